"""Simulated clicks on every GT segment, answered at every granularity (the click benchmarks' model).

:class:`ClickSegmenter` encodes each image ONCE with a SAM / HQ-SAM / SAM 2 encoder, then, for every
GT segment of the image, simulates the clicks of the protocol (:mod:`samantics_d2.utils.clicks`):

1. the first click: the pixel farthest from the segment and image borders of the GT mask (at the
   original resolution), a positive point, optionally with a +- ``click_box`` px box around it
   (Semantic-SAM gives its click as such a box); the box stays with every later round;
2. :class:`~samantics_d2.modeling.proposals.granularity.MultiGranularityDecoder` answers the click
   set with up to K masks (part to whole) and their predicted IoUs;
3. the prediction of the round is the candidate with the highest predicted IoU (Max); the next
   click goes to the centre of its largest error region against the GT (positive in a false
   negative, negative in a false positive), added to the click set; repeated for ``max_clicks``
   rounds. A segment whose prediction equals its GT gets no more clicks: its later rounds repeat
   the last answer (label -1).

Optionally the first round's candidates are labelled by a training-free model's image prototypes
(``label_model``: a :class:`~.training_free.TrainingFreeSegmenter`, its semantic encoder (once per
image) pooled inside each mask by its classifier's pooling, cosine to its prototypes:
:class:`~samantics_d2.modeling.semantic.labeller.PrototypeLabeller`, as the predictor labels).

Output per image: ``{"clicks": {...}}`` in the format that
:class:`samantics_d2.evaluation.click.ClickEvaluator` reads (its module docstring): per round, the
candidate masks ``[S, K, H, W]`` at the original size, predicted IoUs, labels; the clicks
``[S, R, 2]`` and their labels ``[S, R]``.

Cost: one encoder forward per image; one decoder pass per (segment, round) for the click set (two
when the click has no box and ``box_scales`` are set: MultiGranularityDecoder's token layouts);
candidate masks are resampled once to the original size. Clicks need the previous round's answer,
so rounds are sequential.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from ...d2 import META_ARCH_REGISTRY, BitMasks, configurable
from ...utils.clicks import NO_CLICK, click_points, next_clicks, point_boxes
from ..backbone import EncoderBackbone
from ..preprocess import ImageFit
from ..proposals.prompt_decoder import build_prompt_decoder
from ..proposals.granularity import ClickSet, GranularityMasks, MultiGranularityDecoder
from ..semantic.labeller import PrototypeLabeller, dense_features
from ...yacs_config import check_yacs_config, node_kwargs
from .training_free import TrainingFreeSegmenter, sam_proposer_from_config

__all__ = ["ClickSegmenter", "build_click_segmenter", "fit_to_size"]

logger = logging.getLogger(__name__)


def fit_to_size(fit: ImageFit, size: tuple[int, int]) -> ImageFit:
    """``fit`` of an image resized from ``size = (H, W)``: the same encoder input, read from the
    ``H x W`` image (points, boxes and masks then map to and from ``size`` directly)."""
    (h, w), (H, W) = fit.original_size, size
    sy, sx = fit.scale
    return dataclasses.replace(fit, original_size=(int(H), int(W)), scale=(sy * h / H, sx * w / W))


@META_ARCH_REGISTRY.register()
class ClickSegmenter(nn.Module):
    """Click simulation over GT segments with a multi-granularity SAM decoder (module docstring).

    Input: a list of dataset dicts with ``image`` (uint8 ``[3, h, w]`` RGB, possibly resized),
    ``height``/``width`` (the original size) and ``instances`` with ``gt_masks`` (BitMasks or bool
    ``[S, height, width]``: the segments to click, at the original size; e.g.
    :class:`samantics_d2.data.panoptic.ClickMapper`). Output: per image ``{"clicks": dict}``.
    Inference only.

    Args:
        backbone: the SAM / HQ-SAM / SAM 2 image encoder of ``granularity``'s decoder.
        granularity: the multi-granularity decoder over the encoder's prompt decoder.
        max_clicks: click rounds per segment (1: Max | Oracle of the first click only; 20: NoC).
        click_box: the half side (px) of a box around the first click, given with the click (Semantic-
            SAM: 3); None: the click as a point only.
        keep_all_candidates: keep every candidate of rounds after the first (default: only the Max
            candidate, all that NoC and mIoU@k use; the first round always keeps all).
        label_model: label the first round's candidates with this training-free model's semantic
            encoder and image prototypes (its ``prepare_references`` is run by ours).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: EncoderBackbone,
        granularity: MultiGranularityDecoder,
        max_clicks: int = 1,
        click_box: Optional[float] = None,
        keep_all_candidates: bool = False,
        label_model: Optional[nn.Module] = None,
    ):
        super().__init__()
        if max_clicks < 1 or (click_box is not None and click_box < 0):
            raise ValueError(
                f"ClickSegmenter got max_clicks={max_clicks}, click_box={click_box}; expected max_clicks >= 1 and "
                "click_box None or >= 0 (pixels)."
            )
        if label_model is not None and not all(
            hasattr(label_model, a) for a in ("semantic_encoder", "classifier", "prepare_prototypes")
        ):
            raise TypeError(
                f"ClickSegmenter label_model must be a training-free model (semantic_encoder, classifier, "
                f"prepare_prototypes()); got a {type(label_model).__name__}."
            )
        self.backbone = backbone
        self.granularity = granularity
        self.max_clicks = int(max_clicks)
        self.click_box = None if click_box is None else float(click_box)
        self.keep_all_candidates = bool(keep_all_candidates)
        self.label_model = label_model
        for p in self.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Yacs path (:mod:`samantics_d2.yacs_config`): the SAM of ``MODEL.SAMANTICS.BACKBONE`` and its
        prompt decoder (from the same checkpoint with ``PRETRAINED``) in a ``MultiGranularityDecoder`` of
        ``.CLICK.GRANULARITY``, the options of ``.CLICK``; with ``CLICK.LABELS`` the label model is the
        config's TrainingFreeSegmenter (``.SEMANTIC_ENCODER``, ``.TRAINING_FREE``), whose SAM is this one."""
        check_yacs_config(cfg, cls.__name__)
        opts = cfg.MODEL.SAMANTICS.CLICK
        options = node_kwargs(opts)
        label_model = TrainingFreeSegmenter(cfg) if options.pop("labels") else None
        proposer = label_model.proposer if label_model is not None else sam_proposer_from_config(cfg)
        granularity = MultiGranularityDecoder(decoder=proposer.proposals.decoder, **node_kwargs(opts.GRANULARITY))
        return {**options, "backbone": proposer.backbone, "granularity": granularity, "label_model": label_model}

    def extra_repr(self) -> str:
        return (
            f"max_clicks={self.max_clicks}, click_box={self.click_box}, keep_all_candidates={self.keep_all_candidates}, "
            f"labelled={self.label_model is not None}"
        )

    def prepare_references(self) -> None:
        """The label model's prototypes (after the weights are loaded; train_net calls it)."""
        if self.label_model is not None:
            self.label_model.prepare_references()

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        if self.training:
            raise RuntimeError("ClickSegmenter has nothing to train: use it in eval mode (--eval-only).")
        with torch.no_grad():
            return [{"clicks": self.simulate(x)} for x in batched_inputs]

    # ------------------------------------------------------------------ one image

    def simulate(self, x: dict[str, Any]) -> dict[str, Any]:
        """The click rounds of every GT segment of one input (format: module docstring)."""
        image = x["image"]
        height, width = int(x.get("height", image.shape[-2])), int(x.get("width", image.shape[-1]))
        if "instances" not in x:
            raise ValueError(
                f"ClickSegmenter: input {x.get('file_name', '<no file_name>')!r} has no 'instances' (the GT segments "
                "to click); build the test loader with samantics_d2.data.panoptic.ClickMapper."
            )
        gt_masks = x["instances"].gt_masks
        gt_masks = (gt_masks.tensor if isinstance(gt_masks, BitMasks) else gt_masks).detach().cpu().bool()
        if tuple(gt_masks.shape[-2:]) != (height, width):
            raise ValueError(
                f"ClickSegmenter: GT masks {tuple(gt_masks.shape)} of {x.get('file_name')!r} are not at the original size "
                f"({height}, {width}); the clicks and IoUs are taken there."
            )
        inputs, fits = self.backbone.prepare_with_fits([image])
        features = {name: value[0] for name, value in self.backbone(inputs).items()}
        fit = fit_to_size(fits[0], (height, width))
        prepared = self.granularity.prepare_image(features)
        semantic = self._semantic(image, (height, width)) if self.label_model is not None else None

        S, R = len(gt_masks), self.max_clicks
        points = torch.zeros((S, R, 2), dtype=torch.float32)
        point_labels = torch.full((S, R), NO_CLICK, dtype=torch.int64)
        rounds: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(R)]
        first = click_points(gt_masks)
        for s in range(S):
            points[s, 0], point_labels[s, 0] = first[s], 1
            box = None
            if self.click_box is not None:
                box = fit.boxes_to_input(point_boxes(first[s : s + 1], half_size=self.click_box)[0].to(self.device))
            answer = None
            for r in range(R):
                if r > 0 and point_labels[s, r] == NO_CLICK:  # perfect already: the answer stays
                    rounds[r].append(answer)
                    continue
                given = point_labels[s, : r + 1] != NO_CLICK
                clicks = ClickSet(
                    points=fit.points_to_input(points[s, : r + 1][given].to(self.device)),
                    point_labels=point_labels[s, : r + 1][given].to(self.device),
                    box=box,
                )
                result = self.granularity.decode_prepared(prepared, fit, clicks)
                masks, ious, classes = self._candidates(result, semantic if r == 0 else None, (height, width))
                best = int(ious.argmax())
                keep = slice(None) if r == 0 or self.keep_all_candidates else slice(best, best + 1)
                answer = (masks[keep], ious[keep], classes[keep])
                rounds[r].append(answer)
                if r + 1 < R:
                    nxt, label = next_clicks(masks[best : best + 1], gt_masks[s : s + 1])
                    points[s, r + 1], point_labels[s, r + 1] = nxt[0], label[0]
        stacked = [_pad_and_stack(round_answers, (height, width)) for round_answers in rounds]
        out = {
            "masks": [m for m, _, _ in stacked],
            "pred_ious": [i for _, i, _ in stacked],
            "points": points,
            "point_labels": point_labels,
        }
        if self.label_model is not None:
            out["pred_classes"] = [c for _, _, c in stacked]
        return out

    @property
    def device(self) -> torch.device:
        return self.granularity.decoder.device

    def _semantic(self, image: torch.Tensor, size: tuple[int, int]) -> tuple[PrototypeLabeller, torch.Tensor, ImageFit]:
        """The label model's labeller (its prototypes and its classifier's pooling) and its semantic
        encoder's features ``[C, h, w]`` of ``image``, with their fit to the ``size`` image."""
        labeller = PrototypeLabeller.from_training_free(self.label_model,
                                                        mask_weights=self.label_model.classifier.mask_weights)
        features, fit = dense_features(labeller.encoder, image)
        return labeller, features, fit_to_size(fit, size)

    def _candidates(
        self,
        result: GranularityMasks,
        semantic: Optional[tuple[PrototypeLabeller, torch.Tensor, ImageFit]],
        size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(masks [K, H, W] bool, ious [K], classes [K] int64)`` on the CPU; K >= 1 (no mask: one empty, -inf)."""
        if len(result) == 0:
            return torch.zeros((1, *size), dtype=torch.bool), torch.tensor([-float("inf")]), torch.tensor([-1])
        classes = torch.full((len(result),), -1, dtype=torch.int64)
        if semantic is not None:
            labeller, features, feature_fit = semantic
            classes, _ = labeller.label(result.mask_logits, mask_fit=result.fit, features=features, feature_fit=feature_fit)
            classes = classes.cpu()
        return result.original_masks().cpu(), result.iou_pred.float().cpu(), classes


def build_click_segmenter(
    *,
    backbone: EncoderBackbone,
    decoder_weights: Optional[str] = None,
    decoder_options: Optional[Mapping[str, Any]] = None,
    granularity_options: Optional[Mapping[str, Any]] = None,
    **options: Any,
) -> ClickSegmenter:
    """A :class:`ClickSegmenter` over ``backbone``: its prompt decoder (:func:`build_prompt_decoder` with
    ``decoder_weights``, the backbone's own checkpoint: a weight tag or path; None: random) in a
    :class:`MultiGranularityDecoder` with ``granularity_options``; ``options`` go to ClickSegmenter."""
    decoder = build_prompt_decoder(backbone, weights=decoder_weights, **dict(decoder_options or {}))
    granularity = MultiGranularityDecoder(decoder=decoder, **dict(granularity_options or {}))
    return ClickSegmenter(backbone=backbone, granularity=granularity, **options)


def _pad_and_stack(
    answers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-segment ``(masks [K_s, H, W], ious [K_s], classes [K_s])`` -> ``[S, K, H, W]``, ``[S, K]``,
    ``[S, K]`` with K = max K_s; padding: empty masks, IoU -inf, class -1."""
    K = max((len(i) for _, i, _ in answers), default=1)
    masks = torch.zeros((len(answers), K, *size), dtype=torch.bool)
    ious = torch.full((len(answers), K), -float("inf"))
    classes = torch.full((len(answers), K), -1, dtype=torch.int64)
    for s, (m, i, c) in enumerate(answers):
        masks[s, : len(i)], ious[s, : len(i)], classes[s, : len(i)] = m, i, c
    return masks, ious, classes
