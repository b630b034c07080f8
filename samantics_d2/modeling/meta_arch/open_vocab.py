"""Prompted open-vocabulary recognition: the Open-Vocabulary SAM system, training-free.

:class:`OpenVocabPromptedSegmenter`: SAM / HQ-SAM / SAM 2 prompted with boxes or points (all prompts
of an image in one prompt-decoder call), each mask labelled by an
:class:`~samantics_d2.modeling.semantic.OpenVocabClassifier` (CLIP mask embeddings against text
prototypes, reference prototypes, or both fused). Its input and output are those of
:class:`~samantics_d2.evaluation.PromptedRecognitionEvaluator` (OVSAM's protocol); docs/open_vocabulary.md
shows the use. The vocabulary and its text prototypes come built with the config; nothing is looked
up or cached in ``forward``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ...d2 import META_ARCH_REGISTRY, Boxes, Instances, configurable
from ...yacs_config import check_yacs_config, dataset_classes, node_kwargs, registry_choice
from ..backbone import build_encoder
from ..preprocess import ImageFit
from ..semantic.clip_recognition import MASK_RECOGNIZER_REGISTRY
from ..semantic.mask_ops import masks_to_boxes
from ..semantic.open_vocab_classifier import OpenVocabClassifier
from ..semantic.text_prototypes import build_clip_text_encoder, load_or_build_text_prototypes
from .click import fit_to_size  # the same encoder input read from the original-size image
from .training_free import SamProposer, sam_proposer_from_config

__all__ = ["MASK_RECOGNIZER_REGISTRY", "OpenVocabPromptedSegmenter", "fit_to_size"]

logger = logging.getLogger(__name__)

_PROMPT_KEYS = ("boxes", "points")


def _mask_chunks(logits: torch.Tensor, fit: ImageFit, chunk: int):
    """``[N, h, w]`` bool masks of ``logits [N, Hm, Wm]`` on ``fit``'s image, ``chunk`` at a time, made
    as they are consumed."""
    return (fit.mask_to_original(part.float()) > 0 for part in logits.split(chunk))


@META_ARCH_REGISTRY.register()
class OpenVocabPromptedSegmenter(nn.Module):
    """Prompted recognition: SAM's mask for each box or point prompt, with a label and a score.

    Input (per image, :class:`~samantics_d2.data.prompted.PromptedRecognitionMapper`): ``image``
    (uint8 ``[3, h, w]`` RGB, the image SAM sees, e.g. resized to long side 1024), ``height`` /
    ``width`` (the original size, default ``h`` / ``w``), and ``prompts``: ``{"boxes": [N, 4] XYXY}``
    or ``{"points": [N, 2] (x, y)}`` in ``image``'s pixels (points: pixel indices, one foreground
    click each).

    Output (per image): ``{"instances": Instances((height, width))}``, one row per prompt in input
    order: ``pred_masks`` bool ``[N, height, width]``, ``pred_boxes`` (of the masks), ``pred_classes``
    int64 ``[N]`` (``K`` = background, only with ``predict_background``), ``scores`` ``[N]`` (the
    label's probability), ``mask_scores`` ``[N]`` (SAM's predicted IoU), and the prompts echoed as
    ``prompt_boxes`` / ``prompt_points`` (as given).

    Args:
        proposer: the SAM image encoder and its prompt decoder (:func:`build_sam_proposer`; its point
            grid is not used: the prompts come with the input).
        classifier: the open-vocabulary classifier (:class:`OpenVocabClassifier`).
        point_multimask_output: a point prompt takes the best of SAM's three masks by predicted IoU
            (SAM's advice for one ambiguous click); False: the single-mask output.
        box_multimask_output: the same for box prompts (default False, SAM's single mask for boxes).
        predict_background: the label may be background (id ``K``); False (OVSAM): the best of the
            ``K`` classes, as OVSAM drops the background column before its argmax.
        points_per_batch: prompts per mask-decoder call (memory bound).
    """

    @configurable
    def __init__(
        self,
        *,
        proposer: SamProposer,
        classifier: OpenVocabClassifier,
        point_multimask_output: bool = True,
        box_multimask_output: bool = False,
        predict_background: bool = False,
        points_per_batch: int = 256,
    ) -> None:
        super().__init__()
        self.proposer = proposer
        self.classifier = classifier
        self.point_multimask_output = bool(point_multimask_output)
        self.box_multimask_output = bool(box_multimask_output)
        self.predict_background = bool(predict_background)
        if points_per_batch < 1:
            raise ValueError(f"OpenVocabPromptedSegmenter got points_per_batch={points_per_batch}; expected >= 1.")
        self.points_per_batch = int(points_per_batch)
        for p in self.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Yacs path (:mod:`samantics_d2.yacs_config`): the SAM of ``MODEL.SAMANTICS.BACKBONE`` and its
        prompt decoder; ``.OPEN_VOCAB``'s options, its recognizer (``RECOGNIZER.NAME`` over the CLIP image
        tower of ``CLIP``) and the text prototypes of ``DATASETS.TEST[0]``'s ``thing_classes`` from the text
        tower of the same CLIP checkpoint (``TEXT_PROTOTYPES``: built, or read from the cache, here)."""
        check_yacs_config(cfg, cls.__name__)
        opts = cfg.MODEL.SAMANTICS.OPEN_VOCAB
        class_names = dataset_classes(cfg, key="thing_classes", splits=("TEST",))
        if class_names is None:
            raise ValueError("OpenVocabPromptedSegmenter labels with the classes of DATASETS.TEST[0], which is empty: set "
                             "DATASETS.TEST to the dataset to evaluate (its thing_classes are the vocabulary).")
        clip = node_kwargs(opts.CLIP)
        recognizer_cls, recognizer_options = registry_choice(opts.RECOGNIZER, MASK_RECOGNIZER_REGISTRY,
                                                             "MODEL.SAMANTICS.OPEN_VOCAB.RECOGNIZER")
        text_encoder = build_clip_text_encoder(clip["tag"], size=clip["size"], weights=clip["weights"],
                                               pretrained=clip["pretrained"])
        classifier = OpenVocabClassifier(
            recognizer=recognizer_cls(clip=build_encoder(**clip), **recognizer_options),
            text_prototypes=load_or_build_text_prototypes(text_encoder, class_names, **node_kwargs(opts.TEXT_PROTOTYPES)),
            **node_kwargs(opts.CLASSIFIER),
        )
        return {**node_kwargs(opts), "proposer": sam_proposer_from_config(cfg), "classifier": classifier}

    def class_names(self) -> list[str]:
        """The output label space."""
        return list(self.classifier.class_names)

    def _decode(self, features: dict, fit: ImageFit, prompts: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Best mask logits ``[N, Hm, Wm]`` and predicted IoU ``[N]`` of all prompts of one image, one call."""
        decoder = self.proposer.proposals.decoder
        given = [k for k in _PROMPT_KEYS if k in prompts]
        if len(given) != 1:
            raise ValueError(f"OpenVocabPromptedSegmenter: 'prompts' must hold exactly one of {_PROMPT_KEYS}; got "
                             f"{sorted(prompts)}. Build the loader with PromptedRecognitionMapper.")
        device = decoder.device
        if given[0] == "boxes":
            boxes = prompts["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4)
            logits, iou = decoder.decode(features, boxes=fit.boxes_to_input(boxes), multimask_output=self.box_multimask_output,
                                         points_per_batch=self.points_per_batch, best_only=True)
        else:
            points = prompts["points"].to(device=device, dtype=torch.float32).reshape(-1, 2)
            labels = torch.ones(points.shape[0], 1, dtype=torch.int64, device=device)
            logits, iou = decoder.decode(features, points=fit.points_to_input(points)[:, None], point_labels=labels,
                                         multimask_output=self.point_multimask_output,
                                         points_per_batch=self.points_per_batch, best_only=True)
        return logits[:, 0], iou[:, 0]

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        if self.training:
            raise RuntimeError("OpenVocabPromptedSegmenter has nothing to train: use it in eval mode (--eval-only).")
        for x in batched_inputs:
            if "prompts" not in x:
                raise ValueError(f"OpenVocabPromptedSegmenter: input {x.get('file_name', '<no file_name>')!r} has no "
                                 "'prompts'; build the loader with PromptedRecognitionMapper(prompt='box' or 'point').")
        backbone = self.proposer.backbone
        images = [x["image"] for x in batched_inputs]
        pixels, fits = backbone.prepare_with_fits(images)
        features = backbone(pixels)  # one encoder forward for the batch
        seen_masks, logits_per_image, iou_per_image = [], [], []
        chunk = self.classifier.chunk_size
        for i, (x, fit) in enumerate(zip(batched_inputs, fits)):
            logits, iou = self._decode({k: v[i] for k, v in features.items()}, fit, x["prompts"])
            logits_per_image.append(logits)
            iou_per_image.append(iou)
            seen_masks.append(_mask_chunks(logits, fit, chunk))
        probabilities = self.classifier(images, seen_masks)
        results = []
        for x, fit, logits, iou, probs in zip(batched_inputs, fits, logits_per_image, iou_per_image, probabilities):
            height, width = int(x.get("height", fit.original_size[0])), int(x.get("width", fit.original_size[1]))
            results.append({"instances": self._instances(x["prompts"], fit_to_size(fit, (height, width)), logits, iou,
                                                         probs)})
        return results

    def _instances(self, prompts: dict, fit: ImageFit, logits: torch.Tensor, iou: torch.Tensor,
                   probs: torch.Tensor) -> Instances:
        num_classes = self.classifier.num_classes
        candidates = probs if self.predict_background else probs[:, :num_classes]
        scores, classes = candidates.max(dim=1) if len(probs) else (probs.new_zeros(0), probs.new_zeros(0, dtype=torch.long))
        masks = fit.mask_to_original(logits.float()) > 0 if len(logits) else logits.new_zeros((0, *fit.original_size),
                                                                                              dtype=torch.bool)
        result = Instances(fit.original_size)
        result.pred_masks = masks
        result.pred_boxes = Boxes(masks_to_boxes(masks))
        result.pred_classes = classes.long()
        result.scores = scores.float()
        result.mask_scores = iou.float()
        for key in _PROMPT_KEYS:
            if key in prompts:
                setattr(result, f"prompt_{key}", prompts[key].to(masks.device).float())
        return result
