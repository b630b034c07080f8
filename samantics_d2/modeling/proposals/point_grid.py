"""Class-agnostic mask proposals: SAM prompted with a regular point grid (or with boxes).

Two point layouts (``PointGridProposals(point_layout=...)``):

- ``"input_linspace"`` ("No Time to Train", ``Sam2MatchingBaselineNoAMG._forward_sam``):
  ``linspace(0, S - 1, n) + 0.5`` on each axis of the part of the encoder input that holds the
  image (the whole ``S x S`` square when the image is stretched to it, as theirs is: ``0.5 + 33 i``
  for ``S = 1024, n = 32``), x varying SLOWEST (``torch.meshgrid`` in "ij" order over (x, y));
- ``"cell_centres"`` (``SamAutomaticMaskGenerator``'s ``build_point_grid``): the centres of an
  ``n x n`` cell grid over the ORIGINAL image, point ``(i, j)`` at ``((j + 0.5) / n * W,
  (i + 0.5) / n * H)``, x varying fastest, mapped into the encoder input with the image's
  :class:`~samantics_d2.modeling.preprocess.ImageFit` (``16 + 32 i`` for a 1024 px image, n = 32).
 All prompts of the image go through the mask
decoder in chunks (one call per chunk, see :mod:`.prompt_decoder`); each prompt keeps its best mask
by predicted IoU; filtering happens once, after the last chunk (the masks of prompts below
``pred_iou_thresh`` are not even computed: the decoder knows their predicted IoU first). Masks stay low-resolution logits
in the encoder-input frame (``MaskProposals.original_masks`` resamples the ones that survive).

Defaults follow "No Time to Train" (SAM 2 Hiera-L, 32x32 single-point prompts, best of 3 masks by
predicted IoU, keep predicted IoU > 0.4).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...utils.checks import raise_if_problems
from ..preprocess import ImageFit
from ..semantic.mask_ops import mask_pooling, remove_small_regions
from .prompt_decoder import PromptDecoder

__all__ = [
    "MASK_EMBEDDINGS",
    "MaskProposals",
    "POINT_LAYOUTS",
    "PointGridProposals",
    "input_linspace_grid",
    "mask_logits_to_boxes",
    "point_grid",
    "stability_score",
]

POINT_LAYOUTS = ("input_linspace", "cell_centres")
#: per-proposal SAM embeddings :class:`PointGridProposals` can return (``mask_embeddings=``)
MASK_EMBEDDINGS = ("mask_token", "image_pooled")


@dataclass
class MaskProposals:
    """Candidate masks of one image.

    Attributes:
        mask_logits: ``[P, Hm, Wm]`` low-resolution logits covering the whole ``S x S`` encoder
            input (``fit`` maps them to the image); a pixel is in the mask where the logit is > 0.
        iou_pred: ``[P]`` SAM's predicted IoU.
        stability: ``[P]`` SAM's stability score (IoU of the masks at logit thresholds +-offset),
            on the low-resolution logits inside the image area.
        points: ``[P, 2]`` (x, y) of the prompt in original-image pixels (box centres for box prompts).
        fit: how the image was fitted into the encoder input.
        prompt_boxes: ``[P, 4]`` XYXY original-image box prompts (box mode), None for point prompts.
        mask_tokens: ``[P, C]`` SAM's mask embedding of each proposal: the two-way transformer's
            output of the mask token that made the mask, from the decoder call that made it
            (``mask_embeddings`` with ``"mask_token"``; else None).
        image_pooled: ``[P, C]`` SAM's image embedding (the decoder's input) averaged under each
            mask on the embedding grid (``mask_embeddings`` with ``"image_pooled"``; else None).
    """

    mask_logits: torch.Tensor
    iou_pred: torch.Tensor
    stability: torch.Tensor
    points: torch.Tensor
    fit: ImageFit
    prompt_boxes: Optional[torch.Tensor] = None
    mask_tokens: Optional[torch.Tensor] = None
    image_pooled: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.mask_logits.shape[0])

    def __getitem__(self, index: Any) -> "MaskProposals":
        """The proposals selected by ``index`` (a slice, an index tensor or a bool mask ``[P]``)."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            values[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        return MaskProposals(**values)

    def original_masks(self, *, threshold: float = 0.0) -> torch.Tensor:
        """``[P, H, W]`` bool masks on the original image grid (logits resampled, then ``> threshold``)."""
        return self.fit.mask_to_original(self.mask_logits.float()) > threshold


