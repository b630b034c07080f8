"""BDD100K instance segmentation, registered from its official JSON layout under ``$DETECTRON2_DATASETS``.

The BDD100K release (https://doc.bdd100k.com/download.html, "Instance Segmentation") unpacks to::

    bdd100k/images/10k/{train,val}/<name>.jpg
    bdd100k/labels/ins_seg/rles/ins_seg_{train,val}.json        (Scalabel format, RLE masks)
    bdd100k/labels/ins_seg/polygons/ins_seg_{train,val}.json    (older release: poly2d polygons)

A Scalabel file is a list of frames (or ``{"frames": [...]}``), each ``{"name": <image file>,
"labels": [{"id", "category", "attributes": {"crowd", ...}, "rle": {"size": [H, W], "counts"} or
"poly2d": [{"vertices": [[x, y], ...], "closed": true}], "box2d": {"x1", "y1", "x2", "y2"}}]}``.
The eight instance-segmentation classes (:data:`BDD100K_INS_SEG_CLASSES`) become contiguous ids in
that order; labels of other categories are left out, ``attributes.crowd`` becomes ``iscrowd``.
The loader reads the RLE file when present, else the polygon one; a missing folder or file is an
error that names the path and ``$DETECTRON2_DATASETS``.

Registered names: ``bdd100k_ins_seg_train``, ``bdd100k_ins_seg_val``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

from pycocotools import mask as mask_util

from ..d2 import BoxMode, DatasetCatalog, MetadataCatalog

__all__ = ["BDD100K_INS_SEG_CLASSES", "BDD100K_SPLITS", "bdd100k_files", "load_bdd100k_ins_seg", "register_all_bdd100k"]

logger = logging.getLogger(__name__)

#: the instance-segmentation categories of BDD100K, in the order of its official config (ids 1..8)
BDD100K_INS_SEG_CLASSES = ("pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
#: registered name -> split
BDD100K_SPLITS = {"bdd100k_ins_seg_train": "train", "bdd100k_ins_seg_val": "val"}
_LABEL_FORMATS = ("rles", "polygons")


def _image_root(root: str, split: str) -> str:
    return os.path.join(root, "bdd100k", "images", "10k", split)


def bdd100k_files(root: str, split: str) -> tuple[str, str]:
    """``(json file, image folder)`` of ``split`` under ``root`` (the RLE labels when present).

    Raises:
        FileNotFoundError: neither label file exists; the message names both and ``$DETECTRON2_DATASETS``.
    """
    image_root = _image_root(root, split)
    candidates = [os.path.join(root, "bdd100k", "labels", "ins_seg", f, f"ins_seg_{split}.json") for f in _LABEL_FORMATS]
    for json_file in candidates:
        if os.path.isfile(json_file):
            return json_file, image_root
    raise FileNotFoundError(
        f"BDD100K instance segmentation ({split}): none of {[os.path.abspath(c) for c in candidates]} exists. The root "
        f"{os.path.abspath(root)!r} is DETECTRON2_DATASETS (default 'datasets'): set it to the folder holding bdd100k/ "
        "(images/10k/<split>/ and labels/ins_seg/rles/ins_seg_<split>.json from the official download) before "
        "starting Python."
    )


def _frames(data) -> list[dict]:
    if isinstance(data, dict) and "frames" in data:
        return list(data["frames"])
    if isinstance(data, list):
        return data
    raise ValueError("expected a list of frames or {'frames': [...]} (Scalabel format)")


def load_bdd100k_ins_seg(json_file: str, image_root: str, name: Optional[str] = None) -> list[dict]:
    """Detectron2 dataset dicts of a BDD100K instance-segmentation JSON (see the module docstring)."""
    with open(json_file, encoding="utf-8") as f:
        try:
            frames = _frames(json.load(f))
        except ValueError as e:
            raise ValueError(f"{json_file}: not a BDD100K instance-segmentation file: {e}.") from e
    class_index = {c: i for i, c in enumerate(BDD100K_INS_SEG_CLASSES)}
    dicts, skipped = [], 0
    for image_id, frame in enumerate(frames):
        annotations = []
        height = width = None
        for label in frame.get("labels") or []:
            category = label.get("category")
            if category not in class_index:
                skipped += 1
                continue
            ann = {"category_id": class_index[category], "iscrowd": int(bool((label.get("attributes") or {}).get("crowd")))}
            if label.get("id") is not None:
                ann["id"] = label["id"]
            if label.get("rle") is not None:
                rle = {"size": list(label["rle"]["size"]), "counts": label["rle"]["counts"]}
                height, width = rle["size"]
                ann["segmentation"] = rle
                box = mask_util.toBbox(rle)  # (pycocotools reads str counts as COCO json stores them)
                ann["bbox"], ann["bbox_mode"] = [float(v) for v in box], BoxMode.XYWH_ABS
            elif label.get("poly2d"):
                ann["segmentation"] = [[float(c) for point in poly["vertices"] for c in point] for poly in label["poly2d"]]
            else:
                skipped += 1
                continue
            if label.get("box2d") is not None:
                b = label["box2d"]
                ann["bbox"], ann["bbox_mode"] = [float(b["x1"]), float(b["y1"]), float(b["x2"]), float(b["y2"])], BoxMode.XYXY_ABS
            elif "bbox" not in ann:
                xs = [c for polygon in ann["segmentation"] for c in polygon[0::2]]
                ys = [c for polygon in ann["segmentation"] for c in polygon[1::2]]
                ann["bbox"], ann["bbox_mode"] = [min(xs), min(ys), max(xs), max(ys)], BoxMode.XYXY_ABS
            annotations.append(ann)
        dicts.append({
            "file_name": os.path.join(image_root, frame["name"]),
            "image_id": image_id,
            # the 10k images are 1280 x 720; RLE labels carry the size
            "height": int(height) if height is not None else 720,
            "width": int(width) if width is not None else 1280,
            "annotations": annotations,
        })
    logger.info("Loaded %d images of %s from %s (%d labels of other categories or without masks left out).",
                len(dicts), name or "BDD100K", json_file, skipped)
    return dicts


def register_all_bdd100k(root: str) -> list[str]:
    """Register the BDD100K names not registered yet under ``root`` (nothing is read now). The metadata
    has no ``json_file`` (the labels are not COCO json: COCOEvaluator converts the dataset dicts)."""
    registered = []
    for name, split in BDD100K_SPLITS.items():
        if name in DatasetCatalog.list():
            continue

        def load(name: str = name, split: str = split) -> list[dict]:
            json_file, image_root = bdd100k_files(root, split)
            return load_bdd100k_ins_seg(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            thing_classes=list(BDD100K_INS_SEG_CLASSES), evaluator_type="coco",
            image_root=_image_root(root, split),
        )
        registered.append(name)
    return registered
