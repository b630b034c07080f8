"""Prompted recognition data, as Open-Vocabulary SAM (OVSAM, arXiv 2401.02955) evaluates it.

Protocol (read from OVSAM's code: its data preprocessor, detector and ``InsClsIoUMetric``):

- the image is resized so that its long side is 1024 (aspect ratio kept; each side
  ``int(side * 1024 / long_side + 0.5)``, as mmcv's ``Resize(keep_ratio=True)`` and SAM's
  ``ResizeLongestSide`` compute it);
- one prompt per ground-truth instance (crowds excluded; boxes narrower or lower than one pixel
  dropped, mmdet's loading rule), in annotation order, in the coordinates of the resized image:
  either its box (the annotation's box scaled by ``new_width / width`` and ``new_height / height``)
  or its centre point: the GT mask resized (nearest neighbour) to the resized image, padded with one
  row/column of zeros on every side (so the image border counts as mask border), the distance of
  each pixel to the nearest zero pixel, and the pixel where it is largest; ties go to the first
  pixel in row-major order (smallest row, then smallest column: ``argmax`` of the flattened map);
- the model's mask is compared at the original resolution with the GT mask (see
  :mod:`samantics_d2.evaluation.prompted_recognition`).

Points are pixel indices ``(x, y) = (column, row)``, as OVSAM passes them: SAM's prompt encoder adds
0.5 itself to reach the pixel centre. One deviation, on purpose: OVSAM computes the distance
transform with ``kornia.contrib.distance_transform`` (an approximation by cascaded soft-min
convolutions); here it is the exact Euclidean transform (``scipy.ndimage.distance_transform_edt``),
so where the maximum is flat or nearly so the chosen pixel can differ from OVSAM's (not measured).

Also here: the COCO open-vocabulary split (48 base / 17 novel classes of OVR-CNN, used by OVSAM), the
LVIS split OVSAM reports (base = frequent + common, novel = rare: :func:`lvis_base_novel_split`) and
the loader of ``coco_2017_val_ov65`` (COCO val2017 restricted to those 65 classes).
"""
from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from ..d2 import BoxMode, load_coco_json
from ..utils.clicks import click_points
from ..utils.io import read_json
from .mapper import DetectionMapper

__all__ = [
    "COCO_OV_BASE_CLASSES",
    "COCO_OV_CATEGORIES",
    "COCO_OV_NOVEL_CLASSES",
    "COCO_OV_CLASSES",
    "COCO_OV_ID_TO_CONTIGUOUS",
    "PROMPT_TYPES",
    "PromptedRecognitionMapper",
    "centre_points",
    "load_coco_ov_json",
    "lvis_base_novel_split",
    "long_side_shape",
    "prompts_from_instances",
]

logger = logging.getLogger(__name__)

PROMPT_TYPES: tuple[str, ...] = ("box", "point")

# The COCO open-vocabulary split of OVR-CNN (Zareian et al. 2021), used by OVSAM (its
# ext/class_names/coco_4817_ids.py, there as indices into the 80 classes). COCO naming.
# The same lists as samantics_d2.data.vocabularies (a test checks): importing them from there makes an
# import cycle (builtin -> prompted -> vocabularies -> reference_sets / shapes -> builtin); next: move the
# pure class lists (COCO, shapes) into a leaf module that vocabularies, reference_sets and shapes share.
COCO_OV_BASE_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse",
    "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite",
    "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote",
    "microwave", "oven", "toaster", "refrigerator", "book", "clock", "vase", "toothbrush",
)  # fmt: skip
COCO_OV_NOVEL_CLASSES: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
    "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)  # fmt: skip
