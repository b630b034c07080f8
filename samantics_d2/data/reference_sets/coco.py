"""COCO reference loading: the COCO class lists and FSOD splits, reading and checking a COCO
instances json, category subsets, and the annotations as columns and RLE masks for the selection."""
from __future__ import annotations

import difflib
import logging
import math
import os
import time
from itertools import chain
from operator import itemgetter
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from iopath.common.file_io import PathManager as _PathManagerClass
from pycocotools import mask as mask_util

from ...utils.io import read_json

__all__ = [
    "COCO_BASE_CLASSES",
    "COCO_CLASSES",
    "COCO_NOVEL_CLASSES",
    "CategorySpec",
    "load_coco_dict",
    "resolve_categories",
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

CategorySpec = Union[None, str, Sequence[Union[str, int]]]

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
