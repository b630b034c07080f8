"""Catalogs, COCO/LVIS loading, dataset dicts and data loaders (against the active backend)."""
from __future__ import annotations

import itertools
import json
import logging
import os

import numpy as np
import pytest
from pycocotools import mask as mask_util

import samantics_d2.data  # noqa: F401  (registers the builtin and shapes datasets)
from samantics_d2.d2 import (
    BoxMode,
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    comm,
    get_detection_dataset_dicts,
    load_coco_json,
    load_lvis_json,
    register_coco_instances,
)


@pytest.fixture
def names():
    """Dataset names used by a test, unregistered afterwards."""
    used: list[str] = []
    yield used
    for name in used:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def _polygon_rect(x0, y0, x1, y1):
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def _write_coco(tmp_path, name="coco.json"):
    """A small COCO file: unsorted, non-contiguous category ids, an RLE, a degenerate polygon, an empty image."""
    mask = np.pad(np.ones((4, 5), np.uint8), ((2, 14), (3, 12)))  # 20 x 20
    rle = mask_util.encode(np.asfortranarray(mask))
    # uncompressed RLE: run lengths of the column-major mask, starting with zeros
    flat = mask.ravel(order="F")
    runs = [len(list(g)) for _, g in itertools.groupby(flat)]
    uncompressed = {"size": [20, 20], "counts": runs if flat[0] == 0 else [0] + runs}
    data = {
        "images": [
            {"id": 7, "file_name": "b.png", "height": 20, "width": 30},
            {"id": 3, "file_name": "a.png", "height": 20, "width": 20},
            {"id": 9, "file_name": "c.png", "height": 20, "width": 20},  # no annotations
        ],
        "categories": [{"id": 10, "name": "zebra"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 10, "bbox": [1, 1, 4, 4], "iscrowd": 0, "area": 16.0,
             "segmentation": [_polygon_rect(1, 1, 5, 5)]},
            {"id": 2, "image_id": 3, "category_id": 3, "bbox": [3, 2, 5, 4], "iscrowd": 1, "area": 20.0,
             "segmentation": uncompressed},
            {"id": 3, "image_id": 7, "category_id": 7, "bbox": [0, 0, 2, 2], "iscrowd": 0, "area": 4.0,
             "segmentation": [[1.0, 1.0, 2.0, 2.0]]},  # degenerate: 2 points -> instance dropped
            {"id": 4, "image_id": 7, "category_id": 7, "bbox": [5, 5, 6, 6], "iscrowd": 0, "area": 36.0,
             "segmentation": [_polygon_rect(5, 5, 11, 11), [3.0, 3.0]]},  # one valid, one degenerate polygon
            {"id": 5, "image_id": 7, "category_id": 3, "bbox": [2, 2, 2, 2], "iscrowd": 0, "area": 0.0,
             "segmentation": []},  # empty -> dropped
        ],
    }
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path), data, rle


# ------------------------------------------------------------------ catalogs
def test_dataset_catalog_register_get_remove(names):
    names.append("test_data_catalog")
    DatasetCatalog.register("test_data_catalog", lambda: [{"x": 1}])
    assert "test_data_catalog" in DatasetCatalog.list()
    assert DatasetCatalog.get("test_data_catalog") == [{"x": 1}]
    with pytest.raises((AssertionError, KeyError, ValueError)):
        DatasetCatalog.register("test_data_catalog", lambda: [])
    with pytest.raises(KeyError) as info:
        DatasetCatalog.get("test_data_nope")
    assert "test_data_nope" in str(info.value) and "test_data_catalog" in str(info.value)
    DatasetCatalog.remove("test_data_catalog")
    assert "test_data_catalog" not in DatasetCatalog.list()


