"""Simulated clicks and the click metrics (torch / numpy / scipy only: a leaf module).

The rules of the interactive-segmentation benchmarks, as Semantic-SAM (arXiv 2307.04767, "1-IoU@COCO
Max|Oracle") and the standard iterative protocol (RITM's ``Clicker``, used by SimpleClick and
FocalClick for NoC) define them:

- **the first click** of a segment (:func:`click_points`): the pixel farthest from the segment's
  border and from the image border: the mask is padded with one row/column of zeros on every side
  (so the image border counts as segment border), the exact Euclidean distance of every pixel to the
  nearest zero pixel is computed (``scipy.ndimage.distance_transform_edt``), and the click is its
  argmax. **Ties** go to the first pixel in row-major order (smallest row, then smallest column:
  ``argmax`` of the flattened map, as RITM's ``np.where(dt == max)[0]``). An empty mask gives
  ``(0, 0)``. Points are pixel indices ``(x, y) = (column, row)`` (SAM adds 0.5 itself);
- **the box variant** (:func:`point_boxes`): Semantic-SAM also passes the click as a small box, the
  click +- ``half_size`` (3) pixels, XYXY, not clipped to the image;
- **the next click** (:func:`next_clicks`): from the previous prediction and the GT, the false
  negatives (``gt & ~pred``) and false positives (``pred & ~gt``) each get the same zero-padded
  distance transform; the click goes to the error pixel farthest from the border of its error region
  (the "centre of the largest error region": largest by depth, not by area, as RITM measures it),
  **positive** when the deepest false negative is strictly deeper than the deepest false positive,
  else **negative** (ties: negative, RITM's ``fn_max > fp_max``); ties within a map: row-major order.
  A prediction equal to the GT gets no click (label -1);
- **NoC@t** (:func:`number_of_clicks`): the number of clicks after which the IoU first reaches
  ``t`` (``>=``), or ``max_clicks`` (20) when it never does; averaged over segments;
- **mIoU@k** (:func:`miou_at_clicks`): the IoU after ``k`` clicks, averaged over segments.

The rules are applied to masks at whatever resolution they are given; the click evaluation
(:mod:`samantics_d2.evaluation.click`) gives them the GT at the original image resolution.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

__all__ = [
    "NO_CLICK",
    "click_points",
    "deepest_pixel",
    "mask_ious",
    "miou_at_clicks",
    "next_clicks",
    "number_of_clicks",
    "point_boxes",
]

NO_CLICK = -1  # label of a segment that needs no further click (its prediction equals the GT)


def deepest_pixel(mask: np.ndarray) -> tuple[float, int, int]:
    """``(distance, y, x)``: the pixel of ``mask`` farthest from its zero-padded border (module docstring).

    Args:
        mask: ``[H, W]`` bool.

    Returns:
        The Euclidean distance (in pixels, 1 for a pixel touching the border) and the pixel; ties go
        to the first pixel in row-major order. An empty mask gives ``(0.0, 0, 0)``.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0.0, 0, 0
    # The distance transform inside the bounding box padded by one zero pixel equals the full one
    # (the nearest outside pixel is never farther than the ring around the box), and row-major order
    # within the box is row-major order within the image, so ties resolve the same way.
    y0, x0 = int(rows[0]), int(cols[0])
    box = np.pad(mask[y0 : rows[-1] + 1, x0 : cols[-1] + 1], 1)
    distance = distance_transform_edt(box)[1:-1, 1:-1]
    flat = int(np.argmax(distance))
    y, x = np.unravel_index(flat, distance.shape)
    return float(distance.flat[flat]), y0 + int(y), x0 + int(x)


def _as_bool_numpy(masks: torch.Tensor, name: str) -> np.ndarray:
    if masks.dim() != 3:
        raise ValueError(f"{name} expects masks [N, H, W]; got shape {tuple(masks.shape)}.")
    return masks.detach().cpu().numpy().astype(bool)


def click_points(masks: torch.Tensor) -> torch.Tensor:
    """The first click of each mask: the pixel farthest from the segment and image borders.

    Args:
        masks: ``[N, H, W]`` bool (or 0/1) masks.

    Returns:
        ``[N, 2]`` float32 ``(x, y)`` pixel indices (:func:`deepest_pixel`; ``(0, 0)`` for an empty mask).
    """
    points = torch.zeros((len(masks), 2), dtype=torch.float32)
    for i, mask in enumerate(_as_bool_numpy(masks, "click_points")):
        _, y, x = deepest_pixel(mask)
        points[i, 0], points[i, 1] = x, y
    return points


