"""A synthetic COCO-format instance dataset of coloured shapes, for tests, demos and smoke runs.

Each category differs from the others in shape and in colour or texture, so that even a tiny
untrained encoder can tell them apart. Images have 2-5 non-overlapping instances (so every polygon
is exactly its visible mask) on varied backgrounds (gradients, noise, stripes), with per-instance
jitter of size, position, rotation and shade. Everything follows from the seed.

Registered datasets (generated on first load, never at import):

===================  =================================================
``shapes_train``     64 images of 128x128, all 8 classes
``shapes_val``       16 images of 128x128, all 8 classes
``shapes_test``      64 images of 128x128, all 8 classes (benchmarks: more instances per class)
``shapes_train_base``  ``shapes_train`` restricted to the base classes
``shapes_val_base``    ``shapes_val`` restricted to the base classes
``shapes_val_novel``   ``shapes_val`` restricted to the novel classes
``shapes_parts_train``  32 images of 128x128: wholes carrying an inner part (below)
``shapes_parts_val``    16 images of 128x128: wholes carrying an inner part
===================  =================================================

Shapes with parts (``shapes_parts_*``): 1-3 larger shapes per image (radius 16-26 % of the side) of the
six classes with a roomy interior (:data:`SHAPES_PART_WHOLE_CLASSES`), each carrying one inner part of
a part class (:data:`SHAPES_PART_CATEGORIES`: a white disc or a black square, category ids 9 and 10),
drawn on top of it. The part is 0.6 times the whole's inscribed radius, its centre moved at most 0.15
times that radius from the whole's, so it lies inside the whole with a margin, and the whole's centre
point (the click rule of :mod:`samantics_d2.utils.clicks`) falls on the part: one click, two right
answers. Both are annotated: the whole's segmentation is its full outline (part included), the part's
its own outline; every annotation has its ``id``, and a part has ``part_of``: the ``id`` of its whole
(wholes have no ``part_of``). The registered loaders keep ``id`` and ``part_of`` in the dataset dicts;
the metadata has ``thing_classes`` (the six whole classes then the two part classes, by category id),
``whole_classes`` and ``part_classes``.

A restricted dataset keeps every image and only the annotations and categories of its split, so
its ``thing_classes`` are the split's classes. The files are cached under
``$SAMANTICS_CACHE/shapes/<part>-<hash of the generation parameters>/`` (default cache
``~/.cache/samantics_d2``), built in a temporary folder and renamed into place, so concurrent
processes (DDP ranks) never see half a dataset.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from ..d2 import DatasetCatalog, MetadataCatalog, load_coco_json
from .builtin import set_paths_if_missing

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_DATASETS",
    "SHAPES_PARTS",
    "SHAPES_PART_CATEGORIES",
    "SHAPES_PART_WHOLE_CLASSES",
    "SHAPES_SPLITS",
    "ensure_shapes",
    "generate_shapes",
    "register_all_shapes",
    "register_shapes",
    "shapes_json_file",
    "write_split_json",
]

from ..utils.io import atomic_path, cache_root

logger = logging.getLogger(__name__)

# Bump when the drawing code changes, so cached datasets are regenerated.
_GENERATOR_VERSION = 1

# (COCO category id, name, shape, RGB colour, texture)
SHAPES_CATEGORIES: tuple[tuple[int, str, str, tuple[int, int, int], str], ...] = (
    (1, "red circle", "circle", (220, 40, 40), "solid"),
    (2, "green square", "square", (40, 190, 60), "solid"),
    (3, "blue triangle", "triangle", (40, 80, 230), "solid"),
    (4, "yellow star", "star", (240, 220, 40), "solid"),
    (5, "orange cross", "cross", (250, 140, 20), "solid"),
    (6, "magenta hexagon", "hexagon", (220, 40, 200), "stripes"),
    (7, "cyan diamond", "diamond", (40, 220, 230), "checker"),
    (8, "purple pentagon", "pentagon", (140, 60, 200), "dots"),
)
SHAPES_CLASSES = [c[1] for c in SHAPES_CATEGORIES]

# The part classes of the shapes-with-parts datasets (same fields), ids after the whole classes'.
SHAPES_PART_CATEGORIES: tuple[tuple[int, str, str, tuple[int, int, int], str], ...] = (
    (9, "white disc", "circle", (245, 245, 245), "solid"),
    (10, "black square", "square", (25, 25, 25), "solid"),
)
# The whole classes of shapes with parts: those whose inscribed radius is at least half the outer
# one (the star's and the cross's interiors are too thin to hold a part).
SHAPES_PART_WHOLE_CLASSES: tuple[str, ...] = (
    "red circle", "green square", "blue triangle", "magenta hexagon", "cyan diamond", "purple pentagon",
)  # fmt: skip
# A part's outer radius and largest offset from its whole's centre, as fractions of the whole's
# inscribed radius: 0.6 + 0.15 < 1 keeps it inside with a margin (>= 2.5 px at the sizes drawn).
_PART_RADIUS, _PART_OFFSET = 0.6, 0.15

SHAPES_SPLITS: dict[str, list[str]] = {
    "base": ["red circle", "green square", "blue triangle", "yellow star", "orange cross"],
    "novel": ["magenta hexagon", "cyan diamond", "purple pentagon"],
}

# Generation parameters of each cached part.
SHAPES_PARTS: dict[str, dict] = {
    "shapes_train": {"num_images": 64, "image_size": 128, "seed": 0},
    "shapes_val": {"num_images": 16, "image_size": 128, "seed": 1},
    "shapes_test": {"num_images": 64, "image_size": 128, "seed": 2},
    "shapes_parts_train": {
        "num_images": 32, "image_size": 128, "seed": 3, "instances_per_image": [1, 3], "radius_range": [0.16, 0.26],
        "class_names": list(SHAPES_PART_WHOLE_CLASSES), "part_classes": [c[1] for c in SHAPES_PART_CATEGORIES],
    },
    "shapes_parts_val": {
        "num_images": 16, "image_size": 128, "seed": 4, "instances_per_image": [1, 3], "radius_range": [0.16, 0.26],
        "class_names": list(SHAPES_PART_WHOLE_CLASSES), "part_classes": [c[1] for c in SHAPES_PART_CATEGORIES],
    },
}
# Registered name -> (part, split or None for all classes).
SHAPES_DATASETS: dict[str, tuple[str, Optional[str]]] = {
    "shapes_train": ("shapes_train", None),
    "shapes_val": ("shapes_val", None),
    "shapes_test": ("shapes_test", None),
    "shapes_train_base": ("shapes_train", "base"),
    "shapes_val_base": ("shapes_val", "base"),
    "shapes_val_novel": ("shapes_val", "novel"),
    "shapes_parts_train": ("shapes_parts_train", None),
    "shapes_parts_val": ("shapes_parts_val", None),
}


# ---------------------------------------------------------------- drawing
def _shape_outline(shape: str, radius: float, angle: float) -> np.ndarray:
    """Vertices ``[K, 2]`` (x, y) of a shape centred at the origin, rotated by ``angle`` radians."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        points = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape in ("triangle", "square", "pentagon", "hexagon"):
        k = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[shape]
        t = -np.pi / 2 + np.pi / k * (shape == "square") + 2 * np.pi * np.arange(k) / k  # a vertex (or side) on top
        points = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "star":
        t = -np.pi / 2 + np.pi * np.arange(10) / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif shape == "diamond":  # an elongated rhombus, unlike a rotated square
        points = np.array([[0.0, -1.0], [0.6, 0.0], [0.0, 1.0], [-0.6, 0.0]])
    elif shape == "cross":
        a = 0.35
        points = np.array(
            [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]]
        )
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {sorted({c[2] for c in SHAPES_CATEGORIES})}.")
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return radius * points @ rotation.T


