"""RefSAM's mapper: a target image plus one reference instance per kept category.

For each target image the mapper keeps up to ``max_categories`` of the categories present in it
(non-crowd instances of an allowed category), and adds up to ``num_negatives`` allowed categories
absent from it (their targets are empty: the head learns to say "no" to classes that are not in
the image, which evaluation over every class needs). For every kept category it draws ONE
reference instance from a different image of the reference pool (not crowd, area at least
``min_area``). The references are a list of dicts carrying their own ``category_id``; the model
takes each reference's targets from the GT boxes of exactly that id
(``RefSAM(reference_pairing="category_id")``), so the pairing of references and ground truth
cannot get out of order (the published code listed references in set order and GT in sorted
order; ``category_sampling="set_order"`` with ``reference_pairing="sorted_position"`` reproduces it).

The same mapper builds the published "standard test" loader: references drawn from the test set
itself, one per present class, with ``seed`` set so that every image gets the same draws on every
run (``num_negatives=0``, no augmentation; ``max_categories`` is the authors' per-size validation cap:
none for ViT-B, 8 for ViT-L, 6 for ViT-H).

Published recipe against ours (docs/ref_sam.md): 4 categories per image and no negative
(``max_categories=4, num_negatives=0``) against 3 and 1; references through the target's
augmentations (``reference_augmentations``: an independent random flip) against none; the pool filtered
by the annotation's mask area (``pool_area="mask"``: the json's ``"area"``, kept when the pool is
loaded) against the box's w x h (``"box"``). ``image_format="BGR"`` reproduces the published BGR input
(the model normalises with RGB statistics); the project's default is RGB.

``categories`` restricts training to a class subset (the base classes), so that the novel classes
are never a reference and never a target: they stay unseen.

Randomness: numpy's global RNG (seeded per process and data-loader worker by ``train.seed``) and,
for the reference augmentations, torch's; with ``seed`` set, an RNG of its own per image, seeded by
``(seed, image_id)``.
"""
from __future__ import annotations

import copy
import logging
import zlib
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..d2 import BoxMode, MetadataCatalog, get_detection_dataset_dicts, load_coco_json
from .io import read_image
from .mapper import DetectionMapper

__all__ = ["CATEGORY_SAMPLINGS", "POOL_AREAS", "RefSAMMapper", "reference_pool_dicts"]

logger = logging.getLogger(__name__)

POOL_AREAS = ("mask", "box")
CATEGORY_SAMPLINGS = ("shuffled", "set_order")


def _box_area(ann: dict) -> float:
    x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
    return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)


def reference_pool_dicts(names: Sequence[str], *, keep_area: bool) -> list[dict]:
    """The dataset dicts the references are drawn from.

    ``keep_area=False``: the registered datasets' dicts (their loader drops the annotations' ``"area"``).
    ``keep_area=True``: each dataset's COCO json (metadata ``json_file`` / ``image_root``) loaded again
    with ``"id"`` and ``"area"`` kept (the mask area, what the authors filter the pool by), category ids
    mapped to the dataset's contiguous ids (annotations of other categories dropped). A dataset whose
    metadata has no json is an error naming it.
    """
    if not keep_area:
        return get_detection_dataset_dicts(list(names), filter_empty=False)
    get_detection_dataset_dicts(list(names), filter_empty=False)  # a lazy loader sets json_file / image_root on load
    dicts = []
    for name in names:
        meta = MetadataCatalog.get(name)
        json_file, image_root = meta.get("json_file"), meta.get("image_root")
        id_map = meta.get("thing_dataset_id_to_contiguous_id")
        if json_file is None or image_root is None or id_map is None:
            raise ValueError(
                f"RefSAMMapper(pool_area='mask'): dataset {name!r} has no json_file / image_root / "
                "thing_dataset_id_to_contiguous_id in its metadata, so the annotations' mask area cannot be read; "
                "use pool_area='box' (box w x h) for it."
            )
        id_map = {int(k): int(v) for k, v in id_map.items()}
        for record in load_coco_json(json_file, image_root, None, extra_annotation_keys=["id", "area"]):
            record["annotations"] = [
                {**a, "category_id": id_map[int(a["category_id"])]}
                for a in record.get("annotations", [])
                if int(a["category_id"]) in id_map
            ]
            dicts.append(record)
    return dicts


