"""Reference sets: a few annotated instances per category, picked reproducibly from a COCO json.

The training-free pipeline builds class prototypes from ``n_ref`` reference instances per category
(and RefSAM averages the tokens of its references). This module picks them:

- :class:`ReferenceSelection` holds every choice (``n_ref``, seed, order, filters) with documented
  defaults; it is written into the output json, so a reference set says how it was made.
- :func:`select_references` is a pure function from a COCO dict (or json path) to a
  :class:`ReferenceSet`: the picked annotation ids per category, and the categories left short.
- :func:`write_reference_json` writes the picks as a COCO json (atomically), the selection in its
  ``"info"`` and in a sidecar ``<name>.selection.json``.
- :func:`register_reference_set` registers a reference set of any registered COCO-format dataset
  as a dataset of its own; nothing is computed until ``DatasetCatalog.get`` (the json is then made
  once into ``$SAMANTICS_CACHE``). :func:`register_all_reference_sets`, called at import (nothing
  is read or computed then), registers the standard names (``coco_2017_train_ref{n}_seed{s}``,
  ``coco_2017_train_novel_ref{n}_seed{s}``, ``shapes_train_ref{n}_seed{s}``,
  ``shapes_train_novel_ref{n}_seed{s}``).
- Picking is greedy (rounds, below), not an optimal assignment of images to categories: when
  images are scarce a category may fall short although a different assignment would have filled it.

Guarantees:

- Same source, selection and categories -> the same picks and byte-identical json.
- Every picked instance comes from a different image (over all categories), and is not a crowd.
- **k-shot is a prefix**: the picks of a category are sorted by area, largest first (ties: smaller
  annotation id first), and the k-shot subset of a reference set is its first k picks per
  category (:meth:`ReferenceSet.k_shot`, :func:`take_k_shot`; each annotation of the json carries
  its ``"reference_rank"`` 0..n-1).
- **Nested sets**: picking is done in rounds (each category picks one instance per round, the
  categories with the fewest candidates first), and each category's candidate order depends only
  on the seed and its category id. Hence the picks made with ``n_ref=k`` are a subset of the picks
  made with ``n_ref=n >= k`` (same seed, filters and categories): the first k rounds are the same.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import io
import json
import logging
import math
import os
import time
from itertools import chain
from operator import itemgetter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from iopath.common.file_io import PathManager as _PathManagerClass
from pycocotools import mask as mask_util

from ..utils.io import atomic_path, cache_root, read_json

__all__ = [
    "COCO_BASE_CLASSES",
    "COCO_CLASSES",
    "COCO_NOVEL_CLASSES",
    "ReferenceSelection",
    "ReferenceSet",
    "load_coco_dict",
    "reference_cache_dir",
    "register_all_reference_sets",
    "register_reference_set",
    "resolve_categories",
    "select_references",
    "sidecar_path",
    "take_k_shot",
    "write_contact_sheets",
    "write_reference_json",
]

logger = logging.getLogger(__name__)

PathManager = _PathManagerClass()

# The 80 COCO detection classes, in COCO's category-id order.
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
# COCO-FSOD: the 20 PASCAL VOC classes (COCO naming) are the novel classes, the other 60 the base.
COCO_NOVEL_CLASSES: tuple[str, ...] = (
    "airplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorcycle", "person", "potted plant", "sheep", "couch",
    "train", "tv",
)  # fmt: skip
COCO_BASE_CLASSES: tuple[str, ...] = tuple(c for c in COCO_CLASSES if c not in COCO_NOVEL_CLASSES)

_CATEGORY_SPLITS: dict[str, Optional[tuple[str, ...]]] = {
    "all": None,
    "novel": COCO_NOVEL_CLASSES,
    "base": COCO_BASE_CLASSES,
}
_ORDERS = ("random", "largest")
_INFO_KEY = "samantics_d2_reference_set"
_FORMAT_VERSION = 1

CategorySpec = Union[None, str, Sequence[Union[str, int]]]


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


def _with_file_name(image: Mapping[str, Any]) -> dict[str, Any]:
    """An image entry with ``file_name``: LVIS entries only have ``coco_url``, whose last two parts
    (``val2017/000000139.jpg``) are the file relative to the COCO folder, as ``load_lvis_json`` reads them."""
    if "file_name" in image or "coco_url" not in image:
        return dict(image)
    return {**image, "file_name": "/".join(str(image["coco_url"]).split("/")[-2:])}


# ------------------------------------------------------------------------------------------------
# Loading and category subsets


def load_coco_dict(path: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read a COCO instances json and check its top level.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not JSON, or not an object with ``images``, ``annotations`` and
            ``categories`` lists.
    """
    path = os.fspath(path)
    if not PathManager.exists(path):
        raise FileNotFoundError(f"COCO annotation file {path!r} does not exist. Check the path.")
    start = time.perf_counter()
    coco = read_json(PathManager.get_local_path(path), what="a COCO instances json")
    _check_coco_dict(coco, path)
    logger.info("Read %s (%d annotations) in %.1f s.", path, len(coco["annotations"]), time.perf_counter() - start)
    return coco


