"""Datasets and data mapping of samantics_d2.

Importing this package registers COCO 2017 / LVIS v1 (under ``$DETECTRON2_DATASETS``) and the synthetic
shapes datasets in ``DatasetCatalog``: names not registered yet only, nothing read or generated now.
"""
from . import builtin, classification, reference_sets, shapes  # noqa: F401  (registration)
from . import reference_presets  # noqa: F401  (registration: RefSAM evaluation reference sets)
from .classification import ClassificationMapper, register_detection_crops, register_image_folder
from .io import read_image, to_rgb_uint8
from .mapper import DetectionMapper, large_scale_jitter, random_flip, resize_shortest_edge
from .reference_json import load_reference_json

__all__ = [
    "ClassificationMapper",
    "register_detection_crops",
    "register_image_folder",
    "DetectionMapper",
    "large_scale_jitter",
    "load_reference_json",
    "random_flip",
    "read_image",
    "resize_shortest_edge",
    "to_rgb_uint8",
]