def test_metadata_is_fixed_once_set(names):
    names.append("test_data_meta")
    meta = MetadataCatalog.get("test_data_meta")
    assert MetadataCatalog.get("test_data_meta") is meta
    meta.set(thing_classes=["a", "b"], evaluator_type="coco")
    meta.thing_classes = ["a", "b"]  # the same value again is fine
    with pytest.raises((AssertionError, AttributeError)):
        meta.thing_classes = ["a", "c"]
    assert meta.thing_classes == ["a", "b"]
    assert meta.get("missing", 5) == 5
    with pytest.raises(AttributeError):
        _ = meta.missing
    assert meta.as_dict()["evaluator_type"] == "coco"
    MetadataCatalog.remove("test_data_meta")
    assert not hasattr(MetadataCatalog.get("test_data_meta"), "thing_classes")


# ------------------------------------------------------------------ COCO / LVIS
def test_load_coco_json(tmp_path, names, caplog):
    names.append("test_data_coco")
    json_file, data, rle = _write_coco(tmp_path)
    with caplog.at_level(logging.WARNING):
        dicts = load_coco_json(json_file, str(tmp_path / "img"), "test_data_coco")
    meta = MetadataCatalog.get("test_data_coco")
    # classes sorted by category id: 3 cat, 7 dog, 10 zebra
    assert meta.thing_classes == ["cat", "dog", "zebra"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 10: 2}
    assert [d["image_id"] for d in dicts] == [3, 7, 9]
    assert dicts[0]["file_name"] == os.path.join(str(tmp_path / "img"), "a.png")
    assert (dicts[1]["height"], dicts[1]["width"]) == (20, 30)
    first = dicts[0]["annotations"]
    assert [a["category_id"] for a in first] == [2, 0]
    assert all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in first)
    assert first[0]["bbox"] == [1, 1, 4, 4] and first[0]["iscrowd"] == 0
    # uncompressed RLE -> compressed RLE of the same mask
    crowd = first[1]["segmentation"]
    assert isinstance(crowd, dict) and not isinstance(crowd["counts"], list)
    np.testing.assert_array_equal(mask_util.decode(crowd), mask_util.decode(rle))
    # the degenerate and empty instances are dropped, a degenerate polygon inside a valid instance too
    second = dicts[1]["annotations"]
    assert len(second) == 1 and second[0]["segmentation"] == [_polygon_rect(5, 5, 11, 11)]
    assert dicts[2]["annotations"] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("fewer than 3 points" in m and json_file in m for m in warnings)
    # without a dataset name, category ids stay as in the file
    raw = load_coco_json(json_file, "img")
    assert [a["category_id"] for a in raw[0]["annotations"]] == [10, 3]
    # extra keys are copied when asked for
    with_area = load_coco_json(json_file, "img", extra_annotation_keys=["area"])
    assert with_area[0]["annotations"][0]["area"] == 16.0


def test_register_coco_instances_is_lazy(tmp_path, names):
    names.append("test_data_registered")
    json_file = str(tmp_path / "later.json")
    register_coco_instances("test_data_registered", {"extra": 1}, json_file, str(tmp_path))
    meta = MetadataCatalog.get("test_data_registered")
    assert (meta.json_file, meta.image_root, meta.evaluator_type, meta.extra) == (json_file, str(tmp_path), "coco", 1)
    _write_coco(tmp_path, "later.json")  # written after registration: read at get time
    assert len(DatasetCatalog.get("test_data_registered")) == 3


def test_missing_json_names_path_and_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    missing = str(tmp_path / "coco" / "annotations" / "nope.json")
    with pytest.raises(FileNotFoundError) as info:
        load_coco_json(missing, str(tmp_path))
    assert missing in str(info.value) and "DETECTRON2_DATASETS" in str(info.value)


def test_missing_dataset_root_names_path_and_variable(tmp_path, monkeypatch):
    root = tmp_path / "no_such_root"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    for name in ("coco_2017_val", "lvis_v1_train"):
        with pytest.raises(FileNotFoundError) as info:
            DatasetCatalog.get(name)
        assert str(root) in str(info.value) and "DETECTRON2_DATASETS" in str(info.value)