def _check_coco_dict(coco: Any, source: str) -> None:
    keys = ("images", "annotations", "categories")
    if not isinstance(coco, dict):
        raise ValueError(
            f"{source!r} holds a JSON {type(coco).__name__}; expected a COCO instances object with keys {list(keys)}."
        )
    for key in keys:
        if not isinstance(coco.get(key), list):
            found = "missing" if key not in coco else f"a {type(coco[key]).__name__}, not a list"
            raise ValueError(
                f"{source!r} is not a COCO instances file: key {key!r} is {found} (top-level keys: "
                f"{sorted(coco)}). Expected lists under {list(keys)}."
            )


def resolve_categories(categories: CategorySpec, coco_categories: Sequence[Mapping[str, Any]]) -> list[int]:
    """Category ids (sorted) of a category subset.

    Args:
        categories: ``None`` or ``"all"`` (every category), ``"novel"`` / ``"base"`` (the COCO-FSOD
            splits, :data:`COCO_NOVEL_CLASSES` / :data:`COCO_BASE_CLASSES`), one category name, or a
            sequence of names and/or ids.
        coco_categories: the ``categories`` list of the COCO dict.

    Raises:
        ValueError: an unknown name (listing close names) or id, or a split whose classes the
            source lacks.
    """
    by_name = {str(c["name"]): int(c["id"]) for c in coco_categories}
    all_ids = sorted(by_name.values())
    if categories is None:
        return all_ids
    if isinstance(categories, str):
        if categories in _CATEGORY_SPLITS:
            split = _CATEGORY_SPLITS[categories]
            if split is None:
                return all_ids
            missing = [n for n in split if n not in by_name]
            if missing:
                raise ValueError(
                    f"Category subset {categories!r} is the COCO-FSOD split of COCO class names, but the source "
                    f"lacks {missing}. Use 'all' or a list of this dataset's category names."
                )
            return sorted(by_name[n] for n in split)
        categories = [categories]
    if len(categories) == 0:
        raise ValueError(
            f"Category subset {categories!r} is empty; pass None or 'all' for every category, or at least one name."
        )
    ids: set[int] = set()
    for item in categories:
        if isinstance(item, str):
            if item not in by_name:
                close = difflib.get_close_matches(item, list(by_name), n=5, cutoff=0.5)
                hint = f" Close names: {close}." if close else ""
                raise ValueError(
                    f"Unknown category name {item!r}.{hint} Valid: the dataset's names or one of "
                    f"{sorted(_CATEGORY_SPLITS)}; the dataset has {len(by_name)} categories, e.g. {list(by_name)[:10]}."
                )
            ids.add(by_name[item])
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            if int(item) not in all_ids:
                raise ValueError(f"Unknown category id {item!r}; the dataset's ids are {all_ids}.")
            ids.add(int(item))
        else:
            raise ValueError(
                f"Category {item!r} is a {type(item).__name__}; expected a category name (str) or id (int)."
            )
    return sorted(ids)


