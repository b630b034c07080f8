"""COCO panoptic val2017 for the click benchmarks, and the mapper of click evaluation.

``coco_2017_val_panoptic`` as Detectron2 names and loads it (its ``load_coco_panoptic_json``, the
"standard" metadata): under ``$DETECTRON2_DATASETS`` (default ``datasets``), the images
``coco/val2017/*.jpg``, the panoptic PNGs ``coco/panoptic_val2017/*.png`` and
``coco/annotations/panoptic_val2017.json``. One dict per image: ``file_name``, ``image_id``,
``pan_seg_file_name``, ``segments_info`` (``id``, ``category_id`` = the index of the category among
all 133 sorted by id, ``iscrowd``, ``isthing``, ``area``, ``bbox``). With Detectron2, its own
registration of the name is kept (``import detectron2.data`` made it); with lite it is registered here
(from :mod:`samantics_d2.data.builtin`), nothing read until loaded; a missing file is an error naming
it and the root. The metadata's ``thing_classes`` / ``stuff_classes`` (all 133 names, as Detectron2's
standard panoptic metadata) are set from the json when loaded.

:class:`ClickMapper` turns such a dict, or a COCO instances dict (shapes with parts), into the input
of :class:`~samantics_d2.modeling.meta_arch.click.ClickSegmenter`: the image resized as Detectron2's
``ResizeShortestEdge`` (Semantic-SAM's test size: short side 800, long side at most 1333) and every
non-crowd segment, things and stuff, as a GT mask at the original size.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..d2 import BitMasks, DatasetCatalog, Instances, MetadataCatalog
from .io import read_image
from .mapper import segmentation_to_mask

__all__ = [
    "BUILTIN_COCO_PANOPTIC",
    "ClickMapper",
    "load_coco_panoptic_json",
    "register_all_panoptic",
    "shortest_edge_shape",
]

logger = logging.getLogger(__name__)

# name -> (image root, panoptic PNG root, panoptic json), relative to the datasets root (Detectron2's).
BUILTIN_COCO_PANOPTIC: dict[str, tuple[str, str, str]] = {
    "coco_2017_val_panoptic": ("coco/val2017", "coco/panoptic_val2017", "coco/annotations/panoptic_val2017.json"),
}


def _check_exists(name: str, path: str, root: str, what: str) -> None:
    exists = os.path.isdir(path) if what == "folder" else os.path.isfile(path)
    if not exists:
        raise FileNotFoundError(
            f"Dataset {name!r}: the {what} {os.path.abspath(path)!r} does not exist. Its root {os.path.abspath(root)!r} "
            "is DETECTRON2_DATASETS (default 'datasets'), read when samantics_d2 was imported: set DETECTRON2_DATASETS "
            "to the folder holding coco/ (with coco/val2017, coco/panoptic_val2017 and "
            "coco/annotations/panoptic_val2017.json, as in datasets/README.md) before starting Python."
        )


def load_coco_panoptic_json(json_file: str, image_dir: str, gt_dir: str, dataset_name: Optional[str] = None) -> list[dict]:
    """Detectron2's ``load_coco_panoptic_json`` with the standard COCO panoptic metadata read from the
    json's ``categories`` (``category_id`` -> its index among the categories sorted by id).

    ``dataset_name``: when given, its metadata gets ``thing_classes`` and ``stuff_classes`` (all names)
    and the two id maps, unless already set.
    """
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    things = {c["id"] for c in categories if c.get("isthing", 0)}
    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        names = [c["name"] for c in categories]
        values = {
            "thing_classes": names,
            "stuff_classes": names,
            "thing_dataset_id_to_contiguous_id": {i: contiguous[i] for i in sorted(things)},
            "stuff_dataset_id_to_contiguous_id": {i: contiguous[i] for i in contiguous if i not in things},
        }
        meta.set(**{key: value for key, value in values.items() if meta.get(key) is None})
    dicts = []
    for annotation in data["annotations"]:
        segments = [
            dict(s, category_id=contiguous[s["category_id"]], isthing=s["category_id"] in things)
            for s in annotation["segments_info"]
        ]
        dicts.append(
            {
                "file_name": os.path.join(image_dir, os.path.splitext(annotation["file_name"])[0] + ".jpg"),
                "image_id": int(annotation["image_id"]),
                "pan_seg_file_name": os.path.join(gt_dir, annotation["file_name"]),
                "segments_info": segments,
            }
        )
    logger.info("Loaded %d panoptic images from %s.", len(dicts), json_file)
    return dicts


def register_all_panoptic(root: str) -> list[str]:
    """Register the names of :data:`BUILTIN_COCO_PANOPTIC` not registered yet, under ``root``; nothing is read."""
    registered = []
    for name, (image_dir, gt_dir, json_name) in BUILTIN_COCO_PANOPTIC.items():
        if name in DatasetCatalog.list():
            continue
        image_root, gt_root, json_file = (os.path.join(root, p) for p in (image_dir, gt_dir, json_name))

        def load(name=name, image_root=image_root, gt_root=gt_root, json_file=json_file) -> list[dict]:
            _check_exists(name, json_file, root, "file")
            _check_exists(name, gt_root, root, "folder")
            return load_coco_panoptic_json(json_file, image_root, gt_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            image_root=image_root, panoptic_root=gt_root, panoptic_json=json_file, evaluator_type="coco_panoptic_seg",
            ignore_label=255, label_divisor=1000,
        )  # fmt: skip
        registered.append(name)
    return registered


def shortest_edge_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """``(new_height, new_width)`` as Detectron2's ``ResizeShortestEdge.get_output_shape``: the short side
    to ``short_edge``, then both scaled down if the long side exceeds ``max_size``; ``int(x + 0.5)``."""
    scale = short_edge / min(height, width)
    new_height, new_width = (short_edge, scale * width) if height < width else (scale * height, short_edge)
    if max(new_height, new_width) > max_size:
        factor = max_size / max(new_height, new_width)
        new_height, new_width = new_height * factor, new_width * factor
    return int(new_height + 0.5), int(new_width + 0.5)


def _panoptic_segments(record: dict, height: int, width: int) -> tuple[np.ndarray, list[int], list[int]]:
    """``(masks [S, H, W] bool, classes, segment ids)`` of the non-crowd segments of a panoptic record."""
    png = np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB"), dtype=np.uint32)
    if png.shape[:2] != (height, width):
        raise ValueError(
            f"Panoptic PNG {record['pan_seg_file_name']!r} is {png.shape[1]}x{png.shape[0]} but its image is "
            f"{width}x{height}; the annotation does not match the image."
        )
    ids = png[..., 0] + 256 * png[..., 1] + 256 * 256 * png[..., 2]
    segments = [s for s in record["segments_info"] if not s.get("iscrowd", 0)]
    masks = np.stack([ids == s["id"] for s in segments]) if segments else np.zeros((0, height, width), dtype=bool)
    return masks, [int(s["category_id"]) for s in segments], [int(s["id"]) for s in segments]


def _instance_segments(record: dict, height: int, width: int) -> tuple[np.ndarray, list[int], list[int]]:
    """The same for a COCO instances record (``annotations``: crowds left out); ids: ``id`` or -1."""
    annotations = [a for a in record.get("annotations") or [] if not a.get("iscrowd", 0)]
    masks = np.zeros((len(annotations), height, width), dtype=bool)
    for i, a in enumerate(annotations):
        masks[i] = segmentation_to_mask(a["segmentation"], height, width).astype(bool)
    return masks, [int(a["category_id"]) for a in annotations], [int(a.get("id", -1)) for a in annotations]


class ClickMapper:
    """Map a panoptic (``pan_seg_file_name`` + ``segments_info``) or instances (``annotations``) dataset
    dict to the input of the click models and :class:`~samantics_d2.evaluation.click.ClickEvaluator`.

    Output: the dict (copied) without its annotations, plus ``"image"``: uint8 ``[3, h, w]`` in
    ``image_format``, resized (bilinear) to :func:`shortest_edge_shape` when ``short_edge`` is set
    (else as read); ``"height"``/``"width"``: the original size; ``"instances"``: ``Instances((height,
    width), gt_masks=BitMasks [S, height, width], gt_classes=int64 [S], gt_part_of=int64 [S])``, one
    per non-crowd, non-empty segment in file order (panoptic: things and stuff); ``gt_part_of[i]``
    is the index of the segment that segment ``i`` is part of (its annotation's ``part_of`` id, shapes
    with parts), -1 when none.

    Args:
        short_edge: the short side of the resized image (Semantic-SAM's test size: 800); None: no resize.
        max_size: the cap on the long side (1333).
        image_format: ``"RGB"`` or ``"BGR"``.
    """

    def __init__(self, *, short_edge: Optional[int] = 800, max_size: int = 1333, image_format: str = "RGB"):
        if image_format not in ("RGB", "BGR") or (short_edge is not None and not 0 < short_edge <= max_size):
            raise ValueError(
                f"ClickMapper got short_edge={short_edge}, max_size={max_size}, image_format={image_format!r}; expected "
                "0 < short_edge <= max_size (or short_edge None) and 'RGB' or 'BGR'."
            )
        self.short_edge, self.max_size, self.image_format = short_edge, int(max_size), image_format

    def __repr__(self) -> str:
        return f"ClickMapper(short_edge={self.short_edge}, max_size={self.max_size}, image_format={self.image_format!r})"

    def __call__(self, dataset_dict: dict) -> dict:
        record = copy.copy(dataset_dict)
        image = read_image(record["file_name"], format=self.image_format)
        height, width = image.shape[:2]
        expected = (record.get("height", height), record.get("width", width))
        if expected != (height, width):
            raise ValueError(
                f"Image {record['file_name']!r} is {width}x{height} but its dataset dict says {expected[1]}x{expected[0]}."
            )
        segments = _panoptic_segments if "pan_seg_file_name" in record else _instance_segments
        masks, classes, ids = segments(record, height, width)
        keep = masks.reshape(len(masks), -1).any(axis=1)
        masks, classes, ids = masks[keep], [c for c, k in zip(classes, keep) if k], [i for i, k in zip(ids, keep) if k]
        index_of = {i: n for n, i in enumerate(ids) if i >= 0}
        parents = [a.get("part_of") for a in record.get("annotations") or [] if not a.get("iscrowd", 0)]
        parents = [p for p, k in zip(parents, keep) if k] if "pan_seg_file_name" not in record else [None] * len(ids)
        for key in ("annotations", "segments_info", "pan_seg_file_name", "sem_seg_file_name"):
            record.pop(key, None)
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        if self.short_edge is not None:
            shape = shortest_edge_shape(height, width, self.short_edge, self.max_size)
            resized = F.interpolate(tensor[None].float(), size=shape, mode="bilinear", align_corners=False)[0]
            tensor = resized.round().clamp(0, 255).to(torch.uint8)
        instances = Instances((height, width))
        instances.gt_masks = BitMasks(torch.from_numpy(masks))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        instances.gt_part_of = torch.tensor([index_of.get(p, -1) if p is not None else -1 for p in parents],
                                            dtype=torch.int64)  # fmt: skip
        record.update(image=tensor, height=height, width=width, instances=instances)
        return record
