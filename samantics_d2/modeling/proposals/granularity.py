"""One click -> up to K masks at distinct granularities, part to whole (the Semantic-SAM answer).

:class:`MultiGranularityDecoder` (math only, no config, no I/O) takes ONE image's encoder features
(as :meth:`~.prompt_decoder.PromptDecoder.decode` takes them, or their
:meth:`~.prompt_decoder.PromptDecoder.prepare_image` output, cached once per image) and ONE click
set (a :class:`ClickSet`), and returns a :class:`GranularityMasks`::

    granularity = MultiGranularityDecoder(decoder=build_prompt_decoder(backbone), box_scales=(0.25, 0.5))
    image = granularity.prepare_image(features)                     # once per image
    clicks = ClickSet(points=p, point_labels=l)                     # validated here
    result = granularity.decode_prepared(image, fit, clicks)        # per click set
    result = granularity(features, fit, points=p, point_labels=l)   # the same, in one call
    result.mask_logits            # [K, Hm, Wm] low-res logits over the encoder input square
    result.original_masks()       # [K, H, W] bool on the original image

Signature (stable; the click meta-architecture, modeling/meta_arch/click.py, builds on it)::

    MultiGranularityDecoder(*, decoder: PromptDecoder, box_scales: Sequence[float] = (),
        multimask_output: bool = True, box_multimask_output: bool = False, max_masks: int = 6,
        dedup_iou: float = 0.8, min_iou: Optional[float] = None, part_threshold: float = 0.8,
        stability_score_offset: float = 1.0, points_per_batch: int = 64)
    ClickSet(points [N, 2], point_labels [N], box [4] | None = None); .to(device)   (frozen, validated)
    .prepare_image(image_features) -> dict                                  (decoder.prepare_image)
    .candidates(image, fit, clicks: ClickSet) -> (logits [C, Hm, Wm], iou [C], prompt_index [C], mask_index [C])
    .decode_prepared(image, fit, clicks: ClickSet) -> GranularityMasks
    .forward(image_features, fit, *, points, point_labels, box=None) -> GranularityMasks   (builds the ClickSet)
    .describe(mask_logits [K, Hm, Wm], iou_pred [K], fit) -> GranularityMasks   (given masks, unselected)
    GranularityMasks(mask_logits [K, Hm, Wm], iou_pred [K], stability [K], masks [K, H, W], areas [K], part_of [K, K],
        prompt_index [K], mask_index [K], fit); len(), .original_masks(threshold=0.0), .parents()

Candidate prompts (all in the encoder-input pixel frame, ``fit`` maps original pixels there):

- prompt 0: the click set itself (the :class:`ClickSet`'s points, labels and ``box``, if any), with
  ``multimask_output`` (SAM's three masks: whole, part, subpart);
- prompts ``1 .. len(box_scales)``: the same points plus a square box of side
  ``scale * max(image width, image height)`` (the image's extent in the input, ``fit.valid_box``)
  centred on the first positive point (the first point when none is positive), clipped to the
  image, with ``box_multimask_output``; growing scales give growing context. A given ``box`` is
  replaced by these boxes in the extra prompts.

Prompts whose token layouts agree (same number of sparse tokens: all with a box, or all without) and
that use the same multimask flag are embedded and decoded in ONE decoder call; the click alone and
the click with a box have different token counts in SAM's prompt encoder (a padding point without
a box, two corner tokens with one), and padding one to the other's length would change SAM's answer,
so without a given box the candidates take two calls (the click; all its boxes).

Selection, on the low-resolution masks inside the image area (``logit > 0``):

1. empty masks, and masks with predicted IoU ``<= min_iou`` (when set), are dropped;
2. deduplication: candidates in decreasing predicted IoU (ties: prompt order, then mask order);
   a candidate whose mask IoU with an already kept one is ``> dedup_iou`` is dropped (greedy
   mask NMS);
3. the first ``max_masks`` survivors are kept and resampled onto the image
   (:func:`~samantics_d2.modeling.semantic.masks_to_original`); masks empty there are dropped, the
   others sorted by area on the image, small to large (ties: higher predicted IoU first).

Part-of relation: ``part_of[i, j]`` is True when mask ``i`` is part of mask ``j``: ``i != j``, ``i`` is
strictly smaller than ``j`` (in pixels) and at least ``part_threshold`` of ``i``'s pixels lie in
``j`` (``|m_i & m_j| >= part_threshold * |m_i|``), on the image-grid masks. Since the masks are sorted by area, ``part_of`` is
strictly upper triangular; :meth:`GranularityMasks.parents` gives the smallest mask each is part of.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ...utils.checks import raise_if_problems
from ..preprocess import ImageFit
from ..semantic.mask_ops import mask_iou_matrix, mask_overlap_over_area, masks_to_original
from .point_grid import _image_region, stability_score
from .prompt_decoder import PromptDecoder

__all__ = ["ClickSet", "GranularityMasks", "MultiGranularityDecoder", "click_boxes", "greedy_mask_nms", "part_of_matrix"]


@dataclass(frozen=True, eq=False)
class ClickSet:
    """One click set: the prompt :class:`MultiGranularityDecoder` answers, validated once, here.

    Attributes:
        points: ``[N, 2]`` float32 (x, y) in encoder-input pixels (``fit.points_to_input``); ``N``
            may be 0 with a ``box``.
        point_labels: ``[N]`` int64: 1 foreground, 0 background.
        box: ``[4]`` float32 XYXY in encoder-input pixels (``fit.boxes_to_input``), or None.

    Construction converts the dtypes (and a box of 4 values of any shape to ``[4]``), keeps the
    devices, and raises ``ValueError`` naming the received shapes when they do not fit.
    """

    points: torch.Tensor
    point_labels: torch.Tensor
    box: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        points = torch.as_tensor(self.points, dtype=torch.float32)
        point_labels = torch.as_tensor(self.point_labels, dtype=torch.int64)
        if points.ndim != 2 or points.shape[-1] != 2 or tuple(point_labels.shape) != (points.shape[0],):
            raise ValueError(
                f"ClickSet expects points [N, 2] (x, y in input pixels) and point_labels [N]; got "
                f"{tuple(points.shape)} and {tuple(point_labels.shape)}."
            )
        box = self.box
        if box is not None:
            box = torch.as_tensor(box, dtype=torch.float32).reshape(-1)
            if box.numel() != 4:
                raise ValueError(f"ClickSet expects box [4] XYXY in input pixels; got {tuple(box.shape)}.")
        if points.shape[0] == 0 and box is None:
            raise ValueError("ClickSet got no point and no box: give at least one click or a box.")
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "point_labels", point_labels)
        object.__setattr__(self, "box", box)

    def to(self, device: torch.device | str) -> "ClickSet":
        """The same click set with its tensors on ``device`` (values and dtypes kept)."""
        return ClickSet(
            points=self.points.to(device),
            point_labels=self.point_labels.to(device),
            box=self.box.to(device) if self.box is not None else None,
        )


@dataclass
class GranularityMasks:
    """The masks one click set gets, small to large.

    Attributes:
        mask_logits: ``[K, Hm, Wm]`` low-resolution logits covering the whole ``S x S`` encoder
            input (``fit`` maps them to the image); a pixel is in the mask where the logit is > 0.
        iou_pred: ``[K]`` the decoder's predicted IoU.
        stability: ``[K]`` SAM's stability score (at ``stability_score_offset``) on the low-res
            logits inside the image area.
        masks: ``[K, H, W]`` bool masks on the original image grid (the logits resampled once,
            :func:`~samantics_d2.modeling.semantic.masks_to_original`).
        areas: ``[K]`` int64 pixels of ``masks`` (non-decreasing after selection).
        part_of: ``[K, K]`` bool, ``part_of[i, j]``: mask ``i`` is part of mask ``j`` (module
            docstring).
        prompt_index: ``[K]`` int64: the candidate prompt a mask comes from (0: the click set
            itself; ``b >= 1``: the click with the box of ``box_scales[b - 1]``).
        mask_index: ``[K]`` int64: which of that prompt's decoder outputs it is.
        fit: how the image was fitted into the encoder input.
    """

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    stability: torch.Tensor
    masks: torch.Tensor
    areas: torch.Tensor
    part_of: torch.Tensor
    prompt_index: torch.Tensor
    mask_index: torch.Tensor
    fit: ImageFit

    def __len__(self) -> int:
        return int(self.mask_logits.shape[0])

    def __getitem__(self, index: Any) -> "GranularityMasks":
        """The masks selected by ``index`` (a slice or an index tensor); ``part_of`` follows."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "part_of":
                value = value[index][:, index]
            elif isinstance(value, torch.Tensor):
                value = value[index]
            values[f.name] = value
        return GranularityMasks(**values)

    def original_masks(self, *, threshold: float = 0.0) -> torch.Tensor:
        """``[K, H, W]`` bool masks on the original image grid (:attr:`masks` for threshold 0)."""
        if threshold == 0.0:
            return self.masks
        return masks_to_original(self.mask_logits.float(), self.fit, threshold=threshold)

    def parents(self) -> torch.Tensor:
        """``[K]`` int64: the index of the smallest mask each mask is part of, -1 where none."""
        K = len(self)
        if K == 0:
            return torch.zeros(0, dtype=torch.long, device=self.part_of.device)
        # masks are sorted by area: the first True column of a row is the smallest container
        index = torch.arange(K, device=self.part_of.device)
        first = torch.where(self.part_of, index[None, :], torch.full_like(self.part_of, K, dtype=torch.long)).amin(dim=1)
        return torch.where(first < K, first, torch.full_like(first, -1))