# ------------------------------------------------------------------------------------------------
# Selection


def _annotation_arrays(coco: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    """Columns of the annotations: ``ids``, ``image`` (row in ``image_ids``), ``category``,
    ``xywh`` ``[N, 4]``, ``area``, ``crowd``; and the images' ``image_ids``, ``heights``, ``widths``."""
    images, anns = coco["images"], coco["annotations"]

    def column(items: list, key: str, dtype: type, default: Any = None) -> np.ndarray:
        get = itemgetter(key) if default is None else (lambda item: item.get(key, default))
        return np.fromiter(map(get, items), dtype=dtype, count=len(items))

    try:
        image_ids = column(images, "id", np.int64)
        heights = column(images, "height", np.float64)
        widths = column(images, "width", np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{source!r}: an image is malformed ({type(e).__name__}: {e}); COCO images need an integer id, height "
            "and width."
        ) from e
    try:
        ann_ids = column(anns, "id", np.int64)
        ann_images = column(anns, "image_id", np.int64)
        categories = column(anns, "category_id", np.int64)
        crowd = column(anns, "iscrowd", bool, 0)
        area = column(anns, "area", np.float64, math.nan)
        bboxes = list(map(itemgetter("bbox"), anns))
        if len(anns) and (np.fromiter(map(len, bboxes), dtype=np.int64, count=len(anns)) != 4).any():
            raise ValueError("a bbox does not have 4 numbers")
        xywh = np.fromiter(chain.from_iterable(bboxes), dtype=np.float64, count=4 * len(anns)).reshape(-1, 4)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{source!r}: an annotation is malformed ({type(e).__name__}: {e}); COCO annotations need integer id, "
            "image_id and category_id, and bbox [x, y, w, h]."
        ) from e
    no_area = np.isnan(area)
    area[no_area] = xywh[no_area, 2] * xywh[no_area, 3]
    if (np.diff(np.sort(ann_ids)) == 0).any():
        raise ValueError(f"{source!r}: annotation ids are not unique; each annotation needs its own id.")
    by_id = np.argsort(image_ids, kind="stable")
    sorted_ids = image_ids[by_id]
    if (np.diff(sorted_ids) == 0).any():
        raise ValueError(f"{source!r}: image ids are not unique; each image needs its own id.")
    pos = np.minimum(np.searchsorted(sorted_ids, ann_images), max(len(image_ids) - 1, 0))
    known = sorted_ids[pos] == ann_images if len(image_ids) else np.zeros(len(ann_ids), dtype=bool)
    image_rows = by_id[pos] if len(image_ids) else np.zeros(len(ann_ids), dtype=np.int64)
    if not known.all():
        i = int(np.flatnonzero(~known)[0])
        raise ValueError(
            f"{source!r}: annotation {int(ann_ids[i])} refers to image_id {int(ann_images[i])}, which is not in "
            "'images'."
        )
    return {
        "ids": ann_ids,
        "image": image_rows,
        "category": categories,
        "xywh": xywh,
        "area": area,
        "crowd": crowd,
        "image_ids": image_ids,
        "heights": heights,
        "widths": widths,
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


def _annotation_rle(annotation: Mapping[str, Any], height: int, width: int) -> dict:
    """The mask of an annotation as a compressed RLE: its segmentation, or its box when it has none."""
    segmentation = annotation.get("segmentation")
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
        if polygons:
            return mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict):
        if list(segmentation.get("size", [])) != [height, width]:
            raise ValueError(
                f"Annotation {annotation.get('id')!r} has an RLE of size {segmentation.get('size')!r}; expected "
                f"[height, width] = [{height}, {width}] of its image."
            )
        if isinstance(segmentation.get("counts"), list):
            return mask_util.frPyObjects(segmentation, height, width)
        return segmentation
    # No usable segmentation: the box ([x, y, w, h]; pycocotools reads 4-number lists as boxes).
    return mask_util.frPyObjects([list(annotation["bbox"])], height, width)[0]


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


