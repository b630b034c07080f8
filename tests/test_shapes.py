"""The synthetic shapes dataset: determinism, annotations, splits, lazy registration, cache races."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

import samantics_d2.data  # noqa: F401  (registers the datasets)
from samantics_d2.d2 import DatasetCatalog, MetadataCatalog, load_coco_json
from samantics_d2.data import shapes
from samantics_d2.data.shapes import SHAPES_CATEGORIES, SHAPES_SPLITS, generate_shapes

ALL_CLASSES = [c[1] for c in SHAPES_CATEGORIES]
NAME_OF_ID = {c[0]: c[1] for c in SHAPES_CATEGORIES}


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    """A small generated dataset: (json path, parsed json)."""
    out = tmp_path_factory.mktemp("shapes_small")
    json_file = generate_shapes(str(out), num_images=12, image_size=96, seed=5)
    with open(json_file) as f:
        return json_file, json.load(f)


def test_generation_is_deterministic(tmp_path, small_shapes):
    first = generate_shapes(str(tmp_path / "a"), num_images=3, image_size=64, seed=11)
    second = generate_shapes(str(tmp_path / "b"), num_images=3, image_size=64, seed=11)
    other = generate_shapes(str(tmp_path / "c"), num_images=3, image_size=64, seed=12)
    with open(first, "rb") as f1, open(second, "rb") as f2, open(other, "rb") as f3:
        a, b, c = f1.read(), f2.read(), f3.read()
    assert a == b and a != c
    for name in sorted(os.listdir(tmp_path / "a" / "images")):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


def test_splits_and_categories(small_shapes):
    _, data = small_shapes
    assert len(ALL_CLASSES) == len(set(ALL_CLASSES)) >= 6
    assert not set(SHAPES_SPLITS["base"]) & set(SHAPES_SPLITS["novel"])
    assert sorted(SHAPES_SPLITS["base"] + SHAPES_SPLITS["novel"]) == sorted(ALL_CLASSES)
    assert [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])] == ALL_CLASSES
    # every shape differs from every other one in its shape and in its colour or texture
    assert len({c[2] for c in SHAPES_CATEGORIES}) == len(SHAPES_CATEGORIES)
    assert len({(c[3], c[4]) for c in SHAPES_CATEGORIES}) == len(SHAPES_CATEGORIES)


def test_annotations_match_their_masks_and_images(small_shapes):
    json_file, data = small_shapes
    image_dir = os.path.join(os.path.dirname(json_file), "images")
    per_image = {}
    for ann in data["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    assert len(per_image) == len(data["images"]) == 12
    assert all(len(anns) >= 2 for anns in per_image.values())  # several instances per image
    assert len({a["category_id"] for a in data["annotations"]}) >= 6
    mean_colours, labels = [], []
    for image in data["images"]:
        pixels = np.asarray(Image.open(os.path.join(image_dir, image["file_name"])).convert("RGB"))
        assert pixels.shape == (image["height"], image["width"], 3) == (96, 96, 3)
        occupancy = np.zeros(pixels.shape[:2], dtype=np.int32)
        for ann in per_image[image["id"]]:
            assert ann["iscrowd"] == 0 and all(len(p) >= 6 for p in ann["segmentation"])
            mask = mask_util.decode(mask_util.merge(mask_util.frPyObjects(ann["segmentation"], 96, 96))).astype(bool)
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["area"] == mask.sum() > 0
            occupancy += mask
            mean_colours.append(pixels[mask].mean(0))
            labels.append(ann["category_id"])
        assert occupancy.max() == 1  # instances do not overlap: each polygon is its visible mask
    # colour alone already separates the classes: nearest class-mean colour recovers the label
    mean_colours, labels = np.stack(mean_colours), np.array(labels)
    classes = np.unique(labels)
    centres = np.stack([mean_colours[labels == k].mean(0) for k in classes])
    predicted = classes[np.argmin(((mean_colours[:, None] - centres[None]) ** 2).sum(-1), axis=1)]
    assert (predicted == labels).mean() > 0.9


def test_registered_names_and_metadata():
    for name in ("shapes_train", "shapes_val", "shapes_train_base", "shapes_val_base", "shapes_val_novel"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco"
        assert meta.base_classes == SHAPES_SPLITS["base"] and meta.novel_classes == SHAPES_SPLITS["novel"]
    assert MetadataCatalog.get("shapes_train").thing_classes == ALL_CLASSES
    assert MetadataCatalog.get("shapes_val_novel").thing_classes == [c for c in ALL_CLASSES if c in SHAPES_SPLITS["novel"]]


def test_registration_is_lazy_and_split_restricted(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path))
    name, preset = "test_shapes_val_novel", "test_shapes_val_preset"
    shapes.register_shapes(name, part="shapes_val", split="novel")
    try:
        assert os.listdir(tmp_path) == []  # nothing generated by registering
        assert MetadataCatalog.get(name).get("json_file") is None
        dicts = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        assert meta.json_file.startswith(str(tmp_path)) and os.path.isfile(meta.json_file)
        assert os.path.isdir(meta.image_root)
        assert len(dicts) == shapes.SHAPES_PARTS["shapes_val"]["num_images"]  # all images kept
        novel = meta.thing_classes
        assert novel == [c for c in ALL_CLASSES if c in SHAPES_SPLITS["novel"]]
        # the same images with all classes: the split keeps exactly the novel instances
        everything = load_coco_json(os.path.join(os.path.dirname(meta.json_file), "annotations.json"), meta.image_root)
        expected = sorted(
            (d["image_id"], tuple(a["bbox"])) for d in everything for a in d["annotations"]
            if NAME_OF_ID[a["category_id"]] in novel
        )
        got = sorted((d["image_id"], tuple(a["bbox"])) for d in dicts for a in d["annotations"])
        assert got == expected and len(got) > 0
        assert {novel[a["category_id"]] for d in dicts for a in d["annotations"]} <= set(novel)
        assert all(os.path.isfile(d["file_name"]) for d in dicts)
        # an evaluator built before loading may have set json_file to its own conversion: it is kept
        shapes.register_shapes(preset, part="shapes_val")
        MetadataCatalog.get(preset).json_file = str(tmp_path / "converted.json")
        assert len(DatasetCatalog.get(preset)) == len(dicts)
        assert MetadataCatalog.get(preset).json_file == str(tmp_path / "converted.json")
    finally:
        for registered in (name, preset):
            if registered in DatasetCatalog.list():
                DatasetCatalog.remove(registered)
                MetadataCatalog.remove(registered)


def test_cache_race_uses_the_first_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path))
    monkeypatch.setitem(shapes.SHAPES_PARTS, "shapes_tiny", {"num_images": 2, "image_size": 48, "seed": 3})
    folder = shapes._shapes_folder("shapes_tiny")
    real_generate = shapes.generate_shapes

    def generate_while_another_rank_finishes(output_dir, **kwargs):
        # another process completes the same folder while this one is still generating
        real_generate(folder, **kwargs)
        (tmp_path / "marker").write_text("theirs")
        os.replace(tmp_path / "marker", os.path.join(folder, "theirs.txt"))
        return real_generate(output_dir, **kwargs)

    monkeypatch.setattr(shapes, "generate_shapes", generate_while_another_rank_finishes)
    assert shapes.ensure_shapes("shapes_tiny") == folder
    assert os.path.isfile(os.path.join(folder, "theirs.txt"))  # theirs kept, ours discarded
    assert sorted(os.listdir(os.path.dirname(folder))) == [os.path.basename(folder)]  # no temporary folder left
    monkeypatch.setattr(shapes, "generate_shapes", real_generate)
    assert shapes.ensure_shapes("shapes_tiny") == folder  # cached: nothing regenerated
