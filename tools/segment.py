#!/usr/bin/env python
"""Segment and label every instance of your own classes from a few annotated reference images.

    python tools/segment.py --references REF.json --image-root REF_IMAGES --images DIR --output OUT
    python tools/segment.py --references REF_DIR --images DIR --output OUT [--config-file CFG] [key=value ...]

References, either
  * a COCO-format instances JSON (``--image-root`` is the folder its file names are relative to), or
  * a folder with one sub-folder per class, holding images and their binary masks: ``cat/a.jpg``
    with ``cat/a_mask.png`` (non-zero pixels are the object; one instance per mask).
Every image file directly in ``--images`` is segmented. Written to ``--output``:
``coco_results.json`` (COCO results: image_id, category_id, bbox XYWH, score, RLE segmentation),
``index.json`` (image ids -> file names, category ids -> names), one ``overlays/<name>.png`` per image,
and ``predictions/<name>.json`` per image, so an interrupted run resumes where it stopped.

The model is the training-free pipeline of ``--config-file`` (default: SAM 2.1 Hiera-L proposals +
DINOv2 ViT-L/14 prototypes, weights under $SAMANTICS_WEIGHTS); ``key=value`` overrides apply to it,
and ``train.init_checkpoint`` (when set) is loaded into it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util
from tqdm import tqdm

from samantics_d2.config import check_override_keys
from samantics_d2.d2 import BoxMode, DetectionCheckpointer, LazyConfig, instantiate, setup_logger
from samantics_d2.data.io import read_image
from samantics_d2.data.classification import IMAGE_EXTENSIONS
from samantics_d2.modeling.semantic import load_reference_json
from samantics_d2.utils.io import atomic_path
from samantics_d2.utils.visualization import draw_instances

logger = logging.getLogger("samantics_d2.tools.segment")
DEFAULT_CONFIG = "configs/common/training_free.py"
MASK_SUFFIX = "_mask.png"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.endswith(MASK_SUFFIX)


def _write_json(path: str, data) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)


def folder_to_coco(root: str, output_json: str) -> str:
    """Convert a ``<class>/<image>`` + ``<class>/<image>_mask.png`` folder into a COCO instances json.

    Image file names in the json are relative to ``root``. Raises ``ValueError`` naming the file for
    an image without a mask, an empty mask, or a mask whose size differs from its image.
    """
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"Reference folder {root} has no class sub-folders; expected {root}/<class>/<image> "
                         f"with {root}/<class>/<image-stem>{MASK_SUFFIX}.")
    images, annotations, categories = [], [], []
    for cid, name in enumerate(classes, start=1):
        categories.append({"id": cid, "name": name})
        files = sorted(f for f in os.listdir(os.path.join(root, name)) if _is_image(f))
        if not files:
            logger.warning("Reference class %r (%s) has no images: it will never be predicted.", name,
                           os.path.join(root, name))
        for file in files:
            image_path = os.path.join(root, name, file)
            mask_path = os.path.join(root, name, os.path.splitext(file)[0] + MASK_SUFFIX)
            if not os.path.exists(mask_path):
                raise ValueError(f"Reference image {image_path} has no mask: expected {mask_path} (non-zero = object).")
            mask = read_image(mask_path, format="L")[..., 0] > 0
            height, width = read_image(image_path).shape[:2]
            if mask.shape != (height, width):
                raise ValueError(f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                                 f"{width}x{height}; they must have the same size.")
            if not mask.any():
                raise ValueError(f"Mask {mask_path} is empty: mark the object with non-zero pixels.")
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": os.path.join(name, file), "height": height, "width": width})
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cid, "iscrowd": 0,
                "bbox": [float(v) for v in mask_util.toBbox(rle)], "area": float(mask_util.area(rle)),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            })
    _write_json(output_json, {"images": images, "annotations": annotations, "categories": categories})
    return output_json


def load_references(references: str, image_root: str | None, output_dir: str) -> tuple[list[dict], list[str]]:
    """Reference dataset dicts (contiguous class ids) and class names, from a COCO json or a folder."""
    if os.path.isdir(references):
        json_file = folder_to_coco(references, os.path.join(output_dir, "references.json"))
        image_root = references
    elif os.path.isfile(references):
        json_file = references
        if image_root is None:
            image_root = os.path.dirname(os.path.abspath(references))
            logger.info("No --image-root: reference file names are taken relative to %s.", image_root)
    else:
        raise FileNotFoundError(f"--references {references} is neither a COCO json file nor a folder.")
    dicts, classes = load_reference_json(json_file, image_root)
    if not any(d["annotations"] for d in dicts):
        raise ValueError(f"--references {references} holds no annotated instance: nothing to build prototypes from.")
    return dicts, classes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--references", required=True, help="COCO json or <class>/<image> + mask folder")
    parser.add_argument("--image-root", default=None, help="folder of the reference json's file names")
    parser.add_argument("--images", required=True, help="folder of images to segment")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help=f"training-free config (default {DEFAULT_CONFIG})")
    parser.add_argument("--shots", type=int, default=None, help="references per class to use (default: all)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="minimum score drawn on the overlays")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    args = parser.parse_args(argv)

    os.makedirs(args.output, exist_ok=True)
    setup_logger(args.output, name="samantics_d2")
    if not os.path.isdir(args.images):
        parser.error(f"--images {args.images} is not a folder")
    image_files = sorted(f for f in os.listdir(args.images) if _is_image(f))
    if not image_files:
        parser.error(f"--images {args.images} holds no image ({', '.join(IMAGE_EXTENSIONS)})")

    cfg = LazyConfig.load(args.config_file)
    check_override_keys(cfg, args.opts)
    LazyConfig.apply_overrides(cfg, args.opts)
    references, classes = load_references(args.references, args.image_root, args.output)
    key = hashlib.sha256(json.dumps([[a.get("id") for a in d["annotations"]] + [d["file_name"]] for d in references],
                                    default=str).encode()).hexdigest()[:12]
    cfg.model.references = "given-by-tools/segment.py"  # replaced below: dataset dicts stay out of the config
    cfg.model.dataset_name = None
    cfg.model.class_names = None
    cfg.model.shots = args.shots
    cfg.model.memory_bank_path = os.path.join(args.output, f"memory_bank-{key}.safetensors")
    seed = cfg.train.get("seed", -1)
    torch.manual_seed(seed if seed >= 0 else 0)  # randomly initialised (tiny) encoders are the same in every run
    model = instantiate(cfg.model)
    if cfg.train.get("init_checkpoint"):  # e.g. a SAM trained with train_net.py
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
    model.set_references(references, classes)
    model.to(cfg.train.device).eval()

    pred_dir, overlay_dir = os.path.join(args.output, "predictions"), os.path.join(args.output, "overlays")
    os.makedirs(pred_dir, exist_ok=True)
    os.makedirs(overlay_dir, exist_ok=True)
    done = 0
    for image_id, file in enumerate(tqdm(image_files, desc="segment", unit="image"), start=1):
        stem = os.path.splitext(file)[0]
        pred_file = os.path.join(pred_dir, stem + ".json")
        if os.path.exists(pred_file):  # resume: finished in an earlier run
            continue
        image = read_image(os.path.join(args.images, file))
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        with torch.no_grad():
            inst = model([{"image": tensor, "height": image.shape[0], "width": image.shape[1]}])[0]["instances"]
        inst = inst.to("cpu")
        masks = inst.pred_masks.numpy()
        boxes = inst.pred_boxes.tensor.numpy()
        scores, labels = inst.scores.numpy().tolist(), inst.pred_classes.numpy().tolist()
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))) if len(masks) else []
        results = [{
            "image_id": image_id, "category_id": int(c) + 1, "score": float(s),
            "bbox": BoxMode.convert(box.tolist(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS),
            "segmentation": {"size": r["size"], "counts": r["counts"].decode("ascii")},
        } for box, s, c, r in zip(boxes, scores, labels, rles)]
        keep = np.asarray(scores) >= args.score_threshold
        overlay = draw_instances(image, masks=masks[keep], boxes=boxes[keep], classes=np.asarray(labels)[keep],
                                 scores=np.asarray(scores)[keep], class_names=classes)
        with atomic_path(os.path.join(overlay_dir, stem + ".png")) as tmp:
            Image.fromarray(overlay).save(tmp, format="PNG")
        _write_json(pred_file, results)  # last: its presence marks the image as done
        done += 1

    all_results = []
    for file in image_files:
        with open(os.path.join(pred_dir, os.path.splitext(file)[0] + ".json"), encoding="utf-8") as f:
            all_results.extend(json.load(f))
    _write_json(os.path.join(args.output, "coco_results.json"), all_results)
    _write_json(os.path.join(args.output, "index.json"), {
        "images": [{"id": i, "file_name": f} for i, f in enumerate(image_files, start=1)],
        "categories": [{"id": i, "name": n} for i, n in enumerate(classes, start=1)],
    })
    logger.info("Segmented %d image(s) (%d resumed from earlier runs): %d instances in %s.", done,
                len(image_files) - done, len(all_results), os.path.join(args.output, "coco_results.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
