"""Image-classification datasets: image folders, ImageNet-1K, and crops of a detection dataset.

Dataset dicts are ``{"file_name", "image_id", "label"}`` (``"height"``/``"width"`` when known), with
``label`` in ``0..K-1``; the metadata holds ``classes`` (the K names, in label order) and
``evaluator_type="classification"``.

- ``register_image_folder(name, root)``: ``root/<class>/**/<image>``, classes sorted by folder name
  unless ``class_names`` gives them (and their order).
- ``imagenet_train`` / ``imagenet_val``: ``$DETECTRON2_DATASETS/imagenet/{train,val}/<wnid>/*.JPEG``,
  the root read when the dataset is loaded; both splits use the class list of ``train``.
- ``shapes_train_cls`` / ``shapes_val_cls`` (and ``register_detection_crops`` for any detection
  dataset): one crop per non-crowd instance, labelled with its category. The crops are written on
  first load into ``$SAMANTICS_CACHE/classification_crops/`` (default ``~/.cache/samantics_d2``),
  each file atomically, so concurrent ranks and interrupted runs are safe.

``ClassificationMapper`` turns a dataset dict into the model input of the linear probe
(``image``: uint8 ``[3, H, W]`` RGB, ``label``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..d2 import BoxMode, DatasetCatalog, MetadataCatalog
from .builtin import datasets_root
from .io import read_image

__all__ = [
    "BUILTIN_IMAGENET",
    "ClassificationMapper",
    "IMAGE_EXTENSIONS",
    "atomic_path",
    "cache_root",
    "list_image_folder",
    "load_detection_crops",
    "register_all_classification",
    "register_detection_crops",
    "register_image_folder",
]

from ..utils.io import CACHE_ENV, atomic_path, cache_root  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
# name -> split folder under $DETECTRON2_DATASETS; class lists always come from the train split.
BUILTIN_IMAGENET: dict[str, str] = {"imagenet_train": "imagenet/train", "imagenet_val": "imagenet/val"}
# name -> detection dataset it is cropped from.
BUILTIN_CROPS: dict[str, str] = {"shapes_train_cls": "shapes_train", "shapes_val_cls": "shapes_val"}


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------
def _class_folders(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def list_image_folder(root: str, *, class_names: Optional[Sequence[str]] = None) -> tuple[list[dict], list[str]]:
    """Dataset dicts of ``root/<class>/**/<image>`` and the class list.

    Args:
        root: folder with one sub-folder per class.
        class_names: the class folders to use, in label order; default all sub-folders, sorted.
            Sub-folders not listed are ignored (logged).

    Returns:
        (dicts, classes): dicts ``{"file_name", "image_id" (path relative to root), "label"}``
        sorted by class then path; ``classes`` the folder names in label order.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist; expected one sub-folder per class.")
    present = _class_folders(root)
    if class_names is None:
        classes = present
    else:
        classes = [str(c) for c in class_names]
        missing = [c for c in classes if c not in present]
        if missing:
            raise FileNotFoundError(
                f"Image folder {root!r} has no sub-folder for {len(missing)} of the given classes "
                f"(first: {missing[:5]}); expected one folder per class name. Fix class_names or the folder."
            )
        ignored = sorted(set(present) - set(classes))
        if ignored:
            logger.info("Image folder %s: %d sub-folders not in class_names are ignored (first: %s).",
                        root, len(ignored), ignored[:5])
    if not classes:
        raise FileNotFoundError(f"Image folder {root!r} has no class sub-folders; expected root/<class>/<image>.")
    dicts: list[dict] = []
    for label, name in enumerate(classes):
        start = len(dicts)
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    path = os.path.join(dirpath, fname)
                    dicts.append({"file_name": path, "image_id": os.path.relpath(path, root), "label": label})
        if len(dicts) == start:
            logger.warning("Image folder %s: class %r has no images.", root, name)
    if not dicts:
        raise FileNotFoundError(f"Image folder {root!r} holds no images with extensions {IMAGE_EXTENSIONS}.")
    logger.info("Loaded %d images of %d classes from %s.", len(dicts), len(classes), root)
    return dicts, classes


