"""The one ordering rule for reference instances, and their shot ranks.

Every consumer of a reference set (the training-free memory bank, RefSAM's token cache, the
prototype sources to come) sees its instances in the same order:

    by category id, then shot rank, then annotation id  (:data:`ORDERING`)

The **shot rank** of an instance is its ``reference_rank`` (written by
:func:`~samantics_d2.data.reference_sets.write_reference_json`: 0 = the first shot of its
category, reference sets sort by area, largest first) or, when the annotation has none, its order of
appearance among the instances of its category in the dataset dicts. Ranks are distinct within a
category (two shots with the same rank are an error), so "k-shot" is always "the instances of rank
< k", and the annotation id only breaks ties that cannot happen. Crowd annotations are never
references.
"""
from __future__ import annotations

import hashlib
import json
import logging
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..d2 import BoxMode
from ..utils.image import read_image
from ..data.mapper import segmentation_to_mask

__all__ = ["ORDERING", "ReferenceInstance", "order_references", "references_digest"]

logger = logging.getLogger(__name__)

ORDERING = "category_id, shot_rank, annotation_id"


@dataclass(frozen=True)
class ReferenceInstance:
    """One reference instance (a non-crowd annotation of a reference image).

    Attributes:
        file_name, height, width, image_id: its image (``image_id`` None when the dicts have none).
        annotation: the Detectron2 annotation dict (``bbox``/``bbox_mode``, ``segmentation``...).
        class_id: contiguous category id in ``[0, K)``.
        annotation_id: the annotation's ``id``, else ``"<image_id or file_name>:<index in the image>"``.
        shot_rank: rank among the shots of its class (0 = first shot), see the module docstring.
        index: position in the dataset dicts (non-crowd annotations counted in order).
    """

    file_name: str
    height: int
    width: int
    image_id: Any
    annotation: dict
    class_id: int
    annotation_id: Union[int, str]
    shot_rank: int
    index: int

    def read_image(self) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB of the reference image, checked against the dataset dict's size."""
        image = read_image(self.file_name, format="RGB")
        if image.shape[:2] != (self.height, self.width):
            raise ValueError(
                f"Reference image {self.file_name!r} is {image.shape[0]}x{image.shape[1]} but its dataset dict "
                f"says {self.height}x{self.width}; fix the annotation file."
            )
        return image

    def mask(self) -> np.ndarray:
        """``[H, W]`` uint8 mask of the instance (its ``segmentation``; empty without one)."""
        return segmentation_to_mask(self.annotation.get("segmentation", []), self.height, self.width)

    def box_xyxy(self) -> list[float]:
        """The annotation's box, XYXY in original pixels."""
        box = BoxMode.convert(list(self.annotation["bbox"]), self.annotation.get("bbox_mode", BoxMode.XYWH_ABS),
                              BoxMode.XYXY_ABS)
        return [float(v) for v in box]


def order_references(
    dataset_dicts: Sequence[dict], num_classes: int, *, class_names: Optional[Sequence[str]] = None
) -> list[ReferenceInstance]:
    """The non-crowd reference instances of ``dataset_dicts`` in the one order (:data:`ORDERING`).

    Args:
        dataset_dicts: Detectron2 dataset dicts with contiguous ``category_id`` in ``[0, num_classes)``;
            ``id`` and ``reference_rank`` used when present.
        num_classes: ``K``, the number of reference classes.
        class_names: their names (for messages only).

    Raises:
        ValueError: a category id outside ``[0, K)``, or two shots of a class with the same rank.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"order_references got num_classes={num_classes!r}; expected an int >= 1.")
    names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
    items: list[ReferenceInstance] = []
    appearance: dict[int, int] = {}
    crowd = 0
    for record in dataset_dicts:
        for index, ann in enumerate(record.get("annotations", [])):
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            class_id = ann.get("category_id")
            if isinstance(class_id, bool) or not isinstance(class_id, numbers.Integral) or not 0 <= class_id < num_classes:
                raise ValueError(
                    f"Reference annotation {ann.get('id', index)} of {record.get('file_name')!r} has category_id "
                    f"{class_id!r}; expected a contiguous id in [0, {num_classes}) (the reference classes "
                    f"{names[:10]}). Load COCO jsons with samantics_d2.data.load_reference_json or "
                    "load_coco_json(..., dataset_name)."
                )
            class_id = int(class_id)
            seen = appearance.get(class_id, 0)
            appearance[class_id] = seen + 1
            annotation_id = ann["id"] if "id" in ann else f"{record.get('image_id', record['file_name'])}:{index}"
            items.append(ReferenceInstance(
                file_name=record["file_name"], height=int(record["height"]), width=int(record["width"]),
                image_id=record.get("image_id"), annotation=ann, class_id=class_id, annotation_id=annotation_id,
                shot_rank=int(ann.get("reference_rank", seen)), index=len(items),
            ))
    if crowd:
        logger.info("References: skipped %d crowd annotation(s).", crowd)
    items.sort(key=lambda r: (r.class_id, r.shot_rank, str(r.annotation_id)))
    for a, b in zip(items, items[1:]):
        if a.class_id == b.class_id and a.shot_rank == b.shot_rank:
            raise ValueError(
                f"Class {names[a.class_id]!r} has two references of shot rank {a.shot_rank} (annotations "
                f"{a.annotation_id!r} and {b.annotation_id!r}); a reference set gives each shot of a class its own "
                "'reference_rank' (or none at all: then the order of appearance is the rank)."
            )
    return items


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode("ascii")
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Cannot describe a {type(obj).__name__} in a reference provenance.")


def references_digest(items: Sequence[ReferenceInstance]) -> str:
    """SHA-256 over what defines each reference, in order (image, size, class, box, segmentation)."""
    digest = hashlib.sha256()
    for r in items:
        ann = r.annotation
        key = [
            r.file_name, r.height, r.width, r.class_id,
            ann.get("bbox"), int(ann.get("bbox_mode", BoxMode.XYWH_ABS)), ann.get("segmentation"),
        ]
        digest.update(json.dumps(key, default=_json_default).encode("utf-8") + b"\n")
    return digest.hexdigest()


def json_normalised(obj: Any) -> Any:
    """``obj`` as it reads back from a JSON file (tuples become lists, NumPy scalars numbers...)."""
    return json.loads(json.dumps(obj, default=_json_default))
