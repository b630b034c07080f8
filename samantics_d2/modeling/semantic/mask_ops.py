"""Batched mask operations of the training-free pipeline: pure tensor functions, no per-mask loop.

Frames. A *mask frame* is a low-resolution grid that covers the whole input square of one encoder
(SAM's 256x256 logits cover its 1024x1024 input, padding included); an :class:`ImageFit` maps the
original image to that input. :func:`resample_masks` carries masks from one encoder's frame (SAM)
to the patch grid of another (DINOv2) through the original image, so the two encoders may fit the
image differently (longest side + pad, stretch, centre crop).

Nothing here calls ``.item()``/``.cpu()``: the functions run on CUDA without device syncs.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from ..preprocess import ImageFit

__all__ = [
    "connected_component_areas",
    "BOX_CONVENTIONS",
    "identity_fit",
    "mask_grid_weights",
    "mask_intersections",
    "mask_iou_matrix",
    "mask_overlap_over_area",
    "mask_pooling",
    "masks_to_boxes",
    "masks_to_original",
    "remove_small_regions",
    "resample_masks",
]

logger = logging.getLogger(__name__)

# "exclusive": x1, y1 are the far pixel edges (Detectron2's BitMasks, a one-pixel mask at (x, y) is
# [x, y, x+1, y+1]); "inclusive": the last pixel's index (segment_anything / sam2
# ``batched_mask_to_box``, used by "No Time to Train": [x, y, x, y]).
BOX_CONVENTIONS = ("inclusive", "exclusive")


def identity_fit(height: int, width: int) -> ImageFit:
    """The :class:`ImageFit` of masks given on the original ``height x width`` pixel grid."""
    return ImageFit((height, width), (height, width), (1.0, 1.0), (0.0, 0.0), (0, 0, width, height))


def _sample_coordinates(
    count: int, *, patch_size: int, samples_per_patch: int, scale: float, offset: float, size: int,
    src_scale: float, src_offset: float, src_input: int, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-sample positions of ``count`` patches along one axis.

    Returns ``(normalised source coordinates [count * s], inside [count * s] float)``: positions in
    the destination input frame go to original pixels (``inside``: within the image and within the
    source input square), then to the source input frame, normalised for ``grid_sample``.
    """
    s = samples_per_patch
    within = (torch.arange(s, dtype=torch.float32, device=device) + 0.5) * (patch_size / s)
    dst = (torch.arange(count, dtype=torch.float32, device=device)[:, None] * patch_size + within).reshape(-1)
    original = (dst - offset) / scale
    src = original * src_scale + src_offset
    inside = (original >= 0) & (original < size) & (src >= 0) & (src < src_input)
    return src / src_input * 2 - 1, inside.float()


def _check_resampling(
    caller: str, mask_logits: torch.Tensor, src_fit: ImageFit, dst_fit: ImageFit, *, patch_size: int,
    samples_per_patch: int = 1,
) -> None:
    """The argument checks shared by :func:`resample_masks` and :func:`mask_grid_weights`."""
    if mask_logits.ndim != 3:
        raise ValueError(f"{caller} expects masks [P, Hm, Wm]; got shape {tuple(mask_logits.shape)}.")
    if src_fit.original_size != dst_fit.original_size:
        raise ValueError(
            f"{caller} got fits of different images: source original size {src_fit.original_size}, "
            f"destination {dst_fit.original_size}. Both fits must come from the same image."
        )
    if samples_per_patch < 1 or patch_size < 1:
        raise ValueError(
            f"{caller} got samples_per_patch={samples_per_patch}, patch_size={patch_size}; both must be >= 1."
        )