def test_builtin_coco_reads_root_at_call_time(tmp_path, monkeypatch):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    json_file, _, _ = _write_coco(tmp_path / "coco" / "annotations", "instances_val2017.json")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    had_json = MetadataCatalog.get("coco_2017_val").get("json_file")
    if had_json is not None and had_json != json_file:
        pytest.fail(f"coco_2017_val metadata already points to {had_json}; run this test in a fresh process")
    try:
        dicts = DatasetCatalog.get("coco_2017_val")
        assert len(dicts) == 3
        assert dicts[0]["file_name"] == os.path.join(str(tmp_path), "coco/val2017", "a.png")
        meta = MetadataCatalog.get("coco_2017_val")
        assert meta.json_file == json_file and meta.evaluator_type == "coco"
    finally:  # leave coco_2017_val as registered at import (metadata without paths)
        evaluator_type = MetadataCatalog.get("coco_2017_val").evaluator_type
        MetadataCatalog.remove("coco_2017_val")
        MetadataCatalog.get("coco_2017_val").set(evaluator_type=evaluator_type)


@pytest.mark.parametrize(
    "content, key",
    [({"images": [], "categories": []}, "annotations"), ({"foo": 1}, "images"), ([1, 2], "list")],
)
def test_json_that_is_not_coco(tmp_path, content, key):
    path = tmp_path / "not_coco.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as info:
        load_coco_json(str(path), str(tmp_path))
    assert str(path) in str(info.value) and key in str(info.value)


def test_load_lvis_json(tmp_path, names):
    names.append("test_data_lvis")
    data = {
        "images": [
            {"id": 5, "height": 10, "width": 12, "coco_url": "http://images.cocodataset.org/val2017/000000000005.jpg",
             "not_exhaustive_category_ids": [20], "neg_category_ids": [4]},
            {"id": 2, "height": 10, "width": 12, "coco_url": "http://images.cocodataset.org/train2017/000000000002.jpg"},
        ],
        "categories": [{"id": 20, "name": "b_thing", "image_count": 1}, {"id": 4, "name": "a_thing", "image_count": 2}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 20, "bbox": [1, 1, 3, 3], "segmentation": [_polygon_rect(1, 1, 4, 4)],
             "area": 9.0},
            {"id": 2, "image_id": 2, "category_id": 4, "bbox": [0, 0, 2, 2], "segmentation": [_polygon_rect(0, 0, 2, 2)],
             "area": 4.0},
        ],
    }
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(data))
    dicts = load_lvis_json(str(path), "root", "test_data_lvis")
    assert [d["image_id"] for d in dicts] == [2, 5]
    assert dicts[0]["file_name"] == os.path.join("root", "train2017", "000000000002.jpg")
    assert dicts[1]["file_name"] == os.path.join("root", "val2017", "000000000005.jpg")
    assert dicts[1]["not_exhaustive_category_ids"] == [20] and dicts[1]["neg_category_ids"] == [4]
    assert dicts[0]["neg_category_ids"] == []
    assert [a["category_id"] for d in dicts for a in d["annotations"]] == [0, 1]  # ids 4 -> 0, 20 -> 1
    assert dicts[1]["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS
    assert MetadataCatalog.get("test_data_lvis").thing_classes == ["a_thing", "b_thing"]


# ------------------------------------------------------------------ get_detection_dataset_dicts
def _toy_dicts(n: int, *, wide=lambda i: i % 2 == 0, empty=()):
    out = []
    for i in range(n):
        w, h = (40, 20) if wide(i) else (20, 40)
        annotations = [] if i in empty else [{"bbox": [0, 0, 1, 1], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                                              "iscrowd": 0}]
        out.append({"file_name": f"{i}.png", "image_id": i, "height": h, "width": w, "annotations": annotations})
    return out


def test_filter_empty(names, caplog):
    names.append("test_data_empty")
    dicts = _toy_dicts(5, empty=(1, 3))
    dicts[4]["annotations"][0]["iscrowd"] = 1  # crowd only: unusable too
    DatasetCatalog.register("test_data_empty", lambda: dicts)
    MetadataCatalog.get("test_data_empty").set(thing_classes=["thing"])
    with caplog.at_level(logging.INFO):
        kept = get_detection_dataset_dicts("test_data_empty")
    assert [d["image_id"] for d in kept] == [0, 2]
    assert any("Removed 3 images" in r.getMessage() for r in caplog.records)
    assert [d["image_id"] for d in get_detection_dataset_dicts(["test_data_empty"], filter_empty=False)] == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError) as info:
        get_detection_dataset_dicts(["test_data_empty", "test_data_unregistered"])
    assert "test_data_unregistered" in str(info.value)


