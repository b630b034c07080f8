"""Selection: :class:`ReferenceSelection` (every choice, with its defaults), the vectorised
filters, :func:`select_references` (the greedy, nested, seeded rounds of the package docstring),
:class:`ReferenceSet` (its outcome) and :func:`take_k_shot` on loaded dataset dicts."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools import mask as mask_util

from .coco import (
    CategorySpec,
    _annotation_arrays,
    _annotation_rle,
    _check_coco_dict,
    _with_file_name,
    load_coco_dict,
    resolve_categories,
)

__all__ = ["ReferenceSelection", "ReferenceSet", "select_references", "take_k_shot"]

logger = logging.getLogger(__name__)

_ORDERS = ("random", "largest")
_INFO_KEY = "samantics_d2_reference_set"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ReferenceSelection:
    """How reference instances are picked. All bounds are inclusive; ``None`` means no bound.

    Attributes:
        n_ref: references per category.
        seed: seed of the ``"random"`` order (each category draws from ``(seed, category_id)``).
        order: ``"random"`` (a seeded shuffle of the candidates) or ``"largest"`` (largest area
            first, ties by annotation id; the seed is then unused).
        min_area: smallest instance area in pixels (the annotation's ``"area"``, i.e. the mask
            area in COCO; the box area ``w * h`` when absent). Default ``32 * 32``: COCO's
            small/medium boundary; smaller instances cover too few DINOv2 patches to pool.
        max_area: largest instance area in pixels.
        min_area_fraction: smallest area as a share of the image (``area / (height * width)``).
        max_area_fraction: largest area as a share of the image. Default 0.9: an instance filling
            the whole image leaves no context to crop.
        min_aspect_ratio: smallest box ``w / h``. Default 0.1.
        max_aspect_ratio: largest box ``w / h``. Default 10: only extreme slivers are dropped.
        min_border_distance: smallest distance in pixels from the box to every image edge.
            Default 0: boxes may touch the edge (truncation is judged on the mask, below).
        border_frame: width in pixels of the frame along the image edges used by
            ``max_border_overlap``. Default 4.
        max_border_overlap: largest share of the instance's mask that lies in the border frame.
            Default 0.1 (with the 4-px frame): an instance cut by an image edge is dropped unless
            it reaches at least 40 px into the image; 1.0 disables the filter (no mask decoded).
        max_box_iou: largest box IoU with any other annotation (any category, crowd included) of
            the same image. Default 0.5: drops heavily overlapped, ambiguous instances.
    """

    n_ref: int = 10
    seed: int = 0
    order: str = "random"
    min_area: Optional[float] = 32.0 * 32.0
    max_area: Optional[float] = None
    min_area_fraction: Optional[float] = None
    max_area_fraction: Optional[float] = 0.9
    min_aspect_ratio: Optional[float] = 0.1
    max_aspect_ratio: Optional[float] = 10.0
    min_border_distance: float = 0.0
    border_frame: int = 4
    max_border_overlap: float = 0.1
    max_box_iou: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.n_ref, bool) or not isinstance(self.n_ref, int) or self.n_ref < 1:
            raise ValueError(f"ReferenceSelection got n_ref={self.n_ref!r}; expected an int >= 1.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ReferenceSelection got seed={self.seed!r}; expected an int >= 0.")
        if self.order not in _ORDERS:
            raise ValueError(f"ReferenceSelection got order={self.order!r}; expected one of {_ORDERS}.")
        for low, high in (
            ("min_area", "max_area"),
            ("min_area_fraction", "max_area_fraction"),
            ("min_aspect_ratio", "max_aspect_ratio"),
        ):
            lo, hi = getattr(self, low), getattr(self, high)
            for name, value in ((low, lo), (high, hi)):
                if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                    raise ValueError(f"ReferenceSelection got {name}={value!r}; expected a finite number >= 0 or None.")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"ReferenceSelection got {low}={lo!r} > {high}={hi!r}; expected {low} <= {high}.")
        for name in ("min_area_fraction", "max_area_fraction"):
            value = getattr(self, name)
            if value is not None and value > 1:
                raise ValueError(f"ReferenceSelection got {name}={value!r}; expected a share of the image in [0, 1].")
        if not isinstance(self.min_border_distance, (int, float)) or not self.min_border_distance >= 0:
            raise ValueError(
                f"ReferenceSelection got min_border_distance={self.min_border_distance!r}; expected pixels >= 0."
            )
        if isinstance(self.border_frame, bool) or not isinstance(self.border_frame, int) or self.border_frame < 0:
            raise ValueError(
                f"ReferenceSelection got border_frame={self.border_frame!r}; expected an int >= 0 (pixels)."
            )
        for name in ("max_border_overlap", "max_box_iou"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"ReferenceSelection got {name}={value!r}; expected a number in [0, 1].")

    def to_dict(self) -> dict[str, Any]:
        """The parameters as a JSON-serialisable dict (field order)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> "ReferenceSelection":
        """The inverse of :meth:`to_dict`; unknown keys are an error naming the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(f"ReferenceSelection got unknown parameters {unknown}; valid ones: {names}.")
        return cls(**params)


@dataclass(frozen=True)
class ReferenceSet:
    """The outcome of :func:`select_references`.

    Attributes:
        selection: the parameters it was picked with.
        shots: references per category this set holds at most (``selection.n_ref``, or k after
            :meth:`k_shot`).
        source: the source json path, or ``"<dict>"``.
        categories: every category dict of the source, sorted by id.
        category_ids: the selected category ids, sorted (only these are written to the json, so
            its contiguous ids are those of the source restricted to the same categories).
        picks: category id -> picked annotation ids, largest area first (ties: smaller id first).
        num_candidates: category id -> number of annotations passing the vectorised filters
            (all but ``max_border_overlap``, which is only checked for candidates reached).
        rejected: category id -> filter name -> number of the category's annotations failing that
            filter. The vectorised filters (``crowd``, ``area``, ``area_fraction``,
            ``aspect_ratio``, ``border_distance``) are judged independently; ``box_iou`` counts
            annotations that passed them; ``image_used`` counts candidates skipped because their
            image was already picked, ``border_overlap`` candidates whose mask was checked.
        annotations: annotation id -> the source annotation dict of every pick.
        images: image id -> the source image dict of every pick.
    """

    selection: ReferenceSelection
    shots: int
    source: str
    categories: tuple[dict, ...]
    category_ids: tuple[int, ...]
    picks: dict[int, tuple[int, ...]]
    num_candidates: dict[int, int]
    rejected: dict[int, dict[str, int]]
    annotations: dict[int, dict] = field(repr=False)
    images: dict[int, dict] = field(repr=False)

    @property
    def category_names(self) -> dict[int, str]:
        """Category id -> name, for every source category."""
        return {int(c["id"]): str(c["name"]) for c in self.categories}

    @property
    def shortfall(self) -> dict[int, int]:
        """Category id -> number of references missing, for the selected categories left short."""
        return {c: self.shots - len(self.picks[c]) for c in self.category_ids if len(self.picks[c]) < self.shots}

    def k_shot(self, k: int) -> "ReferenceSet":
        """The first ``k`` picks of every category (the ``k`` largest of this set's picks)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.shots:
            raise ValueError(
                f"ReferenceSet.k_shot got k={k!r}; expected an int in [1, {self.shots}] (this set's shots)."
            )
        picks = {c: ids[:k] for c, ids in self.picks.items()}
        kept = {a for ids in picks.values() for a in ids}
        annotations = {a: d for a, d in self.annotations.items() if a in kept}
        image_ids = {int(d["image_id"]) for d in annotations.values()}
        images = {i: d for i, d in self.images.items() if i in image_ids}
        return dataclasses.replace(self, shots=k, picks=picks, annotations=annotations, images=images)

    def summary(self) -> dict[str, Any]:
        """What went into the json's ``info``: parameters, provenance and shortfalls (JSON-serialisable)."""
        names = self.category_names
        return {
            "format_version": _FORMAT_VERSION,
            "source": self.source,
            "selection": self.selection.to_dict(),
            "shots": self.shots,
            "category_ids": list(self.category_ids),
            "num_references": sum(len(ids) for ids in self.picks.values()),
            "shortfall": [
                {
                    "category_id": c,
                    "name": names[c],
                    "picked": len(self.picks[c]),
                    "missing": missing,
                    "candidates": self.num_candidates[c],
                    "rejected": self.rejected[c],
                }
                for c, missing in self.shortfall.items()
            ],
        }

    def to_coco_dict(self) -> dict[str, Any]:
        """The reference set as a COCO instances dict.

        ``images``: the picked images by id; ``annotations``: grouped by category id, largest
        first, each with ``"reference_rank"`` (0 = largest); ``categories``: the selected ones;
        ``info``: a description and :meth:`summary` under ``"samantics_d2_reference_set"``.
        """
        annotations = []
        for c in self.category_ids:
            for rank, ann_id in enumerate(self.picks[c]):
                annotations.append({**self.annotations[ann_id], "reference_rank": rank})
        sel = self.selection
        description = (
            f"samantics_d2 reference set: {self.shots} per category ({sel.order} order, seed {sel.seed}) "
            f"from {os.path.basename(self.source)}"
        )
        return {
            "info": {"description": description, _INFO_KEY: self.summary()},
            "images": [_with_file_name(self.images[i]) for i in sorted(self.images)],
            "annotations": annotations,
            "categories": [c for c in self.categories if int(c["id"]) in set(self.category_ids)],
        }


def _in_bounds(values: np.ndarray, low: Optional[float], high: Optional[float]) -> np.ndarray:
    ok = np.isfinite(values)
    if low is not None:
        ok &= values >= low
    if high is not None:
        ok &= values <= high
    return ok


def _max_box_iou(xywh: np.ndarray, image_rows: np.ndarray, wanted: np.ndarray, *, chunk: int = 1 << 22) -> np.ndarray:
    """Largest box IoU of each annotation with another annotation of its image.

    Args:
        xywh: ``[N, 4]`` boxes ``[x, y, w, h]``.
        image_rows: ``[N]`` image of each box.
        wanted: ``[N]`` bool; only images holding a wanted box are computed.

    Returns:
        ``[N]`` float64; 0 for boxes alone in their image, and for images with no wanted box.
    """
    result = np.zeros(len(xywh), dtype=np.float64)
    if len(xywh) == 0:
        return result
    order = np.argsort(image_rows, kind="stable")
    sorted_rows = image_rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    wanted_per_image = np.add.reduceat(wanted[order].astype(np.int64), starts) > 0
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    areas = xywh[:, 2] * xywh[:, 3]
    # Images with the same number of boxes c form one [B, c, c] batch: a few dozen numpy calls in all.
    for c in np.unique(counts[wanted_per_image & (counts > 1)]):
        batch_starts = starts[wanted_per_image & (counts == c)]
        per_chunk = max(1, chunk // int(c * c))
        for i in range(0, len(batch_starts), per_chunk):
            rows = order[batch_starts[i : i + per_chunk, None] + np.arange(c)]  # [B, c]
            b, a = boxes[rows], areas[rows]  # [B, c, 4], [B, c]
            lt = np.maximum(b[:, :, None, :2], b[:, None, :, :2])
            rb = np.minimum(b[:, :, None, 2:], b[:, None, :, 2:])
            wh = np.clip(rb - lt, 0, None)
            inter = wh[..., 0] * wh[..., 1]  # [B, c, c]
            union = a[:, :, None] + a[:, None, :] - inter
            iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
            iou[:, np.arange(c), np.arange(c)] = 0.0
            result[rows] = iou.max(axis=2)
    return result


class _BorderOverlap:
    """Share of an instance's mask inside a frame along the image edges, on RLEs (no dense decode)."""

    def __init__(self, frame: int):
        self.frame = frame
        self._frames: dict[tuple[int, int], dict] = {}

    def _frame_rle(self, height: int, width: int) -> dict:
        """The frame of an image size as a compressed RLE, built from its column-major runs."""
        key = (height, width)
        if key not in self._frames:
            f = self.frame
            top = min(f, height)
            bottom = min(f, height - top)
            middle = [(1, top), (0, height - top - bottom), (1, bottom)]  # one inner column
            runs: list[list[int]] = [[0, 0]]  # RLE counts start with a run of zeros
            for col in range(width):
                column = [(1, height)] if col < f or col >= width - f else middle
                for value, length in column:
                    if length == 0:
                        continue
                    if runs[-1][0] == value:
                        runs[-1][1] += length
                    else:
                        runs.append([value, length])
            counts = [length for _, length in runs]
            self._frames[key] = mask_util.frPyObjects({"size": [height, width], "counts": counts}, height, width)
        return self._frames[key]

    def __call__(self, annotation: Mapping[str, Any], height: int, width: int) -> float:
        rle = _annotation_rle(annotation, height, width)
        area = float(mask_util.area(rle))
        if area <= 0:
            return 1.0  # an empty mask cannot be a reference
        if self.frame <= 0:
            return 0.0
        inside = mask_util.merge([rle, self._frame_rle(height, width)], intersect=True)
        return float(mask_util.area(inside)) / area


def select_references(
    coco_dict_or_path: Union[Mapping[str, Any], str, os.PathLike],
    selection: ReferenceSelection = ReferenceSelection(),
    *,
    categories: CategorySpec = None,
    progress: bool = False,
) -> ReferenceSet:
    """Pick ``selection.n_ref`` reference instances per category (see the module docstring).

    Args:
        coco_dict_or_path: a COCO instances dict, or the path of its json.
        selection: the parameters and filters.
        categories: the categories to pick for (:func:`resolve_categories`); default all.
        progress: show a tqdm bar over the picks.

    Returns:
        The :class:`ReferenceSet`; categories left short are logged as a warning and listed in
        :attr:`ReferenceSet.shortfall`.
    """
    start = time.perf_counter()
    if isinstance(coco_dict_or_path, (str, os.PathLike)):
        source = os.fspath(coco_dict_or_path)
        coco = load_coco_dict(source)
    else:
        source = "<dict>"
        coco = coco_dict_or_path
        _check_coco_dict(coco, source)
    if not isinstance(selection, ReferenceSelection):
        raise TypeError(f"select_references got selection={selection!r}; expected a ReferenceSelection.")
    category_ids = resolve_categories(categories, coco["categories"])
    cols = _annotation_arrays(coco, source)
    sel = selection

    # Vectorised filters, judged independently so that shortfalls can say what rejected what.
    height, width = cols["heights"][cols["image"]], cols["widths"][cols["image"]]
    x, y, w, h = cols["xywh"].T
    area = cols["area"]
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(h > 0, w / np.where(h > 0, h, 1.0), np.nan)
        area_fraction = area / (height * width)
    border_distance = np.minimum.reduce([x, y, width - (x + w), height - (y + h)])
    in_categories = np.isin(cols["category"], category_ids)
    passes = {
        "crowd": ~cols["crowd"],
        "area": _in_bounds(area, sel.min_area, sel.max_area) & (area > 0),
        "area_fraction": _in_bounds(area_fraction, sel.min_area_fraction, sel.max_area_fraction),
        "aspect_ratio": _in_bounds(aspect, sel.min_aspect_ratio, sel.max_aspect_ratio) & (w > 0),
        "border_distance": border_distance >= sel.min_border_distance,
    }
    cheap = in_categories & np.logical_and.reduce(list(passes.values()))
    if sel.max_box_iou < 1:
        passes["box_iou"] = _max_box_iou(cols["xywh"], cols["image"], cheap) <= sel.max_box_iou
        candidate = cheap & passes["box_iou"]
    else:
        passes["box_iou"] = np.ones(len(area), dtype=bool)
        candidate = cheap

    cat_index = {c: i for i, c in enumerate(category_ids)}
    cat_rows = np.searchsorted(np.asarray(category_ids, dtype=np.int64), cols["category"])
    cat_rows = np.where(in_categories, cat_rows, len(category_ids))
    num_selected = len(category_ids)

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(cat_rows[mask], minlength=num_selected + 1)[:num_selected]

    rejected: dict[int, dict[str, int]] = {c: {} for c in category_ids}
    for name, ok in passes.items():
        counts = count((cheap if name == "box_iou" else in_categories) & ~ok)
        for c in category_ids:
            rejected[c][name] = int(counts[cat_index[c]])
    for c in category_ids:  # counted while picking, below
        rejected[c].update(image_used=0, border_overlap=0)
    num_candidates = {c: int(n) for c, n in zip(category_ids, count(candidate))}

    # Candidate order per category: depends only on (seed, category id), so subsets and n_ref agree.
    queues: dict[int, np.ndarray] = {}
    ids, area_all = cols["ids"], area
    cand_rows = np.flatnonzero(candidate)
    cand_rows = cand_rows[np.lexsort((ids[cand_rows], cols["category"][cand_rows]))]
    bounds = np.searchsorted(cols["category"][cand_rows], category_ids + [np.iinfo(np.int64).max])
    for i, c in enumerate(category_ids):
        rows = cand_rows[bounds[i] : bounds[i + 1]]  # sorted by annotation id
        if sel.order == "random":
            rng = np.random.default_rng([sel.seed, c % (1 << 64)])
            rows = rows[rng.permutation(len(rows))]
        else:
            rows = rows[np.lexsort((ids[rows], -area_all[rows]))]
        queues[c] = rows

    # Rounds: each category takes its next usable candidate; the rarest categories choose first.
    check_border = sel.max_border_overlap < 1
    border_overlap = _BorderOverlap(sel.border_frame)
    annotations = coco["annotations"]
    image_of = cols["image"]
    used_images: set[int] = set()
    picked_rows: dict[int, list[int]] = {c: [] for c in category_ids}
    pointer = dict.fromkeys(category_ids, 0)
    turn_order = sorted(category_ids, key=lambda c: (num_candidates[c], c))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sel.n_ref * len(category_ids), desc="reference picks", unit="pick")
    for _ in range(sel.n_ref):
        for c in turn_order:
            queue, k = queues[c], pointer[c]
            while k < len(queue):
                row = int(queue[k])
                k += 1
                if int(image_of[row]) in used_images:
                    rejected[c]["image_used"] += 1
                    continue
                if check_border:
                    r = int(image_of[row])
                    overlap = border_overlap(annotations[row], int(cols["heights"][r]), int(cols["widths"][r]))
                    if overlap > sel.max_border_overlap:
                        rejected[c]["border_overlap"] += 1
                        continue
                picked_rows[c].append(row)
                used_images.add(int(image_of[row]))
                break
            pointer[c] = k
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    picks: dict[int, tuple[int, ...]] = {}
    picked_annotations: dict[int, dict] = {}
    picked_images: dict[int, dict] = {}
    for c in category_ids:
        rows = sorted(picked_rows[c], key=lambda r: (-area_all[r], ids[r]))
        picks[c] = tuple(int(ids[r]) for r in rows)
        for r in rows:
            picked_annotations[int(ids[r])] = annotations[r]
            image = coco["images"][int(image_of[r])]
            picked_images[int(image["id"])] = image
    reference_set = ReferenceSet(
        selection=sel,
        shots=sel.n_ref,
        source=source,
        categories=tuple(sorted(coco["categories"], key=lambda c: int(c["id"]))),
        category_ids=tuple(category_ids),
        picks=picks,
        num_candidates=num_candidates,
        rejected=rejected,
        annotations=picked_annotations,
        images=picked_images,
    )
    _log_outcome(reference_set, time.perf_counter() - start, len(annotations))
    return reference_set


def _log_outcome(reference_set: ReferenceSet, seconds: float, num_annotations: int) -> None:
    summary = reference_set.summary()
    logger.info(
        "Picked %d references for %d categories from %d annotations of %s in %.2f s.",
        summary["num_references"],
        len(reference_set.category_ids),
        num_annotations,
        reference_set.source,
        seconds,
    )
    for short in summary["shortfall"]:
        logger.warning(
            "Category %r (id %d) got %d of %d references (%d candidates passed the filters; annotations rejected "
            "per filter: %s). Loosen the filters or lower n_ref.",
            short["name"],
            short["category_id"],
            short["picked"],
            reference_set.shots,
            short["candidates"],
            short["rejected"],
        )


def take_k_shot(dataset_dicts: Sequence[dict], k: int) -> list[dict]:
    """The k-shot subset of a loaded reference set: annotations with ``reference_rank < k``.

    Args:
        dataset_dicts: Detectron2 dataset dicts of a reference-set json, loaded with
            ``extra_annotation_keys`` including ``"reference_rank"`` (as
            :func:`register_reference_set` does).
        k: shots per category, >= 1.

    Returns:
        The dicts that keep an annotation (copies; input untouched), in the input order.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"take_k_shot got k={k!r}; expected an int >= 1.")
    kept = []
    for record in dataset_dicts:
        annotations = []
        for ann in record["annotations"]:
            if "reference_rank" not in ann:
                raise ValueError(
                    f"Image {record.get('image_id')!r} has an annotation without 'reference_rank'; expected dicts "
                    "of a reference-set json loaded with extra_annotation_keys=['reference_rank']."
                )
            if ann["reference_rank"] < k:
                annotations.append(ann)
        if annotations:
            kept.append({**record, "annotations": annotations})
    return kept
