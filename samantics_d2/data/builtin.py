"""COCO 2017 and LVIS v1 under ``$DETECTRON2_DATASETS``, with Detectron2's dataset names.

As in Detectron2 (``detectron2.data.datasets.builtin``), the root is ``$DETECTRON2_DATASETS``
(default ``datasets``, relative to the working directory) read once, when the names are registered,
and each dataset's metadata gets ``json_file``, ``image_root`` and ``evaluator_type`` then. So set
the variable before starting Python. With Detectron2, ``import detectron2.data`` has registered
these names already (and many more): those registrations are Detectron2's and are kept as they
are, so a missing file there fails with Detectron2's error. The names registered here (with lite)
check the json when loaded and name the root and the variable when it is missing.
The expected layout is in ``datasets/README.md``.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from ..d2 import DatasetCatalog, MetadataCatalog, load_coco_json, load_lvis_json
from .prompted import (
    COCO_OV_BASE_CLASSES,
    COCO_OV_CLASSES,
    COCO_OV_ID_TO_CONTIGUOUS,
    COCO_OV_NOVEL_CLASSES,
    load_coco_ov_json,
)

__all__ = [
    "BUILTIN_COCO",
    "BUILTIN_COCO_OV",
    "BUILTIN_LVIS",
    "datasets_root",
    "register_all_builtin",
    "set_paths_if_missing",
]

logger = logging.getLogger(__name__)

DATASETS_ENV = "DETECTRON2_DATASETS"

# name -> (image root, json file), relative to the datasets root.
BUILTIN_COCO: dict[str, tuple[str, str]] = {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}
# COCO val2017 restricted to the 65 open-vocabulary classes (48 base + 17 novel), for prompted
# recognition (OVSAM's protocol; samantics_d2.data.prompted). LVIS v1 val needs no own name:
# prompted recognition on LVIS uses lvis_v1_val (all 1203 classes; OVSAM's base/rare split comes
# from the json: prompted.lvis_base_novel_split).
BUILTIN_COCO_OV: dict[str, tuple[str, str]] = {
    "coco_2017_val_ov65": ("coco/val2017", "coco/annotations/instances_val2017.json"),
}
# LVIS v1 uses COCO 2017 images: file names come from each image's coco_url, under coco/.
BUILTIN_LVIS: dict[str, tuple[str, str]] = {
    "lvis_v1_train": ("coco/", "lvis/lvis_v1_train.json"),
    "lvis_v1_val": ("coco/", "lvis/lvis_v1_val.json"),
}


def _root_from_env() -> str:
    return os.path.expanduser(os.environ.get(DATASETS_ENV, "datasets"))


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` (default ``"datasets"``), read now; an error naming it when missing."""
    root = _root_from_env()
    if not os.path.isdir(root):
        source = f"{DATASETS_ENV}={os.environ[DATASETS_ENV]!r}" if DATASETS_ENV in os.environ else (
            f"{DATASETS_ENV} is unset, so the default 'datasets' relative to {os.getcwd()!r} is used"
        )
        raise FileNotFoundError(
            f"Dataset root {os.path.abspath(root)!r} does not exist ({source}). Set {DATASETS_ENV} to the folder "
            "holding coco/ and lvis/, laid out as in datasets/README.md."
        )
    return root


def set_paths_if_missing(name: str, *, json_file: str, image_root: str) -> None:
    """Put ``json_file``/``image_root`` on the metadata of ``name`` unless already set.

    An evaluator built before the dataset is loaded may already have pointed ``json_file`` at its own
    conversion of the dataset; metadata cannot change, so the first value stays.
    """
    meta = MetadataCatalog.get(name)
    for key, value in (("json_file", json_file), ("image_root", image_root)):
        current = meta.get(key)
        if current is None:
            setattr(meta, key, value)
        elif current != value:
            logger.info("Metadata of %s keeps %s=%s (this load used %s).", name, key, current, value)


def _loader(name: str, json_file: str, image_root: str, root: str, load: Callable) -> Callable[[], list[dict]]:
    def load_builtin() -> list[dict]:
        if not os.path.isfile(json_file):
            raise FileNotFoundError(
                f"Dataset {name!r}: {os.path.abspath(json_file)!r} does not exist. Its root {os.path.abspath(root)!r} "
                f"is {DATASETS_ENV} (default 'datasets'), read when samantics_d2 was imported: set {DATASETS_ENV} to "
                "the folder holding coco/ and lvis/ (laid out as in datasets/README.md) before starting Python."
            )
        return load(json_file, image_root, name)

    return load_builtin


def register_all_builtin(root: Optional[str] = None) -> list[str]:
    """Register the COCO and LVIS names that are not registered yet, under ``root`` (default:
    ``$DETECTRON2_DATASETS``, else ``datasets``); nothing is read. Returns the names registered."""
    root = _root_from_env() if root is None else root
    registered = []
    for table, load, evaluator_type in ((BUILTIN_COCO, load_coco_json, "coco"), (BUILTIN_LVIS, load_lvis_json, "lvis")):
        for name, (image_dir, json_name) in table.items():
            if name in DatasetCatalog.list():
                continue
            json_file, image_root = os.path.join(root, json_name), os.path.join(root, image_dir)
            DatasetCatalog.register(name, _loader(name, json_file, image_root, root, load))
            MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type=evaluator_type)
            registered.append(name)
    for name, (image_dir, json_name) in BUILTIN_COCO_OV.items():
        if name in DatasetCatalog.list():
            continue
        json_file, image_root = os.path.join(root, json_name), os.path.join(root, image_dir)
        DatasetCatalog.register(name, _loader(name, json_file, image_root, root, load_coco_ov_json))
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="prompted_recognition",
            thing_classes=list(COCO_OV_CLASSES),
            thing_dataset_id_to_contiguous_id=dict(COCO_OV_ID_TO_CONTIGUOUS),
            base_class_ids=[COCO_OV_CLASSES.index(c) for c in COCO_OV_BASE_CLASSES],
            novel_class_ids=[COCO_OV_CLASSES.index(c) for c in COCO_OV_NOVEL_CLASSES],
        )
        registered.append(name)
    return registered


register_all_builtin()


# COCO panoptic val2017 for the click benchmarks (samantics_d2/data/panoptic.py; with Detectron2 its own registration stays).
from .panoptic import register_all_panoptic  # noqa: E402

register_all_panoptic(_root_from_env())

# BDD100K instance segmentation from its official JSON layout (samantics_d2/data/bdd100k.py).
from .bdd100k import register_all_bdd100k  # noqa: E402

register_all_bdd100k(_root_from_env())
