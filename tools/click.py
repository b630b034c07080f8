#!/usr/bin/env python
"""One image, one or more clicks: up to K labelled masks, part to whole, as a PNG strip and JSON.

    python tools/click.py --image IMG --point 120,80 [--point 30,40,0] [--box x0,y0,x1,y1] --output OUT
    python tools/click.py --image IMG --point 120,80 --config-file configs/training_free/<x>.py [key=value ...]
    python tools/click.py --image IMG --point 120,80 --tag sam2.1_hiera_t [--pretrained]

``--point x,y[,label]`` (image pixels; label 1 foreground, the default, or 0 background) may be
repeated; ``--box`` adds a box prompt. The model is

- ``--config-file`` (default ``configs/training_free/shapes_tiny_random.py``): a training-free
  LazyConfig; its SAM encoder + prompt decoder give the masks, its semantic encoder and reference
  prototypes (memory bank, computed on first use and stored) the labels; ``train.init_checkpoint``
  is loaded when set (e.g. the demo's trained tiny SAM: ``--config-file
  configs/training_free/shapes_tiny.py train.init_checkpoint=output/demo/tiny_sam/model_final.pth``);
- or ``--tag``: the SAM / HQ-SAM / SAM 2 of a weight tag, masks without labels (``--size tiny``
  for the tiny random variant, ``--pretrained`` for the official weights under $SAMANTICS_WEIGHTS).

The default config runs without any weight file: tiny RANDOMLY INITIALISED SAM and DINOv2, whose
masks and labels are meaningless (the JSON's ``random_weights`` is then true and the strip says so).

Written to ``--output`` (atomically): ``<image stem>_click.png``, one panel per granularity (small
to large) with the mask, its label and score, predicted IoU and the mask it is part of, the clicks
drawn as dots (green foreground, red background); ``<image stem>_click.json``: the prompts and, per
mask, its RLE (COCO, on the original image), area, XYWH box, predicted IoU, stability, labels and
part-of relation.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util

from samantics_d2.config import resolve_config_file
from samantics_d2.d2 import setup_logger
from samantics_d2.predictor import ClickPrediction, SamanticsPredictor
from samantics_d2.utils.image import read_image
from samantics_d2.utils.io import atomic_path
from samantics_d2.utils.visualization import draw_instances

logger = logging.getLogger("samantics_d2.tools.click")
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/training_free/shapes_tiny_random.py"
RANDOM_NOTE = "random weights: masks and labels are meaningless (a smoke run of the pipeline)"
PANEL_NOTE = "RANDOM WEIGHTS: meaningless output"
PANEL_MIN_SIDE = 256  # small images are enlarged for the strip, so that labels stay readable


def parse_point(text: str) -> tuple[float, float, int]:
    """``"x,y"`` or ``"x,y,label"`` -> ``(x, y, label)``."""
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3) or (len(values) == 3 and values[2] not in (0.0, 1.0)):
        raise argparse.ArgumentTypeError(f"--point {text!r}: expected x,y or x,y,label with label 1 (foreground) or 0 "
                                         "(background), e.g. --point 120,80 or --point 30,40,0")
    return values[0], values[1], int(values[2]) if len(values) == 3 else 1


def parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or values[2] <= values[0] or values[3] <= values[1]:
        raise argparse.ArgumentTypeError(f"--box {text!r}: expected x0,y0,x1,y1 in image pixels with x1 > x0 and y1 > y0")
    return tuple(values)


def _uses_random_weights(config_file: str, overrides: Sequence[str]) -> bool:
    """Whether the config's SAM encoder gets no trained weights (no pretrained tag, no init checkpoint)."""
    from samantics_d2.d2 import LazyConfig

    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), list(overrides))
    pretrained = bool(cfg.model.proposer.backbone.get("pretrained", False))
    return not pretrained and not cfg.train.get("init_checkpoint")


def prediction_record(out: ClickPrediction, *, points, labels, box) -> list[dict]:
    """The JSON record of every mask of ``out`` (RLE on the original image, scores, labels, part-of)."""
    masks = out.masks
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))) if len(out) else []
    records = []
    for k, rle in enumerate(rles):
        records.append({
            "rank": k,  # small to large
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_util.area(rle)),
            "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "predicted_iou": float(out.iou_pred[k]),
            "stability": float(out.stability[k]),
            "labels": {name: {"class": lab.names[k], "class_id": int(lab.classes[k]), "score": float(lab.scores[k])}
                       for name, lab in out.labels.items()},
            "part_of": [int(j) for j in np.nonzero(out.part_of[k])[0]],
            "parent": int(out.parents[k]),
        })
    return records