def point_grid(
    points_per_side: int,
    image_size: tuple[int, int],
    *,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """``[n * n, 2]`` float32 (x, y) points covering an ``(H, W)`` image, x varying fastest.

    Point ``(i, j)`` is at ``((j + 0.5) / n * W, (i + 0.5) / n * H)``, the grid of
    ``segment_anything.utils.amg.build_point_grid`` scaled to the image.
    """
    if points_per_side < 1:
        raise ValueError(f"points_per_side={points_per_side} must be >= 1.")
    height, width = image_size
    steps = (torch.arange(points_per_side, dtype=torch.float64, device=device) + 0.5) / points_per_side
    ys, xs = torch.meshgrid(steps * height, steps * width, indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(-1, 2).float()


def input_linspace_grid(
    points_per_side: int,
    valid_box: tuple[float, float, float, float],
    *,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """``[n * n, 2]`` float32 (x, y) points in ENCODER-INPUT pixels, "No Time to Train"'s grid.

    On each axis ``x0 + 0.5 + k * (x1 - x0 - 1) / (n - 1)``, ``k = 0 .. n - 1`` (``linspace(0, S - 1,
    n) + 0.5`` over a box of side ``S``), inside ``valid_box = (x0, y0, x1, y1)``, the part of the
    input holding the image; point ``i * n + j`` is ``(x_i, y_j)``: x varies slowest.
    """
    if points_per_side < 1:
        raise ValueError(f"points_per_side={points_per_side} must be >= 1.")
    x0, y0, x1, y1 = (float(v) for v in valid_box)
    steps = torch.linspace(0.0, 1.0, points_per_side, dtype=torch.float64, device=device)
    xs = x0 + 0.5 + steps * (x1 - x0 - 1)
    ys = y0 + 0.5 + steps * (y1 - y0 - 1)
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")  # [i, j] = (x_i, y_j)
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2).float()


def stability_score(mask_logits: torch.Tensor, *, mask_threshold: float = 0.0, offset: float = 1.0) -> torch.Tensor:
    """SAM's stability score: IoU of the masks ``logits > t + offset`` and ``logits > t - offset``.

    Args:
        mask_logits: ``[P, h, w]``.

    Returns:
        ``[P]`` float32 in [0, 1]; 0 for a mask that is empty even at the low threshold.
    """
    flat = mask_logits.flatten(1)
    intersections = (flat > mask_threshold + offset).sum(1, dtype=torch.int32)
    unions = (flat > mask_threshold - offset).sum(1, dtype=torch.int32)
    scores = intersections.float() / unions.clamp(min=1).float()
    return torch.where(unions > 0, scores, torch.zeros_like(scores))


def mask_logits_to_boxes(mask_logits: torch.Tensor, *, threshold: float = 0.0) -> torch.Tensor:
    """Tight XYXY boxes of ``mask_logits > threshold`` in the logits' pixel grid (vectorised).

    Args:
        mask_logits: ``[P, h, w]``.

    Returns:
        ``[P, 4]`` float32 ``(x0, y0, x1, y1)`` with exclusive ``x1, y1`` (pixel edges); zeros for
        empty masks.
    """
    masks = mask_logits > threshold
    count, h, w = masks.shape
    cols = masks.any(dim=1)  # [P, w]
    rows = masks.any(dim=2)  # [P, h]
    x_index = torch.arange(w, device=masks.device)
    y_index = torch.arange(h, device=masks.device)
    x0 = torch.where(cols, x_index, w).amin(dim=1)
    x1 = torch.where(cols, x_index + 1, 0).amax(dim=1)
    y0 = torch.where(rows, y_index, h).amin(dim=1)
    y1 = torch.where(rows, y_index + 1, 0).amax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return torch.where(cols.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def _image_region(fit: ImageFit, mask_size: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of a low-res mask grid covering the input square that hold image content."""
    x0, y0, x1, y1 = fit.valid_box
    (s_h, s_w), (m_h, m_w) = fit.input_size, mask_size
    rows = slice(int(y0 * m_h // s_h), -(-y1 * m_h // s_h))  # floor, ceil
    cols = slice(int(x0 * m_w // s_w), -(-x1 * m_w // s_w))
    return rows, cols


class PointGridProposals(nn.Module):
    """SAM / HQ-SAM / SAM 2 mask proposals from a point grid (or from boxes) for one image.

    Args:
        decoder: a :class:`~.prompt_decoder.PromptDecoder` matching the backbone whose features
            :meth:`forward` receives (``build_prompt_decoder(backbone)``).
        points_per_side: ``n``: ``n x n`` single-point prompts over the original image.
        point_layout: where the points are and in which order (:data:`POINT_LAYOUTS`, module
            docstring): ``"input_linspace"`` ("No Time to Train") or ``"cell_centres"`` (SAM's
            automatic mask generator).
        points_per_batch: prompts per mask-decoder call (memory bound).
        multimask_output: SAM's three masks per point prompt, the best by predicted IoU is kept
            (False: SAM's single-mask output).
        box_multimask_output: the same for box prompts (default False, as SAM recommends for boxes).
        pred_iou_thresh: keep proposals whose predicted IoU is ``> pred_iou_thresh`` (None: all).
        stability_score_thresh: keep proposals whose stability is ``>= stability_score_thresh``
            (None: all). The score is SAM's, at ``stability_score_offset``, computed on the
            low-resolution logits inside the image area (not upsampled to full size).
        stability_score_offset: logit offset of the stability score (SAM: 1.0).
        box_nms_thresh: class-agnostic NMS at this box IoU on the boxes of the low-resolution
            masks, in decreasing predicted IoU (None: no NMS).
        min_region_area: SAM's ``min_mask_region_area``, in original-image pixels: holes and
            islands smaller than this are filled and removed in every kept proposal (all masks at
            once on the low-resolution grid, :func:`~samantics_d2.modeling.semantic.remove_small_regions`),
            before the box NMS. Removed pixels get logit -10, filled ones +10. 0: off.
        max_proposals: keep at most this many, highest predicted IoU first (None: all).
        mask_embeddings: SAM embeddings returned with every proposal (:data:`MASK_EMBEDDINGS`):
            ``"mask_token"`` (the decoder's mask token output, from the same batched decoder
            call) and/or ``"image_pooled"`` (SAM's image embedding averaged under the mask);
            empty (default): none, the proposals are as without the option.

    Point-grid proposals whose mask is empty inside the image are always dropped; the others are
    returned in decreasing predicted IoU (ties: grid order).
    """

    def __init__(
        self,
        *,
        decoder: PromptDecoder,
        points_per_side: int = 32,
        point_layout: str = "cell_centres",
        points_per_batch: int = 256,
        multimask_output: bool = True,
        box_multimask_output: bool = False,
        pred_iou_thresh: Optional[float] = 0.4,
        stability_score_thresh: Optional[float] = None,
        stability_score_offset: float = 1.0,
        box_nms_thresh: Optional[float] = None,
        max_proposals: Optional[int] = None,
        min_region_area: float = 0.0,
        mask_embeddings: Sequence[str] = (),
    ) -> None:
        super().__init__()
        problems = []
        unknown = [name for name in mask_embeddings if name not in MASK_EMBEDDINGS]
        if unknown or isinstance(mask_embeddings, str):
            problems.append(f"mask_embeddings={mask_embeddings!r} must be a sequence of names from {MASK_EMBEDDINGS}")
        if not isinstance(decoder, PromptDecoder):
            problems.append(f"decoder must be a PromptDecoder (build_prompt_decoder(backbone)); got {type(decoder).__name__}")
        if points_per_side < 1:
            problems.append(f"points_per_side={points_per_side} must be >= 1")
        if point_layout not in POINT_LAYOUTS:
            problems.append(f"point_layout={point_layout!r} must be one of {POINT_LAYOUTS}")
        if points_per_batch < 1:
            problems.append(f"points_per_batch={points_per_batch} must be >= 1")
        if box_nms_thresh is not None and not 0.0 < box_nms_thresh <= 1.0:
            problems.append(f"box_nms_thresh={box_nms_thresh} must be in (0, 1] or None")
        if max_proposals is not None and max_proposals < 1:
            problems.append(f"max_proposals={max_proposals} must be >= 1 or None")
        if min_region_area < 0:
            problems.append(f"min_region_area={min_region_area} must be >= 0 (0: off)")
        if stability_score_offset <= 0:
            problems.append(f"stability_score_offset={stability_score_offset} must be > 0")
        raise_if_problems("PointGridProposals", problems)
        self.decoder = decoder
        self.points_per_side = points_per_side
        self.point_layout = point_layout
        self.points_per_batch = points_per_batch
        self.multimask_output = multimask_output
        self.box_multimask_output = box_multimask_output
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.max_proposals = max_proposals
        self.min_region_area = float(min_region_area)
        self.mask_embeddings = tuple(mask_embeddings)

    def _decode(
        self, image_features, fit: ImageFit, *, mask_iou_floor: Optional[float] = None, multimask_output: bool, **prompts
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple, dict]:
        """Best mask per prompt: ``(logits [P, Hm, Wm], iou [P], stability [P], image region, embeddings)``;
        masks of predicted IoU ``<= mask_iou_floor`` are ``-inf`` (not computed, see ``PromptDecoder.decode``);
        ``embeddings``: the :class:`MaskProposals` fields of ``mask_embeddings``, ``[P, C]`` each."""
        image = self.decoder.prepare_image(image_features)  # what decoder.decode does, with the image kept
        sparse, dense = self.decoder.embed_prompts(**prompts)
        logits, iou, *tokens = self.decoder.decode_embeddings(
            image, sparse, dense, multimask_output=multimask_output, points_per_batch=self.points_per_batch,
            best_only=True, mask_iou_floor=mask_iou_floor, return_mask_tokens="mask_token" in self.mask_embeddings,
        )
        logits, iou = logits[:, 0], iou[:, 0]
        region = _image_region(fit, tuple(logits.shape[-2:]))
        stability = stability_score(logits[(slice(None), *region)], offset=self.stability_score_offset)
        embeddings = {"mask_tokens": tokens[0][:, 0]} if tokens else {}
        if "image_pooled" in self.mask_embeddings:
            embeddings["image_pooled"] = image["embedding"][0]  # [C, h, w], pooled once the proposals are kept
        return logits, iou, stability, region, embeddings

    @staticmethod
    def _image_pooled(embedding: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """``embedding [C, h, w]`` averaged under ``mask_logits [P, Hm, Wm] > 0`` (the share of each
        embedding cell the mask covers as its weight; ``Hm`` a multiple of ``h``) -> ``[P, C]`` float32
        (zeros for empty masks)."""
        if mask_logits.shape[0] == 0:
            return embedding.new_zeros((0, embedding.shape[0]), dtype=torch.float32)
        weights = F.adaptive_avg_pool2d((mask_logits > 0).float(), tuple(embedding.shape[-2:]))
        return mask_pooling(embedding.float(), weights)[0]

    def _with_embeddings(self, proposals: MaskProposals, embeddings: dict, index: Optional[torch.Tensor]) -> MaskProposals:
        """``proposals`` with the ``mask_embeddings`` of the prompts ``index`` (None: all)."""
        if "mask_tokens" in embeddings:
            tokens = embeddings["mask_tokens"]
            proposals.mask_tokens = tokens if index is None else tokens[index]
        if "image_pooled" in embeddings:
            proposals.image_pooled = self._image_pooled(embeddings["image_pooled"], proposals.mask_logits)
        return proposals

    def forward(
        self,
        image_features: Mapping[str, torch.Tensor],
        fit: ImageFit,
        *,
        boxes: Optional[torch.Tensor] = None,
    ) -> MaskProposals:
        """Proposals for ONE image.

        Args:
            image_features: backbone outputs of the image (``{name: [C, h, w]}``), holding
                ``decoder.required_features``.
            fit: the image's :class:`ImageFit` (from ``backbone.prepare_with_fits``).
            boxes: ``[B, 4]`` XYXY original-image boxes to prompt with instead of the point grid
                (ground-truth boxes: the "GT boxes" oracle). Box mode returns exactly one proposal
                per box, in the given order, unfiltered.

        Returns:
            :class:`MaskProposals`.
        """
        device = self.decoder.device
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"PointGridProposals got boxes of shape {tuple(boxes.shape)}; expected [B, 4] XYXY.")
            boxes = boxes.to(device=device, dtype=torch.float32)
            logits, iou, stability, _, embeddings = self._decode(
                image_features, fit, boxes=fit.boxes_to_input(boxes), multimask_output=self.box_multimask_output
            )
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            proposals = MaskProposals(logits, iou, stability, centres, fit, prompt_boxes=boxes)
            return self._with_embeddings(proposals, embeddings, None)

        if self.point_layout == "input_linspace":
            input_points = input_linspace_grid(self.points_per_side, fit.valid_box, device=device)
            points = fit.points_to_original(input_points)
        else:
            points = point_grid(self.points_per_side, fit.original_size, device=device)
            input_points = fit.points_to_input(points)
        labels = torch.ones(points.shape[0], 1, dtype=torch.int64, device=device)
        logits, iou, stability, region, embeddings = self._decode(
            image_features,
            fit,
            points=input_points[:, None],
            point_labels=labels,
            multimask_output=self.multimask_output,
            mask_iou_floor=self.pred_iou_thresh,  # dropped below: their masks are not computed
        )
        # Filter once, after the chunk loop.
        in_image = logits[(slice(None), *region)]
        keep = (in_image > 0).flatten(1).any(dim=1)
        if self.pred_iou_thresh is not None:
            keep &= iou > self.pred_iou_thresh
        if self.stability_score_thresh is not None:
            keep &= stability >= self.stability_score_thresh
        index = keep.nonzero()[:, 0]
        index = index[torch.sort(iou[index], descending=True, stable=True).indices]
        kept_before_cleaning = index
        if self.min_region_area > 0:
            logits = logits[index]
            in_image = self._clean_small_regions(logits, fit, region)
            iou, stability, points = iou[index], stability[index], points[index]
            index = torch.arange(index.numel(), device=index.device)
        if self.box_nms_thresh is not None and index.numel():
            from torchvision.ops import nms

            mask_boxes = mask_logits_to_boxes(in_image[index])
            index = index[nms(mask_boxes, iou[index].float(), self.box_nms_thresh)]
        if self.max_proposals is not None:
            index = index[: self.max_proposals]
        proposals = MaskProposals(logits[index], iou[index], stability[index], points[index], fit)
        if "mask_tokens" in embeddings and self.min_region_area > 0:  # prompts were re-indexed above
            embeddings["mask_tokens"] = embeddings["mask_tokens"][kept_before_cleaning]
        return self._with_embeddings(proposals, embeddings, index)

    def _clean_small_regions(self, logits: torch.Tensor, fit: ImageFit, region: tuple) -> torch.Tensor:
        """Apply ``min_region_area`` to ``logits [P, Hm, Wm]`` in place, inside the image ``region``;
        returns the logits of that region."""
        in_image = logits[(slice(None), *region)]
        (s_h, s_w), (m_h, m_w) = fit.input_size, tuple(logits.shape[-2:])
        # one mask pixel covers (s_h / m_h) x (s_w / m_w) input pixels = that / (scale_y * scale_x) original pixels
        pixel_area = (s_h / m_h) * (s_w / m_w) / (fit.scale[0] * fit.scale[1])
        masks = in_image > 0
        cleaned, _ = remove_small_regions(masks, self.min_region_area / pixel_area)
        changed = torch.where(cleaned, torch.full_like(in_image, 10.0), torch.full_like(in_image, -10.0))
        in_image.copy_(torch.where(cleaned == masks, in_image, changed))
        return in_image

    def extra_repr(self) -> str:
        return (
            f"points_per_side={self.points_per_side}, point_layout={self.point_layout!r}, "
            f"points_per_batch={self.points_per_batch}, "
            f"multimask_output={self.multimask_output}, pred_iou_thresh={self.pred_iou_thresh}, "
            f"stability_score_thresh={self.stability_score_thresh}, box_nms_thresh={self.box_nms_thresh}, "
            f"max_proposals={self.max_proposals}, min_region_area={self.min_region_area}"
            + (f", mask_embeddings={self.mask_embeddings}" if self.mask_embeddings else "")
        )
