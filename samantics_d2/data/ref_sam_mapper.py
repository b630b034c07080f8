"""RefSAM's training mapper: a target image plus one reference instance per kept category.

For each target image the mapper keeps up to ``max_categories`` of the categories present in it
(non-crowd instances of an allowed category), and adds up to ``num_negatives`` allowed categories
absent from it (their targets are empty: the head learns to say "no" to classes that are not in
the image, which evaluation over every class needs). For every kept category it draws ONE
reference instance from a different image of the reference pool (not crowd, area at least
``min_area``). The references are a list of dicts carrying their own ``category_id``; the model
takes each reference's targets from the GT boxes of exactly that id, so the pairing of references
and ground truth cannot get out of order (the published code listed references in set order and
GT in sorted order).

``categories`` restricts training to a class subset (the base classes), so that the novel classes
are never a reference and never a target: they stay unseen. Images are RGB, as everywhere in the
project (the published code fed BGR with RGB statistics).

Randomness: numpy's global RNG, seeded per process and data-loader worker by ``train.seed``.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..d2 import BoxMode, MetadataCatalog, get_detection_dataset_dicts
from .io import read_image
from .mapper import DetectionMapper

__all__ = ["RefSAMMapper"]

logger = logging.getLogger(__name__)


def _area(ann: dict) -> float:
    if "area" in ann:
        return float(ann["area"])
    x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
    return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


class RefSAMMapper:
    """Dataset dict -> RefSAM training input (``DetectionMapper`` output + ``"references"``).

    Output: :class:`DetectionMapper`'s training dict (``image``, ``instances`` with ``gt_boxes`` and
    ``gt_classes``, restricted to the allowed categories) plus ``"references"``: a list of
    ``{"image": uint8 [3, h, w] RGB, "box": float32 [4] XYXY in that image's pixels,
    "category_id": int, "image_id", "annotation_id"}``, positives first.

    Args:
        dataset_names: registered dataset(s) of the reference pool: the same as the training
            loader's, so that category ids agree.
        augmentations: of the target image (``torchvision.transforms.v2``; references are not augmented).
        max_categories: categories present in a target kept per image (drawn at random).
        num_negatives: absent allowed categories added per image (empty targets).
        categories: names of the allowed categories (e.g. the base classes); None: all of the
            dataset's ``thing_classes``.
        min_area: minimum area (pixels) of a reference instance.
    """

    def __init__(
        self,
        *,
        dataset_names: Union[str, Sequence[str]],
        augmentations: Sequence[Callable] = (),
        max_categories: int = 3,
        num_negatives: int = 1,
        categories: Optional[Sequence[str]] = None,
        min_area: float = 32.0 * 32.0,
    ):
        if max_categories < 1 or num_negatives < 0:
            raise ValueError(
                f"RefSAMMapper: max_categories={max_categories} must be >= 1 and num_negatives={num_negatives} >= 0."
            )
        names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
        class_names = list(MetadataCatalog.get(names[0]).thing_classes)
        for other in names[1:]:
            if list(MetadataCatalog.get(other).thing_classes) != class_names:
                raise ValueError(f"RefSAMMapper: datasets {names} have different thing_classes; use one label space.")
        if categories is None:
            allowed = set(range(len(class_names)))
        else:
            unknown = [c for c in categories if c not in class_names]
            if unknown:
                raise ValueError(
                    f"RefSAMMapper: categories {unknown} are not classes of {names} ({class_names}); check the names."
                )
            allowed = {class_names.index(c) for c in categories}
        self.dataset_names = names
        self.class_names = class_names
        self.allowed = allowed
        self.max_categories = max_categories
        self.num_negatives = num_negatives
        self.min_area = float(min_area)
        self.target_mapper = DetectionMapper(is_train=True, augmentations=augmentations, use_instance_mask=False)
        # category id -> candidate references (dataset dict, annotation)
        self.pool: dict[int, list[tuple[dict, dict]]] = {}
        for record in get_detection_dataset_dicts(names, filter_empty=False):
            for ann in record.get("annotations", []):
                label = int(ann["category_id"])
                if label in allowed and not ann.get("iscrowd", 0) and _area(ann) >= self.min_area:
                    self.pool.setdefault(label, []).append((record, ann))
        without = [class_names[c] for c in sorted(allowed) if c not in self.pool]
        if len(without) == len(allowed):
            raise ValueError(
                f"RefSAMMapper: no instance of {names} qualifies as a reference (categories "
                f"{[class_names[c] for c in sorted(allowed)]}, min_area={self.min_area}); lower min_area."
            )
        if without:
            logger.warning("RefSAMMapper: no reference candidate for %s (min_area=%s).", without, self.min_area)
        logger.info(
            "RefSAMMapper over %s: %d allowed categories, %d reference candidates.",
            names, len(allowed), sum(len(v) for v in self.pool.values()),
        )

    def _draw_reference(self, label: int, image_id) -> Optional[dict]:
        candidates = [(r, a) for r, a in self.pool.get(label, []) if r.get("image_id") != image_id]
        if not candidates:
            return None
        record, ann = candidates[np.random.randint(len(candidates))]
        box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
        image = read_image(record["file_name"], format="RGB")
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous(),
            "box": torch.tensor(box, dtype=torch.float32),
            "category_id": label,
            "image_id": record.get("image_id"),
            "annotation_id": ann.get("id"),
        }

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        dataset_dict["annotations"] = [
            a for a in dataset_dict.get("annotations", []) if int(a["category_id"]) in self.allowed
        ]
        image_id = dataset_dict.get("image_id")
        out = self.target_mapper(dataset_dict)
        present = sorted({int(c) for c in out["instances"].gt_classes.tolist()})  # after the augmentations
        present = [int(c) for c in np.random.permutation(present)][: self.max_categories]
        absent = sorted(self.allowed - set(out["instances"].gt_classes.tolist()))
        absent = [int(c) for c in np.random.permutation(absent)][: self.num_negatives] if absent else []
        references = []
        for label in present + absent:
            reference = self._draw_reference(label, image_id)
            if reference is not None:
                references.append(reference)
        out["references"] = references
        return out
