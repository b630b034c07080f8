"""LVIS-format instance datasets, as ``detectron2.data.datasets.lvis.load_lvis_json``; parsing and
indexing is the ``lvis`` package's ``LVIS``.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

from lvis import LVIS

from ..structures import BoxMode
from .catalog import MetadataCatalog
from .coco import _local_json_path, _require_keys, _valid_polygons

__all__ = ["load_lvis_json"]

logger = logging.getLogger(__name__)


def _builtin_lvis_metadata(dataset_name: str, categories: list[dict]) -> dict:
    """The metadata Detectron2's ``get_lvis_instances_meta(dataset_name)`` gives, by the name's version.

    Detectron2 ships the LVIS v0.5 and v1 category tables; lite takes the same fields from the file's
    own ``categories`` (sorted by id), which are those tables in the official files.
    """
    if "cocofied" in dataset_name:
        raise ValueError(
            f"Dataset {dataset_name!r}: 'cocofied' LVIS uses Detectron2's built-in COCO metadata, which "
            "samantics_d2.lite does not ship. Use Detectron2, or a name without 'cocofied'."
        )
    if "v0.5" not in dataset_name and "v1" not in dataset_name:
        raise ValueError(f"No built-in metadata for dataset {dataset_name}")  # Detectron2's message
    categories = sorted(categories, key=lambda c: c["id"])
    meta: dict = {"thing_classes": [(c.get("synonyms") or [c["name"]])[0] for c in categories]}
    if "v1" in dataset_name:
        meta["class_image_count"] = [{"id": c["id"], "image_count": c.get("image_count", 0)} for c in categories]
    return meta


def load_lvis_json(
    json_file: str,
    image_root: str,
    dataset_name: Optional[str] = None,
    extra_annotation_keys: Optional[list[str]] = None,
) -> list[dict]:
    """Load an LVIS instances json into Detectron2's dataset dicts, as Detectron2 does.

    Args:
        json_file: path (or iopath URI) of the LVIS json.
        image_root: prefix of the COCO image folders: an image's ``file_name`` is
            ``os.path.join(image_root + <split folder>, <file>)`` from the last two parts of its
            ``coco_url`` (so ``image_root`` ends with a separator, e.g. ``datasets/coco/``).
        dataset_name: when given, it must name a built-in LVIS version (contain ``"v1"`` or
            ``"v0.5"``), whose metadata (``thing_classes``, and ``class_image_count`` for v1) is set;
            any other name raises ValueError, as in Detectron2.
        extra_annotation_keys: annotation keys copied besides ``bbox``, ``category_id`` and
            ``segmentation`` (each annotation must have them).

    Returns:
        One dict per image, sorted by image id: ``file_name``, ``height``, ``width``, ``image_id``,
        ``not_exhaustive_category_ids`` and ``neg_category_ids`` (dataset ids, as in the file), and
        ``annotations`` with ``bbox`` (``BoxMode.XYWH_ABS``), ``bbox_mode``, ``category_id``
        (the file's id - 1: LVIS ids are 1..K) and ``segmentation`` (polygons).

    Raises:
        ValueError: the file is not LVIS, annotation ids repeat, or a segmentation is empty or has
            a polygon with fewer than 3 points (Detectron2 asserts the same).
    """
    start = time.perf_counter()
    local_json = _local_json_path(json_file, "LVIS json file")
    try:
        lvis_api = LVIS(local_json)
    except (KeyError, AssertionError) as e:
        raise ValueError(
            f"{json_file!r} is not an LVIS instances file ({type(e).__name__}: {e}); expected an object with "
            "'images', 'annotations' and 'categories'."
        ) from e
    _require_keys(json_file, lvis_api.dataset, ("images", "annotations", "categories"), "LVIS")
    elapsed = time.perf_counter() - start
    if elapsed > 1:
        logger.info("Loading %s takes %.2f seconds.", json_file, elapsed)
    if dataset_name is not None:
        MetadataCatalog.get(dataset_name).set(**_builtin_lvis_metadata(dataset_name, lvis_api.dataset["categories"]))

    image_ids = sorted(lvis_api.imgs.keys())
    annotation_ids = [ann["id"] for image_id in image_ids for ann in lvis_api.img_ann_map[image_id]]
    if len(set(annotation_ids)) != len(annotation_ids):
        raise ValueError(f"Annotation ids in {json_file!r} are not unique; each annotation needs its own id.")
    extra_keys = list(extra_annotation_keys or [])
    if extra_keys:
        logger.info("The following extra annotation keys will be loaded: %s", extra_keys)
    dataset_dicts = []
    for image_id in image_ids:
        image = lvis_api.imgs[image_id]
        try:
            split_folder, file_name = image["coco_url"].split("/")[-2:]
            record = {
                "file_name": os.path.join(image_root + split_folder, file_name),
                "height": image["height"],
                "width": image["width"],
                "not_exhaustive_category_ids": image.get("not_exhaustive_category_ids", []),
                "neg_category_ids": image.get("neg_category_ids", []),
                "image_id": image_id,
            }
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"Image {image_id} in {json_file!r} is not a valid LVIS image ({type(e).__name__}: {e}); LVIS "
                "images need id, coco_url (.../<split>/<file>), height, width."
            ) from e
        objs = []
        for anno in lvis_api.img_ann_map[image_id]:
            segmentation = anno["segmentation"]
            if not segmentation or len(_valid_polygons(segmentation)) != len(segmentation):
                raise ValueError(
                    f"Annotation {anno['id']} in {json_file!r} has an empty segmentation or a polygon with fewer "
                    "than 3 points; LVIS annotations need valid polygons."
                )
            obj = {"bbox": anno["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "category_id": anno["category_id"] - 1}
            obj["segmentation"] = segmentation
            obj.update({key: anno[key] for key in extra_keys})
            objs.append(obj)
        record["annotations"] = objs
        dataset_dicts.append(record)
    logger.info("Loaded %d images in the LVIS format from %s", len(dataset_dicts), json_file)
    return dataset_dicts
