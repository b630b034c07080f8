"""Mask recognition with CLIP (issue 14, item 2): SAM masks -> CLIP image-space embeddings -> class
probabilities over a vocabulary plus background, and the fusion of text and image-prototype scores.

Two visual paths, both batched over masks (no per-mask Python loop; images are looped, masks never):

- :class:`CropRecognizer` (path a, the "image-crop" baseline of OVSAM): a square crop with context
  around each mask's box, the background outside the mask greyed, blurred or kept, resampled to the
  CLIP input and sent through the CLIP image tower (a ViT :class:`~..backbone.clip.CLIPBackbone`, or
  any CLIP tower with a fixed input size), ``chunk_size`` crops per forward.
- :class:`DensePoolRecognizer` (path b, the "feature-crop" baseline): one forward of a convolutional
  CLIP (:class:`~..backbone.clip.CLIPConvNeXtBackbone`, :class:`~..backbone.clip.CLIPResNetBackbone`)
  per image batch, masks resampled to its stride-32 grid (:func:`.mask_ops.resample_masks`), mask
  pooling and CLIP's own head per mask (``ConvCLIPBackbone.embed_masks``: LayerNorm + projection for
  ConvNeXt, the attention pool restricted to the mask for the ResNet). A mask that covers the whole
  image gives ``encode_image`` of the image (tested).

Signatures (what the meta-architectures call)::

    recognizer = CropRecognizer(clip=backbone, context=0.2, background="grey", blur_sigma=10.0,
                                supersample=2, chunk_size=64)
    recognizer = DensePoolRecognizer(clip=conv_backbone, input_size=1024, samples_per_cell=4)
    embeddings = recognizer(images, masks, image_sizes=None)   # list of [N_i, D], L2-normalised
        # images: [B, 3, H, W] uint8 or float RGB on the 0-255 scale (Detectron2's input convention),
        #   at the masks' resolution; one padded batch: image_sizes = [(h_i, w_i)] valid sizes (pixels
        #   beyond them are padding, treated as outside the image)
        # masks: per image [N_i, H, W] bool, or float in [0, 1] (soft masks / probabilities)
    # DensePoolRecognizer in two steps (encode once, recognise several mask sets):
    features, fit = recognizer.encode(images, image_sizes=None)
    embeddings = recognizer.embed(features, fit, masks)

    probs = open_vocab_probabilities(embeddings[i], prototypes, logit_scale=100.0, background=None,
                                     prototype_classes=None, num_classes=None)   # [N, K + 1]
    fused = fuse_class_probabilities(text_probs, image_probs, text_weight=w, background_text_weight=None)

``prototypes`` are :class:`~.text_prototypes.TextPrototypes` ``embeddings`` ``[K, D]`` (or
``synonym_embeddings`` with ``prototype_classes=synonym_class``: a class scores as its best synonym,
as OVSAM does), or image prototypes in the same CLIP space. The last column of every probability
table is the background.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from fvcore.common.registry import Registry

from ..backbone.base import EncoderBackbone
from ..backbone.clip import ConvCLIPBackbone
from ..preprocess import ImageFit
from .mask_ops import identity_fit, masks_to_boxes, resample_masks
from .text_prototypes import zero_shot_logits

__all__ = [
    "CROP_BACKGROUNDS",
    "CropRecognizer",
    "DensePoolRecognizer",
    "MASK_RECOGNIZER_REGISTRY",
    "MaskRecognizer",
    "fuse_class_probabilities",
    "open_vocab_probabilities",
]

#: what fills a crop outside its mask: CLIP's mean colour, a Gaussian-blurred image, or the image itself
CROP_BACKGROUNDS = ("grey", "blur", "keep")

ImageSizes = Optional[Sequence[tuple[int, int]]]

#: The mask recognizers a yacs config picks by name (``MODEL.SAMANTICS.OPEN_VOCAB.RECOGNIZER.NAME``,
#: as ``MODEL.BACKBONE.NAME`` picks a backbone); a new recognizer class registers itself here.
MASK_RECOGNIZER_REGISTRY = Registry("MASK_RECOGNIZER")


def _check_inputs(
    caller: str, images: torch.Tensor, masks: Sequence[torch.Tensor], image_sizes: ImageSizes
) -> list[tuple[int, int]]:
    """Validate ``images [B, 3, H, W]``, ``masks`` (B tensors ``[N_i, H, W]``) and ``image_sizes``;
    return the valid size of every image."""
    if images.ndim != 4 or images.shape[1] != 3 or not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise ValueError(
            f"{caller} takes images [B, 3, H, W] uint8 or float RGB (0-255); got shape {tuple(images.shape)} "
            f"dtype {images.dtype}."
        )
    B, _, H, W = images.shape
    if len(masks) != B:
        raise ValueError(f"{caller} got {B} images but {len(masks)} mask tensors; give one [N_i, H, W] tensor per image.")
    for i, m in enumerate(masks):
        if m.ndim != 3 or tuple(m.shape[-2:]) != (H, W):
            raise ValueError(
                f"{caller}: masks[{i}] has shape {tuple(m.shape)}; expected [N, {H}, {W}] (the images' resolution)."
            )
    sizes = [(H, W)] * B if image_sizes is None else [(int(h), int(w)) for h, w in image_sizes]
    if len(sizes) != B or any(not (0 < h <= H and 0 < w <= W) for h, w in sizes):
        raise ValueError(f"{caller} got image_sizes={image_sizes}; expected {B} (h, w) pairs within {H}x{W}.")
    return sizes


def _centred(images: torch.Tensor, pixel_mean: Sequence[float], sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[B, 3, H, W]`` float32: pixels minus the CLIP mean colour, 0 (the mean colour) beyond each valid size."""
    x = images.float() - images.new_tensor(pixel_mean, dtype=torch.float32)[:, None, None]
    H, W = x.shape[-2:]
    rows = torch.arange(H, device=x.device)
    cols = torch.arange(W, device=x.device)
    valid = torch.stack([(rows[:, None] < h) & (cols[None, :] < w) for h, w in sizes])  # [B, H, W]
    return x * valid[:, None]


