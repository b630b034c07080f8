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
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .classifier import ClassifiedProposals, PrototypeClassifier
from .text_prototypes import TextPrototypes

__all__ = ["OpenVocabClassifier", "classify_by_probabilities", "probability_rows"]

logger = logging.getLogger(__name__)


def _prototype_matrix(value: Union[TextPrototypes, torch.Tensor, None], what: str) -> Optional[torch.Tensor]:
    """``[K, D]`` float32 rows of ``value`` (a :class:`TextPrototypes` or a tensor), or None."""
    if value is None:
        return None
    matrix = value.embeddings if isinstance(value, TextPrototypes) else value
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
        raise ValueError(f"OpenVocabClassifier got {what} of shape {getattr(matrix, 'shape', type(matrix))}; "
                         "expected [K, D] embeddings (or TextPrototypes).")
    return matrix.detach().float()


class OpenVocabClassifier(nn.Module):
    """Class probabilities ``[N, K + 1]`` (the last column: background) of the masks of images.

    Args:
        recognizer: the CLIP mask recognizer (crops through a CLIP ViT, or mask pooling of a
            convolutional CLIP's dense features).
        class_names: the ``K`` output classes.
        text_prototypes: ``[K, D]`` L2-normalised CLIP text prototypes of ``class_names`` (or
            :class:`TextPrototypes`, whose class names must equal them), in the recognizer's space.
        reference_prototypes: ``[K, D]`` prototypes of annotated examples in the recognizer's space;
            a class without examples has an all-zero row (it then gets no probability from them).
        logit_scale: CLIP's logit scale (OpenAI's models: 100).
        background: the background entry of the softmax (see ``open_vocab_probabilities``).
        text_weight: weight of the text distribution in the fusion, one value or one per class
            (``[K]``; e.g. base vs novel classes); classes without reference examples use 1.
    """

    def __init__(
        self,
        *,
        recognizer: nn.Module,
        class_names: Sequence[str],
        text_prototypes: Union[TextPrototypes, torch.Tensor, None] = None,
        reference_prototypes: Optional[torch.Tensor] = None,
        logit_scale: float = 100.0,
        background: Union[float, str, None] = None,
        text_weight: Union[float, Sequence[float]] = 0.5,
    ) -> None:
        super().__init__()
        self.class_names = list(class_names)
        if isinstance(text_prototypes, TextPrototypes) and list(text_prototypes.class_names) != self.class_names:
            raise ValueError(
                f"OpenVocabClassifier: the text prototypes are of classes {text_prototypes.class_names[:5]}... but "
                f"class_names are {self.class_names[:5]}...; build the prototypes from the same vocabulary."
            )
        text = _prototype_matrix(text_prototypes, "text_prototypes")
        reference = _prototype_matrix(reference_prototypes, "reference_prototypes")
        if text is None and reference is None:
            raise ValueError("OpenVocabClassifier needs text_prototypes, reference_prototypes, or both.")
        for name, matrix in (("text_prototypes", text), ("reference_prototypes", reference)):
            if matrix is not None and matrix.shape[0] != len(self.class_names):
                raise ValueError(f"OpenVocabClassifier: {name} has {matrix.shape[0]} rows for "
                                 f"{len(self.class_names)} classes; expected one row per class.")
        weight = torch.as_tensor(text_weight, dtype=torch.float32)
        if weight.ndim == 0:
            weight = weight.expand(len(self.class_names)).clone()
        if weight.shape != (len(self.class_names),) or not bool(((weight >= 0) & (weight <= 1)).all()):
            raise ValueError(f"OpenVocabClassifier got text_weight={text_weight!r}; expected one value in [0, 1] or "
                             f"one per class ({len(self.class_names)}).")
        self.recognizer = recognizer
        self.logit_scale = float(logit_scale)
        self.background = background
        # non-persistent: built from the vocabulary with the config, never part of a checkpoint
        self.register_buffer("text_prototypes", text, persistent=False)
        self.register_buffer("reference_prototypes", reference, persistent=False)
        self.register_buffer("text_weight", weight, persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fusion_weight(self, has_image_side: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[K]`` text weights of the fusion: ``text_weight``, and 1 for classes without an image side
        (``has_image_side [K]`` bool; default: the classes with a nonzero reference prototype)."""
        if has_image_side is None:
            has_image_side = self.reference_prototypes.abs().sum(dim=1) > 0
        return torch.where(has_image_side.to(self.text_weight.device), self.text_weight,
                           torch.ones_like(self.text_weight))

    def probabilities(
        self, embeddings: torch.Tensor, *, image_probabilities: Optional[torch.Tensor] = None,
        has_image_side: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``[N, K + 1]`` class probabilities of ``embeddings [N, D]`` (the recognizer's, normalised).

        Args:
            image_probabilities: ``[N, K + 1]`` probabilities from another image-reference classifier
                (instead of ``reference_prototypes``), fused with the text side.
            has_image_side: ``[K]`` bool, the classes ``image_probabilities`` knows (the others: text only).
        """
        from .clip_recognition import fuse_class_probabilities, open_vocab_probabilities  # (H2's module, landing)

        text = reference = None
        if self.text_prototypes is not None:
            text = open_vocab_probabilities(embeddings, self.text_prototypes, logit_scale=self.logit_scale,
                                            background=self.background)
        if image_probabilities is not None:
            if self.reference_prototypes is not None:
                raise ValueError("OpenVocabClassifier has reference_prototypes; give no image_probabilities as well.")
            reference = image_probabilities
        elif self.reference_prototypes is not None:
            reference = open_vocab_probabilities(embeddings, self.reference_prototypes, logit_scale=self.logit_scale,
                                                 background=self.background)
        if reference is None:
            return text
        if text is None:
            return reference
        return fuse_class_probabilities(text, reference, text_weight=self.fusion_weight(has_image_side))

    def forward(
        self, images: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], *,
        image_probabilities: Optional[Sequence[Optional[torch.Tensor]]] = None,
        has_image_side: Optional[torch.Tensor] = None,
    ) -> list[torch.Tensor]:
        """Probabilities of the masks of each image.

        Args:
            images: per image, uint8 ``[3, H_i, W_i]`` RGB.
            masks: per image, bool ``[N_i, H_i, W_i]``.
            image_probabilities: per image, ``[N_i, K + 1]`` or None (see :meth:`probabilities`).

        Returns:
            per image ``[N_i, K + 1]`` float.
        """
        if len(images) != len(masks):
            raise ValueError(f"OpenVocabClassifier got {len(images)} images and {len(masks)} mask sets.")
        out = []
        for i, (image, image_masks) in enumerate(zip(images, masks)):  # one recognizer call per image (sizes differ)
            if len(image_masks) == 0:
                out.append(torch.zeros((0, self.num_classes + 1), device=image_masks.device))
                continue
            embeddings = self.recognizer(image[None], [image_masks])[0]
            extra = None if image_probabilities is None else image_probabilities[i]
            out.append(self.probabilities(embeddings, image_probabilities=extra, has_image_side=has_image_side))
        return out

    def extra_repr(self) -> str:
        sides = [s for s, m in (("text", self.text_prototypes), ("reference", self.reference_prototypes)) if m is not None]
        return f"classes={self.num_classes}, prototypes={'+'.join(sides)}, logit_scale={self.logit_scale}"


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