def click_boxes(
    points: torch.Tensor, point_labels: torch.Tensor, scales: Sequence[float], valid_box: Sequence[float]
) -> torch.Tensor:
    """``[B, 4]`` XYXY square boxes around the click, one per scale, clipped to ``valid_box``.

    Args:
        points: ``[N, 2]`` (x, y) in input pixels; the box centre is the first positive point
            (label 1), or the first point when none is positive.
        point_labels: ``[N]``.
        scales: ``B`` box sides as shares of ``max(x1 - x0, y1 - y0)`` of ``valid_box``.
        valid_box: ``(x0, y0, x1, y1)``, the part of the input holding the image.
    """
    x0, y0, x1, y1 = (float(v) for v in valid_box)
    positive = torch.nonzero(point_labels == 1)
    centre = points[int(positive[0, 0]) if positive.numel() else 0].float()
    half = torch.tensor([float(s) for s in scales], dtype=torch.float32, device=points.device)[:, None] / 2
    half = half * max(x1 - x0, y1 - y0)
    boxes = torch.cat([centre[None] - half, centre[None] + half], dim=1)
    low = boxes.new_tensor([x0, y0, x0, y0])
    high = boxes.new_tensor([x1, y1, x1, y1])
    return torch.minimum(torch.maximum(boxes, low), high)


