"""The memory bank of the training-free pipeline ("compute_embeds"): one feature per reference instance.

For every reference instance, the semantic encoder (any :class:`EncoderBackbone`) sees either a
square crop around the instance (``crop="square_context"``: the box's longer side plus ``context``
of it on each side, clipped and padded with the pixel mean at the image border, stretched to the
encoder's input square) or the whole image (``crop="full"``: fitted per the encoder's own
preprocessing). The instance mask goes to the patch grid by area interpolation (soft weights) and
the mask-weighted mean of the dense features is the shot's feature. References are processed in
batches: one encoder forward per batch.

A :class:`MemoryBank` keeps the per-shot features ``[S, D]`` grouped by class in reference-set
order (``reference_rank`` when the annotations carry it, else their order), so prototypes for the
first k shots per class come without recomputing (:meth:`MemoryBank.prototypes`). It is saved as
safetensors (tensors, with the provenance in its header) plus a readable JSON copy of the
provenance; :meth:`MemoryBank.load_or_build` reuses a saved bank only when its provenance matches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ...d2 import BoxMode, load_coco_json
from ...utils.io import atomic_path, read_json
from ...data.io import read_image
from ...data.mapper import segmentation_to_mask
from ..backbone.base import EncoderBackbone
from ..preprocess import ImageFit, PreprocessSpec, prepare_batch
from .mask_ops import mask_pooling

__all__ = [
    "AGGREGATIONS",
    "CROP_MODES",
    "MEMORY_BANK_FORMAT",
    "MemoryBank",
    "MemoryBankConfig",
    "crop_mask_weights",
    "crop_padded",
    "kmeans",
    "load_reference_json",
    "reference_preprocess",
    "square_context_window",
    "weights_identity",
]

logger = logging.getLogger(__name__)

MEMORY_BANK_FORMAT = 1
CROP_MODES = ("square_context", "full")
AGGREGATIONS = ("mean", "kmeans", "all")


@dataclass(frozen=True)
class MemoryBankConfig:
    """How reference features are computed.

    Attributes:
        crop: ``"square_context"`` (a square around the instance's box; "No Time to Train") or
            ``"full"`` (the whole image, fitted per the encoder's preprocessing).
        context: ``square_context`` only: margin added on each side, as a share of the box's
            longer side (0.2: the square's side is 1.4 x the longer side).
        batch_size: reference instances per encoder forward (does not change the result, so it is
            not part of the provenance).
    """

    crop: str = "square_context"
    context: float = 0.2
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.crop not in CROP_MODES:
            raise ValueError(f"MemoryBankConfig got crop={self.crop!r}; expected one of {CROP_MODES}.")
        if not (isinstance(self.context, (int, float)) and 0.0 <= self.context <= 10.0):
            raise ValueError(f"MemoryBankConfig got context={self.context!r}; expected a share in [0, 10] (0.2: 20 %).")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"MemoryBankConfig got batch_size={self.batch_size!r}; expected an int >= 1.")

    def describe(self) -> dict[str, Any]:
        """The settings that change the features (part of the provenance)."""
        out: dict[str, Any] = {"crop": self.crop, "mask_resize": "area", "pooling": "mask_weighted_mean"}
        if self.crop == "square_context":
            out.update(context=float(self.context), padding="pixel_mean", fit="resize_square")
        return out


def weights_identity(weights: Optional[Union[str, os.PathLike]] = None, *, seed: Optional[int] = None) -> str:
    """What identifies an encoder's weights in a provenance: the file's SHA-256, or ``"random-init:<seed>"``."""
    if weights is not None:
        from ..weights import sha256_of

        return sha256_of(weights)
    if seed is None:
        raise ValueError("weights_identity needs a weights file or, for randomly initialised weights, the seed.")
    return f"random-init:{seed}"


def load_reference_json(json_file: str, image_root: str) -> tuple[list[dict], list[str]]:
    """Read a COCO-format reference json (bring your own references) as dataset dicts.

    Category ids become contiguous ``0..K-1`` in id order (Detectron2's convention); annotations
    keep ``"id"`` and ``"reference_rank"`` (when present). No metadata is registered.

    Returns:
        ``(dataset_dicts, class_names)``; ``K = len(class_names)`` (categories without references
        included).
    """
    content = read_json(json_file, what="a COCO instances json of reference instances")
    categories = content.get("categories") if isinstance(content, dict) else None
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{json_file!r} has no 'categories' list; a COCO instances json needs one.")
    ordered = sorted(categories, key=lambda c: c["id"])
    id_map = {c["id"]: i for i, c in enumerate(ordered)}
    dicts = load_coco_json(json_file, image_root, extra_annotation_keys=["id", "reference_rank"])
    for record in dicts:
        for ann in record["annotations"]:
            if ann["category_id"] not in id_map:
                raise ValueError(
                    f"Annotation {ann.get('id')} in {json_file!r} has category_id {ann['category_id']}, not among "
                    f"the file's categories {sorted(id_map)}."
                )
            ann["category_id"] = id_map[ann["category_id"]]
    return dicts, [str(c["name"]) for c in ordered]


# ------------------------------------------------------------------------------------------------
# Reference instances


@dataclass(frozen=True)
class _Reference:
    file_name: str
    height: int
    width: int
    annotation: dict
    class_id: int
    annotation_id: Union[int, str]


def _reference_list(references: Sequence[dict], num_classes: int) -> tuple[list[_Reference], list[int]]:
    """The non-crowd reference instances in dataset order, and the permutation to bank order
    (by class, then ``reference_rank``, then dataset order)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"MemoryBank got num_classes={num_classes!r}; expected an int >= 1.")
    items: list[_Reference] = []
    keys: list[tuple[int, float, int]] = []
    crowd = 0
    for record in references:
        for index, ann in enumerate(record.get("annotations", [])):
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            class_id = ann.get("category_id")
            if isinstance(class_id, bool) or not isinstance(class_id, numbers.Integral) or not 0 <= class_id < num_classes:
                raise ValueError(
                    f"Reference annotation {ann.get('id', index)} of {record.get('file_name')!r} has category_id "
                    f"{class_id!r}; expected a contiguous id in [0, {num_classes}). Load COCO jsons with "
                    "load_reference_json or load_coco_json(..., dataset_name)."
                )
            class_id = int(class_id)
            annotation_id = ann["id"] if "id" in ann else f"{record.get('image_id', record['file_name'])}:{index}"
            height, width = int(record["height"]), int(record["width"])
            items.append(_Reference(record["file_name"], height, width, ann, class_id, annotation_id))
            keys.append((class_id, float(ann.get("reference_rank", 0)), len(keys)))
    if crowd:
        logger.info("Memory bank: skipped %d crowd annotation(s) among the references.", crowd)
    order = sorted(range(len(items)), key=lambda i: keys[i])
    return items, order


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode("ascii")
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Cannot describe a {type(obj).__name__} in a memory bank provenance.")


def _references_digest(items: Sequence[_Reference]) -> str:
    """SHA-256 over what defines each reference (image, size, class, box, segmentation)."""
    digest = hashlib.sha256()
    for r in items:
        ann = r.annotation
        key = [
            r.file_name, r.height, r.width, r.class_id,
            ann.get("bbox"), int(ann.get("bbox_mode", BoxMode.XYWH_ABS)), ann.get("segmentation"),
        ]
        digest.update(json.dumps(key, default=_json_default).encode("utf-8") + b"\n")
    return digest.hexdigest()


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


def _input_window(fit: ImageFit) -> tuple[int, int, int, int]:
    """The encoder's input square in original pixels, rounded: ``(y0, x0, y1, x1)`` (may exceed the image)."""
    (sy, sx), (ty, tx), (S_h, S_w) = fit.scale, fit.offset, fit.input_size
    y0, x0 = int(round(-ty / sy)), int(round(-tx / sx))
    y1, x1 = max(y0 + 1, int(round((S_h - ty) / sy))), max(x0 + 1, int(round((S_w - tx) / sx)))
    return (y0, x0, y1, x1)


def crop_mask_weights(masks: Sequence[np.ndarray], grid: tuple[int, int]) -> torch.Tensor:
    """``[N, h, w]`` area-interpolated soft weights of cropped masks (any sizes)."""
    return torch.stack(
        [F.adaptive_avg_pool2d(torch.from_numpy(m).float()[None, None], grid)[0, 0] for m in masks]
    )


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


def _code_version() -> str:
    import samantics_d2  # the package's __init__ has finished when a bank is built

    return f"samantics_d2-{getattr(samantics_d2, '__version__', 'unknown')}/memory_bank-{MEMORY_BANK_FORMAT}"


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
    def describe(
        *,
        references: Sequence[dict],
        backbone: EncoderBackbone,
        config: MemoryBankConfig,
        weights_id: str,
        num_classes: int,
    ) -> dict[str, Any]:
        """The provenance a bank built from these inputs has (computes no feature)."""
        items, order = _reference_list(references, num_classes)
        items = [items[i] for i in order]
        spec = reference_preprocess(backbone, config)
        provenance = {
            "format_version": MEMORY_BANK_FORMAT,
            "code_version": _code_version(),
            "num_classes": num_classes,
            "references": {
                "count": len(items),
                "annotation_ids": [r.annotation_id for r in items],
                "file_names": [r.file_name for r in items],
                "class_ids": [r.class_id for r in items],
                "sha256": _references_digest(items),
            },
            "backbone": _backbone_description(backbone),
            "weights": weights_id,
            "preprocess": dataclasses.asdict(spec),
            "config": config.describe(),
        }
        return json.loads(json.dumps(provenance, default=_json_default))  # as it reads back from a file

    @classmethod
    def build(
        cls,
        *,
        references: Sequence[dict],
        backbone: EncoderBackbone,
        config: MemoryBankConfig,
        weights_id: str,
        num_classes: int,
    ) -> "MemoryBank":
        """Compute the per-shot features of every reference instance.

        Args:
            references: Detectron2 dataset dicts (``file_name``, ``height``, ``width``,
                ``annotations`` with ``segmentation``, ``bbox``/``bbox_mode``, contiguous
                ``category_id``; ``id`` and ``reference_rank`` used when present), e.g.
                ``DatasetCatalog.get(reference_set_name)`` or :func:`load_reference_json`.
            backbone: the semantic encoder (its ``dense_feature`` is pooled).
            config: crop mode and batching.
            weights_id: identity of the encoder weights (:func:`weights_identity`).
            num_classes: ``K``, the number of contiguous class ids.
        """
        provenance = cls.describe(
            references=references, backbone=backbone, config=config, weights_id=weights_id, num_classes=num_classes
        )
        items, order = _reference_list(references, num_classes)
        start = time.perf_counter()
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.inference_mode():
                features = _shot_features(items, backbone, config)
        finally:
            backbone.train(was_training)
        if features is None:
            features = torch.zeros(0, backbone.output_shape()[backbone.dense_feature].channels)
            valid = torch.zeros(0, dtype=torch.bool)
        else:
            features, valid = features
        order_t = torch.as_tensor(order, dtype=torch.long)
        features, valid = features[order_t], valid[order_t]
        items = [items[i] for i in order]
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

    # ------------------------------------------------------------------ files

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``path`` (safetensors; the provenance in its header) and ``path.with_suffix(".json")``
        (the provenance, readable), each atomically."""
        path = Path(path)
        sidecar = _sidecar(path)
        provenance_text = json.dumps(self.provenance, sort_keys=True)
        tensors = {"features": self.features, "class_ids": self.class_ids, "valid": self.valid}
        data = safetensors_bytes(
            {name: t.detach().cpu().contiguous() for name, t in tensors.items()},
            metadata={"provenance": provenance_text, "annotation_ids": json.dumps(self.annotation_ids)},
        )
        with atomic_path(str(path)) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
        with atomic_path(str(sidecar)) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.provenance, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "MemoryBank":
        """Read a bank written by :meth:`save` (tensors on the CPU)."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            provenance = json.loads(metadata["provenance"])
            annotation_ids = json.loads(metadata["annotation_ids"])
            features, class_ids, valid = tensors["features"], tensors["class_ids"], tensors["valid"]
            num_classes = int(provenance["num_classes"])
        except (SafetensorError, KeyError, TypeError, ValueError) as e:  # not our file, or cut short
            raise ValueError(
                f"{str(path)!r} is not a memory bank written by MemoryBank.save ({type(e).__name__}: {e}). "
                "Delete it to rebuild the bank."
            ) from e
        return cls(
            features=features,
            class_ids=class_ids,
            valid=valid,
            num_classes=num_classes,
            annotation_ids=annotation_ids,
            provenance=provenance,
        )

    @classmethod
    def load_or_build(
        cls,
        path: Union[str, os.PathLike],
        *,
        references: Sequence[dict],
        backbone: EncoderBackbone,
        config: MemoryBankConfig,
        weights_id: str,
        num_classes: int,
    ) -> "MemoryBank":
        """The bank saved at ``path`` when its provenance equals these inputs'; otherwise build it
        (logging what changed) and save it there."""
        path = Path(path)
        expected = cls.describe(
            references=references, backbone=backbone, config=config, weights_id=weights_id, num_classes=num_classes
        )
        if path.exists():
            try:
                bank = cls.load(path)
            except ValueError as e:
                logger.warning("Rebuilding memory bank %s: %s", path, e)
            else:
                if bank.provenance == expected:
                    logger.info("Loaded memory bank %s (%d references).", path, len(bank))
                    return bank
                keys = set(expected) | set(bank.provenance)
                changed = sorted(k for k in keys if expected.get(k) != bank.provenance.get(k))
                logger.info("Rebuilding memory bank %s: changed %s.", path, ", ".join(changed))
        else:
            logger.info("No memory bank at %s yet: building it.", path)
        bank = cls.build(
            references=references, backbone=backbone, config=config, weights_id=weights_id, num_classes=num_classes
        )
        bank.save(path)
        return bank


def _sidecar(path: Path) -> Path:
    if path.suffix == ".json":
        raise ValueError(
            f"Memory bank path {str(path)!r} ends in .json; use a .safetensors name (the .json beside it holds the "
            "provenance)."
        )
    return path.with_suffix(".json")


def reference_preprocess(backbone: EncoderBackbone, config: MemoryBankConfig) -> PreprocessSpec:
    """The preprocessing the references get: square crops are stretched onto the input square."""
    spec = backbone.preprocess
    return spec.replace(fit="resize_square") if config.crop == "square_context" else spec


def _shot_features(
    items: Sequence[_Reference], backbone: EncoderBackbone, config: MemoryBankConfig
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``([S, D] float32 CPU features, [S] bool valid)`` in ``items`` order; None without items."""
    if not items:
        return None
    spec = reference_preprocess(backbone, config)
    device, dtype = _model_device_dtype(backbone)
    fill = np.round(np.asarray(spec.pixel_mean)).astype(np.uint8)
    cached: tuple[Optional[str], Optional[np.ndarray]] = (None, None)
    outputs, valids = [], []
    num_batches = math.ceil(len(items) / config.batch_size)
    last_log = time.perf_counter()
    for b in range(num_batches):
        batch = items[b * config.batch_size : (b + 1) * config.batch_size]
        inputs: list[np.ndarray] = []  # encoder inputs (crops, or distinct images)
        input_files: list[str] = []
        input_of: list[int] = []  # instance -> its input
        masks: list[np.ndarray] = []  # masks in the original frame (crop later, once the window is known)
        windows: list[Optional[tuple[int, int, int, int]]] = []
        for r in batch:
            if cached[0] != r.file_name:
                image = read_image(r.file_name, format="RGB")
                if image.shape[:2] != (r.height, r.width):
                    raise ValueError(
                        f"Reference image {r.file_name!r} is {image.shape[0]}x{image.shape[1]} but its dataset dict "
                        f"says {r.height}x{r.width}; fix the annotation file."
                    )
                cached = (r.file_name, image)
            image = cached[1]
            mask = segmentation_to_mask(r.annotation.get("segmentation", []), r.height, r.width)
            masks.append(mask)
            if config.crop == "square_context":
                window = square_context_window(_xywh_box(r.annotation, mask), config.context)
                inputs.append(crop_padded(image, window, fill))
                windows.append(window)
            else:
                if not input_files or input_files[-1] != r.file_name:  # one forward per distinct image
                    inputs.append(image)
                    input_files.append(r.file_name)
                windows.append(None)
            input_of.append(len(inputs) - 1)
        x, fits = prepare_batch(inputs, spec, device=device, dtype=dtype)
        dense = backbone(x)[backbone.dense_feature]  # [B, C, h, w]
        grid = tuple(dense.shape[-2:])
        cropped = [
            crop_padded(mask, window if window is not None else _input_window(fits[i]), 0)
            for mask, window, i in zip(masks, windows, input_of)
        ]
        weights = crop_mask_weights(cropped, grid).to(dense.device, dense.dtype)  # [n, h, w]
        pooled, valid = mask_pooling(dense[torch.as_tensor(input_of, device=dense.device)], weights)
        outputs.append(pooled.float().cpu())
        valids.append(valid.cpu())
        if time.perf_counter() - last_log > 30:
            logger.info("Memory bank: %d / %d reference batches done.", b + 1, num_batches)
            last_log = time.perf_counter()
    return torch.cat(outputs), torch.cat(valids)
