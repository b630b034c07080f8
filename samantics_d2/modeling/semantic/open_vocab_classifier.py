"""Open-vocabulary class probabilities of masks: CLIP mask embeddings against text prototypes,
reference prototypes, or both fused (the Open-Vocabulary SAM recipe, training-free).

:class:`OpenVocabClassifier`: a CLIP
:class:`~samantics_d2.modeling.semantic.clip_recognition.MaskRecognizer` embeds every mask of an
image in one call; the embeddings are scored against **text prototypes** (CLIP's text tower, built
when the config is built: :func:`~samantics_d2.modeling.semantic.load_or_build_text_prototypes`)
and/or **reference prototypes** (embeddings of annotated examples in the same CLIP space), each as
a softmax over the ``K`` classes plus background
(:func:`~samantics_d2.modeling.semantic.clip_recognition.open_vocab_probabilities`). With both, the
two distributions are **fused** (weighted geometric mean,
:func:`~samantics_d2.modeling.semantic.clip_recognition.fuse_class_probabilities`) with a weight of
the text side per class, so classes named by words and classes given by examples mix in one model.
Callers with probabilities from another image encoder (the DINOv2 prototypes of the training-free
pipeline) pass them in to be fused the same way.

:func:`classify_by_probabilities`: the :class:`~.classifier.PrototypeClassifier` stages (per-class
NMS, cap, score floor, soft merge, top K) on masks that come with class probabilities.
"""
from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .classifier import ClassifiedProposals, PrototypeClassifier
from .clip_recognition import MaskRecognizer, fuse_class_probabilities, open_vocab_probabilities
from .text_prototypes import TextPrototypes

__all__ = ["OpenVocabClassifier", "classify_by_probabilities", "probability_rows"]

logger = logging.getLogger(__name__)


