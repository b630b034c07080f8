"""Catalogs, COCO/LVIS loading, dataset dicts and data loaders (against the active backend)."""
from __future__ import annotations

import itertools
import json
import logging
import os
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_util

import samantics_d2.data  # noqa: F401  (registers the builtin and shapes datasets)
from samantics_d2.data.builtin import BUILTIN_COCO, BUILTIN_LVIS, register_all_builtin
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
             "segmentation": []},  # empty -> kept, box only (Detectron2)
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
    # the degenerate instance is dropped, a degenerate polygon inside a valid instance too; an empty
    # segmentation keeps its instance as a box-only annotation (Detectron2's behaviour)
    second = dicts[1]["annotations"]
    assert len(second) == 2 and second[0]["segmentation"] == [_polygon_rect(5, 5, 11, 11)]
    assert "segmentation" not in second[1] and second[1]["bbox"] == [2, 2, 2, 2] and second[1]["category_id"] == 0
    assert dicts[2]["annotations"] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("valid segmentation" in m for m in warnings)
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


def test_missing_json_names_path(tmp_path):
    missing = str(tmp_path / "coco" / "annotations" / "nope.json")
    with pytest.raises(FileNotFoundError) as info:
        load_coco_json(missing, str(tmp_path))
    assert missing in str(info.value)


BUILTIN = {**{n: (*p, "coco") for n, p in BUILTIN_COCO.items()}, **{n: (*p, "lvis") for n, p in BUILTIN_LVIS.items()}}


def test_builtin_names_are_registered_as_detectron2_does():
    # At import, under $DETECTRON2_DATASETS read then (by Detectron2 itself in Detectron2 mode).
    root = os.path.expanduser(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    for name, (image_dir, json_name, evaluator_type) in BUILTIN.items():
        meta = MetadataCatalog.get(name)
        assert name in DatasetCatalog.list()
        assert (meta.json_file, meta.image_root) == (os.path.join(root, json_name), os.path.join(root, image_dir))
        assert meta.evaluator_type == evaluator_type


@pytest.fixture
def builtin_under(monkeypatch):
    """Registers the builtin names with ``register_all_builtin(root)`` instead; restores them after."""
    saved = {name: (DatasetCatalog[name], MetadataCatalog.get(name).as_dict()) for name in BUILTIN}

    def register(root):
        for name in BUILTIN:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        assert register_all_builtin(str(root)) == list(BUILTIN)

    yield register
    for name, (loader, meta) in saved.items():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(**{k: v for k, v in meta.items() if k != "name"})


def test_builtin_datasets_load_from_the_root(tmp_path, builtin_under):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    json_file, _, _ = _write_coco(tmp_path / "coco" / "annotations", "instances_val2017.json")
    builtin_under(tmp_path)
    dicts = DatasetCatalog.get("coco_2017_val")
    assert len(dicts) == 3 and dicts[0]["file_name"] == os.path.join(str(tmp_path), "coco/val2017", "a.png")
    meta = MetadataCatalog.get("coco_2017_val")
    assert meta.json_file == json_file and meta.evaluator_type == "coco" and meta.thing_classes == ["cat", "dog", "zebra"]
    with pytest.raises(FileNotFoundError) as info:  # no lvis/ under the root
        DatasetCatalog.get("lvis_v1_train")
    message = str(info.value)
    assert str(tmp_path / "lvis" / "lvis_v1_train.json") in message and "DETECTRON2_DATASETS" in message


def test_coco_json_without_annotations_or_not_an_object(tmp_path):
    # A test-set image-info file has no "annotations": its images load without annotations.
    path = tmp_path / "image_info.json"
    path.write_text(json.dumps({"images": [{"id": 4, "file_name": "x.png", "height": 5, "width": 6}],
                                "categories": [{"id": 1, "name": "a"}]}))
    assert load_coco_json(str(path), "img") == [
        {"file_name": os.path.join("img", "x.png"), "height": 5, "width": 6, "image_id": 4, "annotations": []}
    ]
    path.write_text(json.dumps([1, 2]))
    with pytest.raises((AssertionError, ValueError), match="list"):  # Detectron2: pycocotools' assertion
        load_coco_json(str(path), str(tmp_path))


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
    dicts = load_lvis_json(str(path), "root/")
    assert [d["image_id"] for d in dicts] == [2, 5]
    assert dicts[0]["file_name"] == os.path.join("root", "train2017", "000000000002.jpg")
    assert dicts[1]["file_name"] == os.path.join("root", "val2017", "000000000005.jpg")
    assert dicts[1]["not_exhaustive_category_ids"] == [20] and dicts[1]["neg_category_ids"] == [4]
    assert dicts[0]["neg_category_ids"] == []
    assert [a["category_id"] for d in dicts for a in d["annotations"]] == [3, 19]  # LVIS ids are 1-based: id - 1
    assert dicts[1]["annotations"][0]["bbox_mode"] == BoxMode.XYWH_ABS
    # As Detectron2: a dataset name selects built-in LVIS metadata by version ("v1", "v0.5")
    with pytest.raises(ValueError, match="No built-in metadata"):
        load_lvis_json(str(path), "root/", "test_data_lvis")


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
    # Detectron2's loader module imports get_world_size by name (for the per-rank batch size)
    loader_module = sys.modules[build_detection_train_loader.__module__]
    monkeypatch.setattr(loader_module, "get_world_size", lambda: world_size, raising=False)


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
    with pytest.raises((AssertionError, ValueError), match="(?i)total.batch.size"):  # Detectron2 asserts
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
