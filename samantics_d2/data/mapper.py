"""The project's detection mapper: a dataset dict in, a model-input dict out, in both modes.

Augmentations are ``torchvision.transforms.v2`` transforms; the image, boxes
(``tv_tensors.BoundingBoxes``) and masks (``tv_tensors.Mask``) go through them together, so they stay
consistent. The builders below return lists of such transforms for LazyConfig files.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.v2 as T
from pycocotools import mask as mask_util
from torchvision import tv_tensors

from ..d2 import BitMasks, Boxes, BoxMode, Instances
from .io import read_image

__all__ = ["DetectionMapper", "large_scale_jitter", "random_flip", "resize_shortest_edge", "segmentation_to_mask"]

logger = logging.getLogger(__name__)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Rasterise a COCO segmentation (polygons, compressed or uncompressed RLE, or an array) to ``[H, W]`` uint8.

    Polygons with fewer than 3 points are ignored (none left: an empty mask).
    """
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) % 2 == 0 and len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_util.merge(mask_util.frPyObjects([list(map(float, p)) for p in polygons], height, width))
    elif isinstance(segmentation, dict):
        if tuple(segmentation.get("size", ())) != (height, width):
            raise ValueError(f"RLE of size {segmentation.get('size')} for an image of size {(height, width)}.")
        uncompressed = isinstance(segmentation["counts"], list)
        rle = mask_util.frPyObjects(segmentation, height, width) if uncompressed else segmentation
    elif isinstance(segmentation, np.ndarray):
        if segmentation.shape != (height, width):
            raise ValueError(f"Mask of shape {segmentation.shape} for an image of size {(height, width)}.")
        return segmentation.astype(np.uint8)
    else:
        raise ValueError(
            f"Segmentation of type {type(segmentation).__name__}; expected polygons (list), an RLE dict or an "
            "[H, W] array."
        )
    return mask_util.decode(rle)


def _flatten_augmentations(augmentations: Any) -> list[Callable]:
    """``[t1, [t2, t3]] -> [t1, t2, t3]``: the builders return lists, configs nest them."""
    flat: list[Callable] = []
    for item in augmentations:
        if callable(item):
            flat.append(item)
        elif isinstance(item, Sequence) and not isinstance(item, str):
            flat.extend(_flatten_augmentations(item))
        else:
            raise TypeError(
                f"DetectionMapper got augmentation {item!r}; expected torchvision.transforms.v2 transforms or lists of them."
            )
    return flat