def _soft_masks(masks: torch.Tensor) -> torch.Tensor:
    return masks.float() if masks.dtype == torch.bool else masks.float().clamp(0, 1)


class MaskRecognizer(nn.Module):
    """Base class: ``forward(images, masks, image_sizes=None) -> [N_i, D]`` L2-normalised CLIP
    image-space embeddings per image (comparable with ``TextPrototypes.embeddings``).

    Attributes:
        clip: the CLIP image tower.
        embed_dim: ``D``.
    """

    def __init__(self, *, clip: EncoderBackbone) -> None:
        super().__init__()
        if "image_embed" not in clip.available_features:
            raise ValueError(f"{type(self).__name__} needs a CLIP image tower (an 'image_embed' output); got {type(clip).__name__}.")
        self.clip = clip
        self.embed_dim: int = clip._available["image_embed"].channels

    def forward(
        self, images: torch.Tensor, masks: Sequence[torch.Tensor], *, image_sizes: ImageSizes = None
    ) -> list[torch.Tensor]:
        """Embed the masks of every image.

        Args:
            images: ``[B, 3, H, W]`` uint8 or float RGB on the 0-255 scale, at the masks' resolution.
            masks: ``B`` tensors ``[N_i, H, W]``, bool or float in [0, 1].
            image_sizes: valid ``(h, w)`` of each image in a padded batch (default: all of it).

        Returns:
            ``B`` tensors ``[N_i, D]`` float32, L2-normalised.
        """
        raise NotImplementedError


