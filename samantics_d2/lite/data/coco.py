"""COCO-format instance datasets, as ``detectron2.data.datasets.coco``: ``load_coco_json``,
``register_coco_instances``. Parsing and indexing is pycocotools' ``COCO``; this module turns it into
Detectron2's dataset dicts and validates the file on the way.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from typing import Any, Optional, Sequence

from iopath.common.file_io import PathManager as _PathManagerClass
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from ...utils.io import read_json
from ..structures import BoxMode
from .catalog import DatasetCatalog, MetadataCatalog

__all__ = ["load_coco_json", "register_coco_instances"]

logger = logging.getLogger(__name__)

PathManager = _PathManagerClass()

def _local_json_path(json_file: str, what: str) -> str:
    json_file = os.fspath(json_file)
    if not PathManager.exists(json_file):
        raise FileNotFoundError(f"{what} {json_file!r} does not exist.")
    return PathManager.get_local_path(json_file)


def _require_keys(json_file: str, dataset: Any, keys: Sequence[str], kind: str, *, allow_missing: bool = False) -> None:
    """Check the top level of an annotation file: a dict with list values under ``keys`` (under those
    of ``keys`` it has, with ``allow_missing``)."""
    if not isinstance(dataset, dict):
        raise ValueError(
            f"{json_file!r} holds a JSON {type(dataset).__name__}; expected a {kind} instances file: an object "
            f"with keys {list(keys)}."
        )
    for key in keys:
        if allow_missing and key not in dataset:
            continue
        if not isinstance(dataset.get(key), list):
            found = "missing" if key not in dataset else f"a {type(dataset[key]).__name__}, not a list"
            raise ValueError(
                f"{json_file!r} is not a {kind} instances file: key {key!r} is {found} (top-level keys: "
                f"{sorted(dataset.keys())}). Expected {list(keys)} as in the {kind} format."
            )


def _valid_polygons(segmentation: list) -> list:
    """The polygons with at least 3 points (6 numbers, an even count)."""
    return [poly for poly in segmentation if len(poly) % 2 == 0 and len(poly) >= 6]


def _convert_segmentation(segmentation: Any, json_file: str, annotation_id: Any) -> Optional[Any]:
    """Detectron2's segmentation field: valid polygons, or a compressed RLE dict. None: nothing valid left."""
    if isinstance(segmentation, dict):
        if isinstance(segmentation.get("counts"), list):  # uncompressed RLE -> compressed
            height, width = segmentation["size"]
            return mask_util.frPyObjects(segmentation, height, width)
        return segmentation
    if isinstance(segmentation, list):
        valid = _valid_polygons(segmentation)
        return valid or None
    raise ValueError(
        f"Annotation {annotation_id} in {json_file!r} has a segmentation of type {type(segmentation).__name__}; "
        "expected a list of polygons or an RLE dict."
    )


def _warn_dropped(json_file: str, polygons: int, instances: int) -> None:
    if polygons or instances:
        logger.warning(
            "%s: dropped %d polygon(s) with fewer than 3 points and %d instance(s) left without a valid "
            "segmentation. Check how the annotations were made.",
            json_file,
            polygons,
            instances,
        )


