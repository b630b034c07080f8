"""Reference-set presets that regenerate published reference sets exactly.

:class:`RefSAMEvalSelection` is the rule of the RefSAM authors' ``reference_sam/create_eval_jsons.py``
(github miquel-espinosa/samantics), which made the evaluation references behind the paper's per-shot
RefSAM AP (``--n_ref 10 --sortby area`` with seeds 42, 123 and 33). It differs from
:class:`~samantics_d2.data.reference_sets.ReferenceSelection` (ours: a shuffle per category from
``(seed, category)``, rounds in which the rarest categories choose first, inclusive bounds, the
share of the *mask* in a 4 px frame) in every step, so it is a rule of its own:

1. **One global shuffle**: the annotation list, in file order, shuffled once with
   ``random.Random(seed).shuffle`` (Python's Mersenne Twister; the permutation depends only on the
   seed and the number of annotations).
2. **One greedy pass** over that order: an annotation is taken when its category has fewer than
   ``n_ref`` picks, its image was not taken before (by any category) and it passes every filter:

   - not crowd (``iscrowd == 0``);
   - ``area > min_area`` (the annotation's ``"area"``, COCO's mask area; strict);
   - ``area < height * width * max_area_percent / 100`` of its image (strict);
   - image ``width / height`` in ``[min_image_aspect, max_image_aspect]`` (the *image*, not the box);
   - the box ``[x, y, x + w, y + h]`` at least ``box_edge_margin`` px inside every image edge
     (rejected when ``x < m``, ``y < m``, ``x + w > W - m`` or ``y + h > H - m``);
   - the mask covers less than ``max_frame_cover_percent`` % of the frame of width ``frame_width``
     along the image edges (a share of the *frame*, not of the mask);
   - largest box IoU with every other annotation of its image (any category, crowd included)
     ``<= max_box_iou``, computed in float32 as ``torchvision.ops.box_iou`` computes it (a NaN IoU,
     from degenerate boxes, makes the maximum NaN and the check pass, as there);
   - its id is not one of :data:`MULTI_INSTANCE_ANNOTATION_IDS` (five COCO train annotations that
     cover several instances).

   The pass stops when every category of the source has ``n_ref`` picks. All categories of the
   source compete for images, whatever subset is written (``categories``).
3. Each category's picks **sorted by area, largest first** (a stable sort: equal areas keep the
   pass order), so the k-shot references are the first k (``reference_rank`` 0..k-1) of the
   ``n_ref = 10`` selection, not a selection made with ``n_ref = k``.

:func:`select_refsam_eval_references` returns a :class:`~samantics_d2.data.reference_sets.ReferenceSet`,
so :func:`~samantics_d2.data.reference_sets.write_reference_json`, ``k_shot`` and the reference
bank take it as any other. Importing this module registers (lazily, nothing read)
``coco_2017_train_refsam_eval_ref10_seed{42,123,33}`` (80 classes) and
``coco_2017_train_novel_refsam_eval_ref10_seed{42,123,33}`` (the COCO-FSOD novel classes of the
same selection). ``tools/create_reference_json.py --preset refsam_eval --seed 42`` writes one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools import mask as mask_util

from .reference_sets import (
    ReferenceSet,
    load_coco_dict,
    reference_cache_dir,
    resolve_categories,
    write_reference_json,
)

__all__ = [
    "MULTI_INSTANCE_ANNOTATION_IDS",
    "REFERENCE_PRESETS",
    "REFSAM_EVAL_SEEDS",
    "RefSAMEvalSelection",
    "register_refsam_eval_reference_set",
    "register_refsam_eval_reference_sets",
    "select_refsam_eval_references",
]

logger = logging.getLogger(__name__)

CategorySpec = Union[None, str, Sequence[Union[str, int]]]  # as resolve_categories takes them

# COCO train2017 annotations that outline several instances at once (create_eval_jsons.py leaves them out).
MULTI_INSTANCE_ANNOTATION_IDS: tuple[int, ...] = (50138, 1549254, 1049944, 1549217, 1048117)
# The seeds of the three evaluation reference sets (reference_sam/scripts/create_eval_jsons.sh).
REFSAM_EVAL_SEEDS: tuple[int, ...] = (42, 123, 33)


@dataclass(frozen=True)
class RefSAMEvalSelection:
    """The RefSAM authors' evaluation-reference rule (module docstring); defaults are theirs.

    Attributes:
        n_ref: references per category (their ``--n_ref 10``; the k-shot sets are prefixes).
        seed: seed of the global shuffle (42, 123, 33 in the paper).
        min_area: annotations need ``area > min_area`` px (``32 ** 2``).
        max_area_percent: and ``area <`` this share of the image, in percent (50).
        min_image_aspect, max_image_aspect: image ``width / height`` bounds, inclusive (1/5, 5).
        box_edge_margin: px between the box and every image edge, at least (10).
        frame_width: width in px of the border frame of the mask check (15).
        max_frame_cover_percent: the mask must cover less than this percentage of that frame (5).
        max_box_iou: largest box IoU with another annotation of the image (0.35).
        excluded_annotation_ids: annotation ids never picked (:data:`MULTI_INSTANCE_ANNOTATION_IDS`).
    """

    n_ref: int = 10
    seed: int = 42
    min_area: float = 32.0**2
    max_area_percent: float = 50.0
    min_image_aspect: float = 1 / 5
    max_image_aspect: float = 5.0
    box_edge_margin: float = 10.0
    frame_width: int = 15
    max_frame_cover_percent: float = 5.0
    max_box_iou: float = 0.35
    excluded_annotation_ids: tuple[int, ...] = MULTI_INSTANCE_ANNOTATION_IDS

    #: the preset's name (tools/create_reference_json.py --preset, the json's info)
    preset = "refsam_eval"

    def __post_init__(self) -> None:
        object.__setattr__(self, "excluded_annotation_ids", tuple(int(i) for i in self.excluded_annotation_ids))
        problems = []
        if isinstance(self.n_ref, bool) or not isinstance(self.n_ref, int) or self.n_ref < 1:
            problems.append(f"n_ref={self.n_ref!r} must be an int >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            problems.append(f"seed={self.seed!r} must be an int")
        if isinstance(self.frame_width, bool) or not isinstance(self.frame_width, int) or self.frame_width < 1:
            problems.append(f"frame_width={self.frame_width!r} must be an int >= 1 (pixels)")
        if not 0 < self.min_image_aspect <= self.max_image_aspect:
            problems.append(f"min_image_aspect={self.min_image_aspect!r} <= max_image_aspect={self.max_image_aspect!r} "
                            "must both be positive")
        if not 0 <= self.max_box_iou <= 1:
            problems.append(f"max_box_iou={self.max_box_iou!r} must be in [0, 1]")
        for name in ("min_area", "max_area_percent", "box_edge_margin", "max_frame_cover_percent"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r} must be a number >= 0")
        if problems:
            raise ValueError("Invalid RefSAMEvalSelection: " + "; ".join(problems) + ".")

    @property
    def order(self) -> str:
        """How candidates are ordered (named in the reference json's description)."""
        return "global random.Random shuffle"

    def to_dict(self) -> dict[str, Any]:
        """The parameters (JSON-serialisable), with ``"preset"`` naming the rule."""
        return {"preset": self.preset, **dataclasses.asdict(self),
                "excluded_annotation_ids": list(self.excluded_annotation_ids)}

    def select(self, coco_dict_or_path: Union[Mapping[str, Any], str, os.PathLike], *,
               categories: "CategorySpec" = None, progress: bool = False) -> ReferenceSet:
        """:func:`select_refsam_eval_references` with this selection."""
        return select_refsam_eval_references(coco_dict_or_path, self, categories=categories, progress=progress)

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> "RefSAMEvalSelection":
        """The inverse of :meth:`to_dict`; unknown keys are an error naming the valid ones."""
        params = dict(params)
        if params.pop("preset", cls.preset) != cls.preset:
            raise ValueError(f"RefSAMEvalSelection.from_dict got another preset's parameters; expected {cls.preset!r}.")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise ValueError(f"RefSAMEvalSelection got unknown parameters {unknown}; valid ones: {names}.")
        return cls(**params)


#: preset name -> its selection class (``tools/create_reference_json.py --preset``).
REFERENCE_PRESETS: Mapping[str, type] = {RefSAMEvalSelection.preset: RefSAMEvalSelection}


class _FrameCover:
    """Percentage of the border frame (``frame_width`` px along the four edges) that a mask covers,
    on RLEs; the frame is built as ``create_eval_jsons.get_area_overlap`` builds it (numpy slices)."""

    def __init__(self, frame_width: int):
        self.frame_width = frame_width
        self._frames: dict[tuple[int, int], tuple[dict, int]] = {}

    def _frame(self, height: int, width: int) -> tuple[dict, int]:
        if (height, width) not in self._frames:
            px = self.frame_width
            frame = np.zeros((height, width), dtype=np.uint8)
            frame[:px, :] = 1
            frame[-px:, :] = 1
            frame[:, :px] = 1
            frame[:, -px:] = 1
            self._frames[(height, width)] = (mask_util.encode(np.asfortranarray(frame)), int(frame.sum()))
        return self._frames[(height, width)]

    def __call__(self, annotation: Mapping[str, Any], height: int, width: int) -> float:
        frame_rle, frame_area = self._frame(height, width)
        inside = mask_util.merge([_coco_rle(annotation, height, width), frame_rle], intersect=True)
        return float(mask_util.area(inside)) / frame_area * 100


def _coco_rle(annotation: Mapping[str, Any], height: int, width: int) -> dict:
    """The annotation's mask as pycocotools' ``COCO.annToRLE`` makes it (polygons merged, raw RLEs encoded)."""
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_util.frPyObjects(segmentation, height, width)
    return segmentation


def _max_box_iou_float32(box: np.ndarray, others: np.ndarray) -> float:
    """Largest IoU of ``box`` ``[4]`` with ``others`` ``[M, 4]`` (XYXY, float32), in
    ``torchvision.ops.box_iou``'s float32 arithmetic; NaN when any IoU is NaN (as ``Tensor.max``)."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    lt = np.maximum(box[None, :2], others[:, :2])
    rb = np.minimum(box[None, 2:], others[:, 2:])
    wh = np.clip(rb - lt, np.float32(0), None)
    inter = wh[:, 0] * wh[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.max(inter / (area + areas - inter)))


def select_refsam_eval_references(
    coco_dict_or_path: Union[Mapping[str, Any], str, os.PathLike],
    selection: RefSAMEvalSelection = RefSAMEvalSelection(),
    *,
    categories: CategorySpec = None,
    progress: bool = False,
) -> ReferenceSet:
    """Pick references with the RefSAM authors' evaluation rule (module docstring).

    Args:
        coco_dict_or_path: a COCO instances dict (annotations in file order), or its json path.
        selection: the rule's parameters (their defaults; ``seed`` 42, 123 or 33 for the paper).
        categories: the categories written to the reference set (:func:`resolve_categories`);
            every category of the source takes part in the selection regardless.
        progress: a tqdm bar over the annotations visited.

    Returns:
        A :class:`ReferenceSet` whose ``picks`` hold each category's annotation ids, largest
        area first; ``num_candidates`` counts the annotations passing the per-annotation filters
        (all but image reuse, box IoU and frame cover, which are checked when reached) and
        ``rejected`` what each filter rejected.
    """
    start = time.perf_counter()
    if not isinstance(selection, RefSAMEvalSelection):
        raise TypeError(f"select_refsam_eval_references got selection={selection!r}; expected a RefSAMEvalSelection.")
    if isinstance(coco_dict_or_path, (str, os.PathLike)):
        source = os.fspath(coco_dict_or_path)
        coco = load_coco_dict(source)
    else:
        source, coco = "<dict>", coco_dict_or_path
        missing = [k for k in ("images", "annotations", "categories") if not isinstance(coco.get(k), list)]
        if missing:
            raise ValueError(f"select_refsam_eval_references got a dict without the COCO lists {missing}.")
    sel = selection
    write_ids = resolve_categories(categories, coco["categories"])
    all_ids = [int(c["id"]) for c in coco["categories"]]
    images = {int(image["id"]): image for image in coco["images"]}
    annotations = coco["annotations"]
    n = len(annotations)

    try:
        ids = np.fromiter((a["id"] for a in annotations), dtype=np.int64, count=n)
        cats = np.fromiter((a["category_id"] for a in annotations), dtype=np.int64, count=n)
        image_ids = np.fromiter((a["image_id"] for a in annotations), dtype=np.int64, count=n)
        crowd = np.fromiter((a.get("iscrowd", 0) for a in annotations), dtype=np.int64, count=n)
        area = np.fromiter((a["area"] for a in annotations), dtype=np.float64, count=n)
        xywh = np.asarray([a["bbox"] for a in annotations], dtype=np.float64).reshape(n, 4)
        heights = np.fromiter((images[i]["height"] for i in image_ids.tolist()), dtype=np.float64, count=n)
        widths = np.fromiter((images[i]["width"] for i in image_ids.tolist()), dtype=np.float64, count=n)
    except KeyError as e:
        raise ValueError(
            f"{source!r}: an annotation lacks {e} or names an image not in 'images'; the RefSAM evaluation rule "
            "needs id, image_id, category_id, area, bbox and segmentation per annotation."
        ) from None
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # float64, as x + w in Python
    m = sel.box_edge_margin
    passes = {
        "crowd": crowd == 0,
        "area": area > sel.min_area,
        "area_percent": area < heights * widths * sel.max_area_percent / 100,
        "image_aspect": (widths / heights >= sel.min_image_aspect) & (widths / heights <= sel.max_image_aspect),
        "box_edges": ~((xyxy[:, 0] < m) | (xyxy[:, 1] < m) | (xyxy[:, 2] > widths - m) | (xyxy[:, 3] > heights - m)),
        "excluded_id": ~np.isin(ids, np.asarray(sel.excluded_annotation_ids, dtype=np.int64)),
    }
    candidate = np.logical_and.reduce(list(passes.values()))
    rejected: dict[int, dict[str, int]] = {
        c: {name: int(np.count_nonzero((cats == c) & ~ok)) for name, ok in passes.items()} for c in write_ids
    }
    for c in write_ids:
        rejected[c].update(image_used=0, box_iou=0, frame_cover=0)
    num_candidates = {c: int(np.count_nonzero(candidate & (cats == c))) for c in write_ids}

    rows_of_image: dict[int, list[int]] = {}
    for row, image_id in enumerate(image_ids.tolist()):
        rows_of_image.setdefault(image_id, []).append(row)
    boxes32 = xyxy.astype(np.float32)  # torch.tensor(list of Python floats) -> float32
    frame_cover = _FrameCover(sel.frame_width)

    order = list(range(n))
    random.Random(sel.seed).shuffle(order)  # the same permutation as shuffling the annotation list
    picked: dict[int, list[int]] = {c: [] for c in all_ids}
    used_images: set[int] = set()
    full = 0
    visit = order
    if progress:
        from tqdm import tqdm

        visit = tqdm(order, desc="annotations", unit="ann")
    for row in visit:
        if not candidate[row]:
            continue
        c, image_id = int(cats[row]), int(image_ids[row])
        if c not in picked or len(picked[c]) >= sel.n_ref:
            continue
        counts = rejected.get(c)
        if image_id in used_images:
            if counts is not None:
                counts["image_used"] += 1
            continue
        others = [r for r in rows_of_image[image_id] if r != row]
        if others and _max_box_iou_float32(boxes32[row], boxes32[others]) > np.float32(sel.max_box_iou):
            if counts is not None:
                counts["box_iou"] += 1
            continue
        height, width = int(heights[row]), int(widths[row])
        if not frame_cover(annotations[row], height, width) < sel.max_frame_cover_percent:
            if counts is not None:
                counts["frame_cover"] += 1
            continue
        picked[c].append(row)
        used_images.add(image_id)
        if len(picked[c]) == sel.n_ref:
            full += 1
            if full == len(picked):
                break

    picks, picked_annotations, picked_images = {}, {}, {}
    for c in write_ids:
        rows = sorted(picked[c], key=lambda r: -area[r])  # stable: equal areas keep the pass order
        picks[c] = tuple(int(ids[r]) for r in rows)
        for r in rows:
            picked_annotations[int(ids[r])] = annotations[r]
            picked_images[int(image_ids[r])] = images[int(image_ids[r])]
    reference_set = ReferenceSet(
        selection=sel,  # duck-typed: to_dict, order, seed, n_ref
        shots=sel.n_ref,
        source=source,
        categories=tuple(sorted(coco["categories"], key=lambda c: int(c["id"]))),
        category_ids=tuple(write_ids),
        picks=picks,
        num_candidates=num_candidates,
        rejected=rejected,
        annotations=picked_annotations,
        images=picked_images,
    )
    short = reference_set.shortfall
    logger.info("RefSAM evaluation references (seed %d): %d picks for %d categories from %d annotations of %s "
                "in %.2f s%s.", sel.seed, sum(map(len, picks.values())), len(write_ids), n, source,
                time.perf_counter() - start, f"; {len(short)} categories short: {short}" if short else "")
    return reference_set


# ------------------------------------------------------------------------------------------------
# Registration


def _source_paths(source: str) -> tuple[str, str]:
    """``(json_file, image_root)`` of the registered COCO-format dataset ``source`` (loaded once when
    its metadata lacks them: generated datasets write their json on first use)."""
    from samantics_d2.d2 import DatasetCatalog, MetadataCatalog

    if source not in DatasetCatalog.list():
        raise KeyError(f"Reference-set source dataset {source!r} is not registered; register it first.")
    meta = MetadataCatalog.get(source)
    if meta.get("json_file") is None or not os.path.exists(meta.get("json_file")):
        DatasetCatalog.get(source)
    json_file, image_root = meta.get("json_file"), meta.get("image_root")
    if json_file is None or image_root is None or not os.path.exists(json_file):
        raise FileNotFoundError(
            f"Dataset {source!r} has no readable json_file ({json_file!r}) / image_root ({image_root!r}) in its "
            "metadata; set DETECTRON2_DATASETS to the folder holding coco/ (datasets/README.md)."
        )
    return os.fspath(json_file), os.fspath(image_root)


def register_refsam_eval_reference_set(
    name: str,
    *,
    source: str,
    selection: RefSAMEvalSelection,
    categories: CategorySpec = None,
    output_dir: Optional[Union[str, os.PathLike]] = None,
) -> None:
    """Register ``name``: the RefSAM evaluation references of the registered COCO-format ``source``.

    Nothing is read now. The first ``DatasetCatalog.get(name)`` selects them and writes
    ``<output_dir or reference_cache_dir()>/<name>-<hash>.json`` (the hash covers the source file and
    the selection), later calls reuse it. Loaded as the other reference sets are: ``load_coco_json``
    keeping ``id``, ``area`` and ``reference_rank`` per annotation (k-shot = ``reference_rank < k``).
    """
    from samantics_d2.d2 import DatasetCatalog, MetadataCatalog, load_coco_json

    from .builtin import set_paths_if_missing

    if not isinstance(selection, RefSAMEvalSelection):
        raise TypeError(f"register_refsam_eval_reference_set({name!r}) got selection={selection!r}.")

    def load() -> list[dict]:
        json_file, image_root = _source_paths(source)
        stat = os.stat(json_file)
        key = json.dumps({"source": os.path.abspath(json_file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                          "selection": selection.to_dict(),
                          "categories": categories if categories is None or isinstance(categories, str)
                          else list(categories)}, sort_keys=True)
        folder = Path(os.fspath(output_dir)) if output_dir is not None else reference_cache_dir()
        path = folder / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.json"
        if not path.exists():
            logger.info("Creating reference set %r (RefSAM evaluation rule) from %s into %s.", name, json_file, path)
            write_reference_json(select_refsam_eval_references(json_file, selection, categories=categories), path)
        set_paths_if_missing(name, json_file=str(path), image_root=image_root)
        return load_coco_json(str(path), image_root, name, extra_annotation_keys=["id", "area", "reference_rank"])

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(evaluator_type="coco", reference_source=source,
                                  reference_selection=selection.to_dict())


def register_refsam_eval_reference_sets() -> list[str]:
    """Register ``coco_2017_train_refsam_eval_ref10_seed{s}`` (all classes) and
    ``coco_2017_train_novel_refsam_eval_ref10_seed{s}`` (the novel classes of the same selection)
    for ``s`` in :data:`REFSAM_EVAL_SEEDS`, where not registered yet. Returns the names registered."""
    from samantics_d2.d2 import DatasetCatalog

    names = []
    for seed in REFSAM_EVAL_SEEDS:
        selection = RefSAMEvalSelection(seed=seed)
        for prefix, categories in (("coco_2017_train", None), ("coco_2017_train_novel", "novel")):
            name = f"{prefix}_refsam_eval_ref{selection.n_ref}_seed{seed}"
            if name not in DatasetCatalog.list():
                register_refsam_eval_reference_set(name, source="coco_2017_train", selection=selection,
                                                   categories=categories)
                names.append(name)
    return names


register_refsam_eval_reference_sets()