# ------------------------------------------------------------------ loaders
def _ids(batches):
    return [d["image_id"] for batch in batches for d in batch]


def _fake_world(monkeypatch, rank: int, world_size: int):
    monkeypatch.setattr(comm, "get_rank", lambda: rank)
    monkeypatch.setattr(comm, "get_world_size", lambda: world_size)
    monkeypatch.setattr(comm, "shared_random_seed", lambda: 1234)


def test_train_loader_infinite_shuffled_batched(monkeypatch):
    _fake_world(monkeypatch, 0, 1)
    dicts = _toy_dicts(8)
    loader = build_detection_train_loader(dicts, mapper=lambda d: d, total_batch_size=2, aspect_ratio_grouping=False)
    batches = list(itertools.islice(iter(loader), 12))  # 24 items: three passes over 8
    assert all(isinstance(b, list) and len(b) == 2 and isinstance(b[0], dict) for b in batches)
    ids = _ids(batches)
    passes = [ids[i : i + 8] for i in range(0, 24, 8)]
    assert all(sorted(p) == list(range(8)) for p in passes)  # each pass is a permutation
    assert passes[0] != list(range(8)) or passes[1] != list(range(8))  # shuffled


def test_train_loader_shards_ranks_disjointly(monkeypatch):
    dicts = _toy_dicts(12)
    seen = []
    for rank in range(2):
        _fake_world(monkeypatch, rank, 2)
        loader = build_detection_train_loader(dicts, mapper=lambda d: d, total_batch_size=4, aspect_ratio_grouping=False)
        batches = list(itertools.islice(iter(loader), 3))  # 3 batches of 2 per rank: half a pass
        assert all(len(b) == 2 for b in batches)
        seen.append(_ids(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))
    with pytest.raises(ValueError):
        build_detection_train_loader(dicts, mapper=None, total_batch_size=3)  # 3 is not a multiple of 2 ranks


def test_train_loader_groups_aspect_ratios_and_retries_none(monkeypatch):
    _fake_world(monkeypatch, 0, 1)
    dicts = _toy_dicts(12, wide=lambda i: i % 3 == 0)
    rejected = {1, 4}

    def mapper(d):
        return None if d["image_id"] in rejected else d

    loader = build_detection_train_loader(dicts, mapper=mapper, total_batch_size=3, aspect_ratio_grouping=True)
    batches = list(itertools.islice(iter(loader), 10))
    kinds = set()
    for batch in batches:
        assert len(batch) == 3
        wide = {d["width"] > d["height"] for d in batch}
        assert len(wide) == 1, f"a batch mixes landscape and portrait images: {batch}"
        kinds |= wide
    assert kinds == {True, False}
    assert not rejected & set(_ids(batches))


@pytest.mark.parametrize("world_size, size", [(1, 5), (3, 10), (4, 2)])
def test_test_loader_shards_are_contiguous_and_ordered(monkeypatch, world_size, size):
    dicts = _toy_dicts(size)
    shards = []
    for rank in range(world_size):
        _fake_world(monkeypatch, rank, world_size)
        loader = build_detection_test_loader(dicts, mapper=lambda d: d)
        shard = _ids(loader)
        if shard:
            assert shard == list(range(shard[0], shard[0] + len(shard)))
        shards.append(shard)
    assert list(itertools.chain(*shards)) == list(range(size))  # ordered union, no padding
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