def greedy_mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the masks kept by greedy NMS on mask IoU, in decreasing score (ties: index order).

    Args:
        masks: ``[C, h, w]`` bool.
        scores: ``[C]``.
        iou_threshold: a mask whose IoU with a kept one is ``> iou_threshold`` is dropped.

    Returns:
        ``[T]`` int64 indices into ``masks``, best first. (One host-device synchronisation: ``C``
        is a handful of candidates.)
    """
    order = torch.argsort(scores.float(), descending=True, stable=True)
    overlaps = (mask_iou_matrix(masks[order]) > iou_threshold).cpu()
    kept: list[int] = []
    for i in range(order.numel()):
        if not any(bool(overlaps[i, j]) for j in kept):
            kept.append(i)
    return order[torch.as_tensor(kept, dtype=torch.long, device=order.device)]


def part_of_matrix(masks: torch.Tensor, *, threshold: float) -> torch.Tensor:
    """``[K, K]`` bool, ``[i, j]``: mask ``i`` is part of mask ``j`` (``i`` non-empty and strictly
    smaller than ``j``, and ``|m_i & m_j| >= threshold * |m_i|``).

    Args:
        masks: ``[K, h, w]`` bool.
    """
    overlap = mask_overlap_over_area(masks)
    area = masks.flatten(1).sum(dim=1)
    smaller = (area[:, None] < area[None, :]) & (area[:, None] > 0)
    return smaller & (overlap >= threshold)


class MultiGranularityDecoder(nn.Module):
    """Up to ``max_masks`` masks of one click set at distinct granularities (module docstring).

    Args:
        decoder: the prompt decoder of the image's encoder (``build_prompt_decoder(backbone)``).
        box_scales: sides of the extra box prompts around the click, as shares of the image's
            longer side in the input (``()``: the click's own outputs only).
        multimask_output: the click prompt's multimask output (SAM: 3 masks).
        box_multimask_output: the extra box prompts' multimask output (SAM recommends one mask
            for box prompts).
        max_masks: ``K``, masks kept per click.
        dedup_iou: two candidates whose mask IoU is above it are duplicates (the one with the
            higher predicted IoU stays).
        min_iou: candidates whose predicted IoU is ``<= min_iou`` are dropped (None: none).
        part_threshold: share of a mask's pixels that must lie in a larger mask for the part-of
            relation.
        stability_score_offset: the stability score's logit offset (SAM: 1.0).
        points_per_batch: prompts per mask-decoder call (the candidates of a click are a few).
    """

    def __init__(
        self,
        *,
        decoder: PromptDecoder,
        box_scales: Sequence[float] = (),
        multimask_output: bool = True,
        box_multimask_output: bool = False,
        max_masks: int = 6,
        dedup_iou: float = 0.8,
        min_iou: Optional[float] = None,
        part_threshold: float = 0.8,
        stability_score_offset: float = 1.0,
        points_per_batch: int = 64,
    ) -> None:
        super().__init__()
        box_scales = tuple(float(s) for s in box_scales)
        problems = []
        if not isinstance(decoder, PromptDecoder):
            problems.append(f"decoder must be a PromptDecoder (build_prompt_decoder(backbone)); got {type(decoder).__name__}")
        if any(not s > 0 for s in box_scales):
            problems.append(f"box_scales={box_scales} must all be > 0 (shares of the image's longer side)")
        if isinstance(max_masks, bool) or not isinstance(max_masks, int) or max_masks < 1:
            problems.append(f"max_masks={max_masks!r} must be an int >= 1")
        if not 0.0 < dedup_iou <= 1.0:
            problems.append(f"dedup_iou={dedup_iou} must be in (0, 1]")
        if not 0.0 < part_threshold <= 1.0:
            problems.append(f"part_threshold={part_threshold} must be in (0, 1]")
        if stability_score_offset <= 0:
            problems.append(f"stability_score_offset={stability_score_offset} must be > 0")
        if points_per_batch < 1:
            problems.append(f"points_per_batch={points_per_batch} must be >= 1")
        raise_if_problems("MultiGranularityDecoder", problems)
        self.decoder = decoder
        self.box_scales = box_scales
        self.multimask_output = bool(multimask_output)
        self.box_multimask_output = bool(box_multimask_output)
        self.max_masks = max_masks
        self.dedup_iou = float(dedup_iou)
        self.min_iou = min_iou
        self.part_threshold = float(part_threshold)
        self.stability_score_offset = float(stability_score_offset)
        self.points_per_batch = points_per_batch

    @property
    def num_prompts(self) -> int:
        """Candidate prompts per click set: the click and one per box scale."""
        return 1 + len(self.box_scales)

    def prepare_image(self, image_features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decoder's per-image inputs (compute once per image, reuse for every click)."""
        return self.decoder.prepare_image(image_features)

    def forward(
        self,
        image_features: Mapping[str, torch.Tensor],
        fit: ImageFit,
        *,
        points: torch.Tensor,
        point_labels: torch.Tensor,
        box: Optional[torch.Tensor] = None,
    ) -> GranularityMasks:
        """:meth:`decode_prepared` on the backbone outputs of one image (``{name: [C, h, w]}``), the
        click set given as keywords (``points [N, 2]``, ``point_labels [N]``, ``box [4]`` or None, in
        input pixels: :class:`ClickSet`)."""
        clicks = ClickSet(points=points, point_labels=point_labels, box=box)
        return self.decode_prepared(self.prepare_image(image_features), fit, clicks)

    def candidates(
        self, image: Mapping[str, torch.Tensor], fit: ImageFit, clicks: ClickSet
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every candidate mask of ``clicks``, unselected: ``(logits [C, Hm, Wm], iou [C], prompt_index [C],
        mask_index [C])``."""
        if not isinstance(clicks, ClickSet):
            raise TypeError(f"MultiGranularityDecoder takes a ClickSet(points=..., point_labels=..., box=...); "
                            f"got {type(clicks).__name__}.")
        device = self.decoder.device
        clicks = clicks.to(device)
        points, point_labels, box = clicks.points, clicks.point_labels, clicks.box
        groups = [(box[None] if box is not None else None, self.multimask_output, [0])]
        if self.box_scales:
            if points.shape[0] == 0:
                raise ValueError("MultiGranularityDecoder: box_scales need a click to centre the boxes on; got none.")
            extra = click_boxes(points, point_labels, self.box_scales, fit.valid_box)
            prompts = list(range(1, self.num_prompts))
            first_has_box, first_multimask, _ = groups[0]
            if first_has_box is not None and first_multimask == self.box_multimask_output:
                groups = [(torch.cat([first_has_box, extra]), first_multimask, [0, *prompts])]  # one call
            else:
                groups.append((extra, self.box_multimask_output, prompts))
        logits, ious, prompt_index, mask_index = [], [], [], []
        for boxes, multimask, indices in groups:
            count = len(indices)
            has_points = points.shape[0] > 0
            sparse, dense = self.decoder.embed_prompts(
                points=points[None].expand(count, -1, -1) if has_points else None,
                point_labels=point_labels[None].expand(count, -1) if has_points else None,
                boxes=boxes,
            )
            group_logits, group_iou = self.decoder.decode_embeddings(
                image, sparse, dense, multimask_output=multimask, points_per_batch=self.points_per_batch
            )
            M = group_logits.shape[1]
            logits.append(group_logits.flatten(0, 1))
            ious.append(group_iou.flatten())
            prompt_index.append(torch.as_tensor(indices, device=device).repeat_interleave(M))
            mask_index.append(torch.arange(M, device=device).repeat(count))
        return torch.cat(logits), torch.cat(ious), torch.cat(prompt_index), torch.cat(mask_index)

    def decode_prepared(self, image: Mapping[str, torch.Tensor], fit: ImageFit, clicks: ClickSet) -> GranularityMasks:
        """The masks of one click set.

        Args:
            image: :meth:`prepare_image` of the image.
            fit: the image's :class:`ImageFit` (``backbone.prepare_with_fits``): the image area.
            clicks: the :class:`ClickSet` (points, labels, optional box in encoder-input pixels).

        Returns:
            :class:`GranularityMasks`, at most ``max_masks``, small to large.
        """
        logits, iou, prompt_index, mask_index = self.candidates(image, fit, clicks)
        region = _image_region(fit, tuple(logits.shape[-2:]))
        in_image = logits[(slice(None), *region)]
        masks = in_image > 0
        keep = masks.flatten(1).any(dim=1)
        if self.min_iou is not None:
            keep &= iou > self.min_iou
        index = torch.nonzero(keep).squeeze(1)
        index = index[greedy_mask_nms(masks[index], iou[index], self.dedup_iou)][: self.max_masks]
        original = masks_to_original(logits[index].float(), fit)  # the few kept masks only
        areas = original.flatten(1).sum(dim=1)
        # small to large on the image; ties: higher predicted IoU first (index is in decreasing predicted
        # IoU); masks empty on the image grid (a few positive low-res pixels between samples) are dropped
        order = torch.argsort(areas, stable=True)
        order = order[areas[order] > 0]
        index = index[order]
        return self.describe(logits[index], iou[index], fit, prompt_index=prompt_index[index],
                             mask_index=mask_index[index], masks=original[order])

    def describe(
        self,
        mask_logits: torch.Tensor,
        iou_pred: torch.Tensor,
        fit: ImageFit,
        *,
        prompt_index: Optional[torch.Tensor] = None,
        mask_index: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
    ) -> GranularityMasks:
        """:class:`GranularityMasks` of given masks, in the given order, unselected: their masks on the
        image, stability, areas and part-of relation (``mask_logits [K, Hm, Wm]``, ``iou_pred [K]``;
        indices default to prompt 0, masks ``0 .. K - 1``; ``masks``: their ``masks_to_original``
        when already computed)."""
        region = _image_region(fit, tuple(mask_logits.shape[-2:]))
        in_image = mask_logits[(slice(None), *region)]
        if masks is None:
            masks = masks_to_original(mask_logits.float(), fit)
        K, device = mask_logits.shape[0], mask_logits.device
        return GranularityMasks(
            mask_logits=mask_logits,
            iou_pred=iou_pred,
            stability=stability_score(in_image, offset=self.stability_score_offset),
            masks=masks,
            areas=masks.flatten(1).sum(dim=1),
            part_of=part_of_matrix(masks, threshold=self.part_threshold),
            prompt_index=prompt_index if prompt_index is not None else torch.zeros(K, dtype=torch.long, device=device),
            mask_index=mask_index if mask_index is not None else torch.arange(K, device=device),
            fit=fit,
        )

    def extra_repr(self) -> str:
        return (
            f"box_scales={self.box_scales}, multimask_output={self.multimask_output}, "
            f"box_multimask_output={self.box_multimask_output}, max_masks={self.max_masks}, dedup_iou={self.dedup_iou}, "
            f"min_iou={self.min_iou}, part_threshold={self.part_threshold}"
        )
