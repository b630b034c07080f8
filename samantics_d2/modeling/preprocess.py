"""Preprocessing constants per weight tag, and the image fitting that each encoder expects.

One table (:data:`PREPROCESS`, read from :mod:`samantics_d2.modeling.catalog`) gives, for every
weight tag, the input size, the RGB pixel mean/std (0-255 scale), the patch size and how an image is fitted to
the input square. :func:`fit_image` implements the fitting modes and returns an :class:`ImageFit`
that maps points, boxes and masks between the original image and the encoder input.

Fitting modes (the ones the upstream packages use):

- ``"longest_side_pad"`` (SAM, HQ-SAM): resize so the longest side is ``input_size``, pad bottom
  and right to a square. Padding is added after normalisation, with zeros, as SAM does.
- ``"resize_square"`` (SAM 2, or a DINOv2 "full image" setting): stretch the whole image to
  ``input_size x input_size`` (aspect ratio not kept).
- ``"resize_center_crop"`` (CLIP, DINOv2 classification): resize so the shorter side is
  ``input_size / crop_pct``, then take the centre ``input_size x input_size`` crop. When the
  resized image would exceed 16M pixels (extreme aspect ratios, e.g. 1 x 100000), only the source
  window that survives the crop is resized (same result up to half a pixel of shift).

Interpolations (:data:`INTERPOLATIONS`):

- ``"bilinear"``, ``"bicubic"``: torch on ``uint8`` with antialiasing (like the PIL resizes of the
  upstream pipelines), so pixel values are quantised as those pipelines quantise them; the
  kernels may differ from PIL's by a grey level (up to ~20 on pixel noise);
- ``"pil_bicubic"``: Pillow's own bicubic resize of the ``uint8`` image (antialiased, quantised):
  exactly what ``PIL.Image.resize`` gives, as sam2's ``_load_img_as_tensor`` loads the target
  image of "No Time to Train" (1024 x 1024, aspect ratio ignored);
- ``"bicubic_float"``: ``torch.nn.functional.interpolate(mode="bicubic")`` on the float pixel
  values, without antialiasing, rounding or clamping (the output is float32, overshoot kept), as
  "No Time to Train" resizes its reference crops to 518 x 518.

Two-step resize (``PreprocessSpec.pre_resize = (P, interpolation)``, ``fit="resize_square"`` only):
the whole image is first resized to ``P x P`` with that interpolation, then to the input square
with ``interpolation``. "No Time to Train" feeds DINOv2 its target that way: the image loaded as
its SAM input (``(1024, "pil_bicubic")``), that tensor then ``bicubic_float`` to 518 x 518.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..utils.image import to_rgb_uint8

# (pixel statistics on the 0-255 scale live with the family records; named here too)
from .catalog import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, WEIGHTS, get_weight_spec

__all__ = [
    "FIT_MODES",
    "IMAGENET_MEAN",
    "INTERPOLATIONS",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "PREPROCESS",
    "ImageFit",
    "PreprocessSpec",
    "fit_image",
    "image_to_tensor",
    "normalize",
    "prepare_batch",
    "preprocess_spec",
]

FIT_MODES = ("longest_side_pad", "resize_square", "resize_center_crop")
INTERPOLATIONS = ("bilinear", "bicubic", "pil_bicubic", "bicubic_float")
# resize_center_crop resizes the whole image up to this many pixels, a crop window beyond.
_MAX_RESIZED_PIXELS = 1 << 24



@dataclass(frozen=True)
class PreprocessSpec:
    """How images are turned into the input of one encoder.

    Attributes:
        tag: the weight tag this spec belongs to (or a descriptive name for custom specs).
        input_size: side ``S`` of the square input, a multiple of ``patch_size``.
        pixel_mean: RGB mean on the 0-255 scale, subtracted before dividing by ``pixel_std``.
        pixel_std: RGB standard deviation on the 0-255 scale.
        patch_size: stride of the encoder's dense feature map (16 SAM, 14 DINOv2, 32/16/14 CLIP,
            16 for the stride-16 map of SAM 2).
        fit: one of :data:`FIT_MODES`.
        interpolation: one of :data:`INTERPOLATIONS` (module docstring).
        crop_pct: ``resize_center_crop`` only: the shorter side is resized to
            ``input_size / crop_pct`` before the centre crop (0.875: 256 -> 224).
        pre_resize: ``(P, interpolation)``: resize the whole image to ``P x P`` with that
            interpolation (one of :data:`INTERPOLATIONS` giving ``uint8``: not ``"bicubic_float"``)
            before fitting it (``fit="resize_square"`` only; module docstring); None: one step.
    """

    tag: str
    input_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    patch_size: int
    fit: str
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    pre_resize: Optional[tuple[int, str]] = None

    def __post_init__(self) -> None:
        problems = []
        if self.pre_resize is not None:
            object.__setattr__(self, "pre_resize", tuple(self.pre_resize))  # configs give lists
            pre = self.pre_resize
            if not (len(pre) == 2 and isinstance(pre[0], int) and pre[0] > 0 and pre[1] in INTERPOLATIONS
                    and pre[1] != "bicubic_float"):
                problems.append(f"pre_resize={self.pre_resize!r} must be (size > 0, interpolation) with an interpolation "
                                f"of {tuple(i for i in INTERPOLATIONS if i != 'bicubic_float')}")
            if self.fit != "resize_square":
                problems.append(f"pre_resize goes with fit='resize_square' (the whole image is stretched twice); "
                                f"got fit={self.fit!r}")
        if self.fit not in FIT_MODES:
            problems.append(f"fit={self.fit!r} is not one of {FIT_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation={self.interpolation!r} is not one of {INTERPOLATIONS}")
        if not (isinstance(self.patch_size, int) and self.patch_size > 0):
            problems.append(f"patch_size={self.patch_size!r} must be a positive int")
        elif not (isinstance(self.input_size, int) and self.input_size > 0 and self.input_size % self.patch_size == 0):
            problems.append(
                f"input_size={self.input_size!r} must be a positive multiple of patch_size={self.patch_size} "
                f"(nearest: {max(1, round(self.input_size / self.patch_size)) * self.patch_size})"
            )
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            problems.append(f"pixel_mean={self.pixel_mean} and pixel_std={self.pixel_std} must be 3 values, std > 0")
        if not 0.0 < self.crop_pct <= 1.0:
            problems.append(f"crop_pct={self.crop_pct!r} must be in (0, 1]")
        if problems:
            raise ValueError(f"Invalid PreprocessSpec for {self.tag!r}: " + "; ".join(problems) + ".")

    def replace(self, **changes) -> "PreprocessSpec":
        """A copy with some fields changed (validated again), e.g. ``spec.replace(input_size=518)``."""
        return dataclasses.replace(self, **changes)


def tag_spec(tag: str) -> PreprocessSpec:
    """The preprocessing of weight tag ``tag``: its family's defaults and the tag's overrides."""
    record = get_weight_spec(tag)
    defaults = dict(record.family_spec.preprocess)
    for name in ("input_size", "patch_size"):
        if getattr(record, name) is not None:
            defaults[name] = getattr(record, name)
    return PreprocessSpec(tag, **defaults)


class _PreprocessTable(Mapping):
    """weight tag -> :class:`PreprocessSpec`, read from the encoder catalog (live)."""

    def __getitem__(self, tag: str) -> PreprocessSpec:
        if tag not in WEIGHTS:
            raise KeyError(tag)
        return tag_spec(tag)

    def __iter__(self) -> Iterator[str]:
        return iter(WEIGHTS)

    def __len__(self) -> int:
        return len(WEIGHTS)


PREPROCESS: Mapping[str, PreprocessSpec] = _PreprocessTable()


def preprocess_spec(
    tag: str,
    *,
    input_size: Optional[int] = None,
    fit: Optional[str] = None,
    crop_pct: Optional[float] = None,
    interpolation: Optional[str] = None,
    pre_resize: Optional[Sequence] = None,
) -> PreprocessSpec:
    """The preprocessing of weight tag ``tag``, optionally with another input size, fitting mode,
    crop share, interpolation or two-step resize (``pre_resize``).

    Example: DINOv2 dense features on the whole image at 518 px (as in "No Time to Train"):
    ``preprocess_spec("dinov2_vitl14", input_size=518, fit="resize_square")``.
    """
    if tag not in PREPROCESS:
        raise KeyError(f"No preprocessing known for weight tag {tag!r}; known tags: {sorted(PREPROCESS)}.")
    spec = PREPROCESS[tag]
    options = (("input_size", input_size), ("fit", fit), ("crop_pct", crop_pct), ("interpolation", interpolation),
               ("pre_resize", pre_resize))
    changes = {k: v for k, v in options if v is not None}
    return spec.replace(**changes) if changes else spec


@dataclass(frozen=True)
class ImageFit:
    """The affine map from an original image to the encoder input it was fitted into.

    Coordinates are continuous pixel coordinates (0 is the left/top edge of the first pixel):
    ``input = original * scale + offset`` per axis. ``valid_box`` is the part of the input that
    holds image content (the rest is padding), as ``(x0, y0, x1, y1)`` in input pixels.
    """

    original_size: tuple[int, int]  # (H, W)
    input_size: tuple[int, int]  # (S, S)
    scale: tuple[float, float]  # (sy, sx)
    offset: tuple[float, float]  # (ty, tx)
    valid_box: tuple[int, int, int, int]

    def points_to_input(self, points: torch.Tensor) -> torch.Tensor:
        """``points: [..., 2]`` (x, y) in original pixels -> same shape in input pixels."""
        sy, sx = self.scale
        ty, tx = self.offset
        factor = points.new_tensor([sx, sy])
        shift = points.new_tensor([tx, ty])
        return points * factor + shift

    def points_to_original(self, points: torch.Tensor) -> torch.Tensor:
        """``points: [..., 2]`` (x, y) in input pixels -> same shape in original pixels."""
        sy, sx = self.scale
        ty, tx = self.offset
        return (points - points.new_tensor([tx, ty])) / points.new_tensor([sx, sy])

    def boxes_to_input(self, boxes: torch.Tensor) -> torch.Tensor:
        """``boxes: [..., 4]`` XYXY in original pixels -> XYXY in input pixels."""
        return self.points_to_input(boxes.reshape(*boxes.shape[:-1], 2, 2)).reshape(boxes.shape)

    def boxes_to_original(self, boxes: torch.Tensor) -> torch.Tensor:
        """``boxes: [..., 4]`` XYXY in input pixels -> XYXY in original pixels (clipped to the image)."""
        out = self.points_to_original(boxes.reshape(*boxes.shape[:-1], 2, 2)).reshape(boxes.shape)
        h, w = self.original_size
        return torch.stack(
            [out[..., 0].clamp(0, w), out[..., 1].clamp(0, h), out[..., 2].clamp(0, w), out[..., 3].clamp(0, h)], dim=-1
        )

    def mask_to_original(self, masks: torch.Tensor) -> torch.Tensor:
        """Resample masks that cover the input square onto the original image grid.

        Args:
            masks: ``[N, h, w]`` (any resolution covering the whole ``S x S`` input, e.g. SAM's
                256x256 low-resolution logits), float (logits or probabilities) or bool.

        Returns:
            ``[N, H, W]``: bilinear samples at the original pixel centres, same dtype kind as the
            input (bool masks are thresholded at 0.5). Pixels that the fit cropped away read 0
            (``False``) for float (bool) masks.
        """
        if masks.ndim != 3:
            raise ValueError(f"mask_to_original expects masks of shape [N, h, w]; got {tuple(masks.shape)}.")
        is_bool = masks.dtype == torch.bool
        values = masks.float()[:, None]  # [N, 1, h, w]
        H, W = self.original_size
        S_h, S_w = self.input_size
        sy, sx = self.scale
        ty, tx = self.offset
        ys = (torch.arange(H, dtype=torch.float32, device=masks.device) + 0.5) * sy + ty  # input pixels
        xs = (torch.arange(W, dtype=torch.float32, device=masks.device) + 0.5) * sx + tx
        gy = ys / S_h * 2 - 1  # grid_sample's normalised coordinates, align_corners=False
        gx = xs / S_w * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)  # [H, W, 2] as (x, y)
        grid = grid[None].expand(values.shape[0], H, W, 2)
        out = F.grid_sample(values, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
        return out > 0.5 if is_bool else out.to(masks.dtype)


def image_to_tensor(image: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """An image as a ``[3, H, W]`` uint8 RGB tensor on the CPU.

    Args:
        image: a numpy array ``[H, W]``, ``[H, W, 1|3|4]`` of uint8/uint16/bool/float in [0, 1]
            (converted by :func:`samantics_d2.utils.image.to_rgb_uint8`: gray repeated, alpha dropped,
            16 bit scaled), or a tensor ``[3, H, W]`` / ``[1, H, W]`` uint8 (the model-input
            convention of this project: RGB, channels first) or float holding pixel values in
            [0, 255] (Detectron2's model-input convention: ``DefaultPredictor`` passes float32).
    """
    if isinstance(image, torch.Tensor):
        supported_dtype = image.dtype == torch.uint8 or image.is_floating_point()
        if image.ndim != 3 or image.shape[0] not in (1, 3) or not supported_dtype or min(image.shape[1:]) < 1:
            raise ValueError(
                f"Image tensors must be [3, H, W] (or [1, H, W]) RGB, uint8 or float in [0, 255], with H, W >= 1; got "
                f"shape {tuple(image.shape)} dtype {image.dtype}. Pass numpy [H, W, C] arrays for other layouts "
                "(gray, RGBA, 16-bit, float in [0, 1] are converted)."
            )
        if image.is_floating_point():
            image = image.detach().round().clamp(0, 255).to(torch.uint8)
        return image.detach().cpu().expand(3, -1, -1).contiguous()
    if isinstance(image, np.ndarray):
        return torch.from_numpy(to_rgb_uint8(image)).permute(2, 0, 1).contiguous()
    raise TypeError(f"Expected an image as numpy.ndarray or torch.Tensor; got {type(image).__name__}.")


def _resize_uint8(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """``image: [3, h, w]`` uint8 -> ``[3, *size]``: uint8, antialiased when shrinking; float32 for
    ``"bicubic_float"`` (see the module docstring)."""
    if interpolation == "bicubic_float":
        out = image[None].float()
        if tuple(image.shape[1:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bicubic", align_corners=False)
        return out[0]
    if tuple(image.shape[1:]) == tuple(size):
        return image
    if interpolation == "pil_bicubic":
        from PIL import Image

        resized = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size[1], size[0]), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous()
    return F.interpolate(image[None], size=size, mode=interpolation, antialias=True, align_corners=False)[0]


def fit_image(image: Union[np.ndarray, torch.Tensor], spec: PreprocessSpec) -> tuple[torch.Tensor, ImageFit]:
    """Fit one image into the ``S x S`` input square of ``spec`` (not normalised, not padded).

    Args:
        image: see :func:`image_to_tensor` (gray, RGBA, 16-bit and float arrays are converted).
        spec: the preprocessing to apply.

    Returns:
        ``(pixels, fit)``: ``pixels`` is ``[3, h, w]`` uint8 RGB (float32 for the
        ``"bicubic_float"`` interpolation) with ``h, w <= S`` (``< S`` only
        for ``longest_side_pad``, whose padding :func:`normalize` adds after normalising), and
        ``fit`` the :class:`ImageFit` mapping original coordinates to input coordinates.
    """
    pixels = image_to_tensor(image)
    H, W = int(pixels.shape[1]), int(pixels.shape[2])
    S = spec.input_size
    if spec.pre_resize is not None:  # resize_square: stretching twice still maps (H, W) onto (S, S)
        pixels = _resize_uint8(pixels, (spec.pre_resize[0],) * 2, spec.pre_resize[1])
    if spec.fit == "longest_side_pad":
        scale = S / max(H, W)
        # rounding as segment_anything.utils.transforms.ResizeLongestSide.get_preprocess_shape
        h, w = max(1, int(H * scale + 0.5)), max(1, int(W * scale + 0.5))
        out = _resize_uint8(pixels, (h, w), spec.interpolation)
        fit = ImageFit((H, W), (S, S), (h / H, w / W), (0.0, 0.0), (0, 0, w, h))
        return out, fit
    if spec.fit == "resize_square":
        out = _resize_uint8(pixels, (S, S), spec.interpolation)
        return out, ImageFit((H, W), (S, S), (S / H, S / W), (0.0, 0.0), (0, 0, S, S))
    # resize_center_crop: the shorter side goes to S / crop_pct, then the centre S x S crop (as
    # torchvision's Resize + CenterCrop). When the resized image would be huge (extreme aspect
    # ratios), only the source window that survives the crop (plus a margin covering the
    # resampling kernel) is resized: same result up to half a pixel of shift, bounded memory.
    short = S / spec.crop_pct
    scale = short / min(H, W)
    # torchvision's Resize(int): the longer side is truncated, not rounded
    full_h, full_w = (int(short), int(short * W / H)) if H <= W else (int(short * H / W), int(short))
    crop_top, crop_left = int(round((full_h - S) / 2.0)), int(round((full_w - S) / 2.0))
    if full_h * full_w <= _MAX_RESIZED_PIXELS:
        resized = _resize_uint8(pixels, (full_h, full_w), spec.interpolation)
        sy, sx, src_top, src_left, y0, x0 = full_h / H, full_w / W, 0, 0, crop_top, crop_left
    else:
        margin = math.ceil(4 / scale) + 2  # source pixels under the resampling kernel at the border
        win_h, win_w = min(H, math.ceil(S / scale) + 2 * margin), min(W, math.ceil(S / scale) + 2 * margin)
        src_top = min(max(0, int(math.floor(crop_top / scale)) - margin), H - win_h)
        src_left = min(max(0, int(math.floor(crop_left / scale)) - margin), W - win_w)
        window = pixels[:, src_top : src_top + win_h, src_left : src_left + win_w]
        rh, rw = max(S, int(round(win_h * scale))), max(S, int(round(win_w * scale)))
        resized = _resize_uint8(window, (rh, rw), spec.interpolation)
        sy, sx = rh / win_h, rw / win_w
        # where the full-image crop origin lands inside the resized window (the window origin
        # sits at src * full-image scale in the fully resized image)
        y0 = min(max(0, int(round(crop_top - src_top * full_h / H))), rh - S)
        x0 = min(max(0, int(round(crop_left - src_left * full_w / W))), rw - S)
    out = resized[:, y0 : y0 + S, x0 : x0 + S]
    assert tuple(out.shape[1:]) == (S, S), (out.shape, spec, (H, W))
    fit = ImageFit((H, W), (S, S), (sy, sx), (-src_top * sy - y0, -src_left * sx - x0), (0, 0, S, S))
    return out.contiguous(), fit


def normalize(pixels: torch.Tensor, spec: PreprocessSpec, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``pixels: [3, h, w]`` uint8 -> ``[3, S, S]`` normalised float, zero-padded bottom/right."""
    mean = torch.tensor(spec.pixel_mean, dtype=dtype, device=pixels.device)[:, None, None]
    std = torch.tensor(spec.pixel_std, dtype=dtype, device=pixels.device)[:, None, None]
    x = (pixels.to(dtype) - mean) / std
    S = spec.input_size
    h, w = x.shape[1:]
    if h > S or w > S:
        raise ValueError(f"normalize got pixels of size {h}x{w}, larger than the input size {S} of {spec.tag!r}.")
    return F.pad(x, (0, S - w, 0, S - h), value=0.0)


def prepare_batch(
    images: Sequence[Union[np.ndarray, torch.Tensor]],
    spec: PreprocessSpec,
    *,
    device: Optional[torch.device] = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[ImageFit]]:
    """Fit and normalise images: returns ``([N, 3, S, S] dtype, [ImageFit] * N)``."""
    if len(images) == 0:
        raise ValueError(f"prepare got no images; expected at least one image for {spec.tag!r}.")
    tensors, fits = [], []
    for image in images:
        pixels, fit = fit_image(image, spec)
        tensors.append(normalize(pixels.to(device) if device is not None else pixels, spec, dtype=dtype))
        fits.append(fit)
    return torch.stack(tensors), fits
