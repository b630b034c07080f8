"""Datasets and data loaders with the names of ``detectron2.data`` (and ``detectron2.data.datasets``)."""
from .build import (
    AspectRatioGroupedDataset,
    DatasetFromList,
    InferenceSampler,
    MapDataset,
    TrainingSampler,
    build_batch_data_loader,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
    trivial_batch_collator,
    worker_init_reset_seed,
)
from .catalog import DatasetCatalog, Metadata, MetadataCatalog
from .coco import load_coco_json, register_coco_instances
from .lvis import load_lvis_json

__all__ = [
    "AspectRatioGroupedDataset",
    "DatasetCatalog",
    "DatasetFromList",
    "InferenceSampler",
    "MapDataset",
    "Metadata",
    "MetadataCatalog",
    "TrainingSampler",
    "build_batch_data_loader",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "get_detection_dataset_dicts",
    "load_coco_json",
    "load_lvis_json",
    "register_coco_instances",
    "trivial_batch_collator",
    "worker_init_reset_seed",
]
