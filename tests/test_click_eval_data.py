"""COCO panoptic registration for the click benchmarks, its missing-file error, and ClickMapper (panoptic
and shapes with parts)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import samantics_d2.data  # noqa: F401  (registers the datasets)
from samantics_d2.d2 import DatasetCatalog, MetadataCatalog
from samantics_d2.data import panoptic
from samantics_d2.data.panoptic import ClickMapper, shortest_edge_shape


def test_shortest_edge_shape_as_detectron2():
    assert shortest_edge_shape(480, 640, 800, 1333) == (800, 1067)
    assert shortest_edge_shape(640, 480, 800, 1333) == (1067, 800)
    assert shortest_edge_shape(100, 1000, 800, 1333) == (133, 1333)  # long side capped, both scaled


def _write_panoptic(root: str) -> None:
    """One 30 x 40 image: a thing (id 1, category 1), a stuff segment (id 2, category 184) and a crowd (id 3)."""
    for folder in ("coco/val2017", "coco/panoptic_val2017", "coco/annotations"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    ids = np.zeros((30, 40), dtype=np.uint32)
    ids[5:15, 5:20] = 1
    ids[20:, :] = 2
    ids[0:3, 30:] = 3
    png = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
    Image.fromarray(png).save(os.path.join(root, "coco/panoptic_val2017/000000000007.png"))
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(root, "coco/val2017/000000000007.jpg"))
    data = {
        "images": [{"id": 7, "file_name": "000000000007.jpg", "height": 30, "width": 40}],
        "annotations": [{"image_id": 7, "file_name": "000000000007.png", "segments_info": [
            {"id": 1, "category_id": 1, "iscrowd": 0, "area": 150, "bbox": [5, 5, 15, 10]},
            {"id": 2, "category_id": 184, "iscrowd": 0, "area": 400, "bbox": [0, 20, 40, 10]},
            {"id": 3, "category_id": 1, "iscrowd": 1, "area": 30, "bbox": [30, 0, 10, 3]},
        ]}],
        "categories": [{"id": 184, "name": "tree-merged", "isthing": 0}, {"id": 1, "name": "person", "isthing": 1}],
    }  # fmt: skip
    with open(os.path.join(root, "coco/annotations/panoptic_val2017.json"), "w") as f:
        json.dump(data, f)


@pytest.fixture
def test_name(monkeypatch):
    name = "test_click_panoptic"
    monkeypatch.setattr(panoptic, "BUILTIN_COCO_PANOPTIC", {name: panoptic.BUILTIN_COCO_PANOPTIC["coco_2017_val_panoptic"]})
    yield name
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_panoptic_loads_every_non_crowd_segment(tmp_path, test_name):
    _write_panoptic(str(tmp_path))
    assert panoptic.register_all_panoptic(str(tmp_path)) == [test_name]
    dicts = DatasetCatalog.get(test_name)
    meta = MetadataCatalog.get(test_name)
    assert meta.thing_classes == ["person", "tree-merged"] and meta.evaluator_type == "coco_panoptic_seg"
    assert [(s["id"], s["category_id"], s["isthing"]) for s in dicts[0]["segments_info"]] == [
        (1, 0, True), (2, 1, False), (3, 0, True)]  # fmt: skip
    mapped = ClickMapper()(dicts[0])
    assert tuple(mapped["image"].shape) == (3, 800, 1067) and (mapped["height"], mapped["width"]) == (30, 40)
    gt = mapped["instances"]
    assert gt.gt_classes.tolist() == [0, 1] and gt.gt_part_of.tolist() == [-1, -1]  # the crowd left out
    masks = gt.gt_masks.tensor
    assert masks.shape == (2, 30, 40) and masks[0].sum() == 150 and masks[1].sum() == 400
    assert "segments_info" not in mapped and "pan_seg_file_name" not in mapped


def test_missing_panoptic_dataset_names_the_file(tmp_path, test_name):
    panoptic.register_all_panoptic(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="panoptic_val2017.json.*DETECTRON2_DATASETS"):
        DatasetCatalog.get(test_name)


def test_coco_panoptic_name_is_registered():
    assert "coco_2017_val_panoptic" in DatasetCatalog.list()


def test_click_mapper_keeps_the_part_of_links_of_shapes_with_parts():
    record = DatasetCatalog.get("shapes_parts_val")[0]
    mapped = ClickMapper(short_edge=None)(record)
    gt = mapped["instances"]
    assert tuple(mapped["image"].shape) == (3, 128, 128)
    annotations = record["annotations"]
    assert len(gt) == len(annotations) and gt.gt_classes.tolist() == [a["category_id"] for a in annotations]
    ids = [a["id"] for a in annotations]
    expected = [ids.index(a["part_of"]) if "part_of" in a else -1 for a in annotations]
    assert gt.gt_part_of.tolist() == expected and max(expected) >= 0
    masks = gt.gt_masks.tensor
    for child, parent in enumerate(expected):
        if parent >= 0:
            assert not (masks[child] & ~masks[parent]).any()
