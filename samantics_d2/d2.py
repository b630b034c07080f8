"""The seam: every Detectron2 name this project uses is imported from here, and only here.

If ``import detectron2`` works, the names are Detectron2's own objects, so our components register
in Detectron2's registries and plug into any Detectron2 codebase. Otherwise they come from
:mod:`samantics_d2.lite`, a small subset of Detectron2's API with the same names and behaviour.

``SAMANTICS_D2_BACKEND=detectron2`` or ``=lite`` forces one backend; any other value is an error.
Project code, configs, tools and tests write ``from samantics_d2.d2 import X``; nothing else in the
project imports ``detectron2``.
"""
from __future__ import annotations

import logging
import os
import sys

__all__ = [
    "BACKEND",
    "log_backend",
    # config
    "LazyCall",
    "LazyConfig",
    "instantiate",
    "CfgNode",
    "configurable",
    "get_cfg",
    # modeling
    "Backbone",
    "ShapeSpec",
    "BACKBONE_REGISTRY",
    "META_ARCH_REGISTRY",
    "build_backbone",
    "build_model",
    # structures
    "Boxes",
    "BoxMode",
    "BitMasks",
    "ImageList",
    "Instances",
    "pairwise_iou",
    # data
    "DatasetCatalog",
    "MetadataCatalog",
    "build_detection_test_loader",
    "build_detection_train_loader",
    "get_detection_dataset_dicts",
    "load_coco_json",
    "load_lvis_json",
    "register_coco_instances",
    # engine
    "AMPTrainer",
    "DefaultPredictor",
    "SimpleTrainer",
    "create_ddp_model",
    "default_argument_parser",
    "default_setup",
    "default_writers",
    "hooks",
    "launch",
    # checkpoint, solver, utils
    "DetectionCheckpointer",
    "LRMultiplier",
    "WarmupParamScheduler",
    "get_default_optimizer_params",
    "collect_env_info",
    "comm",
    "EventStorage",
    "get_event_storage",
    "setup_logger",
    # evaluation
    "COCOEvaluator",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "LVISEvaluator",
    "inference_on_dataset",
    "print_csv_format",
]

_ENV = "SAMANTICS_D2_BACKEND"
logger = logging.getLogger(__name__)


def _choose_backend() -> str:
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced not in ("", "detectron2", "lite"):
        raise ValueError(
            f"{_ENV}={os.environ[_ENV]!r} is not a backend: use 'detectron2', 'lite', or leave it unset "
            "(Detectron2 when importable, lite otherwise)."
        )
    if forced == "lite":
        return "lite"
    try:
        import detectron2  # noqa: F401
    except ImportError as e:
        if forced == "detectron2":
            raise ImportError(
                f"{_ENV}=detectron2 but Detectron2 cannot be imported ({e}). Install it from its source "
                "repository (https://github.com/facebookresearch/detectron2) or unset the variable."
            ) from e
        return "lite"
    return "detectron2"


BACKEND: str = _choose_backend()

if BACKEND == "detectron2":  # pragma: no cover - Detectron2 cannot be installed on CI machines
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import CfgNode, LazyCall, LazyConfig, configurable, get_cfg, instantiate
    from detectron2.data import (
        DatasetCatalog,
        MetadataCatalog,
        build_detection_test_loader,
        build_detection_train_loader,
        get_detection_dataset_dicts,
    )
    from detectron2.data.datasets import load_coco_json, load_lvis_json, register_coco_instances
    from detectron2.engine import (
        AMPTrainer,
        DefaultPredictor,
        SimpleTrainer,
        create_ddp_model,
        default_argument_parser,
        default_setup,
        default_writers,
        hooks,
        launch,
    )
    from detectron2.evaluation import (
        COCOEvaluator,
        DatasetEvaluator,
        DatasetEvaluators,
        LVISEvaluator,
        inference_on_dataset,
        print_csv_format,
    )
    from detectron2.modeling import (
        BACKBONE_REGISTRY,
        META_ARCH_REGISTRY,
        Backbone,
        ShapeSpec,
        build_backbone,
        build_model,
    )
    from detectron2.solver import LRMultiplier, WarmupParamScheduler, get_default_optimizer_params
    from detectron2.structures import BitMasks, Boxes, BoxMode, ImageList, Instances, pairwise_iou
    from detectron2.utils import comm
    from detectron2.utils.collect_env import collect_env_info
    from detectron2.utils.events import EventStorage, get_event_storage
    from detectron2.utils.logger import setup_logger
else:
    from .lite import comm, hooks
    from .lite.checkpoint import DetectionCheckpointer
    from .lite.config import LazyCall, LazyConfig, instantiate
    from .lite.data import (
        DatasetCatalog,
        MetadataCatalog,
        build_detection_test_loader,
        build_detection_train_loader,
        get_detection_dataset_dicts,
        load_coco_json,
        load_lvis_json,
        register_coco_instances,
    )
    from .lite.engine import (
        AMPTrainer,
        DefaultPredictor,
        SimpleTrainer,
        create_ddp_model,
        default_argument_parser,
        default_setup,
        default_writers,
        launch,
    )
    from .lite.evaluation import (
        COCOEvaluator,
        DatasetEvaluator,
        DatasetEvaluators,
        LVISEvaluator,
        inference_on_dataset,
        print_csv_format,
    )
    from .lite.env import collect_env_info
    from .lite.events import EventStorage, get_event_storage
    from .lite.logger import setup_logger
    from .lite.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, Backbone, ShapeSpec, build_backbone, build_model
    from .lite.solver import LRMultiplier, WarmupParamScheduler, get_default_optimizer_params
    from .lite.structures import BitMasks, Boxes, BoxMode, ImageList, Instances, pairwise_iou
    from .lite.yacs_config import CfgNode, configurable, get_cfg
    from .lite.config import bind_seam as _bind_seam

    _bind_seam(sys.modules[__name__])  # lite's LazyConfig names the seam's objects by their seam path

_logged = False


def log_backend() -> None:
    """Log which backend is active; the first call logs, later calls do nothing."""
    global _logged
    if not _logged:
        _logged = True
        where = "Detectron2" if BACKEND == "detectron2" else "samantics_d2.lite (Detectron2 not importable or not chosen)"
        logger.info("samantics_d2 backend: %s [%s=%s]", where, _ENV, os.environ.get(_ENV, "<unset>"))