class DetectionMapper:
    """Map a Detectron2 dataset dict to the model input of this project.

    Output: the input dict (deep-copied) plus ``"image"``: uint8 ``[3, H', W']`` in ``image_format``
    after the augmentations; ``"height"``/``"width"`` stay the original size. In training mode also
    ``"instances"``: ``Instances((H', W'), gt_boxes=Boxes [N, 4] XYXY, gt_classes=int64 [N],
    gt_masks=BitMasks [N, H', W'] (when ``use_instance_mask``))``, crowd annotations and instances
    left empty by the augmentations removed; ``"annotations"`` is dropped in both modes.
    """

    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: Sequence[Callable],
        image_format: str = "RGB",
        use_instance_mask: bool = True,
        recompute_boxes: bool = False,
    ):
        """
        Args:
            is_train: build ``instances`` from the annotations.
            augmentations: ``torchvision.transforms.v2`` transforms, applied in order; nested lists
                (what the builders below return) are flattened.
            image_format: ``"RGB"`` (the project's format) or ``"BGR"``.
            use_instance_mask: rasterise the segmentations into ``gt_masks``.
            recompute_boxes: replace the boxes by the masks' bounding boxes after the augmentations
                (tighter after crops and rotations); needs ``use_instance_mask``.
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"DetectionMapper got image_format={image_format!r}; expected 'RGB' or 'BGR'.")
        if recompute_boxes and not use_instance_mask:
            raise ValueError("DetectionMapper: recompute_boxes=True needs use_instance_mask=True (boxes come from masks).")
        self.is_train = is_train
        self.augmentations = _flatten_augmentations(augmentations)
        self.transform = T.Compose(self.augmentations) if self.augmentations else None
        self.image_format = image_format
        self.use_instance_mask = use_instance_mask
        self.recompute_boxes = recompute_boxes
        mode = "training" if is_train else "inference"
        logger.info("DetectionMapper for %s, augmentations: %s", mode, self.augmentations)

    def __repr__(self) -> str:
        return (
            f"DetectionMapper(is_train={self.is_train}, augmentations={self.augmentations}, image_format="
            f"{self.image_format!r}, use_instance_mask={self.use_instance_mask}, recompute_boxes={self.recompute_boxes})"
        )

    def _apply(self, sample: Any) -> Any:
        return sample if self.transform is None else self.transform(sample)

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        image = read_image(file_name, format=self.image_format)
        height, width = image.shape[:2]
        expected = (dataset_dict.get("height", height), dataset_dict.get("width", width))
        if expected != (height, width):
            raise ValueError(
                f"Image {file_name!r} is {width}x{height} (width x height, EXIF orientation applied) but its dataset "
                f"dict says {expected[1]}x{expected[0]}; the annotations do not match the file."
            )
        dataset_dict["height"], dataset_dict["width"] = height, width
        image_tv = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        annotations = dataset_dict.pop("annotations", None)
        dataset_dict.pop("sem_seg_file_name", None)
        if not self.is_train:
            dataset_dict["image"] = self._apply(image_tv).as_subclass(torch.Tensor).contiguous()
            return dataset_dict

        annotations = [a for a in (annotations or []) if a.get("iscrowd", 0) == 0]
        boxes = torch.zeros((len(annotations), 4), dtype=torch.float32)
        for i, a in enumerate(annotations):
            boxes[i] = torch.as_tensor(BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS))
        sample = {
            "image": image_tv,
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
        }
        if self.use_instance_mask:
            missing = sum("segmentation" not in a for a in annotations)
            if missing:
                raise ValueError(
                    f"{missing} annotation(s) of image {file_name!r} have no 'segmentation' but use_instance_mask=True; "
                    "pass use_instance_mask=False for box-only data."
                )
            masks = np.zeros((len(annotations), height, width), dtype=np.uint8)
            for i, a in enumerate(annotations):
                masks[i] = segmentation_to_mask(a["segmentation"], height, width)
            sample["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        sample = self._apply(sample)

        image_out = sample["image"].as_subclass(torch.Tensor).contiguous()
        new_height, new_width = image_out.shape[-2:]
        boxes = sample["boxes"].as_subclass(torch.Tensor).float()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, new_width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, new_height)
        masks_out: Optional[BitMasks] = None
        if self.use_instance_mask:
            masks_out = BitMasks(sample["masks"].as_subclass(torch.Tensor).bool())
            if self.recompute_boxes:
                boxes = masks_out.get_bounding_boxes().tensor.float()
        keep = (boxes[:, 2] - boxes[:, 0] > 1e-5) & (boxes[:, 3] - boxes[:, 1] > 1e-5)
        if masks_out is not None:
            keep &= masks_out.nonempty()
        instances = Instances((int(new_height), int(new_width)))
        instances.gt_boxes = Boxes(boxes[keep])
        instances.gt_classes = sample["labels"][keep]
        if masks_out is not None:
            instances.gt_masks = masks_out[keep]
        dataset_dict["image"] = image_out
        dataset_dict["instances"] = instances
        return dataset_dict


# ---------------------------------------------------------------- augmentation builders
def resize_shortest_edge(
    short_edge_length: Union[int, Sequence[int]], *, max_size: Optional[int] = None, sample_style: str = "choice"
) -> list:
    """Resize so the shorter side is ``short_edge_length`` (the longer one at most ``max_size``).

    Args:
        short_edge_length: one length, or several: ``sample_style="choice"`` picks one of them per
            image, ``"range"`` takes ``(min, max)`` and picks any integer in between.
        max_size: cap on the longer side (None: no cap).
    """
    if isinstance(short_edge_length, int):
        return [T.Resize(short_edge_length, max_size=max_size, antialias=True)]
    lengths = [int(x) for x in short_edge_length]
    if sample_style == "choice" and lengths:
        return [T.RandomShortestSize(lengths, max_size=max_size, antialias=True)]
    if sample_style == "range" and len(lengths) == 2 and lengths[0] <= lengths[1]:
        return [T.RandomShortestSize(list(range(lengths[0], lengths[1] + 1)), max_size=max_size, antialias=True)]
    raise ValueError(
        f"resize_shortest_edge got short_edge_length={short_edge_length!r}, sample_style={sample_style!r}; expected an "
        "int, a non-empty list with 'choice', or (min, max) with 'range'."
    )


def random_flip(*, prob: float = 0.5, horizontal: bool = True, vertical: bool = False) -> list:
    """Flip left-right (and/or up-down) with probability ``prob``."""
    if not (horizontal or vertical) or not 0.0 <= prob <= 1.0:
        raise ValueError(
            f"random_flip got prob={prob}, horizontal={horizontal}, vertical={vertical}; expected 0 <= prob <= 1 and "
            "at least one direction."
        )
    return ([T.RandomHorizontalFlip(prob)] if horizontal else []) + ([T.RandomVerticalFlip(prob)] if vertical else [])


def large_scale_jitter(image_size: int, min_scale: float, max_scale: float, *, pad_value: int = 128) -> list:
    """Large-scale jitter: resize to fit ``image_size x image_size`` times a random scale in
    ``[min_scale, max_scale]``, then take a random ``image_size x image_size`` crop, padding with
    ``pad_value`` (masks with 0) where the image is smaller. Pair with ``recompute_boxes=True``.
    """
    if image_size <= 0 or not 0 < min_scale <= max_scale:
        raise ValueError(
            f"large_scale_jitter got image_size={image_size}, scales ({min_scale}, {max_scale}); expected a positive "
            "size and 0 < min_scale <= max_scale."
        )
    fill = {tv_tensors.Image: pad_value, tv_tensors.Mask: 0, "others": 0}
    return [
        T.ScaleJitter((image_size, image_size), scale_range=(min_scale, max_scale), antialias=True),
        T.RandomCrop((image_size, image_size), pad_if_needed=True, fill=fill),
    ]