def draw_strip(image: np.ndarray, out: ClickPrediction, *, points, labels, note: Optional[str] = None) -> np.ndarray:
    """One panel per mask (small to large) side by side: mask, label + score, IoU, parent, clicks."""
    labeller = next(iter(out.labels.values()), None)
    panels = []
    for k in range(len(out)):
        if labeller is not None and labeller.classes[k] >= 0:
            names, cls, score = [labeller.names[k]], labeller.classes[k], labeller.scores[k]
        else:
            names, cls, score = ["mask"], 0, out.iou_pred[k]
        ys, xs = np.nonzero(out.masks[k])
        box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0]
        panel = draw_instances(image, masks=out.masks[k][None], boxes=np.asarray([box], dtype=np.float32),
                               classes=[int(cls)], scores=[float(score)], class_names={int(cls): names[0]},
                               min_side=PANEL_MIN_SIDE)
        scale = panel.shape[0] // image.shape[0]
        canvas = Image.fromarray(panel)
        draw = ImageDraw.Draw(canvas)
        for (x, y), label in zip(points, labels):
            r = max(4, 2 * scale)
            draw.ellipse([x * scale - r, y * scale - r, x * scale + r, y * scale + r],
                         fill=(0, 220, 0) if label == 1 else (230, 0, 0), outline=(255, 255, 255))
        parent = int(out.parents[k])
        title = f"{k + 1}/{len(out)}  iou {out.iou_pred[k]:.2f}  stab {out.stability[k]:.2f}"
        title += f"  part of {parent + 1}" if parent >= 0 else "  whole"
        header = Image.new("RGB", (canvas.width, 14 if note is None else 28), (0, 0, 0))
        header_draw = ImageDraw.Draw(header)
        header_draw.text((3, 1), title, fill=(255, 255, 255))
        if note is not None:
            header_draw.text((3, 14), note, fill=(255, 120, 120))
        full = Image.new("RGB", (canvas.width, canvas.height + header.height))
        full.paste(header, (0, 0))
        full.paste(canvas, (0, header.height))
        panels.append(np.asarray(full))
    if not panels:
        return image
    gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--point", type=parse_point, action="append", default=[], metavar="X,Y[,LABEL]",
                        help="a click in image pixels (label 1 foreground, default; 0 background); repeat for more")
    parser.add_argument("--box", type=parse_box, default=None, metavar="X0,Y0,X1,Y1", help="a box prompt in image pixels")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--config-file", default=None, help=f"training-free config (default {DEFAULT_CONFIG})")
    parser.add_argument("--tag", default=None, help="a SAM / HQ-SAM / SAM 2 weight tag instead of a config (no labels)")
    parser.add_argument("--size", default="full", choices=("full", "tiny"), help="with --tag: tiny random variant")
    parser.add_argument("--pretrained", action="store_true", help="with --tag: load the official weights")
    parser.add_argument("--max-masks", type=int, default=6, help="K, masks per click (default 6)")
    parser.add_argument("--single", action="store_true",
                        help="the decoder's multimask outputs as they are (SamPredictor's), not the multi-granularity set")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    args = parser.parse_args(argv)
    if not args.point and args.box is None:
        parser.error("give at least one --point x,y[,label] or a --box x0,y0,x1,y1")
    if args.tag is not None and (args.config_file is not None or args.opts):
        parser.error("--tag builds the model from a weight tag; do not combine it with --config-file or overrides")
    os.makedirs(args.output, exist_ok=True)
    setup_logger(args.output, name="samantics_d2")

    import torch

    try:
        image = read_image(args.image)
    except (OSError, ValueError) as e:
        parser.error(f"--image {args.image}: {e}")
    height, width = image.shape[:2]
    outside = [p for p in args.point if not (0 <= p[0] < width and 0 <= p[1] < height)]
    if outside:
        parser.error(f"--point {outside[0][0]:g},{outside[0][1]:g} lies outside the {width}x{height} image")

    granularity = {"max_masks": args.max_masks}
    if args.tag is not None:
        torch.manual_seed(0)  # the tiny random variant is the same in every run
        predictor = SamanticsPredictor.from_tag(args.tag, size=args.size, pretrained=args.pretrained, **granularity)
        random_weights, model_name = not args.pretrained, f"{args.tag} ({args.size})"
    else:
        config_file = resolve_config_file(args.config_file or DEFAULT_CONFIG, example=DEFAULT_CONFIG)
        predictor = SamanticsPredictor.from_config(config_file, args.opts, **granularity)
        random_weights, model_name = _uses_random_weights(config_file, args.opts), os.path.relpath(config_file, PROJECT_ROOT)
    if random_weights:
        logger.warning("%s uses %s.", model_name, RANDOM_NOTE)

    points = [(x, y) for x, y, _ in args.point]
    labels = [label for _, _, label in args.point]
    predictor.set_image(image)
    out = predictor.predict(points=np.asarray(points, dtype=np.float32).reshape(-1, 2), point_labels=labels,
                            box=args.box, multi_granularity=not args.single)
    stem = os.path.splitext(os.path.basename(args.image))[0]
    png, js = os.path.join(args.output, f"{stem}_click.png"), os.path.join(args.output, f"{stem}_click.json")
    strip = draw_strip(image, out, points=points, labels=labels, note=PANEL_NOTE if random_weights else None)
    with atomic_path(png) as tmp:
        Image.fromarray(strip).save(tmp, format="PNG")
    record = {
        "image": args.image, "height": height, "width": width, "model": model_name, "random_weights": random_weights,
        "note": RANDOM_NOTE if random_weights else None,
        "prompts": {"points": [list(p) for p in points], "point_labels": labels, "box": list(args.box) if args.box else None},
        "multi_granularity": not args.single,
        "masks": prediction_record(out, points=points, labels=labels, box=args.box),
    }
    with atomic_path(js) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    logger.info("%d mask(s) for %d click(s): %s and %s.", len(out), len(points), png, js)
    for k, m in enumerate(record["masks"]):
        label = ", ".join(f"{n}: {v['class'] or '-'} {v['score']:.2f}" for n, v in m["labels"].items()) or "unlabelled"
        logger.info("  %d. area %d px, IoU %.2f, stability %.2f, %s, part of %s", k + 1, m["area"], m["predicted_iou"],
                    m["stability"], label, [j + 1 for j in m["part_of"]] or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
