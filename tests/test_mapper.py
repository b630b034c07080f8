"""Image reading and the detection mapper: formats, errors, boxes and masks kept consistent."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image
from pycocotools import mask as mask_util

from samantics_d2.d2 import BitMasks, Boxes, BoxMode, Instances, load_coco_json
from samantics_d2.data import (
    DetectionMapper,
    large_scale_jitter,
    random_flip,
    read_image,
    resize_shortest_edge,
    to_rgb_uint8,
)
from samantics_d2.data.shapes import generate_shapes

H, W = 40, 60


# ------------------------------------------------------------------ image reading
def test_read_gray_rgba_16bit_palette_as_rgb(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    deep = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray(rgba[..., :3]).convert("P", palette=Image.ADAPTIVE, colors=16).save(tmp_path / "palette.png")
    expected = {
        "gray": np.repeat(gray[..., None], 3, axis=2),
        "rgba": rgba[..., :3],
        "deep": np.repeat(np.round(deep / 257.0).astype(np.uint8)[..., None], 3, axis=2),
    }
    for name, want in expected.items():
        got = read_image(str(tmp_path / f"{name}.png"))
        assert got.dtype == np.uint8 and got.shape == (H, W, 3), name
        np.testing.assert_array_equal(got, want, err_msg=name)
    palette = read_image(str(tmp_path / "palette.png"))
    assert palette.dtype == np.uint8 and palette.shape == (H, W, 3)
    np.testing.assert_array_equal(read_image(str(tmp_path / "rgba.png"), "BGR"), rgba[..., 2::-1])
    assert read_image(str(tmp_path / "gray.png"), "L").shape == (H, W, 1)
    np.testing.assert_array_equal(read_image(str(tmp_path / "gray.png"), "L")[..., 0], gray)


def test_read_applies_exif_orientation(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    np.testing.assert_array_equal(read_image(str(tmp_path / "rotated.png")), np.rot90(pixels, k=-1))


def test_to_rgb_uint8_conversions_and_errors():
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[True, False]])), [[[255] * 3, [0] * 3]])
    np.testing.assert_array_equal(to_rgb_uint8(np.full((1, 2, 1), 0.5, np.float32)), np.full((1, 2, 3), 128))
    for bad, words in [
        (np.zeros((4, 4, 2), np.uint8), "(4, 4, 2)"),
        (np.zeros((4, 4), np.int32), "int32"),
        (np.full((2, 2, 3), 2.0), "[0, 1]"),
        (np.zeros((2, 2, 3, 1), np.uint8), "(2, 2, 3, 1)"),
    ]:
        with pytest.raises(ValueError) as info:
            to_rgb_uint8(bad)
        assert words in str(info.value)


def test_unreadable_or_missing_image_names_the_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    mapper = DetectionMapper(is_train=False, augmentations=[])
    with pytest.raises(OSError) as info:
        mapper({"file_name": str(broken), "height": H, "width": W, "image_id": 0})
    assert str(broken) in str(info.value)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(OSError) as info:
        mapper({"file_name": missing, "height": H, "width": W, "image_id": 0})
    assert missing in str(info.value)


# ------------------------------------------------------------------ mapper
def _rect(x0, y0, x1, y1):
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def _mask_bbox(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.fixture
def record(tmp_path):
    """A 60x40 image with two instances (polygon, RLE), a crowd region, and its dataset dict."""
    pixels = np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    triangle = [[5.0, 5.0, 25.0, 8.0, 12.0, 30.0]]
    blob = np.zeros((H, W), np.uint8)
    blob[20:35, 40:55] = 1
    blob[25:30, 30:40] = 1
    blob_rle = mask_util.encode(np.asfortranarray(blob))
    blob_rle["counts"] = blob_rle["counts"].decode()  # as stored in json
    triangle_rle = mask_util.merge(mask_util.frPyObjects(triangle, H, W))
    annotations = [
        {"bbox": mask_util.toBbox(triangle_rle).tolist(), "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2,
         "segmentation": triangle, "iscrowd": 0},
        {"bbox": [0, 0, 10, 10], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "segmentation": [_rect(0, 0, 10, 10)],
         "iscrowd": 1},
        {"bbox": [30.0, 20.0, 55.0, 35.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1, "segmentation": blob_rle,
         "iscrowd": 0},
    ]
    record = {"file_name": str(tmp_path / "image.png"), "height": H, "width": W, "image_id": 7, "annotations": annotations}
    return record, pixels


def _check_consistent(instances: Instances, size, tolerance: float = 0.0):
    assert instances.image_size == size
    assert isinstance(instances.gt_boxes, Boxes) and isinstance(instances.gt_masks, BitMasks)
    masks = instances.gt_masks.tensor
    assert masks.dtype == torch.bool and tuple(masks.shape[1:]) == size
    for box, mask in zip(instances.gt_boxes.tensor, masks):
        np.testing.assert_allclose(box.tolist(), _mask_bbox(mask), atol=tolerance)


def test_mapper_flip_keeps_boxes_masks_and_image_consistent(record):
    record, pixels = record
    original = {k: v for k, v in record.items()}
    out = DetectionMapper(is_train=True, augmentations=[random_flip(prob=1.0)])(record)  # nested lists are flattened
    assert record == original  # the input dict is not modified
    assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, H, W)
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), pixels[:, ::-1])
    assert (out["height"], out["width"], out["image_id"]) == (H, W, 7) and "annotations" not in out
    instances = out["instances"]
    assert instances.gt_classes.tolist() == [2, 1] and instances.gt_classes.dtype == torch.int64  # crowd dropped
    _check_consistent(instances, (H, W))
    # the flipped triangle mask is the mirror image of the unflipped one
    plain = DetectionMapper(is_train=True, augmentations=[])(record)["instances"]
    _check_consistent(plain, (H, W))
    torch.testing.assert_close(instances.gt_masks.tensor, plain.gt_masks.tensor.flip(-1))
    x0, y0, x1, y1 = plain.gt_boxes.tensor[0].tolist()
    assert instances.gt_boxes.tensor[0].tolist() == [W - x1, y0, W - x0, y1]


@pytest.mark.parametrize("short_edge, tolerance", [(80, 0.0), (57, 60 / 57 * 2)])
def test_mapper_resize_keeps_boxes_and_masks_consistent(record, short_edge, tolerance):
    record, _ = record
    out = DetectionMapper(is_train=True, augmentations=resize_shortest_edge(short_edge, max_size=1000))(record)
    new_h, new_w = out["image"].shape[1:]
    assert new_h == short_edge and abs(new_w - W * short_edge / H) < 1  # aspect ratio kept (to rounding)
    assert (out["height"], out["width"]) == (H, W)  # original size, for the evaluator
    instances = out["instances"]
    assert len(instances) == 2
    _check_consistent(instances, (new_h, new_w), tolerance)
    plain = DetectionMapper(is_train=True, augmentations=[])(record)["instances"]
    scale = torch.tensor([new_w / W, new_h / H, new_w / W, new_h / H])
    torch.testing.assert_close(instances.gt_boxes.tensor, plain.gt_boxes.tensor * scale, atol=1e-3, rtol=0)


def test_mapper_large_scale_jitter_with_recomputed_boxes(record):
    record, _ = record
    torch.manual_seed(0)
    mapper = DetectionMapper(is_train=True, augmentations=large_scale_jitter(64, 0.5, 2.0), recompute_boxes=True)
    for _ in range(5):
        instances = mapper(record)["instances"]
        assert instances.image_size == (64, 64)
        assert bool(instances.gt_masks.nonempty().all())
        _check_consistent(instances, (64, 64))


def test_mapper_drops_instances_left_empty(record):
    record, _ = record
    out = DetectionMapper(is_train=True, augmentations=[T.CenterCrop((6, 6))])(record)  # the centre holds no object
    assert len(out["instances"]) == 0 and tuple(out["image"].shape) == (3, 6, 6)
    assert out["instances"].gt_masks.tensor.shape == (0, 6, 6)
    no_masks = DetectionMapper(is_train=True, augmentations=[], use_instance_mask=False)(record)["instances"]
    assert not no_masks.has("gt_masks") and len(no_masks) == 2


def test_mapper_inference_mode_and_size_mismatch(record, tmp_path):
    record, _ = record
    out = DetectionMapper(is_train=False, augmentations=resize_shortest_edge(20))(record)
    assert tuple(out["image"].shape) == (3, 20, 30) and (out["height"], out["width"]) == (H, W)
    assert "instances" not in out and "annotations" not in out and out["file_name"] == record["file_name"]
    Image.fromarray(np.full((H, W), 100, np.uint8)).save(tmp_path / "gray.png")
    gray = DetectionMapper(is_train=False, augmentations=[])({**record, "file_name": str(tmp_path / "gray.png")})
    assert gray["image"].dtype == torch.uint8 and bool((gray["image"] == 100).all()) and gray["image"].shape[0] == 3
    with pytest.raises(ValueError) as info:
        DetectionMapper(is_train=False, augmentations=[])({**record, "height": H + 1})
    assert record["file_name"] in str(info.value)


def test_mapper_on_generated_shapes(tmp_path):
    json_file = generate_shapes(str(tmp_path), num_images=2, image_size=64, seed=0)
    dicts = load_coco_json(json_file, str(tmp_path / "images"))
    mapper = DetectionMapper(is_train=True, augmentations=random_flip(prob=1.0))
    for d in dicts:
        instances = mapper(d)["instances"]
        assert len(instances) == len(d["annotations"])
        _check_consistent(instances, (64, 64))