def resample_masks(
    mask_logits: torch.Tensor,
    *,
    src_fit: ImageFit,
    dst_fit: ImageFit,
    grid_size: tuple[int, int],
    patch_size: int,
    samples_per_patch: int = 2,
    probabilities: bool = False,
) -> torch.Tensor:
    """The share of every destination patch covered by every mask.

    Each patch of the destination encoder's input (``patch_size`` pixels, ``grid_size`` patches)
    is sampled at ``samples_per_patch x samples_per_patch`` points; each point goes to the original
    image (``dst_fit``), then to the source mask frame (``src_fit``), where the mask is read with
    bilinear interpolation (logits interpolated, then the sigmoid, as SAM upsamples its masks).
    Points outside the original image (padding) or outside the source input count as 0.

    Args:
        mask_logits: ``[P, Hm, Wm]`` float logits covering the whole source input square (or
            probabilities in [0, 1] with ``probabilities=True``; bool masks are taken as 0/1).
        src_fit: the fit of the original image into the source encoder input (e.g. SAM's).
        dst_fit: the fit of the original image into the destination encoder input (e.g. DINOv2's).
        grid_size: ``(h, w)`` of the destination patch grid.
        patch_size: destination patch size in input pixels.
        samples_per_patch: sub-samples per patch side (2: four points per patch).
        probabilities: the input holds probabilities, not logits.

    Returns:
        ``[P, h, w]`` float weights in [0, 1], on the input's device.
    """
    _check_resampling("resample_masks", mask_logits, src_fit, dst_fit, patch_size=patch_size,
                      samples_per_patch=samples_per_patch)
    if mask_logits.dtype == torch.bool:
        mask_logits, probabilities = mask_logits.float(), True
    h, w = grid_size
    P = mask_logits.shape[0]
    H, W = src_fit.original_size
    device = mask_logits.device
    s = samples_per_patch
    common = dict(patch_size=patch_size, samples_per_patch=s, device=device)
    gy, inside_y = _sample_coordinates(
        h, scale=dst_fit.scale[0], offset=dst_fit.offset[0], size=H, src_scale=src_fit.scale[0],
        src_offset=src_fit.offset[0], src_input=src_fit.input_size[0], **common,
    )
    gx, inside_x = _sample_coordinates(
        w, scale=dst_fit.scale[1], offset=dst_fit.offset[1], size=W, src_scale=src_fit.scale[1],
        src_offset=src_fit.offset[1], src_input=src_fit.input_size[1], **common,
    )
    if P == 0:
        return mask_logits.new_zeros((0, h, w), dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)  # [h*s, w*s, 2] as (x, y)
    values = mask_logits.float()[:, None]  # [P, 1, Hm, Wm]
    # "border": points just inside the source input read the edge value; points outside are zeroed below
    sampled = F.grid_sample(
        values, grid[None].expand(P, -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=False
    )
    if not probabilities:
        sampled = sampled.sigmoid()
    sampled = sampled * (inside_y[:, None] * inside_x[None, :])
    return F.avg_pool2d(sampled, kernel_size=s)[:, 0]  # [P, h, w]


def _bilinear_axis_matrix(
    count: int, *, src_size: int, src_scale: float, src_offset: float, size: int,
    dst_scale: float, dst_offset: float, dst_input: int, grid: int, patch_size: int, device: torch.device,
) -> torch.Tensor:
    """``[count, grid]``: row ``u`` holds the bilinear weights (``align_corners=False``, edges
    clamped) that read the destination patch grid at the centre of source mask pixel ``u``, scaled
    so that every row sums to the area of one mask pixel in patches along this axis; rows of mask
    pixels outside the original image or outside the destination input are zero."""
    centre = (torch.arange(count, dtype=torch.float64, device=device) + 0.5) * (src_size / count)  # source input px
    original = (centre - src_offset) / src_scale
    dst = original * dst_scale + dst_offset  # destination input px
    inside = (original >= 0) & (original < size) & (dst >= 0) & (dst < dst_input)
    position = (dst / patch_size - 0.5).clamp(0, grid - 1)  # in patch indices
    low = position.floor().long().clamp(max=grid - 1)
    high = (low + 1).clamp(max=grid - 1)
    frac = position - low
    rows = torch.arange(count, device=device)
    matrix = torch.zeros(count, grid, dtype=torch.float64, device=device)
    matrix.index_put_((rows, low), 1 - frac, accumulate=True)
    matrix.index_put_((rows, high), frac, accumulate=True)
    pixel_in_patches = (src_size / count) / src_scale * dst_scale / patch_size
    return (matrix * (inside[:, None] * pixel_in_patches)).float()


def mask_grid_weights(
    mask_logits: torch.Tensor,
    *,
    src_fit: ImageFit,
    dst_fit: ImageFit,
    grid_size: tuple[int, int],
    patch_size: int,
    threshold: float = 0.0,
) -> torch.Tensor:
    """Patch-grid weights that pool features as "No Time to Train" does, on the mask grid.

    The authors upsample the ``h x w`` feature map bilinearly (``align_corners=False``) to the
    ``Hm x Wm`` mask grid and average the features of the mask pixels whose logit is
    ``> threshold``. Bilinear upsampling is linear and separable, ``F_up = B_y F B_x^T``, so that
    mean equals ``sum(W * F) / sum(W)`` with ``W = B_y^T M B_x`` on the patch grid: the same
    numbers (up to float rounding) from two small matrix products instead of a ``[P, Hm * Wm] x
    [Hm * Wm, C]`` one. :func:`mask_pooling` with these weights gives that mean.

    Each mask pixel is read at its centre through both fits (mask frame -> original image ->
    destination input -> patch grid, edges clamped as ``F.interpolate`` does); pixels outside the
    original image (padding) or outside the destination input (cropped away) count as outside
    the mask. When both encoders stretch the whole image to their input squares (the authors'
    preprocessing) this is exactly ``F.interpolate(F, (Hm, Wm), mode="bilinear")``.

    Args:
        mask_logits: ``[P, Hm, Wm]`` logits covering the whole source input square (bool masks
            are taken as they are).
        src_fit: the fit of the original image into the source encoder input (SAM's).
        dst_fit: the fit of the original image into the destination encoder input (DINOv2's).
        grid_size: ``(h, w)`` of the destination patch grid.
        patch_size: destination patch size in input pixels.
        threshold: a mask pixel is in the mask where its logit is ``> threshold``.

    Returns:
        ``[P, h, w]`` float32 weights >= 0, in patches (their sum is the mask's area on the patch grid).
    """
    _check_resampling("mask_grid_weights", mask_logits, src_fit, dst_fit, patch_size=patch_size)
    P, Hm, Wm = mask_logits.shape
    h, w = grid_size
    H, W = src_fit.original_size
    device = mask_logits.device
    by = _bilinear_axis_matrix(
        Hm, src_size=src_fit.input_size[0], src_scale=src_fit.scale[0], src_offset=src_fit.offset[0], size=H,
        dst_scale=dst_fit.scale[0], dst_offset=dst_fit.offset[0], dst_input=dst_fit.input_size[0], grid=h,
        patch_size=patch_size, device=device,
    )
    bx = _bilinear_axis_matrix(
        Wm, src_size=src_fit.input_size[1], src_scale=src_fit.scale[1], src_offset=src_fit.offset[1], size=W,
        dst_scale=dst_fit.scale[1], dst_offset=dst_fit.offset[1], dst_input=dst_fit.input_size[1], grid=w,
        patch_size=patch_size, device=device,
    )
    masks = mask_logits if mask_logits.dtype == torch.bool else mask_logits > threshold
    return by.T @ (masks.float() @ bx)  # [h, Hm] @ [P, Hm, w] -> [P, h, w]


def mask_pooling(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of a dense feature map under soft masks (one matmul).

    Args:
        features: ``[C, h, w]`` (all masks on one image) or ``[N, C, h, w]`` (a batch of images).
        weights: ``[P, h, w]`` with ``[C, h, w]`` features; with ``[N, C, h, w]`` features either
            ``[N, h, w]`` (mask ``n`` on image ``n``) or ``[N, P, h, w]`` (``P`` masks per image).
            Non-negative.

    Returns:
        ``(pooled, valid)``: pooled ``[P, C]`` / ``[N, C]`` / ``[N, P, C]`` float (``sum(w f) /
        sum(w)``; zeros where a mask has no weight) and ``valid`` (same leading shape, bool): the
        mask has a positive total weight.
    """
    if features.ndim == 3 and weights.ndim == 3:
        equation = "phw,chw->pc"
    elif features.ndim == 4 and weights.ndim == 3 and weights.shape[0] == features.shape[0]:
        equation = "nhw,nchw->nc"
    elif features.ndim == 4 and weights.ndim == 4 and weights.shape[0] == features.shape[0]:
        equation = "nphw,nchw->npc"
    else:
        raise ValueError(
            f"mask_pooling got features {tuple(features.shape)} and weights {tuple(weights.shape)}; expected "
            "features [C, h, w] with weights [P, h, w], or features [N, C, h, w] with weights [N, h, w] or "
            "[N, P, h, w]."
        )
    if features.shape[-2:] != weights.shape[-2:]:
        raise ValueError(
            f"mask_pooling got a feature grid {tuple(features.shape[-2:])} and a weight grid "
            f"{tuple(weights.shape[-2:])}; resample the masks to the feature grid first (resample_masks)."
        )
    weights = weights.to(features.dtype)
    total = weights.sum(dim=(-2, -1))  # [P] / [N] / [N, P]
    pooled = torch.einsum(equation, weights, features)
    valid = total > 0
    pooled = pooled / torch.where(valid, total, torch.ones_like(total))[..., None]
    return pooled, valid


def masks_to_original(
    mask_logits: torch.Tensor, fit: ImageFit, *, threshold: float = 0.0, antialias: bool = False
) -> torch.Tensor:
    """Final masks on the original image grid (call it for the kept masks only).

    Args:
        mask_logits: ``[K, Hm, Wm]`` logits covering the input square of ``fit`` (use
            ``threshold=0.5`` for probabilities).
        fit: the fit of the original image into that input.
        threshold: a pixel is in the mask when its bilinear sample exceeds it.
        antialias: where the original image is smaller than the mask grid (fewer original
            pixels per mask pixel than 1), first resample the mask grid to the original pixel
            density with ``F.interpolate(..., mode="bilinear", antialias=True)`` (an average over
            the mask pixels each original pixel covers), as "No Time to Train" does for its final
            masks; for an image stretched to the input square that is exactly
            ``F.interpolate(mask_logits, (H, W), mode="bilinear", antialias=True)``. No effect
            where the image is at least as large as the mask grid (upsampling).

    Returns:
        ``[K, H, W]`` bool, ``(H, W) = fit.original_size``.
    """
    if mask_logits.ndim != 3:
        raise ValueError(f"masks_to_original expects masks [K, Hm, Wm]; got shape {tuple(mask_logits.shape)}.")
    if mask_logits.dtype == torch.bool:
        return fit.mask_to_original(mask_logits)
    if mask_logits.shape[0] == 0:
        return torch.zeros((0, *fit.original_size), dtype=torch.bool, device=mask_logits.device)
    values = mask_logits.float()
    if antialias:
        # the input square at the original image's pixel density
        density = tuple(max(1, round(s / scale)) for s, scale in zip(fit.input_size, fit.scale))
        if density[0] < values.shape[-2] or density[1] < values.shape[-1]:
            values = F.interpolate(values[:, None], size=density, mode="bilinear", align_corners=False, antialias=True)[:, 0]
    return fit.mask_to_original(values) > threshold


def masks_to_boxes(masks: torch.Tensor, *, fit: Optional[ImageFit] = None, convention: str = "exclusive") -> torch.Tensor:
    """Tight XYXY boxes of binary masks.

    Args:
        masks: ``[P, Hm, Wm]`` bool (or 0/1).
        fit: when given, the masks cover the input square of ``fit`` and the boxes are returned in
            original image pixels (clipped to the image); otherwise in mask pixels.
        convention: ``"exclusive"`` (pixel edges: a one-pixel mask at (x, y) is ``[x, y, x+1, y+1]``)
            or ``"inclusive"`` (pixel indices: ``[x, y, x, y]``, sam2's ``batched_mask_to_box``);
            see :data:`BOX_CONVENTIONS`.

    Returns:
        ``[P, 4]`` float; empty masks get ``[0, 0, 0, 0]``.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks_to_boxes expects masks [P, Hm, Wm]; got shape {tuple(masks.shape)}.")
    if convention not in BOX_CONVENTIONS:
        raise ValueError(f"masks_to_boxes got convention={convention!r}; expected one of {BOX_CONVENTIONS}.")
    masks = masks.bool()
    Hm, Wm = masks.shape[-2:]
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [P, Hm], [P, Wm]
    nonempty = rows.any(dim=1)
    far_edge = 0 if convention == "exclusive" else 1
    # first True from each end (argmax returns the first maximum)
    y0 = rows.byte().argmax(dim=1)
    y1 = Hm - far_edge - rows.flip(1).byte().argmax(dim=1)
    x0 = cols.byte().argmax(dim=1)
    x1 = Wm - far_edge - cols.flip(1).byte().argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float() * nonempty[:, None]
    if fit is None:
        return boxes
    S_h, S_w = fit.input_size
    to_input = boxes.new_tensor([S_w / Wm, S_h / Hm, S_w / Wm, S_h / Hm])
    return fit.boxes_to_original(boxes * to_input) * nonempty[:, None]


def mask_intersections(
    masks_a: torch.Tensor, masks_b: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairwise intersection areas of binary masks (one float32 matmul; counts are exact).

    Args:
        masks_a: ``[P, Hm, Wm]`` bool (or 0/1).
        masks_b: ``[Q, Hm, Wm]``; default: ``masks_a``.

    Returns:
        ``(intersection [P, Q], area_a [P], area_b [Q])`` float32.
    """
    if masks_a.ndim != 3 or (masks_b is not None and (masks_b.ndim != 3 or masks_b.shape[1:] != masks_a.shape[1:])):
        raise ValueError(
            f"mask_intersections expects masks [P, Hm, Wm] (and [Q, Hm, Wm] of the same size); got "
            f"{tuple(masks_a.shape)} and {None if masks_b is None else tuple(masks_b.shape)}."
        )
    a = masks_a.reshape(masks_a.shape[0], -1).float()
    b = a if masks_b is None else masks_b.reshape(masks_b.shape[0], -1).float()
    return a @ b.T, a.sum(dim=1), b.sum(dim=1)


def mask_iou_matrix(masks_a: torch.Tensor, masks_b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[P, Q]`` intersection over union of binary masks ``[P, Hm, Wm]`` x ``[Q, Hm, Wm]`` (0 for two empty masks)."""
    inter, area_a, area_b = mask_intersections(masks_a, masks_b)
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp_min(1.0)


def mask_overlap_over_area(masks_a: torch.Tensor, masks_b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[P, Q]``: the share of mask ``a_i``'s own area covered by ``b_j`` (0 for an empty ``a_i``)."""
    inter, area_a, _ = mask_intersections(masks_a, masks_b)
    return inter / area_a.clamp_min(1.0)[:, None]


def _component_labels(masks: torch.Tensor, check_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, areas)``, both ``[P, h, w]`` float32: 8-connected components of ``masks [P, h, w]``.

    A component's label is ``h * w - i`` for its first pixel ``i`` in raster order (so the larger
    label belongs to the component that starts first, OpenCV's labelling order); 0 on background.
    """
    P, h, w = masks.shape
    foreground = masks.bool()[:, None].float()  # [P, 1, h, w]
    ids = torch.arange(h * w, 0, -1, dtype=torch.float32, device=masks.device).view(1, 1, h, w)  # exact in fp32
    labels = foreground * ids
    while True:
        previous = labels
        for _ in range(check_every):
            labels = F.max_pool2d(labels, kernel_size=3, stride=1, padding=1) * foreground
        if torch.equal(labels, previous):
            break
    flat = labels.view(P, h * w).long()  # 0 = background
    counts = torch.zeros((P, h * w + 1), dtype=torch.float32, device=masks.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    counts[:, 0] = 0.0
    return labels[:, 0], counts.gather(1, flat).view(P, h, w)


def connected_component_areas(masks: torch.Tensor, *, check_every: int = 8) -> torch.Tensor:
    """Area (in pixels) of the 8-connected component of every foreground pixel, for all masks at once.

    Each foreground pixel starts with its own label and takes the largest label of its 3x3
    neighbourhood within the foreground (one ``max_pool2d`` per step) until nothing changes, so
    every component ends up with one label; one ``scatter_add`` then counts the pixels per label.
    The steps needed grow with the longest path inside a component (about the mask side), and
    whether anything changed is checked every ``check_every`` steps (one device sync each).

    Args:
        masks: ``[P, h, w]`` bool.

    Returns:
        ``[P, h, w]`` float32: the component area at foreground pixels, 0 at background pixels.
    """
    if masks.ndim != 3:
        raise ValueError(f"connected_component_areas expects masks [P, h, w]; got shape {tuple(masks.shape)}.")
    if masks.numel() == 0:
        return torch.zeros(masks.shape, dtype=torch.float32, device=masks.device)
    return _component_labels(masks, check_every)[1]


def remove_small_regions(masks: torch.Tensor, min_area: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill small holes, then drop small islands, of every mask at once (SAM's ``min_mask_region_area``).

    As ``segment_anything.utils.amg.remove_small_regions`` does per mask with OpenCV, in its
    automatic mask generator's order (holes, then islands), 8-connectivity: background components
    smaller than ``min_area`` become foreground; foreground components smaller than ``min_area``
    are removed, except that a mask whose components are all small keeps its largest one (the
    first in raster order among equals). Same result as upstream (tested).

    Args:
        masks: ``[P, h, w]`` bool.
        min_area: in pixels of ``masks``.

    Returns:
        ``(cleaned [P, h, w] bool, changed [P] bool)``.
    """
    if masks.ndim != 3:
        raise ValueError(f"remove_small_regions expects masks [P, h, w]; got shape {tuple(masks.shape)}.")
    masks = masks.bool()
    if min_area <= 0 or masks.numel() == 0:
        return masks, torch.zeros(masks.shape[0], dtype=torch.bool, device=masks.device)
    hole_area = connected_component_areas(~masks)
    filled = masks | ((hole_area > 0) & (hole_area < min_area))
    labels, area = _component_labels(filled, 8)
    largest = area.flatten(1).amax(dim=1)[:, None, None]
    first_largest = torch.where(area == largest, labels, torch.zeros_like(labels)).flatten(1).amax(dim=1)[:, None, None]
    keep = (area >= min_area) | ((largest < min_area) & (labels == first_largest))
    cleaned = filled & keep
    return cleaned, (cleaned != masks).flatten(1).any(dim=1)
