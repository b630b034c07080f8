"""The memory bank of the training-free pipeline ("compute_embeds"): one feature per reference instance.

For every reference instance, the semantic encoder (any :class:`EncoderBackbone`) sees either a
square crop around the instance, stretched to the encoder's input square, or the whole image
(``crop="full"``: fitted per the encoder's own preprocessing). The square is the box's longer side
plus ``context`` of it on each side, either padded with the pixel mean where it leaves the image
(``crop="square_context"``) or, as "No Time to Train" crops (``COCOMemoryFillCropDataset``),
centred on the integer box and clipped to the image (``crop="square_clipped"``: then no longer
square at the border). The instance mask goes to the patch grid as soft weights, by area
interpolation (``mask_weights="area"``) or as "No Time to Train" does (``"bilinear_nearest"``:
bilinear to the input size, then nearest to the patch grid), and the mask-weighted mean of the
dense features is the shot's feature. References are processed in batches: one encoder forward
per batch.

A :class:`MemoryBank` keeps the per-shot features ``[S, D]`` in the one reference order of
:mod:`samantics_d2.references` (category id, then shot rank, then annotation id), so prototypes for
the first k shots per class come without recomputing (:meth:`MemoryBank.prototypes`). It is stored
by the references store (safetensors + JSON provenance, :mod:`samantics_d2.references.store`);
:meth:`MemoryBank.load_or_build` reuses a stored bank only when its provenance matches exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ...d2 import BoxMode
from ...references.ordering import ReferenceInstance, order_references
from ...references.store import (
    StoredFeatures,
    load_features,
    load_or_build_features,
    reference_provenance,
    save_features,
)
from ..backbone.base import EncoderBackbone
from ..preprocess import INTERPOLATIONS, ImageFit, PreprocessSpec, prepare_batch
from .mask_ops import mask_pooling

__all__ = [
    "AGGREGATIONS",
    "CROP_MODES",
    "MASK_WEIGHTS",
    "MEMORY_BANK_FORMAT",
    "MemoryBank",
    "MemoryBankConfig",
    "crop_mask_weights",
    "crop_padded",
    "clipped_context_window",
    "kmeans",
    "reference_preprocess",
    "square_context_window",
    "weights_identity",
]

logger = logging.getLogger(__name__)

MEMORY_BANK_FORMAT = 1
CROP_MODES = ("square_context", "square_clipped", "full")
MASK_WEIGHTS = ("area", "bilinear_nearest")
AGGREGATIONS = ("mean", "kmeans", "all")


@dataclass(frozen=True)
class MemoryBankConfig:
    """How reference features are computed.

    Attributes:
        crop: ``"square_context"`` (a square around the instance's box, padded with the pixel
            mean outside the image), ``"square_clipped"`` (the same square from the integer box,
            clipped to the image: "No Time to Train") or ``"full"`` (the whole image, fitted per
            the encoder's preprocessing).
        context: square crops only: margin added on each side, as a share of the box's longer
            side (0.2: the square's side is 1.4 x the longer side; "No Time to Train"'s
            ``context_ratio=0.2`` is the whole margin, 0.1 per side here).
        mask_weights: ``"area"`` (area interpolation of the cropped mask onto the patch grid) or
            ``"bilinear_nearest"`` (bilinear to the encoder's input size, then nearest onto the
            patch grid: "No Time to Train"'s ``F.interpolate`` pair).
        crop_interpolation: square crops only: how the crop is resized onto the input square (one
            of :data:`~samantics_d2.modeling.preprocess.INTERPOLATIONS`; None: the encoder's own;
            "No Time to Train": ``"bicubic_float"``).
        batch_size: reference instances per encoder forward (does not change the result, so it is
            not part of the provenance). None: :func:`auto_batch_size` (16 on a GPU; on a CPU as
            many as fit in :data:`CPU_TOKENS_PER_FORWARD` patch tokens).
        autocast: None (the encoder's own dtype: the faithful recipe) or ``"bf16"`` / ``"fp16"``:
            the encoder forwards run under ``torch.autocast`` with that dtype (faster where the
            hardware has it, e.g. AVX512-BF16 CPUs; the features differ from float32 by the
            dtype's rounding, so it is part of the provenance).
    """

    crop: str = "square_context"
    context: float = 0.2
    mask_weights: str = "area"
    crop_interpolation: Optional[str] = None
    batch_size: Optional[int] = None
    autocast: Optional[str] = None

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"MemoryBankConfig got crop={self.crop!r}; expected one of {CROP_MODES}.")
        if self.mask_weights not in MASK_WEIGHTS:
            raise ValueError(f"MemoryBankConfig got mask_weights={self.mask_weights!r}; expected one of {MASK_WEIGHTS}.")
        if self.crop_interpolation is not None and self.crop_interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"MemoryBankConfig got crop_interpolation={self.crop_interpolation!r}; expected None (the encoder's "
                f"own) or one of {INTERPOLATIONS}."
            )
        if not (isinstance(self.context, (int, float)) and 0.0 <= self.context <= 10.0):
            raise ValueError(f"MemoryBankConfig got context={self.context!r}; expected a share in [0, 10] (0.2: 20 %).")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(f"MemoryBankConfig got batch_size={self.batch_size!r}; expected None (automatic) or an int >= 1.")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(
                f"MemoryBankConfig got autocast={self.autocast!r}; expected None (the encoder's dtype) or one of "
                f"{tuple(AUTOCAST_DTYPES)}."
            )

    def describe(self) -> dict[str, Any]:
        """The settings that change the features (part of the provenance)."""
        out: dict[str, Any] = {"crop": self.crop, "mask_resize": self.mask_weights, "pooling": "mask_weighted_mean"}
        if self.crop != "full":  # (the crop's interpolation is in the provenance's preprocess)
            padding = "pixel_mean" if self.crop == "square_context" else "none (clipped)"
            out.update(context=float(self.context), padding=padding, fit="resize_square")
        if self.autocast is not None:
            out["autocast"] = self.autocast
        return out


#: MemoryBankConfig.autocast -> the torch dtype the encoder forwards are autocast to
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: patch tokens per encoder forward on a CPU when ``batch_size`` is None. Measured on a 2-core AMD
#: EPYC (DINOv2 ViT-S/14, float32): at 518 px (1369 tokens) 1-3 crops per forward cost 0.64-0.75
#: s each and 16 cost 0.93-1.05 s each (the activations of one crop stay in cache); at 224 px (256
#: tokens) 16 per forward are about 10 % faster than 1.
CPU_TOKENS_PER_FORWARD = 4096


def auto_batch_size(device: torch.device, tokens_per_input: int) -> int:
    """References per encoder forward when ``MemoryBankConfig.batch_size`` is None: 16 on a GPU; on
    a CPU ``CPU_TOKENS_PER_FORWARD // tokens_per_input`` clamped to [1, 16]."""
    if device.type != "cpu":
        return 16
    return max(1, min(16, CPU_TOKENS_PER_FORWARD // max(1, tokens_per_input)))


def weights_identity(weights: Optional[Union[str, os.PathLike]] = None, *, seed: Optional[int] = None) -> str:
    """What identifies an encoder's weights in a provenance: the file's SHA-256, or ``"random-init:<seed>"``."""
    if weights is not None:
        from ..weights import sha256_of

        return sha256_of(weights)
    if seed is None:
        raise ValueError("weights_identity needs a weights file or, for randomly initialised weights, the seed.")
    return f"random-init:{seed}"


# ------------------------------------------------------------------------------------------------
# Reference instances


def _xywh_box(ann: dict, mask: np.ndarray) -> tuple[float, float, float, float]:
    """The annotation's box in XYWH_ABS (from the mask when it has none)."""
    if "bbox" in ann:
        box = BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYWH_ABS)
        return tuple(float(v) for v in box)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min()))


def crop_padded(array: np.ndarray, window: tuple[int, int, int, int], fill: Any) -> np.ndarray:
    """``array[y0:y1, x0:x1]`` with the part outside the array filled with ``fill``."""
    y0, x0, y1, x1 = window
    out = np.empty((y1 - y0, x1 - x0, *array.shape[2:]), dtype=array.dtype)
    out[...] = fill
    H, W = array.shape[:2]
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, H), min(x1, W)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = array[sy0:sy1, sx0:sx1]
    return out


def square_context_window(box: tuple[float, float, float, float], context: float) -> tuple[int, int, int, int]:
    """Integer ``(y0, x0, y1, x1)`` of the square around an XYWH box with ``context`` margin per side."""
    x, y, w, h = box
    side = max(1, math.ceil(max(w, h, 1.0) * (1.0 + 2.0 * context)))
    x0 = int(math.floor(x + w / 2.0 - side / 2.0 + 0.5))
    y0 = int(math.floor(y + h / 2.0 - side / 2.0 + 0.5))
    return (y0, x0, y0 + side, x0 + side)


def clipped_context_window(
    box: tuple[float, float, float, float], context: float, image_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``(y0, x0, y1, x1)`` of "No Time to Train"'s reference crop (``COCOMemoryFillCropDataset``):
    the XYWH box truncated to integers, a square of ``(1 + 2 * context)`` x its longer side centred
    on it, each bound truncated and clipped to the ``(H, W)`` image (at least one pixel kept)."""
    H, W = image_size
    x1, y1, x2, y2 = int(box[0]), int(box[1]), int(box[0] + box[2]), int(box[1] + box[3])
    mid_x, mid_y = (x1 + x2) * 0.5, (y1 + y2) * 0.5
    half = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * context) * 0.5
    cx0, cy0 = max(0, int(mid_x - half)), max(0, int(mid_y - half))
    cx1, cy1 = min(W, int(mid_x + half)), min(H, int(mid_y + half))
    cx0, cy0 = min(cx0, W - 1), min(cy0, H - 1)  # degenerate boxes: keep one pixel
    return (cy0, cx0, max(cy1, cy0 + 1), max(cx1, cx0 + 1))


def _input_window(fit: ImageFit) -> tuple[int, int, int, int]:
    """The encoder's input square in original pixels, rounded: ``(y0, x0, y1, x1)`` (may exceed the image)."""
    (sy, sx), (ty, tx), (S_h, S_w) = fit.scale, fit.offset, fit.input_size
    y0, x0 = int(round(-ty / sy)), int(round(-tx / sx))
    y1, x1 = max(y0 + 1, int(round((S_h - ty) / sy))), max(x0 + 1, int(round((S_w - tx) / sx)))
    return (y0, x0, y1, x1)


def crop_mask_weights(
    masks: Sequence[np.ndarray], grid: tuple[int, int], *, mode: str = "area", input_size: Optional[int] = None
) -> torch.Tensor:
    """``[N, h, w]`` soft weights of cropped masks (any sizes) on the ``grid`` patch grid.

    Args:
        mode: ``"area"`` (area interpolation) or ``"bilinear_nearest"`` (bilinear, no antialias,
            to ``input_size x input_size``, then nearest, i.e. input pixel ``floor(i * S / h)`` for
            patch ``i``).
    """
    if mode not in MASK_WEIGHTS:
        raise ValueError(f"crop_mask_weights got mode={mode!r}; expected one of {MASK_WEIGHTS}.")
    if mode == "bilinear_nearest" and input_size is None:
        raise ValueError("crop_mask_weights(mode='bilinear_nearest') needs the encoder's input_size.")
    out = []
    for m in masks:
        x = torch.from_numpy(m).float()[None, None]
        if mode == "area":
            out.append(F.adaptive_avg_pool2d(x, grid)[0, 0])
        else:
            x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
            out.append(F.interpolate(x, size=grid, mode="nearest")[0, 0])
    return torch.stack(out)


def _model_device_dtype(backbone: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in backbone.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _backbone_description(backbone: EncoderBackbone) -> dict[str, Any]:
    return {
        "class": type(backbone).__name__,
        "variant": getattr(backbone, "variant", None),
        "size": getattr(backbone, "size", None),
        "dense_feature": backbone.dense_feature,
        "channels": backbone.output_shape()[backbone.dense_feature].channels,
    }


# ------------------------------------------------------------------------------------------------
# Aggregation


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 50) -> torch.Tensor:
    """Deterministic k-means (k-means++ seeding with a seeded generator, then Lloyd steps).

    Args:
        points: ``[n, D]`` float; ``n > k``.
        k: number of centres.

    Returns:
        ``[k, D]`` centres (an emptied cluster keeps its previous centre).
    """
    n = points.shape[0]
    assert n > k >= 1, (n, k)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = points.float().cpu()
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    distance = ((x - x[chosen[0]]) ** 2).sum(dim=1)
    for _ in range(1, k):
        probs = distance / distance.sum() if distance.sum() > 0 else torch.full((n,), 1.0 / n)
        chosen.append(int(torch.multinomial(probs, 1, generator=generator)))
        distance = torch.minimum(distance, ((x - x[chosen[-1]]) ** 2).sum(dim=1))
    centres = x[chosen].clone()
    assignment = None
    for _ in range(iterations):
        new_assignment = torch.cdist(x, centres).argmin(dim=1)
        if assignment is not None and torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
        counts = torch.bincount(assignment, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
    return centres.to(points.device)


class MemoryBank:
    """Per-shot reference features, grouped by class, with their provenance.

    Attributes:
        features: ``[S, D]`` float32 mask-weighted mean features (not normalised), grouped by class
            id, in reference-set order within a class.
        class_ids: ``[S]`` int64, non-decreasing.
        valid: ``[S]`` bool: the shot's mask covered part of the encoder input (invalid shots are
            never used but still count as shots, so ``shots=k`` means "the first k references").
        num_classes: ``K``; classes without valid shots get no prototype.
        annotation_ids: ``S`` reference annotation ids (ints, or ``"<image_id>:<index>"``).
        provenance: JSON-able description of what the bank was built from.
    """

    def __init__(
        self,
        *,
        features: torch.Tensor,
        class_ids: torch.Tensor,
        valid: torch.Tensor,
        num_classes: int,
        annotation_ids: Sequence[Union[int, str]],
        provenance: dict[str, Any],
    ) -> None:
        S = features.shape[0]
        if features.ndim != 2 or class_ids.shape != (S,) or valid.shape != (S,) or len(annotation_ids) != S:
            raise ValueError(
                f"MemoryBank got features {tuple(features.shape)}, class_ids {tuple(class_ids.shape)}, valid "
                f"{tuple(valid.shape)} and {len(annotation_ids)} annotation ids; expected [S, D], [S], [S] and S."
            )
        unsorted = S > 1 and bool((class_ids[1:] < class_ids[:-1]).any())
        if S and (unsorted or int(class_ids.min()) < 0 or int(class_ids.max()) >= num_classes):
            raise ValueError(f"MemoryBank class_ids must be sorted and in [0, {num_classes}).")
        self.features = features.float()
        self.class_ids = class_ids.long()
        self.valid = valid.bool()
        self.num_classes = int(num_classes)
        self.annotation_ids = list(annotation_ids)
        self.provenance = provenance

    def __len__(self) -> int:
        return self.features.shape[0]

    def __repr__(self) -> str:
        return (
            f"MemoryBank(shots={len(self)}, dim={self.features.shape[1]}, classes={self.num_classes}, "
            f"empty_classes={int((self.shots_per_class() == 0).sum())})"
        )

    def shots_per_class(self, shots: Optional[int] = None) -> torch.Tensor:
        """``[K]`` int64: valid shots per class among the first ``shots`` (all when None)."""
        return torch.bincount(self.class_ids[self._selected(shots)], minlength=self.num_classes)

    def _selected(self, shots: Optional[int]) -> torch.Tensor:
        """``[S]`` bool: valid shots among the first ``shots`` of their class."""
        if shots is None:
            return self.valid.clone()
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise ValueError(f"MemoryBank.prototypes got shots={shots!r}; expected an int >= 1 or None (all).")
        counts = torch.bincount(self.class_ids, minlength=self.num_classes)
        start = torch.cumsum(counts, 0) - counts
        position = torch.arange(len(self)) - start[self.class_ids]
        return self.valid & (position < shots)

    def prototypes(
        self,
        *,
        shots: Optional[int] = None,
        aggregation: str = "mean",
        num_centres: int = 4,
        seed: int = 0,
        device: Optional[Union[str, torch.device]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class prototypes from the first ``shots`` references of every class (all when None).

        Args:
            aggregation: ``"mean"`` (one prototype: mean of the per-shot features, then
                L2-normalised), ``"kmeans"`` (``num_centres`` k-means centres of the normalised
                shot features, seeded; a class with at most ``num_centres`` shots uses all of
                them) or ``"all"`` (every shot its own prototype).
            num_centres: ``kmeans`` only.
            seed: ``kmeans`` only.
            device: where to put the result (default: CPU).

        Returns:
            ``(prototypes [K, M, D] float32, valid [K, M] bool)``, L2-normalised; rows of classes
            without valid shots and padding rows are zero and invalid.
        """
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"MemoryBank.prototypes got aggregation={aggregation!r}; expected one of {AGGREGATIONS}.")
        selected = self._selected(shots)
        K, D = self.num_classes, self.features.shape[1]
        feats, classes = self.features[selected], self.class_ids[selected]
        counts = torch.bincount(classes, minlength=K)
        if aggregation == "mean":
            sums = torch.zeros(K, D).index_add_(0, classes, feats)
            protos = F.normalize(sums / counts.clamp_min(1)[:, None], dim=-1)[:, None]
            valid = (counts > 0)[:, None]
        elif aggregation == "all":
            M = max(1, int(counts.max())) if K else 1
            position = torch.arange(len(classes)) - (torch.cumsum(counts, 0) - counts)[classes]
            protos = torch.zeros(K, M, D)
            valid = torch.zeros(K, M, dtype=torch.bool)
            protos[classes, position] = F.normalize(feats, dim=-1)
            valid[classes, position] = True
        else:
            if isinstance(num_centres, bool) or not isinstance(num_centres, int) or num_centres < 1:
                raise ValueError(f"MemoryBank.prototypes got num_centres={num_centres!r}; expected an int >= 1.")
            protos = torch.zeros(K, num_centres, D)
            valid = torch.zeros(K, num_centres, dtype=torch.bool)
            normalised = F.normalize(feats, dim=-1)
            for c in torch.nonzero(counts).squeeze(1).tolist():  # per class, at build time (CPU)
                members = normalised[classes == c]
                centres = members if len(members) <= num_centres else kmeans(members, num_centres, seed=seed)
                protos[c, : len(centres)] = F.normalize(centres, dim=-1)
                valid[c, : len(centres)] = True
        return protos.to(device) if device is not None else protos, valid.to(device) if device is not None else valid

    # ------------------------------------------------------------------ building

    @staticmethod
    def describe(**inputs: Any) -> dict[str, Any]:
        """The provenance a bank built from ``inputs`` (the keyword arguments of :meth:`build`) has;
        computes no feature (keys: :mod:`samantics_d2.references.store`)."""
        references, num_classes = inputs.pop("references"), inputs["num_classes"]
        items = order_references(references, num_classes, class_names=inputs.get("class_names"))
        return _provenance(items, **inputs)

    @classmethod
    def build(
        cls,
        *,
        references: Sequence[dict],
        backbone: EncoderBackbone,
        config: MemoryBankConfig,
        weights_id: str,
        num_classes: int,
        source: str = "<dataset dicts>",
        class_names: Optional[Sequence[str]] = None,
    ) -> "MemoryBank":
        """Compute the per-shot features of every reference instance.

        Args:
            references: Detectron2 dataset dicts (``file_name``, ``height``, ``width``,
                ``annotations`` with ``segmentation``, ``bbox``/``bbox_mode``, contiguous
                ``category_id``; ``id`` and ``reference_rank`` used when present), e.g. a
                :class:`~samantics_d2.references.ReferenceBank`'s ``dataset_dicts``.
            backbone: the semantic encoder (its ``dense_feature`` is pooled).
            config: crop mode and batching.
            weights_id: identity of the encoder weights (:func:`weights_identity`).
            num_classes: ``K``, the number of contiguous class ids.
            source, class_names: the reference set's name and class names (provenance only).
        """
        items = order_references(references, num_classes, class_names=class_names)
        provenance = _provenance(items, backbone=backbone, config=config, weights_id=weights_id,
                                 num_classes=num_classes, source=source, class_names=class_names)
        start = time.perf_counter()
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.inference_mode():
                # Encoded in dataset order (consecutive shots of one image share its read), stored in bank order.
                by_index = sorted(range(len(items)), key=lambda i: items[i].index)
                features = _shot_features([items[i] for i in by_index], backbone, config)
        finally:
            backbone.train(was_training)
        if features is None:
            features = torch.zeros(0, backbone.output_shape()[backbone.dense_feature].channels)
            valid = torch.zeros(0, dtype=torch.bool)
        else:
            features, valid = features
            position = torch.empty(len(items), dtype=torch.long)
            position[torch.as_tensor(by_index, dtype=torch.long)] = torch.arange(len(items))
            features, valid = features[position], valid[position]
        invalid = [items[i].annotation_id for i in torch.nonzero(~valid).squeeze(1).tolist()]
        if invalid:
            logger.warning(
                "Memory bank: %d reference mask(s) cover nothing of the encoder input and are not used "
                "(annotation ids %s%s).", len(invalid), invalid[:10], " ..." if len(invalid) > 10 else "",
            )
        bank = cls(
            features=features,
            class_ids=torch.as_tensor([r.class_id for r in items], dtype=torch.long),
            valid=valid,
            num_classes=num_classes,
            annotation_ids=[r.annotation_id for r in items],
            provenance=provenance,
        )
        empty = torch.nonzero(bank.shots_per_class() == 0).squeeze(1).tolist()
        logger.info(
            "Built memory bank of %d reference(s), %d class(es) (%d without references%s) in %.1f s.",
            len(items), num_classes, len(empty), f": {empty[:10]}" if empty else "", time.perf_counter() - start,
        )
        return bank

    # ------------------------------------------------------------------ files (the references store)

    def to_stored(self) -> StoredFeatures:
        """The bank as the references store holds it."""
        return StoredFeatures(
            tensors={"features": self.features, "class_ids": self.class_ids, "valid": self.valid},
            provenance=self.provenance,
            records=[{"annotation_id": a} for a in self.annotation_ids],
        )

    @classmethod
    def from_stored(cls, stored: StoredFeatures) -> "MemoryBank":
        """The bank of a store file (:meth:`to_stored`)."""
        try:
            tensors = stored.tensors
            return cls(
                features=tensors["features"],
                class_ids=tensors["class_ids"],
                valid=tensors["valid"],
                num_classes=int(stored.provenance["reference_set"]["num_classes"]),
                annotation_ids=[record["annotation_id"] for record in stored.records],
                provenance=stored.provenance,
            )
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"the stored features are not a memory bank (no {e}); kind {stored.provenance.get('kind')!r}."
            ) from e

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``path`` (safetensors) and its ``.json`` provenance sidecar, atomically."""
        save_features(path, self.to_stored())

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "MemoryBank":
        """Read a bank written by :meth:`save` (tensors on the CPU)."""
        try:
            return cls.from_stored(load_features(path))
        except ValueError as e:
            raise ValueError(f"{str(path)!r} is not a memory bank written by MemoryBank.save: {e}") from e

    @classmethod
    def load_or_build(cls, path: Union[str, os.PathLike], **inputs: Any) -> "MemoryBank":
        """The bank stored at ``path`` when its provenance equals that of ``inputs`` (the keyword
        arguments of :meth:`build`); otherwise build it (logging what changed) and store it there."""
        stored = load_or_build_features(
            path, provenance=cls.describe(**inputs), build=lambda: cls.build(**inputs).to_stored(), what="memory bank"
        )
        return cls.from_stored(stored)


def _provenance(items: Sequence[ReferenceInstance], *, backbone: EncoderBackbone, config: MemoryBankConfig,
                weights_id: str, num_classes: int, source: str = "<dataset dicts>",
                class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """The provenance of a bank of ``items`` (the arguments of :meth:`MemoryBank.build`)."""
    encoder = {**_backbone_description(backbone), "weights": weights_id}
    options = {
        "format_version": MEMORY_BANK_FORMAT,
        "preprocess": dataclasses.asdict(reference_preprocess(backbone, config)),
        **config.describe(),
    }
    return reference_provenance(kind="memory_bank", source=source, num_classes=num_classes, class_names=class_names,
                                items=items, encoder=encoder, options=options)


def reference_preprocess(backbone: EncoderBackbone, config: MemoryBankConfig) -> PreprocessSpec:
    """The preprocessing the references get: square crops are stretched onto the input square
    (with ``config.crop_interpolation`` when given)."""
    spec = backbone.preprocess
    if config.crop == "full":
        return spec
    # the crop is resized once (a two-step pre_resize is the target image's, not the crops')
    return spec.replace(fit="resize_square", interpolation=config.crop_interpolation or spec.interpolation, pre_resize=None)


def _shot_features(
    items: Sequence[ReferenceInstance], backbone: EncoderBackbone, config: MemoryBankConfig
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``([S, D] float32 CPU features, [S] bool valid)`` in ``items`` order; None without items."""
    if not items:
        return None
    spec = reference_preprocess(backbone, config)
    device, dtype = _model_device_dtype(backbone)
    fill = np.round(np.asarray(spec.pixel_mean)).astype(np.uint8)
    cached: tuple[Optional[str], Optional[np.ndarray]] = (None, None)
    outputs, valids = [], []
    batch_size = config.batch_size or auto_batch_size(device, (spec.input_size // spec.patch_size) ** 2)
    autocast = (torch.autocast(device.type, dtype=AUTOCAST_DTYPES[config.autocast]) if config.autocast is not None
                else contextlib.nullcontext())
    num_batches = math.ceil(len(items) / batch_size)
    last_log = time.perf_counter()
    for b in range(num_batches):
        batch = items[b * batch_size : (b + 1) * batch_size]
        inputs: list[np.ndarray] = []  # encoder inputs (crops, or distinct images)
        input_files: list[str] = []
        input_of: list[int] = []  # instance -> its input
        masks: list[np.ndarray] = []  # masks in the original frame (crop later, once the window is known)
        windows: list[Optional[tuple[int, int, int, int]]] = []
        for r in batch:
            if cached[0] != r.file_name:
                cached = (r.file_name, r.read_image())
            image = cached[1]
            mask = r.mask()
            masks.append(mask)
            if config.crop != "full":
                box = _xywh_box(r.annotation, mask)
                if config.crop == "square_context":
                    window = square_context_window(box, config.context)
                else:
                    window = clipped_context_window(box, config.context, image.shape[:2])
                inputs.append(crop_padded(image, window, fill))
                windows.append(window)
            else:
                if not input_files or input_files[-1] != r.file_name:  # one forward per distinct image
                    inputs.append(image)
                    input_files.append(r.file_name)
                windows.append(None)
            input_of.append(len(inputs) - 1)
        x, fits = prepare_batch(inputs, spec, device=device, dtype=dtype)
        with autocast:
            dense = backbone(x)[backbone.dense_feature]  # [B, C, h, w]
        dense = dense.to(dtype)
        grid = tuple(dense.shape[-2:])
        cropped = [
            crop_padded(mask, window if window is not None else _input_window(fits[i]), 0)
            for mask, window, i in zip(masks, windows, input_of)
        ]
        weights = crop_mask_weights(cropped, grid, mode=config.mask_weights, input_size=spec.input_size)
        weights = weights.to(dense.device, dense.dtype)  # [n, h, w]
        pooled, valid = mask_pooling(dense[torch.as_tensor(input_of, device=dense.device)], weights)
        outputs.append(pooled.float().cpu())
        valids.append(valid.cpu())
        if time.perf_counter() - last_log > 30:
            logger.info("Memory bank: %d / %d reference batches done.", b + 1, num_batches)
            last_log = time.perf_counter()
    return torch.cat(outputs), torch.cat(valids)