def _inscribed_radius(shape: str) -> float:
    """The radius of the largest circle centred at the origin inside ``shape`` of outer radius 1."""
    vertices = _shape_outline(shape, 1.0, 0.0)
    edges = np.roll(vertices, -1, axis=0) - vertices
    t = np.clip(-(vertices * edges).sum(1) / (edges * edges).sum(1), 0.0, 1.0)  # closest point of each edge
    return float(np.linalg.norm(vertices + t[:, None] * edges, axis=1).min())


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour, so that the saturated shapes stand out."""
    return rng.uniform(60, 190) + rng.uniform(-25, 25, size=3)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``[H, W, 3]`` float background: a gradient, noise or stripes."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    kind = rng.choice(["gradient", "noise", "stripes"])
    first = _muted_colour(rng)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
        return first * (1 - t[..., None]) + _muted_colour(rng) * t[..., None]
    if kind == "noise":
        return first + rng.normal(0, 14, size=(height, width, 3))
    angle, period = rng.uniform(0, np.pi), rng.uniform(8, 16)
    stripe = (np.floor((xx * math.cos(angle) + yy * math.sin(angle)) / (period / 2)) % 2)[..., None]
    return first + stripe * rng.choice([-1, 1]) * 30


def _texture(rng: np.random.Generator, texture: str, colour: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[H, W, 3]`` float fill of one instance: its colour, patterned with a darker shade."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    if texture == "solid":
        pattern = np.zeros((height, width))
    elif texture == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(5, 8)
        pattern = np.floor((xx * math.cos(angle) + yy * math.sin(angle)) / (period / 2)) % 2
    elif texture == "checker":
        cell = rng.uniform(3, 5)
        pattern = (np.floor(xx / cell) + np.floor(yy / cell)) % 2
    elif texture == "dots":
        period = rng.uniform(5, 7)
        dx, dy = (xx % period) - period / 2, (yy % period) - period / 2
        pattern = (dx**2 + dy**2 < (period / 3) ** 2).astype(np.float64)
    else:
        raise ValueError(f"Unknown texture {texture!r}; expected solid, stripes, checker or dots.")
    return colour * (1 - 0.45 * pattern[..., None])


def _atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def _write_json(path: str, data: dict) -> None:
    _atomic_write_bytes(path, json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def generate_shapes(
    output_dir: str,
    *,
    num_images: int,
    image_size: Union[int, tuple[int, int]],
    seed: int,
    instances_per_image: tuple[int, int] = (2, 5),
    class_names: Optional[Sequence[str]] = None,
    radius_range: tuple[float, float] = (0.08, 0.18),
    part_classes: Optional[Sequence[str]] = None,
) -> str:
    """Write a synthetic COCO instances dataset: ``output_dir/images/*.png`` and ``output_dir/annotations.json``.

    Args:
        output_dir: folder to write into (created if needed).
        num_images: number of images.
        image_size: ``S`` for ``S x S`` images, or ``(height, width)``.
        seed: everything (layout, classes, colours, backgrounds) follows from it; same arguments,
            same bytes.
        instances_per_image: ``(min, max)`` instances drawn per image; fewer when they do not fit
            without overlapping.
        class_names: the categories to draw (default: all of ``SHAPES_CATEGORIES``).
        radius_range: the outer radius of a shape, as fractions of the image's short side.
        part_classes: names from :data:`SHAPES_PART_CATEGORIES`: each shape then carries one inner
            part of one of them (annotated with ``part_of`` = the whole's ``id``; see the module
            docstring). None (default): no parts, and the same bytes as before parts existed.

    Returns:
        The path of the annotations json (images' ``file_name`` are relative to ``output_dir/images``).
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    low, high = instances_per_image
    if num_images <= 0 or min(height, width) < 32 or not 1 <= low <= high:
        raise ValueError(
            f"generate_shapes got num_images={num_images}, image_size={image_size}, instances_per_image="
            f"{instances_per_image}; expected num_images > 0, sides >= 32 px and 1 <= min <= max."
        )
    names = list(class_names) if class_names is not None else SHAPES_CLASSES
    unknown = sorted(set(names) - set(SHAPES_CLASSES))
    if unknown or not names:
        raise ValueError(
            f"generate_shapes got class_names {names}; unknown {unknown}. Expected names from {SHAPES_CLASSES}."
        )
    categories = [c for c in SHAPES_CATEGORIES if c[1] in names]
    part_names = list(part_classes or [])
    part_categories = [c for c in SHAPES_PART_CATEGORIES if c[1] in part_names]
    unknown = sorted(set(part_names) - {c[1] for c in SHAPES_PART_CATEGORIES})
    if unknown or (part_classes is not None and not part_names):
        raise ValueError(
            f"generate_shapes got part_classes {part_names}; unknown {unknown}. Expected names from "
            f"{[c[1] for c in SHAPES_PART_CATEGORIES]}."
        )

    rng = np.random.default_rng(seed)
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        canvas = _background(rng, height, width)
        placed: list[tuple[float, float, float]] = []  # (cx, cy, outer radius)
        for _ in range(int(rng.integers(low, high + 1))):
            category_id, _, shape, colour, texture = categories[int(rng.integers(len(categories)))]
            radius = rng.uniform(*radius_range) * min(height, width)
            outline = _shape_outline(shape, radius, rng.uniform(-0.26, 0.26))  # +-15 degrees
            outer = float(np.linalg.norm(outline, axis=1).max())
            for _attempt in range(50):
                cx, cy = rng.uniform(outer + 1, width - outer - 1), rng.uniform(outer + 1, height - outer - 1)
                if all(math.hypot(cx - x, cy - y) > outer + r + 2 for x, y, r in placed):
                    break
            else:
                continue  # no room left for this one
            placed.append((cx, cy, outer))
            polygon = np.round(outline + [cx, cy], 2).reshape(-1).tolist()
            rle = mask_util.frPyObjects([polygon], height, width)[0]
            mask = mask_util.decode(rle).astype(bool)
            shade = np.clip(np.asarray(colour) * rng.uniform(0.8, 1.0) + rng.integers(-15, 16, size=3), 0, 255)
            canvas[mask] = _texture(rng, texture, shade, height, width)[mask]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": [polygon],
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "area": float(mask_util.area(rle)),
                    "iscrowd": 0,
                }
            )
            if part_categories:
                annotations.append(
                    _draw_part(rng, canvas, part_categories, whole=annotations[-1], shape=shape, centre=(cx, cy), radius=radius)
                )
        canvas += rng.normal(0, 3, size=canvas.shape)  # nothing perfectly flat
        file_name = f"{image_id:06d}.png"
        pixels = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
        _atomic_write_bytes(os.path.join(image_dir, file_name), _png_bytes(pixels))
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})

    data = {
        "info": {
            "description": "samantics_d2 synthetic shapes",
            "generator_version": _GENERATOR_VERSION,
            "num_images": num_images,
            "image_size": [height, width],
            "seed": seed,
            "instances_per_image": [low, high],
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c[0], "name": c[1], "supercategory": "shape"} for c in categories]
        + [{"id": c[0], "name": c[1], "supercategory": "part"} for c in part_categories],
    }
    json_file = os.path.join(output_dir, "annotations.json")
    _write_json(json_file, data)
    logger.info("Generated %d shapes images with %d instances in %s", num_images, len(annotations), output_dir)
    return json_file


def _draw_part(
    rng: np.random.Generator,
    canvas: np.ndarray,
    part_categories: Sequence[tuple],
    *,
    whole: dict,
    shape: str,
    centre: tuple[float, float],
    radius: float,
) -> dict:
    """Draw the inner part of ``whole`` (a ``shape`` of outer ``radius`` at ``centre``) on ``canvas``
    ``[H, W, 3]`` float, in place; returns its annotation (``part_of`` = the whole's ``id``)."""
    height, width = canvas.shape[:2]
    category_id, _, part_shape, colour, texture = part_categories[int(rng.integers(len(part_categories)))]
    inscribed = _inscribed_radius(shape) * radius
    angle, offset = rng.uniform(0, 2 * np.pi), rng.uniform(0, _PART_OFFSET) * inscribed
    part_centre = [centre[0] + offset * math.cos(angle), centre[1] + offset * math.sin(angle)]
    outline = _shape_outline(part_shape, _PART_RADIUS * inscribed, rng.uniform(-0.26, 0.26))
    polygon = np.round(outline + part_centre, 2).reshape(-1).tolist()
    rle = mask_util.frPyObjects([polygon], height, width)[0]
    mask = mask_util.decode(rle).astype(bool)
    canvas[mask] = _texture(rng, texture, np.asarray(colour, dtype=np.float64), height, width)[mask]
    return {
        "id": whole["id"] + 1,
        "image_id": whole["image_id"],
        "category_id": category_id,
        "segmentation": [polygon],
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "area": float(mask_util.area(rle)),
        "iscrowd": 0,
        "part_of": whole["id"],
    }


def write_split_json(json_file: str, class_names: Sequence[str], output_file: str) -> str:
    """Copy a COCO json keeping every image but only the categories (and annotations) in ``class_names``."""
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    known = {c["name"] for c in data["categories"]}
    unknown = sorted(set(class_names) - known)
    if unknown:
        raise ValueError(f"write_split_json: classes {unknown} are not in {json_file!r} (it has {sorted(known)}).")
    keep_ids = {c["id"] for c in data["categories"] if c["name"] in set(class_names)}
    data["categories"] = [c for c in data["categories"] if c["id"] in keep_ids]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep_ids]
    _write_json(output_file, data)
    return output_file


# ---------------------------------------------------------------- cache and registration
def _shapes_folder(part: str) -> str:
    """Where ``part`` is (or will be) cached; ``$SAMANTICS_CACHE`` is read now."""
    if part not in SHAPES_PARTS:
        raise KeyError(f"Unknown shapes part {part!r}; expected one of {sorted(SHAPES_PARTS)}.")
    params = dict(SHAPES_PARTS[part], generator_version=_GENERATOR_VERSION)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()[:12]
    return os.path.join(cache_root(), "shapes", f"{part}-{digest}")


def _split_json_name(split: Optional[str]) -> str:
    return "annotations.json" if split is None else f"annotations_{split}.json"


def ensure_shapes(part: str) -> str:
    """The cache folder of ``part`` (a key of :data:`SHAPES_PARTS`), generated if missing."""
    folder = _shapes_folder(part)
    if os.path.isdir(folder):
        return folder
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}-", dir=parent)
    try:
        json_file = generate_shapes(tmp, **SHAPES_PARTS[part])
        if not SHAPES_PARTS[part].get("part_classes"):  # the base/novel splits are of the plain shapes
            for split, names in SHAPES_SPLITS.items():
                write_split_json(json_file, names, os.path.join(tmp, _split_json_name(split)))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not os.path.isdir(folder):
                raise
            logger.info("Another process generated %s first; using it.", folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return folder


def shapes_json_file(name: str) -> str:
    """The annotations json of a registered shapes dataset, generated if missing."""
    part, split = SHAPES_DATASETS[name]
    return os.path.join(ensure_shapes(part), _split_json_name(split))


def _part_categories(part: str, split: Optional[str]) -> list[tuple]:
    """The categories of ``part`` restricted to ``split``, ordered by category id (as load_coco_json orders them)."""
    params = SHAPES_PARTS[part]
    names = set(params.get("class_names") or SHAPES_CLASSES) & set(SHAPES_CLASSES if split is None else SHAPES_SPLITS[split])
    names |= set(params.get("part_classes") or ())
    return sorted((c for c in SHAPES_CATEGORIES + SHAPES_PART_CATEGORIES if c[1] in names), key=lambda c: c[0])


def register_shapes(name: str, *, part: str, split: Optional[str] = None) -> None:
    """Register ``name``: ``part``'s images with the classes of ``split`` (None: all); nothing is generated now.

    On load, the cache folder is found (or generated) under the current ``$SAMANTICS_CACHE`` and the
    metadata gets ``json_file`` and ``image_root`` (unless already set). ``shapes_json_file(name)``
    gives the json path (generating it) without loading.
    """
    with_parts = bool(SHAPES_PARTS.get(part, {}).get("part_classes"))
    if part not in SHAPES_PARTS or (split is not None and (split not in SHAPES_SPLITS or with_parts)):
        raise ValueError(
            f"register_shapes({name!r}) got part={part!r}, split={split!r}; expected part in {sorted(SHAPES_PARTS)} "
            f"and split None or in {sorted(SHAPES_SPLITS)} (None for the shapes with parts)."
        )
    # Shapes with parts keep each annotation's id and its part-of link (Detectron2 drops unknown keys).
    extra_keys = ["id", "part_of"] if with_parts else None

    def load() -> list[dict]:
        folder = ensure_shapes(part)
        json_file, image_root = os.path.join(folder, _split_json_name(split)), os.path.join(folder, "images")
        set_paths_if_missing(name, json_file=json_file, image_root=image_root)
        return load_coco_json(json_file, image_root, name, extra_annotation_keys=extra_keys)

    categories = _part_categories(part, split)
    classes = [c[1] for c in categories]
    metadata = {
        "thing_classes": classes,
        "thing_dataset_id_to_contiguous_id": {c[0]: i for i, c in enumerate(categories)},
        "base_classes": list(SHAPES_SPLITS["base"]),
        "novel_classes": list(SHAPES_SPLITS["novel"]),
        "evaluator_type": "coco",
    }
    if with_parts:
        part_names = {c[1] for c in SHAPES_PART_CATEGORIES}
        metadata.update(
            whole_classes=[c for c in classes if c not in part_names],
            part_classes=[c for c in classes if c in part_names],
            evaluator_type="click",
        )
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(**metadata)


def register_all_shapes() -> None:
    """Register the names of ``SHAPES_DATASETS`` that are not registered yet."""
    for name, (part, split) in SHAPES_DATASETS.items():
        if name not in DatasetCatalog.list():
            register_shapes(name, part=part, split=split)


register_all_shapes()
