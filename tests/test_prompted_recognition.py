"""Prompted recognition as Open-Vocabulary SAM evaluates it: prompts from GT instances (box, centre
point), the evaluator's numbers on a hand-made case, the mapper and the COCO open-vocabulary split."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from samantics_d2.d2 import BitMasks, Boxes, BoxMode, DatasetCatalog, Instances, MetadataCatalog, comm, launch
from samantics_d2.data import builtin
from samantics_d2.data.prompted import (
    COCO_OV_BASE_CLASSES,
    COCO_OV_CLASSES,
    COCO_OV_NOVEL_CLASSES,
    PromptedRecognitionMapper,
    centre_points,
    load_coco_ov_json,
    lvis_base_novel_split,
    long_side_shape,
    prompts_from_instances,
)
from samantics_d2.evaluation import PromptedRecognitionEvaluator
from samantics_d2.evaluation import prompted_recognition as prompted_module


def _mask(height, width, *regions):
    """``[H, W]`` bool mask, True on each ``(row0, row1, col0, col1)`` (inclusive) region."""
    mask = np.zeros((height, width), dtype=bool)
    for r0, r1, c0, c1 in regions:
        mask[r0 : r1 + 1, c0 : c1 + 1] = True
    return mask


def _points(*masks):
    return centre_points(torch.from_numpy(np.stack(masks))).tolist()


# ------------------------------------------------------------------ centre point
def test_centre_point_rectangle_ties_go_to_first_pixel_in_row_major_order():
    # Rows 2..5 are 1,2,2,1 from the zeros above/below, columns 3..9 are 1,2,3,4,3,2,1: the
    # distance min(row, col) is 2 on rows 3-4, columns 4-8; the first of them is row 3, column 4.
    assert _points(_mask(12, 12, (2, 5, 3, 9))) == [[4.0, 3.0]]
    # Odd sizes: rows 2..6 -> 1,2,3,2,1, columns 3..9 -> ...,3,4,3...: 3 on row 4, columns 5-7.
    assert _points(_mask(12, 12, (2, 6, 3, 9))) == [[5.0, 4.0]]


def test_centre_point_l_shape_is_in_the_corner():
    # Arms 4 wide: on the arms the distance is at most 2; at (row 8, column 3) of the corner block the
    # nearest outside pixels are (6, 5) (sqrt 8), (11, 3) and (8, 0) (3): sqrt 8 = 2.83, the maximum.
    mask = _mask(14, 14, (1, 10, 1, 4), (7, 10, 1, 12))
    assert _points(mask) == [[3.0, 8.0]]


def test_centre_point_ring_lies_on_the_ring_not_in_the_hole():
    # Square ring 3 wide around a 3x3 hole: distance 2 along its mid-line; the first such pixel is (2, 2).
    ring = _mask(11, 11, (1, 9, 1, 9)) & ~_mask(11, 11, (4, 6, 4, 6))
    ((x, y),) = _points(ring)
    assert (x, y) == (2.0, 2.0) and ring[int(y), int(x)]


def test_centre_point_zero_padding_makes_the_image_border_a_mask_border():
    # A band 3 wide along the left, top and bottom borders of an 8x8 image. Padded: columns 0..2 are
    # 1,2,1 and rows 0..7 are 1,2,3,4,4,3,2,1, so the maximum 2 starts at (x=1, y=1). Without the
    # padding the border would not count and (0, 0) (distance 3 to column 3) would win.
    band = _mask(8, 8, (0, 7, 0, 2))
    assert _points(band) == [[1.0, 1.0]]


def test_centre_point_matches_brute_force_and_handles_empty_masks():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 9, 11)) < 0.6
    masks[0] = False  # empty: (0, 0) like OVSAM's argmax of an all-zero map
    expected = []
    for mask in masks:
        padded = np.pad(mask, 1)
        outside = np.argwhere(~padded)
        best, where = -1.0, (0, 0)
        for y, x in np.argwhere(padded):  # row-major order, strict '>' keeps the first maximum
            d = np.sqrt(((outside - (y, x)) ** 2).sum(1)).min()
            if d > best:
                best, where = d, (x - 1, y - 1)
        expected.append([float(where[0]), float(where[1])])
    assert _points(*masks) == expected
    assert expected[0] == [0.0, 0.0]


# ------------------------------------------------------------------ prompts
def test_long_side_shape_rounds_like_mmcv_and_sam():
    assert long_side_shape(100, 200) == (512, 1024)
    assert long_side_shape(333, 500) == (682, 1024)  # 333 * 2.048 = 681.98 -> 682
    assert long_side_shape(500, 333) == (1024, 682)
    assert long_side_shape(480, 640, 1024) == (768, 1024)
    with pytest.raises(ValueError, match="height=0"):
        long_side_shape(0, 5)


def test_box_prompt_is_the_gt_box_scaled_per_axis():
    masks = torch.zeros((1, 100, 200), dtype=torch.bool)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0]])
    prompts = prompts_from_instances(masks=masks, boxes=boxes, image_shape=(512, 1024), prompt="box")
    assert list(prompts) == ["boxes"]
    torch.testing.assert_close(prompts["boxes"], torch.tensor([[51.2, 102.4, 256.0, 307.2]]))
    with pytest.raises(ValueError, match="'polygon'"):
        prompts_from_instances(masks=masks, boxes=boxes, image_shape=(512, 1024), prompt="polygon")


def test_point_prompt_is_computed_on_the_mask_resized_by_nearest_neighbour():
    # Original rows 1-2, columns 2-5 of a 4x8 image; resized x2: rows 2-5, columns 4-11. Rows give
    # 1,2,2,1 and columns 1,2,3,4,4,3,2,1: maximum 2 first at row 3, column 5.
    masks = torch.from_numpy(_mask(4, 8, (1, 2, 2, 5)))[None]
    prompts = prompts_from_instances(masks=masks, boxes=torch.zeros((1, 4)), image_shape=(8, 16), prompt="point")
    assert list(prompts) == ["points"] and prompts["points"].tolist() == [[5.0, 3.0]]
    empty = prompts_from_instances(masks=masks[:0], boxes=torch.zeros((0, 4)), image_shape=(8, 16), prompt="point")
    assert empty["points"].shape == (0, 2)


# ------------------------------------------------------------------ evaluator
def _input(gt_masks, gt_classes, prompts, name):
    masks = torch.from_numpy(np.stack(gt_masks))
    instances = Instances(tuple(masks.shape[-2:]))
    instances.gt_masks = BitMasks(masks)
    instances.gt_classes = torch.tensor(gt_classes, dtype=torch.int64)
    return {"file_name": name, "height": masks.shape[1], "width": masks.shape[2], "instances": instances,
            "prompts": prompts}  # fmt: skip


def _output(pred_masks, pred_classes, prompts):
    masks = torch.from_numpy(np.stack(pred_masks))
    instances = Instances(tuple(masks.shape[-2:]))
    instances.pred_masks = masks
    instances.pred_classes = torch.tensor(pred_classes, dtype=torch.int64)
    instances.scores = torch.full((len(masks),), 0.9)
    for key, value in prompts.items():
        setattr(instances, {"boxes": "prompt_boxes", "points": "prompt_points"}[key], value.clone())
    return {"instances": instances}


def _hand_made_case():
    """Two images, 3 classes (0, 1 base; 2 novel; 3 = background). Per prompt (IoU, right label):
    A1 class 0: GT top-left 2x2 (4 px), predicted top two rows (8 px): 4/8 = 0.5, label 0 right.
    A2 class 2: GT bottom row, predicted the same: 1.0, label 3 (background) wrong.
    B1 class 1: GT the whole 2x3 image, predicted empty: 0.0, label 1 right.
    B2 class 2: GT first column (2 px), predicted the top row (3 px), 1 shared: 1/4 = 0.25, label 0 wrong.
    """
    prompts_a = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 3.0, 4.0, 4.0]])}
    prompts_b = {"points": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
    inputs = [
        _input([_mask(4, 4, (0, 1, 0, 1)), _mask(4, 4, (3, 3, 0, 3))], [0, 2], prompts_a, "a.jpg"),
        _input([_mask(2, 3, (0, 1, 0, 2)), _mask(2, 3, (0, 1, 0, 0))], [1, 2], prompts_b, "b.jpg"),
    ]
    outputs = [
        _output([_mask(4, 4, (0, 1, 0, 3)), _mask(4, 4, (3, 3, 0, 3))], [0, 3], prompts_a),
        _output([_mask(2, 3), _mask(2, 3, (0, 0, 0, 2))], [1, 0], prompts_b),
    ]
    return inputs, outputs


EXPECTED = {
    "IoU": 100 * (0.5 + 1.0 + 0.0 + 0.25) / 4,  # 43.75
    "IoU_b": 100 * (0.5 + 0.0) / 2,  # 25
    "IoU_n": 100 * (1.0 + 0.25) / 2,  # 62.5
    "Acc": 50.0,
    "Acc_b": 100.0,
    "Acc_n": 0.0,
    "num_prompts": 4,
    "num_base": 2,
    "num_novel": 2,
}


def _evaluator():
    return PromptedRecognitionEvaluator(num_classes=3, base_classes=[0, 1], novel_classes=[2])


def test_evaluator_reproduces_hand_computed_numbers():
    inputs, outputs = _hand_made_case()
    evaluator = _evaluator()
    evaluator.reset()
    evaluator.process(inputs[:1], outputs[:1])
    evaluator.process(inputs[1:], outputs[1:])
    assert evaluator.evaluate() == {"prompted_recognition": EXPECTED}
    evaluator.reset()
    assert evaluator.evaluate() == {}


def test_evaluator_without_split_reports_iou_and_acc_only():
    inputs, outputs = _hand_made_case()
    evaluator = PromptedRecognitionEvaluator(num_classes=3)
    evaluator.process(inputs, outputs)
    assert evaluator.evaluate() == {"prompted_recognition": {"IoU": 43.75, "Acc": 50.0, "num_prompts": 4}}


def test_evaluator_gathers_records_of_every_rank(monkeypatch):
    inputs, outputs = _hand_made_case()
    ranks = [_evaluator(), _evaluator()]
    for rank, evaluator in enumerate(ranks):
        evaluator.process(inputs[rank : rank + 1], outputs[rank : rank + 1])
    gathered = [ranks[0]._records, ranks[1]._records]
    monkeypatch.setattr(prompted_module.comm, "gather", lambda data, dst=0: gathered)
    assert ranks[0].evaluate() == {"prompted_recognition": EXPECTED}
    monkeypatch.setattr(prompted_module.comm, "is_main_process", lambda: False)
    assert ranks[1].evaluate() is None


def _launched_worker(results: dict) -> None:
    inputs, outputs = _hand_made_case()
    evaluator = _evaluator()
    evaluator.process(inputs, outputs)
    results["world_size"] = comm.get_world_size()
    results["metrics"] = evaluator.evaluate()


def test_evaluator_under_launch_with_one_process():
    results: dict = {}
    launch(_launched_worker, 1, args=(results,))
    assert results == {"world_size": 1, "metrics": {"prompted_recognition": EXPECTED}}


def test_evaluator_names_contract_violations():
    inputs, outputs = _hand_made_case()
    evaluator = _evaluator()
    other_prompts = _output([_mask(4, 4), _mask(4, 4)], [0, 0], {"boxes": torch.zeros((2, 4))})
    with pytest.raises(ValueError, match="'prompt_boxes'.*inputs\\['prompts'\\]\\['boxes'\\]"):
        evaluator.process(inputs[:1], [other_prompts])
    no_prompts = _output([_mask(4, 4), _mask(4, 4)], [0, 0], {})
    with pytest.raises(ValueError, match="'a.jpg'.*'prompt_boxes'"):
        evaluator.process(inputs[:1], [no_prompts])
    bad_label = _output([_mask(4, 4), _mask(4, 4)], [0, 4], inputs[0]["prompts"])
    with pytest.raises(ValueError, match=r"pred_classes \[4\]"):
        evaluator.process(inputs[:1], [bad_label])
    resized = _output([_mask(8, 8), _mask(8, 8)], [0, 0], inputs[0]["prompts"])
    with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
        evaluator.process(inputs[:1], [resized])
    with pytest.raises(ValueError, match="neither base nor novel"):
        PromptedRecognitionEvaluator(num_classes=3, base_classes=[0], novel_classes=[1]).process(inputs, outputs)
    with pytest.raises(ValueError, match=r"classes \[1\] are both base and novel"):
        PromptedRecognitionEvaluator(num_classes=3, base_classes=[0, 1], novel_classes=[1, 2])
    with pytest.raises(ValueError, match="both base_classes and novel_classes"):
        PromptedRecognitionEvaluator(num_classes=3, base_classes=[0, 1])
    assert evaluator._records == []


# ------------------------------------------------------------------ mapper and split
def _rect_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def test_mapper_resizes_the_image_and_derives_prompts_from_the_kept_instances(tmp_path):
    file_name = str(tmp_path / "image.png")
    Image.fromarray(np.full((20, 40, 3), 100, dtype=np.uint8)).save(file_name)
    annotations = [
        {"bbox": [4.0, 2.0, 10.0, 8.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 1, "iscrowd": 0,
         "segmentation": _rect_polygon(4, 2, 14, 10)},
        {"bbox": [20.0, 5.0, 10.0, 10.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2, "iscrowd": 1,
         "segmentation": _rect_polygon(20, 5, 30, 15)},  # crowd: no prompt
        {"bbox": [30.0, 5.0, 0.5, 10.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0,
         "segmentation": _rect_polygon(30, 5, 30.5, 15)},  # under one pixel wide: no prompt (mmdet)
    ]  # fmt: skip
    record = {"file_name": file_name, "height": 20, "width": 40, "image_id": 7, "annotations": annotations}
    boxed = PromptedRecognitionMapper(prompt="box", long_side=80)(record)
    assert boxed["image"].shape == (3, 40, 80) and boxed["image"].dtype == torch.uint8
    assert (boxed["height"], boxed["width"]) == (20, 40) and "annotations" not in boxed
    assert record["annotations"] is annotations and len(annotations) == 3  # the dataset dict is not changed
    gt = boxed["instances"]
    assert gt.image_size == (20, 40) and gt.gt_classes.tolist() == [1] and gt.gt_masks.tensor.shape == (1, 20, 40)
    torch.testing.assert_close(boxed["prompts"]["boxes"], torch.tensor([[8.0, 4.0, 28.0, 20.0]]))
    pointed = PromptedRecognitionMapper(prompt="point", long_side=80)(record)
    expected = prompts_from_instances(
        masks=gt.gt_masks.tensor, boxes=gt.gt_boxes.tensor, image_shape=(40, 80), prompt="point"
    )["points"]
    assert torch.equal(pointed["prompts"]["points"], expected)
    x, y = (int(v) for v in expected[0])
    assert 8 <= x < 28 and 4 <= y < 20
    with pytest.raises(ValueError, match="prompt='mask'"):
        PromptedRecognitionMapper(prompt="mask")


def test_coco_ov_split_is_the_ovr_cnn_split():
    assert len(COCO_OV_BASE_CLASSES) == 48 and len(COCO_OV_NOVEL_CLASSES) == 17 and len(COCO_OV_CLASSES) == 65
    assert {"airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
            "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors"} == set(COCO_OV_NOVEL_CLASSES)  # fmt: skip
    assert not {"traffic light", "hair drier", "dining table", "sports ball"} & set(COCO_OV_CLASSES)
    meta = MetadataCatalog.get("coco_2017_val_ov65")
    assert list(meta.thing_classes) == list(COCO_OV_CLASSES) and meta.evaluator_type == "prompted_recognition"
    assert [meta.thing_classes[i] for i in meta.novel_class_ids] == list(COCO_OV_NOVEL_CLASSES)
    assert sorted(meta.base_class_ids + meta.novel_class_ids) == list(range(65))
    # data/prompted.py keeps its own copy of the split (with the COCO ids): it must equal the vocabularies'
    from samantics_d2.data import vocabularies

    assert (COCO_OV_BASE_CLASSES, COCO_OV_NOVEL_CLASSES, COCO_OV_CLASSES) == (
        vocabularies.COCO_OV_BASE_CLASSES, vocabularies.COCO_OV_NOVEL_CLASSES, vocabularies.COCO_OV_CLASSES)
    assert meta.thing_dataset_id_to_contiguous_id[90] == 64 and 10 not in meta.thing_dataset_id_to_contiguous_id


def test_coco_ov_loader_keeps_the_65_classes_and_names_a_missing_file(tmp_path):
    categories = [{"id": 1, "name": "person"}, {"id": 10, "name": "traffic light"}, {"id": 17, "name": "cat"}]
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 10, "width": 10} for i in (1, 2)]
    def ann(i, image_id, category_id):  # noqa: E306
        return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": [1, 1, 4, 4], "area": 16,
                "iscrowd": 0, "segmentation": _rect_polygon(1, 1, 5, 5)}  # fmt: skip
    annotations = [ann(1, 1, 17), ann(2, 1, 10), ann(3, 1, 1), ann(4, 2, 10)]
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    dicts = load_coco_ov_json(str(json_file), str(tmp_path))
    assert [d["image_id"] for d in dicts] == [1]  # image 2 has only a traffic light
    assert [a["category_id"] for a in dicts[0]["annotations"]] == [COCO_OV_CLASSES.index("cat"), 0]
    # The registered loader (here on a root without the json, whatever DETECTRON2_DATASETS holds).
    missing = str(tmp_path / "coco" / "annotations" / "instances_val2017.json")
    loader = builtin._loader("coco_2017_val_ov65", missing, str(tmp_path), str(tmp_path), load_coco_ov_json)
    with pytest.raises(FileNotFoundError, match="coco_2017_val_ov65.*instances_val2017.json.*DETECTRON2_DATASETS"):
        loader()
    assert "coco_2017_val_ov65" in DatasetCatalog.list()


def test_percentages_are_nan_for_an_empty_group():
    inputs, outputs = _hand_made_case()
    evaluator = PromptedRecognitionEvaluator(num_classes=4, base_classes=[0, 1, 2], novel_classes=[3])
    evaluator.process(inputs, outputs)
    metrics = evaluator.evaluate()["prompted_recognition"]
    assert math.isnan(metrics["IoU_n"]) and metrics["num_novel"] == 0 and metrics["IoU_b"] == EXPECTED["IoU"]


def test_lvis_split_is_frequent_and_common_vs_rare(tmp_path):
    json_file = tmp_path / "lvis.json"
    categories = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"},
                  {"id": 3, "name": "c", "frequency": "c"}, {"id": 4, "name": "d", "frequency": "r"}]  # fmt: skip
    json_file.write_text(json.dumps({"categories": categories}))
    assert lvis_base_novel_split(str(json_file)) == ([0, 2], [1, 3])
    json_file.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ValueError, match=r"categories \[1\] do not"):
        lvis_base_novel_split(str(json_file))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        lvis_base_novel_split(str(tmp_path / "missing.json"))


def test_an_image_without_prompts_adds_nothing():
    inputs, outputs = _hand_made_case()
    gt = Instances((4, 4), gt_masks=BitMasks(torch.zeros((0, 4, 4), dtype=torch.bool)), gt_classes=torch.zeros(0).long())
    empty_input = {"file_name": "empty.jpg", "instances": gt, "prompts": {"boxes": torch.zeros((0, 4))}}
    predicted = Instances((4, 4), pred_masks=torch.zeros((0, 4, 4), dtype=torch.bool), pred_classes=torch.zeros(0).long(),
                          scores=torch.zeros(0), prompt_boxes=torch.zeros((0, 4)))  # fmt: skip
    evaluator = _evaluator()
    evaluator.process(inputs + [empty_input], outputs + [{"instances": predicted}])
    assert len(evaluator._records) == 3 and evaluator._records[2][0].shape == (0,)
    assert evaluator.evaluate() == {"prompted_recognition": EXPECTED}
