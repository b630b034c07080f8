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
from .coco import _convert_segmentation, _local_json_path, _require_keys, _warn_dropped

__all__ = ["load_lvis_json"]

logger = logging.getLogger(__name__)


def load_lvis_json(
    json_file: str,
    image_root: str,
    dataset_name: Optional[str] = None,
    extra_annotation_keys: Optional[list[str]] = None,
) -> list[dict]:
    """Load an LVIS instances json into Detectron2's dataset dicts.

    Args:
        json_file: path (or iopath URI) of the LVIS json.
        image_root: folder holding the COCO image folders: an image's ``file_name`` is
            ``image_root/<split folder>/<file>`` from the last two parts of its ``coco_url``.
        dataset_name: when given, its metadata gets ``thing_classes`` (category names sorted by id),
            ``thing_dataset_id_to_contiguous_id`` and ``class_image_count``.
        extra_annotation_keys: annotation keys copied besides ``bbox``, ``category_id`` and
            ``segmentation``.

    Returns:
        One dict per image, sorted by image id: ``file_name``, ``height``, ``width``, ``image_id``,
        ``not_exhaustive_category_ids`` and ``neg_category_ids`` (dataset ids, as in the file), and
        ``annotations`` with ``bbox`` (``BoxMode.XYWH_ABS``), ``bbox_mode``, ``category_id``
        (contiguous: the rank of the id among the sorted category ids) and ``segmentation`` (polygons).
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

    cat_ids = sorted(lvis_api.cats.keys())
    id_map = {cat_id: i for i, cat_id in enumerate(cat_ids)}
    if dataset_name is not None:
        categories = [lvis_api.cats[cat_id] for cat_id in cat_ids]
        MetadataCatalog.get(dataset_name).set(
            thing_classes=[c["name"] for c in categories],
            thing_dataset_id_to_contiguous_id=id_map,
            class_image_count=[{"id": c["id"], "image_count": c.get("image_count", 0)} for c in categories],
        )

    extra_keys = list(extra_annotation_keys or [])
    dropped_polygons = dropped_instances = 0
    dataset_dicts = []
    for image_id in sorted(lvis_api.imgs.keys()):
        image = lvis_api.imgs[image_id]
        try:
            split_folder, file_name = image["coco_url"].split("/")[-2:]
            record = {
                "file_name": os.path.join(image_root, split_folder, file_name),
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
            if anno["category_id"] not in id_map:
                raise ValueError(
                    f"Annotation {anno['id']} in {json_file!r} has category_id {anno['category_id']!r}, which is not "
                    "among the file's categories."
                )
            obj = {"bbox": anno["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "category_id": id_map[anno["category_id"]]}
            segmentation = _convert_segmentation(anno["segmentation"], json_file, anno["id"])
            if isinstance(anno["segmentation"], list):
                dropped_polygons += len(anno["segmentation"]) - len(segmentation or [])
            if segmentation is None:
                dropped_instances += 1
                continue
            obj["segmentation"] = segmentation
            obj.update({key: anno[key] for key in extra_keys if key in anno})
            objs.append(obj)
        record["annotations"] = objs
        dataset_dicts.append(record)
    _warn_dropped(json_file, dropped_polygons, dropped_instances)
    logger.info("Loaded %d images in the LVIS format from %s", len(dataset_dicts), json_file)
    return dataset_dicts
