"""Drawing predictions on images (overlay PNGs)."""
from __future__ import annotations

import colorsys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["class_colour", "draw_instances"]


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A distinct, stable RGB colour per class id (golden-ratio hue steps)."""
    hue = (class_id * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(
    image: np.ndarray,
    *,
    masks: np.ndarray,
    boxes: np.ndarray,
    classes: Sequence[int],
    scores: Sequence[float],
    class_names: Sequence[str],
    alpha: float = 0.45,
    min_side: int = 512,
) -> np.ndarray:
    """Overlay instances on an image.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        masks: ``[N, H, W]`` bool.
        boxes: ``[N, 4]`` XYXY pixels.
        classes, scores: ``N`` class ids (into ``class_names``) and scores.
        min_side: images whose shorter side is below it are enlarged by an integer factor (pixel
            repetition) first, so that the labels stay readable on small images (0: never).

    Returns:
        ``[s * H, s * W, 3]`` uint8 RGB (``s`` the enlargement factor, 1 for images of at least
        ``min_side``): masks blended in their class colour, boxes, ``"name score"`` labels.
    """
    scale = max(1, -(-min_side // max(1, min(image.shape[:2])))) if min_side > 0 else 1
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
        masks = np.asarray(masks).repeat(scale, axis=1).repeat(scale, axis=2)
        boxes = np.asarray(boxes, dtype=np.float32) * scale
    out = image.astype(np.float32).copy()
    colours = np.array([class_colour(int(c)) for c in classes], dtype=np.float32).reshape(-1, 3)
    # Draw the lowest scores first so the best masks end up on top.
    order = np.argsort(np.asarray(scores, dtype=np.float32))
    for i in order:
        m = masks[i]
        out[m] = (1 - alpha) * out[m] + alpha * colours[i]
    canvas = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for i in order:
        colour = tuple(int(v) for v in colours[i])
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        label = f"{class_names[int(classes[i])]} {float(scores[i]):.2f}"
        tx, ty = x0 + 2, max(0.0, y0 - 11)
        draw.rectangle(draw.textbbox((tx, ty), label), fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=colour)
    return np.asarray(canvas)
