"""The registered reference sets hold the same annotations as when they were pinned (issue 11: the
split of ``samantics_d2/data/reference_sets.py`` into a package must not change a pick).

Each standard shapes set is loaded through ``DatasetCatalog`` (selection, json writing and loading
as users get them) and its ``(annotation id, reference_rank)`` pairs are compared with a digest
taken before the split. A synthetic COCO dict pins the COCO standard selection (default filters,
random order) the same way, since the real COCO files are not on the test machines.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from samantics_d2.d2 import DatasetCatalog
from samantics_d2.data.reference_sets import (
    SHAPES_REFERENCE_SEEDS,
    SHAPES_REFERENCE_SHOTS,
    ReferenceSelection,
    register_all_reference_sets,
    select_references,
)


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _registered_picks(name: str) -> list[list[int]]:
    pairs = [[int(a["id"]), int(a["reference_rank"])] for d in DatasetCatalog.get(name) for a in d["annotations"]]
    return sorted(pairs)


# sha1 of the sorted (annotation id, reference_rank) pairs of every standard shapes set, taken at
# commit 1e463af (reference_sets.py as one module).
PINNED_SHAPES = "8085e2c25dc7fffc"
PINNED_SYNTHETIC = {"random": "b7533f4ed5d45a72", "largest": "02b600de63997f5d"}


def test_registered_shapes_reference_sets_keep_their_annotations(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path))
    register_all_reference_sets()
    picks = {}
    for n in SHAPES_REFERENCE_SHOTS:
        for s in SHAPES_REFERENCE_SEEDS:
            for name in (f"shapes_train_ref{n}_seed{s}", f"shapes_train_novel_ref{n}_seed{s}"):
                picks[name] = _registered_picks(name)
                assert picks[name], name
    assert _digest(picks) == PINNED_SHAPES, {k: v[:4] for k, v in picks.items()}


def _synthetic_coco(seed: int = 0) -> dict:
    """60 images of 640 x 480, 400 boxes of 4 categories: sizes, borders and overlaps vary so that
    every default filter rejects some."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "file_name": f"{i:04d}.jpg", "height": 480, "width": 640} for i in range(60)]
    annotations = []
    for k in range(400):
        w, h = (float(v) for v in rng.integers(4, 300, size=2))
        x, y = float(rng.integers(0, 640 - int(w) + 1)), float(rng.integers(0, 480 - int(h) + 1))
        annotations.append(
            {
                "id": 1000 + k,
                "image_id": int(rng.integers(1, 61)),
                "category_id": int(rng.integers(1, 5)),
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": int(rng.random() < 0.05),
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            }
        )
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, 5)]
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.mark.parametrize("order", ["random", "largest"])
def test_default_selection_keeps_its_picks(order):
    coco = _synthetic_coco()
    picks = {
        f"n{n}_seed{s}": {
            str(c): list(ids) for c, ids in select_references(coco, ReferenceSelection(n_ref=n, seed=s, order=order)).picks.items()
        }
        for n in (1, 5)
        for s in (0, 3)
    }
    assert _digest(picks) == PINNED_SYNTHETIC[order], picks