# ------------------------------------------------------------------------------------------------
# Writing


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    with atomic_path(str(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def sidecar_path(output_path: Union[str, os.PathLike]) -> Path:
    """``REF.json`` -> ``REF.selection.json``."""
    path = Path(output_path)
    return path.with_name(f"{path.stem}.selection.json")


def write_reference_json(
    reference_set: ReferenceSet, output_path: Union[str, os.PathLike], *, sidecar: bool = True
) -> Path:
    """Write a reference set as a COCO json (:meth:`ReferenceSet.to_coco_dict`), atomically.

    With ``sidecar``, :meth:`ReferenceSet.summary` is also written to ``<stem>.selection.json``.
    The bytes depend only on the reference set, so the same selection gives the same file.

    Returns:
        The json's path.
    """
    path = Path(output_path)
    coco = reference_set.to_coco_dict()
    _write_atomic(path, json.dumps(coco, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    if sidecar:
        text = json.dumps(coco["info"][_INFO_KEY], indent=2, ensure_ascii=False) + "\n"
        _write_atomic(sidecar_path(path), text.encode("utf-8"))
    logger.info(
        "Wrote %d references of %d categories to %s.",
        len(coco["annotations"]),
        len(reference_set.category_ids),
        path,
    )
    return path


def write_contact_sheets(
    reference_set: ReferenceSet,
    output_dir: Union[str, os.PathLike],
    *,
    image_root: Union[str, os.PathLike],
    thumb_size: int = 160,
    columns: int = 5,
    context: float = 0.2,
    progress: bool = False,
) -> list[Path]:
    """One PNG per category: its references cropped (``context`` of the box size added on each
    side), their mask outline drawn in red, in pick order (largest first).

    Args:
        reference_set: the references.
        output_dir: where ``<category id>_<name>.png`` files go.
        image_root: the folder the images' ``file_name`` are relative to.
        thumb_size: side in pixels of each cell.
        columns: cells per row.
        context: margin around the box, as a share of its width / height.
        progress: show a tqdm bar over the categories.

    Returns:
        The paths written (categories without any reference get no sheet).
    """
    from PIL import Image, ImageDraw

    from .io import read_image

    output_dir = Path(output_dir)
    names = reference_set.category_names
    written = []
    cats = [c for c in reference_set.category_ids if reference_set.picks[c]]
    if progress:
        from tqdm import tqdm

        cats = tqdm(cats, desc="contact sheets", unit="category")
    for c in cats:
        ann_ids = reference_set.picks[c]
        rows, cols = math.ceil(len(ann_ids) / columns), min(columns, len(ann_ids))
        caption = 14
        sheet = Image.new("RGB", (cols * thumb_size, rows * (thumb_size + caption)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for i, ann_id in enumerate(ann_ids):
            ann = reference_set.annotations[ann_id]
            info = reference_set.images[int(ann["image_id"])]
            image = read_image(os.path.join(os.fspath(image_root), info["file_name"]))
            h, w = image.shape[:2]
            mask = mask_util.decode(_annotation_rle(ann, int(info["height"]), int(info["width"]))).astype(bool)
            if mask.shape != (h, w):
                raise ValueError(
                    f"Image {info['file_name']!r} is {w}x{h} but its json entry says "
                    f"{info['width']}x{info['height']}; the annotations do not match the image files."
                )
            outline = mask.copy()
            interior = mask.copy()
            interior[1:, :] &= mask[:-1, :]
            interior[:-1, :] &= mask[1:, :]
            interior[:, 1:] &= mask[:, :-1]
            interior[:, :-1] &= mask[:, 1:]
            outline &= ~interior
            image = image.copy()
            image[outline] = (255, 0, 0)
            bx, by, bw, bh = ann["bbox"]
            x0, y0 = max(0, int(bx - context * bw)), max(0, int(by - context * bh))
            x1 = min(w, int(math.ceil(bx + bw + context * bw)))
            y1 = min(h, int(math.ceil(by + bh + context * bh)))
            crop = Image.fromarray(image[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)])
            scale = thumb_size / max(crop.width, crop.height)  # small instances are enlarged too
            size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
            crop = crop.resize(size, Image.BILINEAR)
            col, row = i % columns, i // columns
            left, top = col * thumb_size, row * (thumb_size + caption)
            sheet.paste(crop, (left + (thumb_size - crop.width) // 2, top + (thumb_size - crop.height) // 2))
            label = f"#{i} id {ann_id} area {ann.get('area', bw * bh):.0f}"
            draw.text((left + 2, top + thumb_size), label, fill=(0, 0, 0))
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in names[c])
        path = output_dir / f"{c}_{safe}.png"
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        _write_atomic(path, buffer.getvalue())
        written.append(path)
    logger.info("Wrote %d contact sheets to %s.", len(written), output_dir)
    return written


# ------------------------------------------------------------------------------------------------
# Dataset registration


def reference_cache_dir() -> Path:
    """``$SAMANTICS_CACHE/reference_sets`` (default ``~/.cache/samantics_d2/reference_sets``)."""
    return Path(cache_root()) / "reference_sets"


def _source_json(source: str) -> tuple[str, str]:
    """``(json_file, image_root)`` of a registered COCO-format dataset, without loading it when
    possible: from its metadata (the builtin COCO/LVIS names get theirs when registered, by us or by
    Detectron2), else by loading it once (datasets generated on first use, like the shapes)."""
    from samantics_d2.d2 import DatasetCatalog, MetadataCatalog

    from .builtin import BUILTIN_COCO, BUILTIN_LVIS

    if source not in DatasetCatalog:
        raise KeyError(
            f"Reference-set source dataset {source!r} is not registered; register it (e.g. with "
            "register_coco_instances) first. Registered: " + ", ".join(sorted(DatasetCatalog.keys()))
        )
    meta = MetadataCatalog.get(source)
    json_file, image_root = meta.get("json_file"), meta.get("image_root")
    builtin = source in BUILTIN_COCO or source in BUILTIN_LVIS  # a missing file is reported below
    if not builtin and (json_file is None or not PathManager.exists(os.fspath(json_file))):
        DatasetCatalog.get(source)  # generated datasets write their json on first use
        json_file, image_root = meta.get("json_file"), meta.get("image_root")
    if json_file is None or image_root is None:
        raise ValueError(
            f"Dataset {source!r} has no json_file / image_root in its metadata; reference sets need a COCO-format "
            "dataset registered with register_coco_instances."
        )
    json_file = os.fspath(json_file)
    if not PathManager.exists(json_file):
        raise FileNotFoundError(
            f"The json of dataset {source!r}, {json_file!r}, does not exist; set DETECTRON2_DATASETS to the folder "
            "holding the datasets (datasets/README.md)."
        )
    return json_file, os.fspath(image_root)


def _reference_json_path(
    name: str, json_file: str, selection: ReferenceSelection, categories: CategorySpec, output_dir: Optional[Path]
) -> Path:
    """Where the reference json of ``name`` lives; its file name hashes everything it depends on."""
    local = PathManager.get_local_path(json_file)
    stat = os.stat(local)
    key = json.dumps(
        {
            "source": os.path.abspath(local),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "selection": selection.to_dict(),
            "categories": categories if categories is None or isinstance(categories, str) else list(categories),
            "format_version": _FORMAT_VERSION,
        },
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
    return (output_dir or reference_cache_dir()) / f"{name}-{digest}.json"


def register_reference_set(
    name: str,
    *,
    source: str,
    selection: ReferenceSelection,
    categories: CategorySpec = None,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
) -> None:
    """Register ``name`` as the reference set of the registered COCO-format dataset ``source``.

    Registering computes and reads nothing. On the first ``DatasetCatalog.get(name)`` the source's
    json is read, the references selected and written to
    ``<output_dir or reference_cache_dir()>/<name>-<hash>.json`` (the hash covers the source file
    and the selection, so a changed source or selection makes a new file); later calls reuse it.
    Concurrent processes may both write it: the writes are atomic and byte-identical.

    The dataset dicts are loaded with ``load_coco_json`` (contiguous ids of the selected categories)
    and keep ``"id"``, ``"area"`` and ``"reference_rank"`` per annotation (see :func:`take_k_shot`).
    Metadata: ``evaluator_type="coco"``, ``reference_source``, ``reference_selection`` and
    ``metadata`` at once; ``json_file``, ``image_root``, ``thing_classes`` on first load.
    """
    from samantics_d2.d2 import DatasetCatalog, MetadataCatalog, load_coco_json

    from .builtin import set_paths_if_missing

    if not isinstance(selection, ReferenceSelection):
        raise TypeError(f"register_reference_set({name!r}) got selection={selection!r}; expected a ReferenceSelection.")
    out_dir = Path(os.path.expanduser(os.fspath(output_dir))) if output_dir is not None else None

    def load() -> list[dict]:
        json_file, image_root = _source_json(source)
        path = _reference_json_path(name, json_file, selection, categories, out_dir)
        if not path.exists():
            logger.info("Creating reference set %r from %s into %s.", name, json_file, path)
            write_reference_json(select_references(json_file, selection, categories=categories), path)
        set_paths_if_missing(name, json_file=str(path), image_root=image_root)
        return load_coco_json(str(path), image_root, name, extra_annotation_keys=["id", "area", "reference_rank"])

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        evaluator_type="coco",
        reference_source=source,
        reference_selection=selection.to_dict(),
        **dict(metadata or {}),
    )



def register_category_subset(name: str, *, source: str, categories: CategorySpec) -> None:
    """Register ``name``: the COCO-format dataset ``source`` (every image) restricted to ``categories``
    (e.g. ``coco_2017_val_novel``, the COCO-FSOD novel-class evaluation set).

    Lazy like :func:`register_reference_set`: the filtered json is written on first use to
    ``reference_cache_dir()/../splits/<name>-<hash of the source file>.json`` and reused; contiguous ids
    follow the kept categories, so they match reference sets of the same ``categories``.
    """
    from samantics_d2.d2 import DatasetCatalog, MetadataCatalog, load_coco_json

    from .builtin import set_paths_if_missing
    from .shapes import write_split_json

    def load() -> list[dict]:
        json_file, image_root = _source_json(source)
        stat = os.stat(json_file)
        key = hashlib.sha256(f"{os.path.abspath(json_file)}:{stat.st_size}:{stat.st_mtime_ns}:{categories}".encode())
        path = reference_cache_dir().parent / "splits" / f"{name}-{key.hexdigest()[:10]}.json"
        if not path.exists():
            coco_categories = load_coco_dict(json_file)["categories"]
            ids = set(resolve_categories(categories, coco_categories))
            names = [c["name"] for c in coco_categories if c["id"] in ids]
            path.parent.mkdir(parents=True, exist_ok=True)
            logger.info("Writing %s: %s restricted to %d categories.", path, json_file, len(names))
            write_split_json(json_file, names, str(path))
        set_paths_if_missing(name, json_file=str(path), image_root=image_root)
        return load_coco_json(str(path), image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(evaluator_type="coco", subset_of=source)

# Standard names: n references per category, seeds 0..9 (the seed study of "No Time to Train").
COCO_REFERENCE_SHOTS: tuple[int, ...] = (1, 2, 3, 5, 10, 30)
COCO_REFERENCE_SEEDS: tuple[int, ...] = tuple(range(10))
LVIS_REFERENCE_SHOTS: tuple[int, ...] = (1, 5, 10)
# shapes_train has 64 images: 8 classes x 5 distinct images fit, 8 x 10 would not.
SHAPES_REFERENCE_SHOTS: tuple[int, ...] = (1, 3, 5)
SHAPES_REFERENCE_SEEDS: tuple[int, ...] = (0, 1, 2)
# The synthetic shapes are small images: no absolute area floor, the share of the image decides.
SHAPES_SELECTION = ReferenceSelection(min_area=None, min_area_fraction=0.002, border_frame=2)


def register_all_reference_sets(*, output_dir: Optional[Union[str, os.PathLike]] = None) -> list[str]:
    """Register the standard reference sets not registered yet (lazily; see :func:`register_reference_set`).

    - ``coco_2017_train_ref{n}_seed{s}``: all 80 classes, from ``coco_2017_train``;
    - ``coco_2017_train_novel_ref{n}_seed{s}``: the 20 COCO-FSOD novel classes;
    - ``shapes_train_ref{n}_seed{s}``: from ``shapes_train`` with :data:`SHAPES_SELECTION`;
    - ``shapes_train_novel_ref{n}_seed{s}``: its novel classes (``SHAPES_SPLITS["novel"]``);
    - ``lvis_v1_train_ref{n}_seed0``: all LVIS v1 classes, from ``lvis_v1_train``;
    - ``coco_2017_val_novel`` / ``coco_2017_val_base``: COCO val restricted to the COCO-FSOD splits.

    for ``n`` in :data:`COCO_REFERENCE_SHOTS` / :data:`SHAPES_REFERENCE_SHOTS` and ``s`` in the
    matching seeds. Returns the names registered by this call.
    """
    from samantics_d2.d2 import DatasetCatalog

    from .shapes import SHAPES_SPLITS

    table: list[tuple[str, str, ReferenceSelection, CategorySpec]] = []
    for n in COCO_REFERENCE_SHOTS:
        for s in COCO_REFERENCE_SEEDS:
            selection = ReferenceSelection(n_ref=n, seed=s)
            table.append((f"coco_2017_train_ref{n}_seed{s}", "coco_2017_train", selection, None))
            table.append((f"coco_2017_train_novel_ref{n}_seed{s}", "coco_2017_train", selection, "novel"))
    for n in LVIS_REFERENCE_SHOTS:
        table.append((f"lvis_v1_train_ref{n}_seed0", "lvis_v1_train", ReferenceSelection(n_ref=n, seed=0), None))
    for n in SHAPES_REFERENCE_SHOTS:
        for s in SHAPES_REFERENCE_SEEDS:
            selection = dataclasses.replace(SHAPES_SELECTION, n_ref=n, seed=s)
            table.append((f"shapes_train_ref{n}_seed{s}", "shapes_train", selection, None))
            novel = list(SHAPES_SPLITS["novel"])
            table.append((f"shapes_train_novel_ref{n}_seed{s}", "shapes_train", selection, novel))
    names = []
    for name, source, categories in (("coco_2017_val_novel", "coco_2017_val", "novel"),
                                     ("coco_2017_val_base", "coco_2017_val", "base")):
        if name not in DatasetCatalog.list():
            register_category_subset(name, source=source, categories=categories)
            names.append(name)
    for name, source, selection, categories in table:
        if name not in DatasetCatalog.list():
            register_reference_set(
                name, source=source, selection=selection, categories=categories, output_dir=output_dir
            )
            names.append(name)
    return names


register_all_reference_sets()