def register_image_folder(
    name: str, root: str, *, class_names: Optional[Sequence[str]] = None, metadata: Optional[dict] = None
) -> None:
    """Register ``root/<class>/**/<image>`` as classification dataset ``name`` (lazy: nothing read now).

    The metadata gets ``image_root``, ``evaluator_type="classification"`` and ``classes`` (now when
    ``class_names`` is given, else when the dataset is first loaded).
    """
    root = str(root)

    def load() -> list[dict]:
        dicts, classes = list_image_folder(root, class_names=class_names)
        MetadataCatalog.get(name).set(classes=classes)
        return dicts

    DatasetCatalog.register(name, load)
    meta = MetadataCatalog.get(name).set(image_root=root, evaluator_type="classification", **(metadata or {}))
    if class_names is not None:
        meta.set(classes=[str(c) for c in class_names])


def _imagenet_loader(name: str, split_dir: str) -> Any:
    def load() -> list[dict]:
        root = datasets_root()
        split_root = os.path.join(root, split_dir)
        if not os.path.isdir(split_root):
            raise FileNotFoundError(
                f"ImageNet folder {os.path.abspath(split_root)!r} does not exist (DETECTRON2_DATASETS="
                f"{os.environ.get('DETECTRON2_DATASETS', '<unset>')!r}). Expected "
                "$DETECTRON2_DATASETS/imagenet/{train,val}/<wnid>/*.JPEG (see datasets/README.md)."
            )
        train_root = os.path.join(root, BUILTIN_IMAGENET["imagenet_train"])
        classes = _class_folders(train_root) if os.path.isdir(train_root) else None
        dicts, classes = list_image_folder(split_root, class_names=classes)
        MetadataCatalog.get(name).set(classes=classes, image_root=split_root)
        return dicts

    return load


# ----------------------------------------------------------------------------------------------
# Crops of a detection dataset
# ----------------------------------------------------------------------------------------------
def _crop_box(bbox: Sequence[float], bbox_mode: Any, height: int, width: int, context: float) -> tuple[int, int, int, int]:
    """Integer XYXY crop of a box grown by ``context`` x its size on each side, clipped to the image."""
    x0, y0, x1, y1 = BoxMode.convert(list(bbox), bbox_mode, BoxMode.XYXY_ABS)
    w, h = x1 - x0, y1 - y0
    x0, x1 = x0 - context * w, x1 + context * w
    y0, y1 = y0 - context * h, y1 + context * h
    left, top = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    right, bottom = min(width, int(np.ceil(x1))), min(height, int(np.ceil(y1)))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def _safe_name(value: Any) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(value))