@MASK_RECOGNIZER_REGISTRY.register()
class CropRecognizer(MaskRecognizer):
    """Path (a): one square crop per mask through the CLIP image tower.

    Each crop is the square centred on the mask's box (pixels where the mask is > 0.5, box edges
    exclusive) with side ``(1 + context) x`` the box's longer side (at least 1 pixel), resampled to
    the tower's ``S x S`` input: every crop pixel averages ``supersample x supersample`` bilinear
    samples (antialiasing for crops larger than ``S``). At every sample the image is blended with
    the background by the (bilinearly sampled) mask: ``bg + m * (image - bg)``. The background is
    CLIP's mean colour (``"grey"``, 0 after normalisation), the image blurred by a Gaussian of
    ``blur_sigma`` image pixels (``"blur"``), or the image (``"keep"``: no masking). Parts of a crop
    outside the image (or beyond ``image_sizes``) read the mean colour.

    Args:
        clip: a CLIP image tower with a fixed input size (:class:`~..backbone.clip.CLIPBackbone`;
            its ``img_size``, pixel mean and std, and ``image_embed`` output are used).
        context: share of the box's longer side added to the square side (0.2: 20 % context).
        background: one of :data:`CROP_BACKGROUNDS`.
        blur_sigma: ``"blur"`` only: the Gaussian's sigma in image pixels.
        supersample: samples per crop pixel and axis.
        chunk_size: crops per CLIP forward.
    """

    def __init__(
        self,
        *,
        clip: EncoderBackbone,
        context: float = 0.2,
        background: str = "grey",
        blur_sigma: float = 10.0,
        supersample: int = 2,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(clip=clip)
        if background not in CROP_BACKGROUNDS:
            raise ValueError(f"CropRecognizer got background={background!r}; expected one of {CROP_BACKGROUNDS}.")
        if context < 0 or blur_sigma <= 0 or supersample < 1 or chunk_size < 1:
            raise ValueError(
                f"CropRecognizer got context={context}, blur_sigma={blur_sigma}, supersample={supersample}, "
                f"chunk_size={chunk_size}; expected context >= 0, blur_sigma > 0, supersample >= 1, chunk_size >= 1."
            )
        self.context, self.background, self.blur_sigma = float(context), background, float(blur_sigma)
        self.supersample, self.chunk_size = int(supersample), int(chunk_size)
        self.crop_size: int = int(clip.img_size)

    def crop_boxes(self, masks: torch.Tensor) -> torch.Tensor:
        """``masks [N, H, W]`` -> ``[N, 4]`` float XYXY squares (image pixels, edges) to crop."""
        boxes = masks_to_boxes(masks > 0.5 if masks.is_floating_point() else masks, convention="exclusive")
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        side = ((boxes[:, 2:] - boxes[:, :2]).amax(dim=1) * (1 + self.context)).clamp_min(1.0)
        return torch.cat([centre - side[:, None] / 2, centre + side[:, None] / 2], dim=1)

    def sample_grid(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``boxes [N, 4]`` -> ``[N, S*k, S*k, 2]`` ``grid_sample`` coordinates (x, y; ``align_corners=False``)
        of the sample points of every crop, ``k = supersample``."""
        n = self.crop_size * self.supersample
        steps = (torch.arange(n, dtype=torch.float32, device=boxes.device) + 0.5) / n  # [n] in (0, 1)
        xs = boxes[:, 0:1] + steps * (boxes[:, 2:3] - boxes[:, 0:1])  # [N, n] image pixels
        ys = boxes[:, 1:2] + steps * (boxes[:, 3:4] - boxes[:, 1:2])
        gx = (xs / width * 2 - 1)[:, None, :].expand(-1, n, -1)
        gy = (ys / height * 2 - 1)[:, :, None].expand(-1, -1, n)
        return torch.stack([gx, gy], dim=-1)

    def _blurred(self, centred: torch.Tensor) -> torch.Tensor:
        """``[1, 3, H, W]`` -> the same, Gaussian-blurred (separable, edges replicated)."""
        radius = max(1, math.ceil(3 * self.blur_sigma))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=centred.device)
        kernel = torch.exp(-(taps**2) / (2 * self.blur_sigma**2))
        kernel = (kernel / kernel.sum()).repeat(3, 1)[:, None]  # [3, 1, 2r+1]
        x = F.pad(centred, (radius, radius, radius, radius), mode="replicate")
        x = F.conv2d(x, kernel[..., None, :], groups=3)  # along x
        return F.conv2d(x, kernel[..., :, None], groups=3)  # along y

    def crops(self, centred: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Normalised crops of one image.

        Args:
            centred: ``[3, H, W]`` float32, the image minus CLIP's mean colour (0 outside the image).
            masks: ``[N, H, W]`` bool or float in [0, 1].

        Returns:
            ``[N, 3, S, S]`` the CLIP tower's input.
        """
        H, W = centred.shape[-2:]
        n = masks.shape[0]
        grid = self.sample_grid(self.crop_boxes(masks), H, W)
        sample = dict(mode="bilinear", padding_mode="zeros", align_corners=False)
        image = F.grid_sample(centred[None].expand(n, -1, -1, -1), grid, **sample)  # [N, 3, S*k, S*k]
        if self.background != "keep":
            m = F.grid_sample(_soft_masks(masks)[:, None], grid, **sample)  # [N, 1, S*k, S*k]
            if self.background == "grey":
                image = image * m
            else:
                bg = F.grid_sample(self._blurred(centred[None]).expand(n, -1, -1, -1), grid, **sample)
                image = bg + m * (image - bg)
        if self.supersample > 1:
            image = F.avg_pool2d(image, self.supersample)
        std = torch.tensor(self.clip.preprocess.pixel_std, dtype=torch.float32, device=image.device)
        return image / std[:, None, None]

    def forward(
        self, images: torch.Tensor, masks: Sequence[torch.Tensor], *, image_sizes: ImageSizes = None
    ) -> list[torch.Tensor]:
        sizes = _check_inputs(type(self).__name__, images, masks, image_sizes)
        centred = _centred(images, self.clip.preprocess.pixel_mean, sizes)
        dtype = self.clip._param_device_dtype()[1]
        outputs = []
        for image, image_masks in zip(centred, masks):  # images, never masks
            chunks = [
                self.clip(self.crops(image, image_masks[i : i + self.chunk_size]).to(dtype))["image_embed"]
                for i in range(0, image_masks.shape[0], self.chunk_size)
            ]
            embeds = torch.cat(chunks) if chunks else image.new_zeros((0, self.embed_dim))
            outputs.append(F.normalize(embeds.float(), dim=-1))
        return outputs


@MASK_RECOGNIZER_REGISTRY.register()
class DensePoolRecognizer(MaskRecognizer):
    """Path (b): mask pooling of a convolutional CLIP's dense map, then CLIP's own head per mask.

    :meth:`encode` normalises the batch, optionally resizes it so its longer side is ``input_size``
    (bilinear, antialiased: e.g. 1024 as OVSAM's SAM-sized input), pads it to a multiple of the
    stride (32) with the mean colour and runs the tower once. :meth:`embed` resamples each mask to
    the stride-32 grid (:func:`.mask_ops.resample_masks`: the covered share of every cell, from
    ``samples_per_cell x samples_per_cell`` bilinear samples per cell) and calls the tower's
    ``embed_masks`` on all masks of all images at once (images with fewer masks are padded with
    empty masks, dropped afterwards). A mask with no weight on the grid (empty, or a few pixels that
    fall between the samples) gets a finite but meaningless embedding: raise ``samples_per_cell``
    or drop such masks before.

    OVSAM's published "feature-crop" baseline differs: it RoI-aligns the box of each prompt to the
    tower's native grid and runs the unchanged attention pool; this class pools under the mask.

    Args:
        clip: a :class:`~..backbone.clip.ConvCLIPBackbone` (ConvNeXt or ResNet CLIP).
        input_size: longer side of the tower's input; None: the images' own size.
        samples_per_cell: mask samples per grid cell and axis.
    """

    def __init__(self, *, clip: ConvCLIPBackbone, input_size: Optional[int] = None, samples_per_cell: int = 4) -> None:
        if not isinstance(clip, ConvCLIPBackbone):
            raise TypeError(
                f"DensePoolRecognizer needs a convolutional CLIP tower (ConvCLIPBackbone: tags clip_convnext_*, "
                f"clip_rn50x16_openai); got {type(clip).__name__}. Mask-pooled ViT features recognise poorly "
                "(OVSAM: 14.3 Acc); use CropRecognizer for a ViT."
            )
        super().__init__(clip=clip)
        if (input_size is not None and input_size < clip.stride) or samples_per_cell < 1:
            raise ValueError(
                f"DensePoolRecognizer got input_size={input_size}, samples_per_cell={samples_per_cell}; expected "
                f"input_size None or >= {clip.stride}, samples_per_cell >= 1."
            )
        self.input_size, self.samples_per_cell = input_size, int(samples_per_cell)

    def encode(self, images: torch.Tensor, *, image_sizes: ImageSizes = None) -> tuple[torch.Tensor, ImageFit]:
        """``images [B, 3, H, W]`` (0-255) -> ``(features [B, C, h, w], fit)``: ``fit`` maps the ``H x W``
        image frame to the tower's padded input (one fit for the whole batch)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"DensePoolRecognizer.encode takes images [B, 3, H, W]; got {tuple(images.shape)}.")
        B, _, H, W = images.shape
        sizes = _check_inputs("DensePoolRecognizer.encode", images, [images.new_zeros((0, H, W))] * B, image_sizes)
        spec = self.clip.preprocess
        x = _centred(images, spec.pixel_mean, sizes)
        scale = 1.0 if self.input_size is None else self.input_size / max(H, W)
        h, w = max(1, round(H * scale)), max(1, round(W * scale))
        if (h, w) != (H, W):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = x / torch.tensor(spec.pixel_std, dtype=x.dtype, device=x.device)[:, None, None]
        stride = self.clip.stride
        hp, wp = -(-h // stride) * stride, -(-w // stride) * stride
        x = F.pad(x, (0, wp - w, 0, hp - h))
        fit = ImageFit((H, W), (hp, wp), (h / H, w / W), (0.0, 0.0), (0, 0, w, h))
        dtype = self.clip._param_device_dtype()[1]
        return self.clip.feature_map(x.to(dtype)), fit

    def embed(self, features: torch.Tensor, fit: ImageFit, masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``features [B, C, h, w]`` and ``fit`` from :meth:`encode`, ``masks``: ``B`` tensors ``[N_i, H, W]``
        on the image frame -> ``B`` tensors ``[N_i, D]``, L2-normalised."""
        B, _, h, w = features.shape
        if len(masks) != B:
            raise ValueError(f"DensePoolRecognizer.embed got {B} feature maps but {len(masks)} mask tensors.")
        H, W = fit.original_size
        counts = [int(m.shape[0]) for m in masks]
        most = max(counts, default=0)
        if most == 0:
            return [features.new_zeros((0, self.embed_dim), dtype=torch.float32) for _ in masks]
        src = identity_fit(H, W)
        weights = features.new_zeros((B, most, h, w), dtype=torch.float32)
        for i, m in enumerate(masks):  # images, never masks
            if tuple(m.shape[-2:]) != (H, W):
                raise ValueError(f"DensePoolRecognizer.embed: masks[{i}] has shape {tuple(m.shape)}; expected [N, {H}, {W}].")
            if counts[i]:
                weights[i, : counts[i]] = resample_masks(
                    _soft_masks(m), src_fit=src, dst_fit=fit, grid_size=(h, w), patch_size=self.clip.stride,
                    samples_per_patch=self.samples_per_cell, probabilities=True,
                )
        embeds = F.normalize(self.clip.embed_masks(features, weights.to(features.dtype)).float(), dim=-1)
        return [embeds[i, :n] for i, n in enumerate(counts)]

    def forward(
        self, images: torch.Tensor, masks: Sequence[torch.Tensor], *, image_sizes: ImageSizes = None
    ) -> list[torch.Tensor]:
        _check_inputs(type(self).__name__, images, masks, image_sizes)
        features, fit = self.encode(images, image_sizes=image_sizes)
        return self.embed(features, fit, masks)


def open_vocab_probabilities(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    logit_scale: float,
    background: Union[None, float, torch.Tensor] = None,
    prototype_classes: Optional[torch.Tensor] = None,
    num_classes: Optional[int] = None,
) -> torch.Tensor:
    """Class probabilities of mask embeddings over a vocabulary plus a background entry.

    Logits are ``logit_scale x cosine`` (CLIP's zero-shot logits, :func:`.text_prototypes.zero_shot_logits`);
    with ``prototype_classes`` several prototype rows belong to one class (synonyms, several image
    prototypes) and a class takes its best row's logit (OVSAM's max over synonyms). The background's
    logit is ``logit_scale x`` a cosine too: that of a background embedding (a ``[D]`` tensor, e.g. the
    text prototype of "background"), or a fixed cosine (a float: masks whose best class is less
    similar than it lean to background). A softmax over the ``K`` class logits and the background's
    gives the probabilities. ``background=None``: no background (its column is 0).

    Args:
        embeddings: ``[N, D]`` mask embeddings (normalised here).
        prototypes: ``[R, D]`` L2-normalised prototypes (``R = K`` without ``prototype_classes``).
        logit_scale: the multiplier (CLIP: ``logit_scale.exp()``, 100 for OpenAI's models and OVSAM).
        background: None, a cosine (float), or a ``[D]`` embedding.
        prototype_classes: ``[R]`` int64 class of each prototype row.
        num_classes: ``K`` (default: ``prototype_classes.max() + 1``, or ``R``).

    Returns:
        ``[N, K + 1]`` float32: probabilities, the last column the background's; rows sum to 1.
    """
    logits = zero_shot_logits(embeddings.float(), prototypes.float(), logit_scale=logit_scale)  # [N, R]
    if prototype_classes is not None:
        classes = prototype_classes.to(device=logits.device, dtype=torch.long)
        if classes.shape != (prototypes.shape[0],):
            raise ValueError(
                f"open_vocab_probabilities got prototype_classes of shape {tuple(prototype_classes.shape)}; expected "
                f"[{prototypes.shape[0]}] (one class per prototype row)."
            )
        K = int(classes.max()) + 1 if num_classes is None else num_classes
        per_class = logits.new_full((logits.shape[0], K), float("-inf"))
        logits = per_class.scatter_reduce(1, classes[None].expand_as(logits), logits, reduce="amax")
    elif num_classes is not None and num_classes != logits.shape[1]:
        raise ValueError(f"open_vocab_probabilities got num_classes={num_classes} for {logits.shape[1]} prototypes.")
    if background is None:
        bg = logits.new_full((logits.shape[0], 1), float("-inf"))
    elif isinstance(background, torch.Tensor):
        if background.shape != (embeddings.shape[1],):
            raise ValueError(
                f"open_vocab_probabilities got a background embedding of shape {tuple(background.shape)}; expected "
                f"[{embeddings.shape[1]}]."
            )
        bg = zero_shot_logits(embeddings.float(), F.normalize(background.float(), dim=0)[None], logit_scale=logit_scale)
    else:
        bg = logits.new_full((logits.shape[0], 1), logit_scale * float(background))
    return torch.cat([logits, bg], dim=1).softmax(dim=1)


def fuse_class_probabilities(
    text_probs: torch.Tensor,
    image_probs: torch.Tensor,
    *,
    text_weight: Union[float, torch.Tensor],
    background_text_weight: Optional[float] = None,
) -> torch.Tensor:
    """Weighted geometric mean of two class distributions (text prototypes, image prototypes), renormalised.

    ``p(c) ∝ p_text(c) ** w_c * p_image(c) ** (1 - w_c)`` for each of the ``K`` classes and the
    background, then divided by the row sum, as OVSAM (after F-VLM) fuses its two classifiers with
    one weight for base and one for novel classes. Per-class weights let classes defined by words
    (``w = 1``: text only) and by examples (``w = 0``: image only) live in one model.

    Background: fused like a class with weight ``background_text_weight``; default: the mean of the
    class weights (with one scalar ``text_weight``, the plain weighted geometric mean of the two
    distributions). ``0 ** 0`` counts as 1 (a distribution with weight 0 does not vote).

    Args:
        text_probs: ``[N, K + 1]`` (last column: background), from :func:`open_vocab_probabilities`.
        image_probs: ``[N, K + 1]``, the same classes in the same order.
        text_weight: a float, or ``[K]`` per class, in [0, 1].
        background_text_weight: the background's weight, in [0, 1].

    Returns:
        ``[N, K + 1]`` float32 probabilities (rows sum to 1).
    """
    if text_probs.shape != image_probs.shape or text_probs.ndim != 2:
        raise ValueError(
            f"fuse_class_probabilities takes two [N, K + 1] tables of the same shape; got {tuple(text_probs.shape)} "
            f"and {tuple(image_probs.shape)}."
        )
    K = text_probs.shape[1] - 1
    weights = torch.as_tensor(text_weight, dtype=torch.float32, device=text_probs.device)
    weights = weights.expand(K) if weights.ndim == 0 else weights
    if weights.shape != (K,):
        raise ValueError(f"fuse_class_probabilities got text_weight of shape {tuple(weights.shape)}; expected a float or [{K}].")
    bg = weights.mean() if background_text_weight is None else weights.new_tensor(float(background_text_weight))
    w = torch.cat([weights, bg[None]])
    if bool(((w < 0) | (w > 1)).any()):
        raise ValueError(f"fuse_class_probabilities: weights must lie in [0, 1]; got {w.tolist()}.")
    log_fused = torch.xlogy(w, text_probs.float()) + torch.xlogy(1 - w, image_probs.float())
    return log_fused.softmax(dim=1)