class OpenVocabClassifier(nn.Module):
    """Class probabilities ``[N, K + 1]`` (the last column: background) of the masks of images.

    Args:
        recognizer: the CLIP mask recognizer
            (:class:`~samantics_d2.modeling.semantic.clip_recognition.CropRecognizer`: crops through a
            CLIP ViT; :class:`~samantics_d2.modeling.semantic.clip_recognition.DensePoolRecognizer`:
            mask pooling of a convolutional CLIP).
        text_prototypes: the CLIP text prototypes of the ``K`` classes (:class:`TextPrototypes`,
            built with the config from the same CLIP model as the recognizer); their class names are
            the label space.
        class_names: the label space without text prototypes (reference prototypes only).
        reference_prototypes: ``[R, D]`` prototypes of annotated examples in the recognizer's space,
            with ``reference_classes [R]`` (int64, the class of each row; a class may have several
            rows or none).
        best_synonym: a class scores as its best synonym (OVSAM); False: its prototype (the mean
            over synonyms).
        logit_scale: CLIP's logit scale (OpenAI's models and OVSAM: 100).
        background: the background entry of the softmax: None (none), a cosine (float) or a
            ``[D]`` embedding (``open_vocab_probabilities``).
        text_weight: weight of the text distribution in the fusion, one value or one per class
            (``[K]``: e.g. base vs novel classes); classes without examples use 1 (text only).
        chunk_size: full-size masks per recognizer call when a caller gives them in chunks
            (:meth:`embed`; memory bound: ``chunk_size x H x W`` floats).
    """

    def __init__(
        self,
        *,
        recognizer: MaskRecognizer,
        text_prototypes: Optional[TextPrototypes] = None,
        class_names: Optional[Sequence[str]] = None,
        reference_prototypes: Optional[torch.Tensor] = None,
        reference_classes: Optional[torch.Tensor] = None,
        best_synonym: bool = True,
        logit_scale: float = 100.0,
        background: Union[None, float, torch.Tensor] = None,
        text_weight: Union[float, Sequence[float]] = 0.5,
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        if (text_prototypes is None) == (class_names is None):
            raise ValueError("OpenVocabClassifier: give text_prototypes (their classes are the label space) or, with "
                             "reference prototypes only, class_names; not both, not neither.")
        if (reference_prototypes is None) != (reference_classes is None):
            raise ValueError("OpenVocabClassifier: reference_prototypes [R, D] and reference_classes [R] go together.")
        if text_prototypes is None and reference_prototypes is None:
            raise ValueError("OpenVocabClassifier needs text_prototypes, reference_prototypes, or both.")
        self.class_names = list(text_prototypes.class_names if text_prototypes is not None else class_names)
        K = len(self.class_names)
        text = text_classes = None
        if text_prototypes is not None:
            text = text_prototypes.synonym_embeddings if best_synonym else text_prototypes.embeddings
            text_classes = text_prototypes.synonym_class if best_synonym else torch.arange(K)
        if reference_prototypes is not None:
            reference_classes = torch.as_tensor(reference_classes, dtype=torch.long)
            if (reference_prototypes.ndim != 2 or reference_classes.shape != reference_prototypes.shape[:1]
                    or bool(((reference_classes < 0) | (reference_classes >= K)).any())):
                raise ValueError(
                    f"OpenVocabClassifier got reference_prototypes {tuple(reference_prototypes.shape)} and "
                    f"reference_classes {tuple(reference_classes.shape)}; expected [R, D] and [R] ids in [0, {K})."
                )
        weight = torch.as_tensor(text_weight, dtype=torch.float32)
        weight = weight.expand(K).clone() if weight.ndim == 0 else weight
        if weight.shape != (K,) or not bool(((weight >= 0) & (weight <= 1)).all()):
            raise ValueError(f"OpenVocabClassifier got text_weight={text_weight!r}; expected one value in [0, 1] or "
                             f"one per class ({K}).")
        if chunk_size < 1:
            raise ValueError(f"OpenVocabClassifier got chunk_size={chunk_size}; expected >= 1.")
        self.chunk_size = int(chunk_size)
        self.recognizer = recognizer
        self.best_synonym = bool(best_synonym)
        self.logit_scale = float(logit_scale)
        self.background = background
        # non-persistent: built from the vocabulary / examples with the config, never in a checkpoint
        for name, value in (("text_prototypes", text), ("text_classes", text_classes),
                            ("reference_prototypes", reference_prototypes), ("reference_classes", reference_classes)):
            self.register_buffer(name, None if value is None else value.detach().clone(), persistent=False)
        self.register_buffer("text_weight", weight, persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _probabilities(self, embeddings: torch.Tensor, prototypes: torch.Tensor, classes: torch.Tensor,
                       logit_scale: float) -> torch.Tensor:
        return open_vocab_probabilities(embeddings, prototypes, logit_scale=logit_scale, background=self.background,
                                        prototype_classes=classes, num_classes=self.num_classes)

    def probabilities(
        self, embeddings: torch.Tensor, *, image_probabilities: Optional[torch.Tensor] = None,
        has_image_side: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``[N, K + 1]`` class probabilities of ``embeddings [N, D]`` (the recognizer's).

        Args:
            image_probabilities: ``[N, K + 1]`` probabilities from another image-prototype classifier
                (instead of ``reference_prototypes``: e.g. DINOv2's), fused with the text side.
            has_image_side: ``[K]`` bool, the classes ``image_probabilities`` knows (the others: text only).
        """
        text = image = None
        if self.text_prototypes is not None:
            text = self._probabilities(embeddings, self.text_prototypes, self.text_classes, self.logit_scale)
        if image_probabilities is not None:
            if self.reference_prototypes is not None:
                raise ValueError("OpenVocabClassifier has reference_prototypes; give no image_probabilities as well.")
            image = image_probabilities
        elif self.reference_prototypes is not None:
            image = self._probabilities(embeddings, self.reference_prototypes, self.reference_classes, self.logit_scale)
            has_image_side = torch.zeros(self.num_classes, dtype=torch.bool, device=embeddings.device)
            has_image_side[self.reference_classes.to(embeddings.device)] = True
        if image is None or text is None:
            return text if image is None else image
        if has_image_side is None:
            has_image_side = torch.ones(self.num_classes, dtype=torch.bool)
        weight = torch.where(has_image_side.to(self.text_weight.device), self.text_weight,
                             torch.ones_like(self.text_weight))
        return fuse_class_probabilities(text, image, text_weight=weight)

    def embed(self, image: torch.Tensor, masks: Union[torch.Tensor, Iterable[torch.Tensor]]) -> torch.Tensor:
        """``[N, D]`` recognizer embeddings of the masks of one image.

        Args:
            image: uint8 ``[3, H, W]`` RGB.
            masks: bool ``[N, H, W]``, or an iterable of such chunks (e.g. of ``chunk_size`` masks,
                made on demand: only one chunk of full-size masks exists at a time). A recognizer
                with a separate image step (``encode`` / ``embed``: ``DensePoolRecognizer``) encodes
                the image once for all chunks.
        """
        device = self.text_weight.device  # the model's (images come from the data loader, on the CPU)
        image = image[None].to(device)
        chunks = [masks] if isinstance(masks, torch.Tensor) else masks
        encode = getattr(self.recognizer, "encode", None)
        encoded = encode(image) if encode is not None else None
        out = [(self.recognizer(image, [chunk.to(device)]) if encoded is None
                else self.recognizer.embed(*encoded, [chunk.to(device)]))[0] for chunk in chunks]
        return torch.cat(out) if out else torch.zeros((0, self.recognizer.embed_dim), device=device)

    def forward(
        self, images: Sequence[torch.Tensor], masks: Sequence[Union[torch.Tensor, Iterable[torch.Tensor]]], *,
        image_probabilities: Optional[Sequence[torch.Tensor]] = None,
        has_image_side: Optional[torch.Tensor] = None,
    ) -> list[torch.Tensor]:
        """Probabilities of the masks of each image.

        Args:
            images: per image, uint8 ``[3, H_i, W_i]`` RGB.
            masks: per image, bool ``[N_i, H_i, W_i]`` (or chunks of them, :meth:`embed`).
            image_probabilities: per image ``[N_i, K + 1]`` (see :meth:`probabilities`), or None.

        Returns:
            per image ``[N_i, K + 1]`` float32.
        """
        if len(images) != len(masks):
            raise ValueError(f"OpenVocabClassifier got {len(images)} images and {len(masks)} mask sets.")
        out = []
        for i, (image, image_masks) in enumerate(zip(images, masks)):  # one recognizer call per image (sizes differ)
            embeddings = self.embed(image, image_masks)  # [N_i, D]: all masks at once (or chunk by chunk)
            extra = None if image_probabilities is None else image_probabilities[i]
            out.append(self.probabilities(embeddings, image_probabilities=extra, has_image_side=has_image_side))
        return out

    def extra_repr(self) -> str:
        sides = [s for s, m in (("text", self.text_prototypes), ("reference", self.reference_prototypes)) if m is not None]
        return (f"classes={self.num_classes}, prototypes={'+'.join(sides)}, best_synonym={self.best_synonym}, "
                f"logit_scale={self.logit_scale}")


def probability_rows(probabilities: torch.Tensor) -> torch.Tensor:
    """``[P, K + 2]`` unit rows whose cosine with the one-hot vector of class ``k < K`` is ``p_k``.

    ``probabilities [P, K + 1]`` (rows summing to 1, so their L2 norm is at most 1) followed by the
    column ``sqrt(1 - |p|^2)``: each row has norm 1, so its cosine with ``e_k`` is exactly ``p_k``
    and the cosine of two rows is ``p_i . p_j + sqrt(1 - |p_i|^2) sqrt(1 - |p_j|^2)`` (1 for equal
    distributions).
    """
    rest = (1.0 - probabilities.float().pow(2).sum(dim=1, keepdim=True)).clamp_min(0.0).sqrt()
    return torch.cat([probabilities.float(), rest], dim=1)


def classify_by_probabilities(
    classifier: PrototypeClassifier,
    probabilities: torch.Tensor,
    masks: torch.Tensor,
    *,
    iou_pred: Optional[torch.Tensor] = None,
) -> ClassifiedProposals:
    """``classifier``'s stages on proposals that come with class probabilities: label = the most
    probable of the ``K`` classes, score = its probability, then the classifier's per-class NMS,
    cap, score floor, soft merge and top K, unchanged.

    It runs the classifier's pooled form on :func:`probability_rows` (each proposal "pools" its own
    row, one-hot weights; class ``k``'s prototype is ``e_k``): the cosine the classifier computes
    is then exactly the probability, and the soft merge's feature similarity is the rows' cosine.

    Args:
        classifier: the :class:`PrototypeClassifier` of the pipeline (its options apply).
        probabilities: ``[P, K + 1]`` (last column: background, never a label).
        masks: ``[P, Hm, Wm]`` bool low-resolution masks (NMS boxes and merge overlaps).
        iou_pred: ``[P]`` SAM's predicted IoU (for ``nms_rank="predicted_iou"``).

    Returns:
        :class:`ClassifiedProposals` (indices into the ``P`` proposals, scores, classes).
    """
    count, num_classes = probabilities.shape[0], probabilities.shape[1] - 1
    rows = probability_rows(probabilities)  # [P, K + 2]
    one_hot = torch.eye(count, device=rows.device)[:, None, :]  # [P, 1, P]: proposal p pools column p
    prototypes = torch.eye(num_classes, num_classes + 2, device=rows.device)[:, None, :]  # [K, 1, K + 2]
    valid = torch.ones((num_classes, 1), dtype=torch.bool, device=rows.device)
    return classifier(features=rows.T[:, None, :], prototypes=prototypes, prototype_valid=valid, weights=one_hot,
                      masks=masks, iou_pred=iou_pred)
