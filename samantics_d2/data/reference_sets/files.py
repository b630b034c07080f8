"""Writing a reference set: its COCO json (atomically, with the selection in ``info`` and a sidecar)
and contact sheets of the picks for a visual check."""
from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Union

from pycocotools import mask as mask_util

from ...utils.io import atomic_path
from .coco import _annotation_rle
from .selection import _INFO_KEY, ReferenceSet

__all__ = ["sidecar_path", "write_contact_sheets", "write_reference_json"]

logger = logging.getLogger(__name__)

def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    with atomic_path(str(path)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def sidecar_path(output_path: Union[str, os.PathLike]) -> Path:
    """``REF.json`` -> ``REF.selection.json``."""
    path = Path(output_path)
    return path.with_name(f"{path.stem}.selection.json")


def write_reference_json(
    reference_set: ReferenceSet, output_path: Union[str, os.PathLike], *, sidecar: bool = True
) -> Path:
    """Write a reference set as a COCO json (:meth:`ReferenceSet.to_coco_dict`), atomically.

    With ``sidecar``, :meth:`ReferenceSet.summary` is also written to ``<stem>.selection.json``.
    The bytes depend only on the reference set, so the same selection gives the same file.

    Returns:
        The json's path.
    """
    path = Path(output_path)
    coco = reference_set.to_coco_dict()
    _write_atomic(path, json.dumps(coco, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    if sidecar:
        text = json.dumps(coco["info"][_INFO_KEY], indent=2, ensure_ascii=False) + "\n"
        _write_atomic(sidecar_path(path), text.encode("utf-8"))
    logger.info(
        "Wrote %d references of %d categories to %s.",
        len(coco["annotations"]),
        len(reference_set.category_ids),
        path,
    )
    return path


def write_contact_sheets(
    reference_set: ReferenceSet,
    output_dir: Union[str, os.PathLike],
    *,
    image_root: Union[str, os.PathLike],
    thumb_size: int = 160,
    columns: int = 5,
    context: float = 0.2,
    progress: bool = False,
) -> list[Path]:
    """One PNG per category: its references cropped (``context`` of the box size added on each
    side), their mask outline drawn in red, in pick order (largest first).

    Args:
        reference_set: the references.
        output_dir: where ``<category id>_<name>.png`` files go.
        image_root: the folder the images' ``file_name`` are relative to.
        thumb_size: side in pixels of each cell.
        columns: cells per row.
        context: margin around the box, as a share of its width / height.
        progress: show a tqdm bar over the categories.

    Returns:
        The paths written (categories without any reference get no sheet).
    """
    from PIL import Image, ImageDraw

    from ..io import read_image

    output_dir = Path(output_dir)
    names = reference_set.category_names
    written = []
    cats = [c for c in reference_set.category_ids if reference_set.picks[c]]
    if progress:
        from tqdm import tqdm

        cats = tqdm(cats, desc="contact sheets", unit="category")
    for c in cats:
        ann_ids = reference_set.picks[c]
        rows, cols = math.ceil(len(ann_ids) / columns), min(columns, len(ann_ids))
        caption = 14
        sheet = Image.new("RGB", (cols * thumb_size, rows * (thumb_size + caption)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for i, ann_id in enumerate(ann_ids):
            ann = reference_set.annotations[ann_id]
            info = reference_set.images[int(ann["image_id"])]
            image = read_image(os.path.join(os.fspath(image_root), info["file_name"]))
            h, w = image.shape[:2]
            mask = mask_util.decode(_annotation_rle(ann, int(info["height"]), int(info["width"]))).astype(bool)
            if mask.shape != (h, w):
                raise ValueError(
                    f"Image {info['file_name']!r} is {w}x{h} but its json entry says "
                    f"{info['width']}x{info['height']}; the annotations do not match the image files."
                )
            outline = mask.copy()
            interior = mask.copy()
            interior[1:, :] &= mask[:-1, :]
            interior[:-1, :] &= mask[1:, :]
            interior[:, 1:] &= mask[:, :-1]
            interior[:, :-1] &= mask[:, 1:]
            outline &= ~interior
            image = image.copy()
            image[outline] = (255, 0, 0)
            bx, by, bw, bh = ann["bbox"]
            x0, y0 = max(0, int(bx - context * bw)), max(0, int(by - context * bh))
            x1 = min(w, int(math.ceil(bx + bw + context * bw)))
            y1 = min(h, int(math.ceil(by + bh + context * bh)))
            crop = Image.fromarray(image[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)])
            scale = thumb_size / max(crop.width, crop.height)  # small instances are enlarged too
            size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
            crop = crop.resize(size, Image.BILINEAR)
            col, row = i % columns, i // columns
            left, top = col * thumb_size, row * (thumb_size + caption)
            sheet.paste(crop, (left + (thumb_size - crop.width) // 2, top + (thumb_size - crop.height) // 2))
            label = f"#{i} id {ann_id} area {ann.get('area', bw * bh):.0f}"
            draw.text((left + 2, top + thumb_size), label, fill=(0, 0, 0))
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in names[c])
        path = output_dir / f"{c}_{safe}.png"
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        _write_atomic(path, buffer.getvalue())
        written.append(path)
    logger.info("Wrote %d contact sheets to %s.", len(written), output_dir)
    return written
