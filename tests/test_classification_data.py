"""Classification datasets: image folders, ImageNet layout, shapes crops, the classification mapper."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from samantics_d2.d2 import BoxMode, DatasetCatalog, MetadataCatalog
from samantics_d2.data.classification import (
    ClassificationMapper,
    list_image_folder,
    register_detection_crops,
    register_image_folder,
)
from samantics_d2.data.io import read_image


def write_image(path, shape=(6, 5, 3), value=100, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    array = np.full(shape, value, dtype=np.uint8)
    Image.fromarray(array, mode=mode).save(path)


@pytest.fixture
def folder(tmp_path):
    for rel in ("b/1.png", "b/0.JPEG", "a/x/2.png", "a/1.jpg", "c/9.bmp"):
        write_image(str(tmp_path / "root" / rel))
    (tmp_path / "root" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "root" / "empty").mkdir()
    return tmp_path / "root"


def test_image_folder_lists_classes_in_order(folder):
    dicts, classes = list_image_folder(str(folder))
    assert classes == ["a", "b", "c", "empty"]
    assert [(d["image_id"], d["label"]) for d in dicts] == [
        ("a/1.jpg", 0), ("a/x/2.png", 0), ("b/0.JPEG", 1), ("b/1.png", 1), ("c/9.bmp", 2)]
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    # class_names choose the classes and their order; other folders are ignored.
    dicts, classes = list_image_folder(str(folder), class_names=["c", "a"])
    assert classes == ["c", "a"] and [(d["image_id"], d["label"]) for d in dicts] == [
        ("c/9.bmp", 0), ("a/1.jpg", 1), ("a/x/2.png", 1)]
    with pytest.raises(FileNotFoundError, match=r"\['zebra'\]"):
        list_image_folder(str(folder), class_names=["a", "zebra"])


def test_register_image_folder_is_lazy_with_classification_metadata(folder, tmp_path):
    register_image_folder("test_cls_folder", str(folder))
    register_image_folder("test_cls_missing", str(tmp_path / "nowhere"))  # registering reads nothing
    try:
        meta = MetadataCatalog.get("test_cls_folder")
        assert meta.evaluator_type == "classification" and meta.image_root == str(folder)
        assert meta.get("classes") is None
        assert len(DatasetCatalog.get("test_cls_folder")) == 5
        assert meta.classes == ["a", "b", "c", "empty"]
        with pytest.raises(FileNotFoundError, match="nowhere"):
            DatasetCatalog.get("test_cls_missing")
    finally:
        for name in ("test_cls_folder", "test_cls_missing"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_imagenet_reads_the_root_at_load_time(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        DatasetCatalog.get("imagenet_val")
    assert os.path.join(str(tmp_path), "imagenet", "val") in str(error.value)
    assert "DETECTRON2_DATASETS" in str(error.value)
    for split, wnid, name in (("train", "n02", "a.JPEG"), ("train", "n01", "b.JPEG"), ("val", "n02", "c.JPEG"),
                              ("val", "n01", "d.JPEG"), ("val", "n01", "e.JPEG")):
        write_image(str(tmp_path / "imagenet" / split / wnid / name))
    (tmp_path / "imagenet" / "val" / "n00_extra").mkdir()  # not a train class: ignored in val
    val = DatasetCatalog.get("imagenet_val")
    assert [(d["image_id"], d["label"]) for d in val] == [("n01/d.JPEG", 0), ("n01/e.JPEG", 0), ("n02/c.JPEG", 1)]
    assert MetadataCatalog.get("imagenet_val").classes == ["n01", "n02"]
    assert MetadataCatalog.get("imagenet_val").evaluator_type == "classification"
    assert len(DatasetCatalog.get("imagenet_train")) == 2


def test_shapes_crops_are_made_once_per_instance(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path))
    crops = DatasetCatalog.get("shapes_val_cls")
    source = DatasetCatalog.get("shapes_val")
    instances = [(d, a) for d in source for a in d["annotations"] if not a.get("iscrowd", 0)]
    assert len(crops) == len(instances) > 16
    assert MetadataCatalog.get("shapes_val_cls").classes == MetadataCatalog.get("shapes_val").thing_classes
    # Each crop is its instance's box grown by 10% on each side, cut from the source image.
    for crop, (image_dict, ann) in list(zip(crops, instances))[::7]:
        assert crop["label"] == ann["category_id"] and crop["source_file_name"] == image_dict["file_name"]
        x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
        w, h = x1 - x0, y1 - y0
        left, top = max(0, int(np.floor(x0 - 0.1 * w))), max(0, int(np.floor(y0 - 0.1 * h)))
        right = min(image_dict["width"], int(np.ceil(x1 + 0.1 * w)))
        bottom = min(image_dict["height"], int(np.ceil(y1 + 0.1 * h)))
        pixels = read_image(crop["file_name"])
        np.testing.assert_array_equal(pixels, read_image(image_dict["file_name"])[top:bottom, left:right])
        assert (crop["height"], crop["width"]) == pixels.shape[:2]
    folder = os.path.dirname(crops[0]["file_name"])
    assert folder.startswith(os.path.join(str(tmp_path), "classification_crops"))
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    mtimes = {c["file_name"]: os.stat(c["file_name"]).st_mtime_ns for c in crops}
    assert DatasetCatalog.get("shapes_val_cls") == crops  # second load: the crops on disk are reused
    assert {c["file_name"]: os.stat(c["file_name"]).st_mtime_ns for c in crops} == mtimes
    # Other crop parameters never reuse these crops.
    register_detection_crops("test_shapes_val_cls_wide", "shapes_val", output_dir=str(tmp_path / "wide"), context=0.5)
    try:
        wide = DatasetCatalog.get("test_shapes_val_cls_wide")
        assert len(wide) == len(crops) and os.path.dirname(wide[0]["file_name"]) != folder
        assert sum(c["height"] * c["width"] for c in wide) > sum(c["height"] * c["width"] for c in crops)
    finally:
        DatasetCatalog.remove("test_shapes_val_cls_wide")
        MetadataCatalog.remove("test_shapes_val_cls_wide")


def test_classification_mapper(tmp_path, caplog):
    write_image(str(tmp_path / "gray.png"), shape=(4, 7), value=9)
    Image.fromarray(np.full((3, 2, 4), 50, dtype=np.uint8), mode="RGBA").save(tmp_path / "rgba.png")
    mapper = ClassificationMapper()
    out = mapper({"file_name": str(tmp_path / "gray.png"), "image_id": "g", "label": 3})
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 4, 7)
    assert (out["label"], out["height"], out["width"], out["image_id"]) == (3, 4, 7, "g")
    assert int(out["image"].max()) == 9
    assert mapper({"file_name": str(tmp_path / "rgba.png"), "label": 0})["image"].shape == (3, 3, 2)
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.raises(OSError, match="broken.png"):
        mapper({"file_name": str(tmp_path / "broken.png"), "label": 0})
    with caplog.at_level("WARNING"):
        assert ClassificationMapper(skip_unreadable=True)({"file_name": str(tmp_path / "broken.png"), "label": 0}) is None
    assert "broken.png" in caplog.text