def point_boxes(points: torch.Tensor, *, half_size: float = 3.0) -> torch.Tensor:
    """``[N, 4]`` XYXY boxes ``(x - h, y - h, x + h, y + h)`` around ``[N, 2]`` (x, y) points (not clipped)."""
    if points.dim() != 2 or points.shape[-1] != 2 or half_size < 0:
        raise ValueError(
            f"point_boxes expects points [N, 2] and half_size >= 0; got {tuple(points.shape)}, half_size={half_size}."
        )
    points = points.float()
    return torch.cat([points - half_size, points + half_size], dim=1)


def next_clicks(pred_masks: torch.Tensor, gt_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next click of each segment from its previous prediction (the standard iterative protocol).

    Args:
        pred_masks: ``[N, H, W]`` bool, the prediction after the previous click.
        gt_masks: ``[N, H, W]`` bool, the GT.

    Returns:
        ``points [N, 2]`` float32 (x, y) and ``labels [N]`` int64: 1 (positive: in a false negative
        region), 0 (negative: in a false positive region), or :data:`NO_CLICK` (-1, point ``(0, 0)``)
        where the prediction equals the GT. Rules and ties: module docstring.
    """
    preds, gts = _as_bool_numpy(pred_masks, "next_clicks"), _as_bool_numpy(gt_masks, "next_clicks")
    if preds.shape != gts.shape:
        raise ValueError(f"next_clicks got pred_masks {preds.shape} and gt_masks {gts.shape}; expected the same shape.")
    points = torch.zeros((len(gts), 2), dtype=torch.float32)
    labels = torch.full((len(gts),), NO_CLICK, dtype=torch.int64)
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        fn_depth, fn_y, fn_x = deepest_pixel(gt & ~pred)
        fp_depth, fp_y, fp_x = deepest_pixel(pred & ~gt)
        if fn_depth == 0 and fp_depth == 0:
            continue
        positive = fn_depth > fp_depth
        points[i, 0], points[i, 1] = (fn_x, fn_y) if positive else (fp_x, fp_y)
        labels[i] = int(positive)
    return points, labels


def mask_ious(pred_masks: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` float64 IoU of ``pred_masks [..., N, H, W]`` with ``gt_masks [N, H, W]`` (bool; 0 when
    both are empty)."""
    pred = pred_masks.bool().flatten(-2)
    gt = gt_masks.bool().flatten(-2).to(pred.device)
    intersection = (pred & gt).sum(-1).double()
    union = (pred | gt).sum(-1).double()
    return intersection / union.clamp(min=1)


def number_of_clicks(ious: np.ndarray, threshold: float, *, max_clicks: int) -> np.ndarray:
    """``[S]`` int: per segment, the first click count ``k`` (1-based) with ``ious[:, k - 1] >= threshold``,
    or ``max_clicks`` when none reaches it.

    Args:
        ious: ``[S, R]`` IoU after each of ``R <= max_clicks`` clicks (fractions, not percent).
        threshold: e.g. 0.85 or 0.9.
    """
    ious = np.asarray(ious, dtype=np.float64)
    if ious.ndim != 2 or ious.shape[1] > max_clicks:
        raise ValueError(
            f"number_of_clicks expects ious [S, R] with R <= max_clicks={max_clicks}; got shape {ious.shape}."
        )
    reached = ious >= threshold
    return np.where(reached.any(axis=1), reached.argmax(axis=1) + 1, max_clicks)


def miou_at_clicks(ious: np.ndarray, clicks: Sequence[int]) -> dict[int, float]:
    """``{k: mean over segments of the IoU after k clicks}`` for each ``k`` in ``clicks`` (1-based,
    ``k <= R`` of ``ious [S, R]``); NaN without segments."""
    ious = np.asarray(ious, dtype=np.float64)
    out = {}
    for k in clicks:
        if not 1 <= k <= ious.shape[1]:
            raise ValueError(f"miou_at_clicks: k={k} is outside the {ious.shape[1]} click rounds recorded.")
        out[int(k)] = float(ious[:, k - 1].mean()) if len(ious) else float("nan")
    return out