def load_coco_json(
    json_file: str,
    image_root: str,
    dataset_name: Optional[str] = None,
    extra_annotation_keys: Optional[list[str]] = None,
) -> list[dict]:
    """Load a COCO instances json into Detectron2's dataset dicts.

    Args:
        json_file: path (or iopath URI) of the COCO instances json.
        image_root: the folder the images' ``file_name`` are relative to.
        dataset_name: when given, ``thing_classes`` (category names sorted by id) and
            ``thing_dataset_id_to_contiguous_id`` are set on its metadata, and ``category_id`` becomes
            the contiguous id ``0..K-1``; otherwise category ids are kept as in the file.
        extra_annotation_keys: annotation keys copied besides ``iscrowd``, ``bbox``, ``keypoints``,
            ``category_id`` and ``segmentation`` (e.g. ``["area"]``).

    Returns:
        One dict per image, sorted by image id: ``file_name``, ``height``, ``width``, ``image_id``,
        ``annotations`` (list of dicts with ``bbox`` in ``BoxMode.XYWH_ABS``, ``bbox_mode``,
        ``category_id``, ``iscrowd``, ``segmentation`` as polygons or compressed RLE). Polygons with
        fewer than 3 points are dropped, and so is an instance left with none (with a warning); an
        instance with an empty or no segmentation is kept with its box only. As in Detectron2
        (pycocotools), a file without ``annotations`` (a test-set image-info file) or ``images``
        reads as if they were empty lists.
    """
    start = time.perf_counter()
    local_json = _local_json_path(json_file, "COCO json file")
    dataset = read_json(local_json, what="a COCO instances json")
    _require_keys(json_file, dataset, ("images", "annotations", "categories"), "COCO", allow_missing=True)
    coco_api = COCO()
    coco_api.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco_api.createIndex()
    except KeyError as e:
        raise ValueError(
            f"{json_file!r} is not a COCO instances file: an image, annotation or category lacks the key {e}."
        ) from e
    elapsed = time.perf_counter() - start
    if elapsed > 1:
        logger.info("Loading %s takes %.2f seconds.", json_file, elapsed)

    id_map = None
    if dataset_name is not None:
        cat_ids = sorted(coco_api.getCatIds())
        thing_classes = [c["name"] for c in coco_api.loadCats(cat_ids)]
        id_map = {cat_id: i for i, cat_id in enumerate(cat_ids)}
        MetadataCatalog.get(dataset_name).set(thing_classes=thing_classes, thing_dataset_id_to_contiguous_id=id_map)

    matched = sum(len(coco_api.imgToAnns[image_id]) for image_id in coco_api.imgs)
    if matched < len(coco_api.anns):
        logger.warning(
            "%s contains %d annotations, but only %d of them match to images in the file.",
            json_file,
            len(coco_api.anns),
            matched,
        )
    annotation_ids = [ann["id"] for ann in dataset.get("annotations", [])]
    if len(set(annotation_ids)) != len(annotation_ids):
        raise ValueError(f"Annotation ids in {json_file!r} are not unique; each annotation needs its own id.")

    ann_keys = ["iscrowd", "bbox", "keypoints", "category_id"] + list(extra_annotation_keys or [])
    dropped_polygons = dropped_instances = 0
    dataset_dicts = []
    for image_id in sorted(coco_api.imgs.keys()):
        image = coco_api.imgs[image_id]
        try:
            record = {
                "file_name": os.path.join(image_root, image["file_name"]),
                "height": image["height"],
                "width": image["width"],
                "image_id": image_id,
            }
        except KeyError as e:
            raise ValueError(
                f"Image {image_id} in {json_file!r} lacks the key {e}; COCO images need id, file_name, height, width."
            ) from e
        objs = []
        for anno in coco_api.imgToAnns[image_id]:
            if anno.get("ignore", 0) != 0:
                raise ValueError(f"Annotation {anno['id']} in {json_file!r} sets 'ignore', which is not supported.")
            obj = {key: anno[key] for key in ann_keys if key in anno}
            if "bbox" in obj and len(obj["bbox"]) == 0:
                raise ValueError(
                    f"Annotation {anno['id']} of image {image_id} in {json_file!r} has an empty 'bbox'; "
                    "expected [x, y, w, h]."
                )
            if anno.get("segmentation"):  # as Detectron2: an empty or missing segmentation keeps the box only
                segmentation = _convert_segmentation(anno["segmentation"], json_file, anno["id"])
                if isinstance(anno["segmentation"], list):
                    dropped_polygons += len(anno["segmentation"]) - len(segmentation or [])
                if segmentation is None:
                    dropped_instances += 1
                    continue
                obj["segmentation"] = segmentation
            if "keypoints" in obj:  # COCO keypoints are integer pixel indices; +0.5 moves them to pixel centres
                obj["keypoints"] = [v + 0.5 if i % 3 != 2 else v for i, v in enumerate(obj["keypoints"])]
            obj["bbox_mode"] = BoxMode.XYWH_ABS
            if id_map is not None:
                if obj.get("category_id") not in id_map:
                    raise ValueError(
                        f"Annotation {anno['id']} in {json_file!r} has category_id {obj.get('category_id')!r}, "
                        f"which is not among the file's categories {sorted(id_map)}."
                    )
                obj["category_id"] = id_map[obj["category_id"]]
            objs.append(obj)
        record["annotations"] = objs
        dataset_dicts.append(record)
    _warn_dropped(json_file, dropped_polygons, dropped_instances)
    logger.info("Loaded %d images in COCO format from %s", len(dataset_dicts), json_file)
    return dataset_dicts


def register_coco_instances(name: str, metadata: dict, json_file: str, image_root: str) -> None:
    """Register a COCO instances dataset; the json is read when ``DatasetCatalog.get(name)`` is called.

    The metadata of ``name`` gets ``json_file``, ``image_root``, ``evaluator_type="coco"`` and ``metadata``.
    """
    if not isinstance(name, str):
        raise TypeError(f"register_coco_instances got name={name!r}; expected a str.")
    if not isinstance(json_file, (str, os.PathLike)) or not isinstance(image_root, (str, os.PathLike)):
        raise TypeError(
            f"register_coco_instances({name!r}) got json_file={json_file!r}, image_root={image_root!r}; "
            "expected paths (str or os.PathLike)."
        )
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata)