class RefSAMMapper:
    """Dataset dict -> RefSAM input (``DetectionMapper`` training output + ``"references"``).

    Output: :class:`DetectionMapper`'s training dict (``image``, ``instances`` with ``gt_boxes`` and
    ``gt_classes``, restricted to the allowed categories) plus ``"references"``: a list of
    ``{"image": uint8 [3, h, w], "box": float32 [4] XYXY in that image's pixels,
    "category_id": int, "image_id", "annotation_id"}``, positives first.

    Args:
        dataset_names: registered dataset(s) of the reference pool: the same as the loader's, so
            that category ids agree (the test set itself for the standard test).
        augmentations: of the target image (``torchvision.transforms.v2``).
        reference_augmentations: of each reference image (with its box), drawn independently of the
            target's; None or ``[]``: references are not augmented.
        max_categories: categories present in a target kept per image (drawn at random); None: all.
        num_negatives: absent allowed categories added per image (empty targets).
        categories: names of the allowed categories (e.g. the base classes); None: all of the
            dataset's ``thing_classes``.
        min_area: minimum area (pixels) of a reference instance.
        pool_area: ``"mask"`` (the annotation's ``"area"``, read from the json) or ``"box"`` (w x h).
        category_sampling: ``"shuffled"`` (the present categories in random order, the first
            ``max_categories`` kept) or ``"set_order"`` (the authors': Python's ``set`` order of the
            present labels, a random subset of ``max_categories`` of them kept in that order; matters
            only with ``RefSAM(reference_pairing="sorted_position")``).
        image_format: of the target and the reference images: ``"RGB"`` or ``"BGR"`` (the published defect).
        seed: None: numpy's global RNG (training); an int: the draws of an image depend only on
            ``(seed, image_id)`` (the standard test's fixed references).
    """

    def __init__(
        self,
        *,
        dataset_names: Union[str, Sequence[str]],
        augmentations: Sequence[Callable] = (),
        reference_augmentations: Optional[Sequence[Callable]] = None,
        max_categories: Optional[int] = 3,
        num_negatives: int = 1,
        categories: Optional[Sequence[str]] = None,
        min_area: float = 32.0 * 32.0,
        pool_area: str = "box",
        category_sampling: str = "shuffled",
        image_format: str = "RGB",
        seed: Optional[int] = None,
    ):
        if (max_categories is not None and max_categories < 1) or num_negatives < 0:
            raise ValueError(
                f"RefSAMMapper: max_categories={max_categories} must be None or >= 1 and num_negatives={num_negatives} "
                ">= 0."
            )
        if pool_area not in POOL_AREAS or category_sampling not in CATEGORY_SAMPLINGS:
            raise ValueError(
                f"RefSAMMapper: pool_area={pool_area!r} must be one of {POOL_AREAS} and category_sampling="
                f"{category_sampling!r} one of {CATEGORY_SAMPLINGS}."
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
        self.pool_area = pool_area
        self.category_sampling = category_sampling
        self.seed = seed
        self.target_mapper = DetectionMapper(
            is_train=True, augmentations=augmentations, use_instance_mask=False, image_format=image_format
        )
        self.reference_mapper = DetectionMapper(
            is_train=True, augmentations=list(reference_augmentations or []), use_instance_mask=False,
            image_format=image_format,
        )
        area = (lambda ann: float(ann["area"])) if pool_area == "mask" else _box_area
        # category id -> candidate references (dataset dict, annotation)
        self.pool: dict[int, list[tuple[dict, dict]]] = {}
        for record in reference_pool_dicts(names, keep_area=pool_area == "mask"):
            for ann in record.get("annotations", []):
                label = int(ann["category_id"])
                if label in allowed and not ann.get("iscrowd", 0) and area(ann) >= self.min_area:
                    self.pool.setdefault(label, []).append((record, ann))
        without = [class_names[c] for c in sorted(allowed) if c not in self.pool]
        if len(without) == len(allowed):
            raise ValueError(
                f"RefSAMMapper: no instance of {names} qualifies as a reference (categories "
                f"{[class_names[c] for c in sorted(allowed)]}, min_area={self.min_area}, pool_area={pool_area!r}); "
                "lower min_area."
            )
        if without:
            logger.warning("RefSAMMapper: no reference candidate for %s (min_area=%s).", without, self.min_area)
        logger.info(
            "RefSAMMapper over %s: %d allowed categories, %d reference candidates (area: %s).",
            names, len(allowed), sum(len(v) for v in self.pool.values()), pool_area,
        )

    def _rng(self, image_id):
        """``np.random`` itself (its global RNG: ``randint``, ``permutation``) or a Generator of ``(seed, image_id)``."""
        if self.seed is None:
            return np.random
        key = image_id if isinstance(image_id, (int, np.integer)) else zlib.crc32(str(image_id).encode())
        return np.random.default_rng([int(self.seed), int(key)])

    @staticmethod
    def _integer(rng, high: int) -> int:
        return int(rng.integers(high)) if isinstance(rng, np.random.Generator) else int(rng.randint(high))

    def _draw_reference(self, label: int, image_id, rng) -> Optional[dict]:
        candidates = [(r, a) for r, a in self.pool.get(label, []) if r.get("image_id") != image_id]
        if not candidates:
            return None
        record, ann = candidates[self._integer(rng, len(candidates))]
        if self.reference_mapper.augmentations:
            mapped = self.reference_mapper({**record, "annotations": [{**ann, "iscrowd": 0}]})
            image, box = mapped["image"], mapped["instances"].gt_boxes.tensor.reshape(4)
        else:
            array = read_image(record["file_name"], format=self.reference_mapper.image_format)
            image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
            box = torch.tensor(BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS))
        return {
            "image": image,
            "box": box.to(torch.float32),
            "category_id": label,
            "image_id": record.get("image_id"),
            "annotation_id": ann.get("id"),
        }

    def _categories(self, labels: list[int], rng) -> list[int]:
        """The present categories (``labels``: of the target's instances, in order) that get a
        reference, in the order of the references."""
        if self.category_sampling == "set_order":  # the authors': set order, a random subset of indices kept
            ordered = list(set(labels))  # the set built from the instances' labels in order, as theirs
            if self.max_categories is not None and len(ordered) > self.max_categories:
                keep = set(int(i) for i in rng.permutation(len(ordered))[: self.max_categories])
                ordered = [c for i, c in enumerate(ordered) if i in keep]
            return ordered
        return [int(c) for c in rng.permutation(sorted(set(labels)))][: self.max_categories]

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        dataset_dict["annotations"] = [
            a for a in dataset_dict.get("annotations", []) if int(a["category_id"]) in self.allowed
        ]
        image_id = dataset_dict.get("image_id")
        rng = self._rng(image_id)
        out = self.target_mapper(dataset_dict)
        present = self._categories([int(c) for c in out["instances"].gt_classes.tolist()], rng)  # after augmentations
        absent = sorted(self.allowed - set(out["instances"].gt_classes.tolist()))
        absent = [int(c) for c in rng.permutation(absent)][: self.num_negatives] if absent else []
        references = []
        for label in present + absent:
            reference = self._draw_reference(label, image_id, rng)
            if reference is not None:
                references.append(reference)
        out["references"] = references
        return out
