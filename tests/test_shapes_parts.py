"""Shapes with parts: every whole carries one inner part of a part class, annotated with a part-of link."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import samantics_d2.data  # noqa: F401  (registers the datasets)
from samantics_d2.d2 import DatasetCatalog, MetadataCatalog
from samantics_d2.data import shapes
from samantics_d2.data.mapper import segmentation_to_mask
from samantics_d2.data.shapes import SHAPES_PART_CATEGORIES, SHAPES_PART_WHOLE_CLASSES, generate_shapes
from samantics_d2.utils.clicks import click_points

PART_NAMES = [c[1] for c in SHAPES_PART_CATEGORIES]


@pytest.fixture(scope="module")
def parts_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_parts")
    json_file = generate_shapes(
        str(out), num_images=6, image_size=96, seed=7, instances_per_image=(1, 3), radius_range=(0.16, 0.26),
        class_names=SHAPES_PART_WHOLE_CLASSES, part_classes=PART_NAMES,
    )  # fmt: skip
    with open(json_file) as f:
        return str(out), json.load(f)


def test_plain_shapes_bytes_are_unchanged_by_parts(tmp_path):
    # sha256 of generate_shapes(num_images=3, image_size=64, seed=11) (json then images), taken before the
    # parts existed: drawing without parts must stay byte for byte the same (cached datasets, numbers).
    json_file = generate_shapes(str(tmp_path), num_images=3, image_size=64, seed=11)
    digest = hashlib.sha256(open(json_file, "rb").read())
    for name in sorted(os.listdir(tmp_path / "images")):
        digest.update((tmp_path / "images" / name).read_bytes())
    assert digest.hexdigest() == "a41da9da262e289fbaca630cc3344444581f90118499f2fb0158f15f3205e4d0"


def test_every_whole_has_one_part_inside_it(parts_dataset):
    folder, data = parts_dataset
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert sorted(names.values()) == sorted(list(SHAPES_PART_WHOLE_CLASSES) + PART_NAMES)
    by_id = {a["id"]: a for a in data["annotations"]}
    assert sorted(by_id) == list(range(1, len(data["annotations"]) + 1))
    wholes = [a for a in data["annotations"] if "part_of" not in a]
    parts = [a for a in data["annotations"] if "part_of" in a]
    assert len(wholes) == len(parts) >= 6
    assert sorted(p["part_of"] for p in parts) == sorted(w["id"] for w in wholes)  # one part per whole
    images = {i["id"]: i for i in data["images"]}
    for part in parts:
        whole = by_id[part["part_of"]]
        assert names[whole["category_id"]] in SHAPES_PART_WHOLE_CLASSES and names[part["category_id"]] in PART_NAMES
        assert whole["image_id"] == part["image_id"]
        h, w = images[part["image_id"]]["height"], images[part["image_id"]]["width"]
        whole_mask = segmentation_to_mask(whole["segmentation"], h, w).astype(bool)
        part_mask = segmentation_to_mask(part["segmentation"], h, w).astype(bool)
        assert part_mask.sum() >= 9 and not (part_mask & ~whole_mask).any()  # inside, the whole includes it
        assert part_mask.sum() < 0.5 * whole_mask.sum()
        assert part["area"] == pytest.approx(part_mask.sum(), abs=1)
        # the whole's click point falls on its part: one click, two right answers
        x, y = click_points(torch.from_numpy(whole_mask)[None])[0].long().tolist()
        assert part_mask[y, x]
        # the part is painted in its class colour: white disc near 245, black square near 25
        pixels = np.asarray(Image.open(os.path.join(folder, "images", images[part["image_id"]]["file_name"])))
        colour = dict((c[1], c[3]) for c in SHAPES_PART_CATEGORIES)[names[part["category_id"]]]
        assert np.abs(pixels[part_mask].mean(0) - colour).max() < 20


def test_parts_generation_is_deterministic(tmp_path, parts_dataset):
    folder, data = parts_dataset
    again = generate_shapes(
        str(tmp_path), num_images=6, image_size=96, seed=7, instances_per_image=(1, 3), radius_range=(0.16, 0.26),
        class_names=SHAPES_PART_WHOLE_CLASSES, part_classes=PART_NAMES,
    )  # fmt: skip
    assert open(again, "rb").read() == open(os.path.join(folder, "annotations.json"), "rb").read()
    with pytest.raises(ValueError, match="part_classes"):
        generate_shapes(str(tmp_path / "x"), num_images=1, image_size=64, seed=0, part_classes=["red circle"])


def test_registered_parts_split_keeps_ids_and_links(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path))
    params = dict(shapes.SHAPES_PARTS["shapes_parts_val"], num_images=3, image_size=96)
    monkeypatch.setitem(shapes.SHAPES_PARTS, "test_parts_tiny", params)
    name = "test_shapes_parts_tiny"
    shapes.register_shapes(name, part="test_parts_tiny")
    try:
        assert os.listdir(tmp_path) == []  # registering generates nothing
        dicts = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "click"
        assert meta.whole_classes == list(SHAPES_PART_WHOLE_CLASSES) and meta.part_classes == PART_NAMES
        assert meta.thing_classes == meta.whole_classes + meta.part_classes
        assert len(dicts) == 3
        for record in dicts:
            ids = {a["id"]: a for a in record["annotations"]}
            links = [a for a in record["annotations"] if "part_of" in a]
            assert links and all(meta.thing_classes[a["category_id"]] in PART_NAMES for a in links)
            assert all(meta.thing_classes[ids[a["part_of"]]["category_id"]] in meta.whole_classes for a in links)
        with pytest.raises(ValueError, match="None for the shapes with parts"):
            shapes.register_shapes("test_shapes_parts_bad", part="test_parts_tiny", split="base")
    finally:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_registered_names():
    for name in ("shapes_parts_train", "shapes_parts_val"):
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).part_classes == PART_NAMES
