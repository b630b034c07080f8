#!/usr/bin/env python
"""Segment and label every instance of your own classes, named by words, by a few annotated
reference images, or both.

    python tools/segment.py --references REF.json --image-root REF_IMAGES --images DIR --output OUT
    python tools/segment.py --references REF_DIR --images DIR --output OUT [--config-file CFG] [key=value ...]
    python tools/segment.py --classes "cat,dog/puppy,traffic light" --images DIR --output OUT
    python tools/segment.py --vocabulary FILE --images DIR --output OUT
    python tools/segment.py --classes "cat,dog" --references REF_DIR --images DIR --output OUT

Words (open vocabulary, docs/open_vocabulary.md): ``--classes`` is a comma-separated list (``/``
separates the synonyms of one class), ``--vocabulary`` a file with one class per line (synonyms
separated by ``/`` or ``,``; ``#`` comments) or a named vocabulary (``coco``, ``lvis_v1``,
``shapes``). The masks are then labelled by CLIP against the text prototypes of these classes.
With ``--references`` as well, every class is labelled by the fusion of its words and its examples
(classes without examples: words only); the label space is the words' classes, then the reference
classes whose names are not among them.

References, either
  * a COCO-format instances JSON (``--image-root`` is the folder its file names are relative to),
  * a folder with one sub-folder per class, holding images and their binary masks: ``cat/a.jpg``
    with ``cat/a_mask.png`` (non-zero pixels are the object; one instance per mask), or
  * a registered reference set (``shapes_train_ref5_seed0``, ``coco_2017_train_novel_ref30_seed0``...).
Every image file directly in ``--images`` (a folder, or a registered dataset's image folder, e.g.
``shapes_val``) is segmented. Written to ``--output`` (each file atomically):
``coco_results.json`` (COCO results: image_id, category_id, bbox XYWH, score, RLE segmentation),
``index.json`` (image ids -> file names and sizes, category ids -> names, skipped files with the reason),
one ``overlays/<file name>.png`` and one ``predictions/<file name>.json`` per image (``x.jpg`` and
``x.png`` get distinct files).

Image ids are derived from the file name (a hash of it), so they are the same in every run whatever
other files come and go. An image unreadable as an image (empty, truncated, not an image) is logged,
listed under ``skipped`` in ``index.json``, and the run goes on; the exit status is then 1.
An interrupted run resumes: an image's prediction is reused only when its fingerprint (the file's
name, size and modification time, the model's config and weights, the references, ``--shots`` and
``--score-threshold``) is unchanged; otherwise it is segmented again.

The model is the training-free pipeline of ``--config-file`` (default: SAM 2.1 Hiera-L proposals +
DINOv2 ViT-L/14 prototypes; with words, ``configs/open_vocab/everything_sam2_1_convnext_l.py`` (+ CLIP
ConvNeXt-L), with words and references ``configs/open_vocab/everything_fused_sam2_1_convnext_l.py``;
weights under $SAMANTICS_WEIGHTS; a relative path that does not exist
from the current folder is taken from the project folder); ``key=value`` overrides apply to it, and
``train.init_checkpoint`` (when set) is loaded into it, checked (``samantics_d2.checkpoint``).
Detections whose mask is empty at the image size are dropped (``model.drop_empty_masks=True``, set
before your overrides: ``model.drop_empty_masks=False`` keeps them, as the evaluation configs do).
To try it without weights, with the demo's tiny models on the synthetic shapes, see the README.
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
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_util
from tqdm import tqdm

from samantics_d2.checkpoint import load_init_checkpoint
from samantics_d2.config import check_weights_available, load_config, resolve_config_file
from samantics_d2.d2 import BoxMode, DatasetCatalog, LazyCall, MetadataCatalog, instantiate, setup_logger
from samantics_d2.data.io import read_image
from samantics_d2.data.classification import IMAGE_EXTENSIONS
from samantics_d2.data.vocabularies import get_vocabulary, parse_class_list
from samantics_d2.modeling.weights import module_fingerprint
from samantics_d2.references import ReferenceBank, build_reference_bank
from samantics_d2.utils.io import atomic_path, read_json
from samantics_d2.utils.visualization import draw_instances

logger = logging.getLogger("samantics_d2.tools.segment")
DEFAULT_CONFIG = "configs/common/training_free.py"
WORDS_CONFIG = "configs/open_vocab/everything_sam2_1_convnext_l.py"
FUSED_CONFIG = "configs/open_vocab/everything_fused_sam2_1_convnext_l.py"
MASK_SUFFIX = "_mask.png"
PREDICTION_FORMAT = 2  # version of predictions/<file>.json (1: a bare list of results, no fingerprint)


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


def _registered(name: str) -> bool:
    return not os.path.exists(name) and name in DatasetCatalog.list()


def reference_source(references: str, image_root: str | None, output_dir: str) -> dict:
    """The :func:`build_reference_bank` arguments of ``--references``: a registered dataset (e.g. the
    shapes reference set ``shapes_train_ref5_seed0``), a COCO json, or a folder (converted to a json)."""
    if _registered(references):
        logger.info("References: the registered dataset %s (%s).", references,
                    MetadataCatalog.get(references).get("json_file", "no json file"))
        return {"references": references}
    if os.path.isdir(references):
        return {"references": folder_to_coco(references, os.path.join(output_dir, "references.json")),
                "image_root": references}
    if os.path.isfile(references):
        if image_root is None:
            image_root = os.path.dirname(os.path.abspath(references))
            logger.info("No --image-root: reference file names are taken relative to %s.", image_root)
        return {"references": references, "image_root": image_root}
    raise FileNotFoundError(f"--references {references} is neither a COCO json file, a folder, nor a "
                            "registered dataset (e.g. shapes_train_ref5_seed0).")


def load_references(source: dict, references: str) -> ReferenceBank:
    """The references of ``--references`` (``source``: :func:`reference_source`) resolved, with at least
    one instance."""
    bank = build_reference_bank(**source)
    if not any(d["annotations"] for d in bank.dataset_dicts):
        raise ValueError(f"--references {references} holds no annotated instance: nothing to build prototypes from.")
    return bank


def label_space(words: list[str], reference_classes: list[str]) -> list[str]:
    """The classes of a run with words and references: the words' classes, then the reference classes
    whose names are not among them (a reference class and a word class are one class when their
    names are equal)."""
    return list(words) + [name for name in reference_classes if name not in words]


def use_words(cfg, *, with_references: bool, config_file: str) -> None:
    """Check that the config's model labels by words (``model.open_vocab``); without references its
    semantic encoder (DINOv2, for image prototypes) is not built."""
    if cfg.model.get("open_vocab") is None:
        raise ValueError(f"--classes/--vocabulary need a config whose model has an open_vocab classifier (CLIP); "
                         f"{config_file} has none. Use {WORDS_CONFIG} or {FUSED_CONFIG}.")
    if not with_references:
        cfg.model.reference_bank = None
        cfg.model.semantic_encoder = None
    elif cfg.model.get("semantic_encoder") is None:
        raise ValueError(f"--references with words need a config with a semantic_encoder (the image prototypes' "
                         f"encoder, DINOv2); {config_file} has none. Use {FUSED_CONFIG}.")


def image_id_of(file_name: str) -> int:
    """A stable COCO image id for ``file_name`` (relative to --images): a 53-bit hash of the name
    (exact in JSON readers that use doubles; two names share one with odds ~n^2 / 2^54)."""
    return int(hashlib.sha256(file_name.encode("utf-8")).hexdigest()[:14], 16) & ((1 << 53) - 1)


def _digest(obj) -> str:
    def named(o):  # LazyCall targets: by name, never by memory address
        return f"{getattr(o, '__module__', '')}.{getattr(o, '__qualname__', type(o).__name__)}"

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=named).encode()).hexdigest()


def references_key(references: list[dict], classes: list[str]) -> str:
    """Identifies the references: their annotations (masks included), class names and image files."""
    files = sorted({d["file_name"] for d in references})
    stats = [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] if os.path.isfile(f) else [f] for f in files]
    return _digest([references, classes, stats])


def _segment_image(model, image: np.ndarray, image_id: int, classes: list[str], score_threshold: float):
    """COCO results of one image, and its overlay."""
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
    keep = np.asarray(scores) >= score_threshold
    overlay = draw_instances(image, masks=masks[keep], boxes=boxes[keep], classes=np.asarray(labels)[keep],
                             scores=np.asarray(scores)[keep], class_names=classes)
    return results, overlay


def _finished(pred_file: str, fingerprint: str):
    """The record of ``pred_file`` if an earlier run finished it with the same fingerprint, else None."""
    if not os.path.exists(pred_file):
        return None
    try:
        record = read_json(pred_file, what="a prediction record of tools/segment.py")
    except ValueError as e:  # not expected (writes are atomic); segment the image again
        logger.warning("%s; segmenting its image again.", e)
        return None
    if not isinstance(record, dict) or record.get("format") != PREDICTION_FORMAT:
        return None
    return record if record.get("fingerprint") == fingerprint else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--references", default=None,
                        help="COCO json, <class>/<image> + mask folder, or a registered reference set")
    word_options = parser.add_mutually_exclusive_group()
    word_options.add_argument("--classes", default=None,
                       help='classes named by words: "cat,dog/puppy,traffic light" (/ separates synonyms)')
    word_options.add_argument("--vocabulary", default=None,
                       help="a vocabulary file (one class per line) or name (coco, lvis_v1, shapes)")
    parser.add_argument("--image-root", default=None, help="folder of the reference json's file names")
    parser.add_argument("--images", required=True,
                        help="folder of images to segment, or a registered dataset (its images)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--config-file", default=None,
                        help=f"training-free config (default {DEFAULT_CONFIG}; with words {WORDS_CONFIG}, with "
                             f"words and references {FUSED_CONFIG})")
    parser.add_argument("--shots", type=int, default=None, help="references per class to use (default: all)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="minimum score drawn on the overlays")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.references is None and args.classes is None and args.vocabulary is None:
        parser.error("give --references (annotated examples), --classes / --vocabulary (words), or both")
    try:
        words = parse_class_list(args.classes) if args.classes is not None else (
            get_vocabulary(args.vocabulary) if args.vocabulary is not None else None)
    except (KeyError, ValueError, FileNotFoundError) as e:
        parser.error(str(e.args[0] if isinstance(e, KeyError) else e))
    if args.config_file is None:
        args.config_file = DEFAULT_CONFIG if words is None else (WORDS_CONFIG if args.references is None else FUSED_CONFIG)
    os.makedirs(args.output, exist_ok=True)
    setup_logger(args.output, name="samantics_d2")

    if _registered(args.images):  # e.g. shapes_val: its image folder (generated on first use)
        DatasetCatalog.get(args.images)
        args.images = MetadataCatalog.get(args.images).image_root
        logger.info("Images: %s", args.images)
    if not os.path.isdir(args.images):
        parser.error(f"--images {args.images} is neither a folder nor a registered dataset (e.g. shapes_val)")
    image_files = sorted(f for f in os.listdir(args.images)
                         if _is_image(f) and os.path.isfile(os.path.join(args.images, f)))
    if not image_files:
        parser.error(f"--images {args.images} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    ids: dict[int, str] = {}
    for file in image_files:
        if ids.setdefault(image_id_of(file), file) != file:  # never silently merge two images' results
            raise ValueError(f"{file} and {ids[image_id_of(file)]} in {args.images} hash to the same image id; "
                             "rename one of them.")
    config_file = resolve_config_file(args.config_file, example=DEFAULT_CONFIG)

    cfg = load_config(config_file, args.opts, user_tool=True)
    if words is not None:
        use_words(cfg, with_references=args.references is not None, config_file=config_file)
    check_weights_available(cfg, config_file)
    classes, refs_key = list(words or []), None  # the label space
    if args.references is not None:
        source = reference_source(args.references, args.image_root, args.output)
        bank = load_references(source, args.references)
        refs_key = references_key(bank.dataset_dicts, bank.reference_classes)
        classes = label_space(classes, bank.reference_classes)
        if words is not None:
            source["class_names"] = classes
        cfg.model.reference_bank = LazyCall(build_reference_bank)(
            **source, shots=args.shots,
            cache_path=os.path.join(args.output, f"memory_bank-{refs_key[:12]}.safetensors"),
        )
    if words is not None:  # the text prototypes of the label space, built with the model
        cfg.model.open_vocab.text_prototypes.class_names = classes
        cfg.model.open_vocab.text_prototypes.name = "segment"
        logger.info("Classes by words%s: %s", " and references" if args.references else "", ", ".join(classes))
    seed = cfg.train.get("seed", -1)
    torch.manual_seed(seed if seed >= 0 else 0)  # randomly initialised (tiny) encoders are the same in every run
    model = instantiate(cfg.model)
    if cfg.train.get("init_checkpoint"):  # e.g. a SAM trained with train_net.py
        load_init_checkpoint(model, cfg.train.init_checkpoint, training=False)
    run_key = _digest([OmegaConf.to_container(cfg.model, resolve=False), module_fingerprint(model), refs_key,
                       args.shots, args.score_threshold])
    model.to(cfg.train.device).eval()
    model.prepare_references()  # the memory bank with the loaded weights, before the first image

    pred_dir, overlay_dir = os.path.join(args.output, "predictions"), os.path.join(args.output, "overlays")
    for folder in (pred_dir, overlay_dir):  # temporary files of a run that was killed while writing
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
    done, resumed, images, all_results, skipped = 0, 0, [], [], []
    for file in tqdm(image_files, desc="segment", unit="image"):
        path = os.path.join(args.images, file)
        image_id = image_id_of(file)
        stat = os.stat(path)
        fingerprint = _digest([file, stat.st_size, stat.st_mtime_ns, run_key])
        pred_file, overlay_file = os.path.join(pred_dir, file + ".json"), os.path.join(overlay_dir, file + ".png")
        record = _finished(pred_file, fingerprint)
        if record is not None and os.path.exists(overlay_file):
            resumed += 1
        else:
            try:
                image = read_image(path)
            except (OSError, ValueError) as e:
                logger.error("Skipping %s: %s", path, e)
                skipped.append({"file_name": file, "reason": str(e)})
                for stale in (pred_file, overlay_file):  # outputs of an earlier, readable version of the file
                    if os.path.exists(stale):
                        os.remove(stale)
                continue
            results, overlay = _segment_image(model, image, image_id, classes, args.score_threshold)
            with atomic_path(overlay_file) as tmp:
                Image.fromarray(overlay).save(tmp, format="PNG")
            record = {"format": PREDICTION_FORMAT, "fingerprint": fingerprint, "file_name": file, "image_id": image_id,
                      "height": int(image.shape[0]), "width": int(image.shape[1]), "results": results}
            _write_json(pred_file, record)  # after the overlay: its presence marks the image as done
            done += 1
        images.append({"id": image_id, "file_name": file, "height": record["height"], "width": record["width"]})
        all_results.extend(record["results"])

    _write_json(os.path.join(args.output, "coco_results.json"), all_results)
    _write_json(os.path.join(args.output, "index.json"), {
        "images": images,
        "categories": [{"id": i, "name": n} for i, n in enumerate(classes, start=1)],
        "skipped": skipped,
    })
    logger.info("Segmented %d image(s) (%d resumed from earlier runs): %d instances in %s.", done, resumed,
                len(all_results), os.path.join(args.output, "coco_results.json"))
    if skipped:
        logger.error("%d of %d image(s) could not be read and were skipped (listed under 'skipped' in %s): %s.",
                     len(skipped), len(image_files), os.path.join(args.output, "index.json"),
                     ", ".join(s["file_name"] for s in skipped))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