def load_detection_crops(
    source: str, *, output_dir: str, context: float = 0.1, min_size: int = 4, name: Optional[str] = None
) -> list[dict]:
    """One classification dict per non-crowd instance of detection dataset ``source``.

    Args:
        source: a registered detection dataset (dicts with ``annotations``; contiguous ``category_id``;
            metadata ``thing_classes``).
        output_dir: where the crops are cached; a sub-folder named after ``source``, ``context``,
            ``min_size`` and a fingerprint of the annotations is used, so a change never reuses stale crops.
        context: the box grows by this fraction of its width/height on each side.
        min_size: instances whose box is smaller than this (pixels, either side) are skipped.
        name: the classification dataset's name, to set ``classes`` on its metadata.

    Returns:
        dicts ``{"file_name" (PNG crop), "image_id" ("<image_id>_<k>"), "label", "height", "width",
        "source_file_name"}``. Crops already on disk are reused; new ones are written atomically.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}.")
    dicts = DatasetCatalog.get(source)
    classes = list(MetadataCatalog.get(source).thing_classes)
    plan = []
    for d in dicts:
        boxes = []
        for k, ann in enumerate(d.get("annotations", [])):
            if ann.get("iscrowd", 0):
                continue
            box = _crop_box(ann["bbox"], ann.get("bbox_mode", BoxMode.XYWH_ABS), d["height"], d["width"], context)
            x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
            if min(x1 - x0, y1 - y0) < min_size:
                continue
            boxes.append((k, int(ann["category_id"]), box))
        plan.append((d, boxes))
    fingerprint = hashlib.sha256(
        json.dumps([[d["file_name"], boxes] for d, boxes in plan], sort_keys=True).encode()
    ).hexdigest()[:16]
    folder = os.path.join(output_dir, f"{_safe_name(source)}-c{context:g}-m{min_size}-{fingerprint}")
    os.makedirs(folder, exist_ok=True)
    out: list[dict] = []
    written = 0
    for d, boxes in plan:
        targets = [os.path.join(folder, f"{_safe_name(d['image_id'])}_{k}.png") for k, _, _ in boxes]
        todo = [i for i, path in enumerate(targets) if not os.path.exists(path)]
        image = read_image(d["file_name"], format="RGB") if todo else None
        for i, ((k, label, (x0, y0, x1, y1)), path) in enumerate(zip(boxes, targets)):
            if i in todo:
                with atomic_path(path) as tmp:
                    Image.fromarray(image[y0:y1, x0:x1]).save(tmp, format="PNG")
                written += 1
            out.append({
                "file_name": path, "image_id": f"{d['image_id']}_{k}", "label": label,
                "height": y1 - y0, "width": x1 - x0, "source_file_name": d["file_name"],
            })
    logger.info("Classification crops of %s: %d instances (%d newly written) in %s.", source, len(out), written, folder)
    if name is not None:
        MetadataCatalog.get(name).set(classes=classes)
    return out


def register_detection_crops(
    name: str, source: str, *, output_dir: Optional[str] = None, context: float = 0.1, min_size: int = 4
) -> None:
    """Register crops of detection dataset ``source`` as classification dataset ``name`` (lazy).

    ``output_dir`` defaults to ``$SAMANTICS_CACHE/classification_crops``, read at load time.
    """

    def load() -> list[dict]:
        folder = output_dir if output_dir is not None else os.path.join(cache_root(), "classification_crops")
        return load_detection_crops(source, output_dir=folder, context=context, min_size=min_size, name=name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(evaluator_type="classification", source_dataset=source)


# ----------------------------------------------------------------------------------------------
# Mapper
# ----------------------------------------------------------------------------------------------
class ClassificationMapper:
    """Dataset dict -> ``{"image": uint8 [3, H, W] RGB, "label", "file_name", "image_id", "height", "width"}``.

    With ``skip_unreadable=True`` an image that cannot be read is logged by file name and ``None`` is
    returned (the training loader's ``MapDataset`` then draws another index); otherwise it raises.
    """

    def __init__(self, *, skip_unreadable: bool = False):
        self.skip_unreadable = skip_unreadable

    def __call__(self, dataset_dict: dict) -> Optional[dict]:
        try:
            image = read_image(dataset_dict["file_name"], format="RGB")
        except (OSError, ValueError) as e:
            if not self.skip_unreadable:
                raise
            logger.warning("Skipping unreadable image %s: %s", dataset_dict["file_name"], e)
            return None
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": int(dataset_dict["label"]),
            "file_name": dataset_dict["file_name"],
            "image_id": dataset_dict.get("image_id"),
            "height": image.shape[0],
            "width": image.shape[1],
        }


def register_all_classification() -> None:
    """Register ``imagenet_train``/``imagenet_val`` and the shapes crop sets not registered yet (cheap)."""
    for name, split_dir in BUILTIN_IMAGENET.items():
        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, _imagenet_loader(name, split_dir))
            MetadataCatalog.get(name).set(evaluator_type="classification")
    for name, source in BUILTIN_CROPS.items():
        if name not in DatasetCatalog.list():
            register_detection_crops(name, source)


register_all_classification()