# The 65 classes with their COCO category ids (the json's ``category_id``), in COCO's order: their
# position is the contiguous id of coco_2017_val_ov65.
COCO_OV_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"),
    (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"),
    (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"),
    (34, "frisbee"), (35, "skis"), (36, "snowboard"), (38, "kite"), (41, "skateboard"),
    (42, "surfboard"), (44, "bottle"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"),
    (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"),
    (65, "bed"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (90, "toothbrush"),
)  # fmt: skip
COCO_OV_CLASSES: tuple[str, ...] = tuple(name for _, name in COCO_OV_CATEGORIES)
COCO_OV_ID_TO_CONTIGUOUS: dict[int, int] = {coco_id: i for i, (coco_id, _) in enumerate(COCO_OV_CATEGORIES)}
assert sorted(COCO_OV_CLASSES) == sorted(COCO_OV_BASE_CLASSES + COCO_OV_NOVEL_CLASSES)


def long_side_shape(height: int, width: int, long_side: int = 1024) -> tuple[int, int]:
    """``(new_height, new_width)`` of an image resized so that its long side is ``long_side``.

    Each side is ``int(side * long_side / max(height, width) + 0.5)`` (mmcv's ``rescale_size`` and
    SAM's ``ResizeLongestSide.get_preprocess_shape``).
    """
    if height <= 0 or width <= 0 or long_side <= 0:
        raise ValueError(f"long_side_shape got height={height}, width={width}, long_side={long_side}; all must be > 0.")
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


# The centre point rule is the click benchmarks' first click: one implementation, in the leaf module
# samantics_d2.utils.clicks (the pixel farthest from the border of the zero-padded mask, exact EDT, first
# pixel in row-major order on ties, (0, 0) for an empty mask).
centre_points = click_points


def prompts_from_instances(
    *, masks: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int], prompt: str
) -> dict[str, torch.Tensor]:
    """The prompts of the GT instances, in the coordinates of the resized image.

    Args:
        masks: ``[N, H, W]`` bool GT masks at the original size (used for ``prompt="point"``).
        boxes: ``[N, 4]`` float GT boxes, XYXY at the original size (used for ``prompt="box"``).
        image_shape: ``(new_height, new_width)`` of the resized image (:func:`long_side_shape`).
        prompt: ``"box"`` or ``"point"``.

    Returns:
        ``{"boxes": [N, 4] float32 XYXY}`` for boxes (scaled by ``new_width / W``, ``new_height / H``), or
        ``{"points": [N, 2] float32 (x, y)}`` for centre points (:func:`centre_points` of the masks
        resized to ``image_shape`` by nearest neighbour).
    """
    if prompt not in PROMPT_TYPES:
        raise ValueError(f"prompt={prompt!r} is not a prompt type; expected one of {PROMPT_TYPES}.")
    height, width = masks.shape[-2:]
    new_height, new_width = image_shape
    if prompt == "box":
        scale = torch.tensor([new_width / width, new_height / height] * 2, dtype=torch.float32)
        return {"boxes": boxes.detach().cpu().float().reshape(-1, 4) * scale}
    if len(masks) == 0:
        return {"points": torch.zeros((0, 2), dtype=torch.float32)}
    resized = F.interpolate(masks[:, None].float(), size=(new_height, new_width), mode="nearest")[:, 0] > 0.5
    return {"points": centre_points(resized)}


class PromptedRecognitionMapper:
    """Map a dataset dict to the input of a prompted-recognition model, one prompt per GT instance.

    Output: the dataset dict (copied) without ``"annotations"``, plus
    - ``"image"``: uint8 ``[3, h, w]`` in ``image_format``, resized (bilinear) so that its long side is
      ``long_side`` (:func:`long_side_shape`); ``"height"``/``"width"`` stay the original size;
    - ``"instances"``: the GT at the original size, one per prompt and in the same order:
      ``Instances((height, width), gt_boxes=Boxes [N, 4] XYXY, gt_classes=int64 [N],
      gt_masks=BitMasks [N, height, width])``; crowds, boxes under one pixel wide or high, and
      empty masks are left out;
    - ``"prompts"``: :func:`prompts_from_instances` of those instances, in the resized image's pixels.

    Args:
        prompt: ``"box"`` or ``"point"`` (the centre point).
        long_side: the long side of the resized image (OVSAM: 1024).
        image_format: ``"RGB"`` or ``"BGR"``.
    """

    def __init__(self, *, prompt: str, long_side: int = 1024, image_format: str = "RGB"):
        if prompt not in PROMPT_TYPES:
            raise ValueError(f"PromptedRecognitionMapper got prompt={prompt!r}; expected one of {PROMPT_TYPES}.")
        self.prompt = prompt
        self.long_side = int(long_side)
        self._gt_mapper = DetectionMapper(is_train=True, augmentations=[], image_format=image_format)

    def __repr__(self) -> str:
        return (
            f"PromptedRecognitionMapper(prompt={self.prompt!r}, long_side={self.long_side}, "
            f"image_format={self._gt_mapper.image_format!r})"
        )

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.copy(dataset_dict)
        # mmdet's COCO loading drops boxes under one pixel wide or high (crowds: DetectionMapper).
        dataset_dict["annotations"] = [a for a in dataset_dict.get("annotations") or [] if _at_least_one_pixel(a)]
        mapped = self._gt_mapper(dataset_dict)
        image = mapped["image"]
        shape = long_side_shape(int(image.shape[-2]), int(image.shape[-1]), self.long_side)
        resized = F.interpolate(image[None].float(), size=shape, mode="bilinear", align_corners=False)[0]
        mapped["image"] = resized.round().clamp(0, 255).to(torch.uint8)
        instances = mapped["instances"]
        mapped["prompts"] = prompts_from_instances(
            masks=instances.gt_masks.tensor, boxes=instances.gt_boxes.tensor, image_shape=shape, prompt=self.prompt
        )
        return mapped


def _at_least_one_pixel(annotation: dict) -> bool:
    _, _, width, height = BoxMode.convert(list(annotation["bbox"]), annotation["bbox_mode"], BoxMode.XYWH_ABS)
    return width >= 1 and height >= 1


def load_coco_ov_json(json_file: str, image_root: str, dataset_name: Optional[str] = None) -> list[dict]:
    """A COCO instances json restricted to the 65 open-vocabulary classes, as dataset dicts.

    ``category_id`` becomes the contiguous id in :data:`COCO_OV_CLASSES`; annotations of the other 15
    classes are dropped, and so are images left without any annotation (they would carry no prompt:
    the metrics do not change). ``dataset_name`` is not used (the metadata is set at registration).
    """
    del dataset_name
    dicts = load_coco_json(json_file, image_root, None)
    kept = []
    for record in dicts:
        annotations = [a for a in record.get("annotations", []) if a["category_id"] in COCO_OV_ID_TO_CONTIGUOUS]
        if not annotations:
            continue
        for a in annotations:
            a["category_id"] = COCO_OV_ID_TO_CONTIGUOUS[a["category_id"]]
        kept.append({**record, "annotations": annotations})
    logger.info(
        "%s: %d of %d images have instances of the 65 open-vocabulary classes.", json_file, len(kept), len(dicts)
    )
    return kept


def lvis_base_novel_split(json_file: str) -> tuple[list[int], list[int]]:
    """OVSAM's LVIS split: base = frequent and common classes, novel = rare, from the json's categories.

    Returns ``(base_ids, novel_ids)`` as contiguous ids (the file's category id - 1, as
    ``load_lvis_json`` maps them), for :class:`~samantics_d2.evaluation.PromptedRecognitionEvaluator`
    on ``lvis_v1_val`` (OVSAM's configs: ``base_classes=LVIS_BASE_IDS, novel_classes=LVIS_RARE_IDS``).
    """
    categories = read_json(
        json_file, what="an LVIS v1 json with categories (lvis_v1_val.json from https://www.lvisdataset.org under "
        "$DETECTRON2_DATASETS/lvis/, datasets/README.md)"
    ).get("categories", [])
    frequencies = {c["id"]: c.get("frequency") for c in categories}
    unknown = sorted(i for i, f in frequencies.items() if f not in ("f", "c", "r"))[:5]
    if not categories or unknown:
        raise ValueError(
            f"{json_file!r} must list LVIS categories with 'frequency' in 'f', 'c', 'r'; categories {unknown} "
            f"do not ({len(categories)} categories in all). Use LVIS v1's lvis_v1_val.json."
        )
    base = sorted(i - 1 for i, f in frequencies.items() if f != "r")
    novel = sorted(i - 1 for i, f in frequencies.items() if f == "r")
    return base, novel
