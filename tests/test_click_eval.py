"""The click rules, Max / Oracle, NoC and mIoU@k on hand-made masks with answers worked out by hand, and
the ClickSegmenter's click simulation on a stub decoder (hand-made) and on a tiny random SAM (format)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import samantics_d2.data  # noqa: F401  (registers the datasets)
from samantics_d2.d2 import BitMasks, Instances
from samantics_d2.evaluation.click import ClickEvaluator, click_metrics, segment_click_records
from samantics_d2.modeling.meta_arch.click import ClickSegmenter, fit_to_size
from samantics_d2.modeling.preprocess import ImageFit
from samantics_d2.modeling.proposals.granularity import GranularityMasks
from samantics_d2.utils.clicks import (
    NO_CLICK,
    click_points,
    miou_at_clicks,
    next_clicks,
    number_of_clicks,
    point_boxes,
)


def _box(height: int, width: int, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


# ---------------------------------------------------------------- the click rules
def test_first_click_is_the_deepest_pixel_first_in_row_major_order():
    # 5 x 7 rectangle (rows 2-6, cols 1-7) in a 9 x 9 image: distance 3 at (x, y) = (3, 4), (4, 4), (5, 4)
    # (3 rows to the zeros above/below; 3 columns to col 0 / col 8): the tie goes to the first, x = 3.
    rectangle = _box(9, 9, (2, 6), (1, 7))
    # rows 0-2 of a 6 x 5 image: the image border counts as border (zero padding), so the click is on
    # row 1, not row 0; distance 2 on row 1 at cols 1-3 -> (1, 1)
    at_border = _box(6, 5, (0, 2), (0, 4))
    empty = torch.zeros(6, 5, dtype=torch.bool)
    assert click_points(rectangle[None]).tolist() == [[3.0, 4.0]]
    assert click_points(torch.stack([at_border, empty])).tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert click_points(torch.ones(1, 1, 1, dtype=torch.bool)).tolist() == [[0.0, 0.0]]  # one pixel
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        click_points(rectangle)


def test_click_boxes_are_three_pixels_each_side():
    boxes = point_boxes(torch.tensor([[3.0, 4.0], [0.0, 10.0]]))
    assert boxes.tolist() == [[0.0, 1.0, 6.0, 7.0], [-3.0, 7.0, 3.0, 13.0]]  # not clipped


def test_next_click_positive_negative_tie_and_none():
    # positive: GT rows/cols 1-6 of 10 x 10, prediction its left half (cols 1-3); the false negatives
    # (cols 4-6) are deepest (2) at col 5, rows 2-5 -> (5, 2), positive
    gt = _box(10, 10, (1, 6), (1, 6))
    pred = _box(10, 10, (1, 6), (1, 3))
    # negative: the GT predicted exactly plus a 5 x 5 false positive in the corner (rows/cols 5-9, the
    # image border counting): its centre (7, 7) at depth 3 beats the empty false negatives
    gt_corner = _box(10, 10, (0, 4), (0, 4))
    pred_fp = gt_corner | _box(10, 10, (5, 9), (5, 9))
    # tie: 3 x 7 image, GT cols 0-2, prediction cols 4-6: both errors are 3 x 3 blocks of depth 2 ->
    # negative (RITM's fn > fp), at the false positive's centre (5, 1)
    gt_tie, pred_tie = _box(3, 7, (0, 2), (0, 2)), _box(3, 7, (0, 2), (4, 6))
    points, labels = next_clicks(torch.stack([pred, pred_fp]), torch.stack([gt, gt_corner]))
    assert points.tolist() == [[5.0, 2.0], [7.0, 7.0]] and labels.tolist() == [1, 0]
    points, labels = next_clicks(torch.stack([pred_tie, gt_tie]), torch.stack([gt_tie, gt_tie]))
    assert points.tolist() == [[5.0, 1.0], [0.0, 0.0]] and labels.tolist() == [0, NO_CLICK]  # perfect: no click
    with pytest.raises(ValueError, match="same shape"):
        next_clicks(pred[None], gt[None, :5])


def test_noc_and_miou_at_k():
    ious = np.array([[0.5, 0.85, 0.91], [0.95, 0.96, 0.97], [0.1, 0.2, 0.3]])
    assert number_of_clicks(ious, 0.85, max_clicks=20).tolist() == [2, 1, 20]  # >= counts; never: max_clicks
    assert number_of_clicks(ious, 0.9, max_clicks=20).tolist() == [3, 1, 20]
    assert miou_at_clicks(ious, (1, 3)) == pytest.approx({1: 1.55 / 3, 3: 2.18 / 3})
    with pytest.raises(ValueError):
        number_of_clicks(ious, 0.9, max_clicks=2)
    with pytest.raises(ValueError, match="outside"):
        miou_at_clicks(ious, (4,))


# ---------------------------------------------------------------- Max, Oracle, labels, NoC
def _hand_made_image() -> tuple[dict, dict]:
    """A 4 x 4 image with segment A (left half, class 0) and B (top-left quarter, class 1: a part).

    First click, candidates (predicted IoU, IoU with the GT, label):
      A: whole image (0.9, 0.5, 3), left half (0.8, 1.0, 0), quarter (0.1, 0.5, 1) -> Max 0.5, Oracle 1.0;
         Max label 3 (wrong), Oracle label 0 (right)
      B: left half (0.7, 0.5, 0), quarter (0.95, 1.0, 1), padding (-inf) -> Max 1.0, Oracle 1.0, both right
    Second click (Max candidate only): A the left half (1.0), B the quarter (1.0).
    """
    whole, left, quarter = torch.ones(4, 4, dtype=torch.bool), _box(4, 4, (0, 3), (0, 1)), _box(4, 4, (0, 1), (0, 1))
    empty = torch.zeros(4, 4, dtype=torch.bool)
    gt = Instances((4, 4))
    gt.gt_masks = BitMasks(torch.stack([left, quarter]))
    gt.gt_classes = torch.tensor([0, 1])
    clicks = {
        "masks": [torch.stack([torch.stack([whole, left, quarter]), torch.stack([left, quarter, empty])]),
                  torch.stack([left[None], quarter[None]])],
        "pred_ious": [torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.95, -float("inf")]]), torch.tensor([[0.99], [0.98]])],
        "pred_classes": [torch.tensor([[3, 0, 1], [0, 1, -1]]), torch.tensor([[-1], [-1]])],
        "points": torch.stack([click_points(gt.gt_masks.tensor), torch.zeros(2, 2)], dim=1),
        "point_labels": torch.tensor([[1, 1], [1, NO_CLICK]]),
    }  # fmt: skip
    return {"file_name": "hand_made.png", "instances": gt}, {"clicks": clicks}


def test_max_oracle_labels_and_noc_by_hand():
    x, output = _hand_made_image()
    evaluator = ClickEvaluator(max_clicks=2, miou_clicks=(1, 2))
    evaluator.part_class_ids = (1,)
    evaluator.reset()
    evaluator.process([x], [output])
    results = evaluator.evaluate()["click"]
    expected = {
        "Max": 75.0, "Oracle": 100.0, "num_segments": 2, "NoC@85": 1.5, "NoC@90": 1.5, "mIoU@1": 75.0, "mIoU@2": 100.0,
        "Acc@Max": 50.0, "Acc@Oracle": 100.0, "Max_whole": 50.0, "Oracle_whole": 100.0, "Acc@Max_whole": 0.0,
        "Acc@Oracle_whole": 100.0, "num_whole": 1, "Max_part": 100.0, "Oracle_part": 100.0, "Acc@Max_part": 100.0,
        "Acc@Oracle_part": 100.0, "num_part": 1,
    }  # fmt: skip
    assert results == pytest.approx(expected)


def test_single_click_has_no_noc_and_unlabelled_has_no_accuracy():
    x, output = _hand_made_image()
    clicks = output["clicks"]
    single = {"masks": clicks["masks"][:1], "pred_ious": clicks["pred_ious"][:1], "points": clicks["points"][:, :1],
              "point_labels": clicks["point_labels"][:, :1]}  # fmt: skip
    evaluator = ClickEvaluator(max_clicks=1, miou_clicks=(1,))
    evaluator.process([x], [{"clicks": single}])
    assert evaluator.evaluate()["click"] == pytest.approx({"Max": 75.0, "Oracle": 100.0, "num_segments": 2, "mIoU@1": 75.0})


def test_evaluator_rejects_outputs_off_the_protocol():
    x, output = _hand_made_image()
    evaluator = ClickEvaluator(max_clicks=2, miou_clicks=(1,))
    wrong_click = dict(output["clicks"], points=output["clicks"]["points"] + 1)
    with pytest.raises(ValueError, match="click rule"):
        evaluator.process([x], [{"clicks": wrong_click}])
    with pytest.raises(ValueError, match="expected max_clicks=3"):
        ClickEvaluator(max_clicks=3, miou_clicks=(1,)).process([x], [output])
    with pytest.raises(ValueError, match="ClickMapper"):
        evaluator.process([{"file_name": "f"}], [output])
    with pytest.raises(ValueError, match="miou_clicks"):
        ClickEvaluator(max_clicks=1, miou_clicks=(5,))


def test_records_of_an_image_without_segments():
    records = segment_click_records(
        gt_masks=torch.zeros(0, 4, 4, dtype=torch.bool), gt_classes=torch.zeros(0, dtype=torch.long),
        masks=[torch.zeros(0, 1, 4, 4, dtype=torch.bool)], pred_ious=[torch.zeros(0, 1)],
    )  # fmt: skip
    assert records["round_ious"].shape == (0, 1)
    assert click_metrics(records, max_clicks=1)["num_segments"] == 0


# ---------------------------------------------------------------- ClickSegmenter
class _StubDecoder:
    """Answers a click set with one mask: the 3 x 3 squares around its positive clicks (identity fit)."""

    device = torch.device("cpu")

    def __init__(self, size: int):
        self.decoder = self
        self.size = size
        self.calls: list[list[list[float]]] = []

    def prepare_image(self, features):
        return {}

    def decode_prepared(self, image, fit, clicks):
        points, point_labels = clicks.points, clicks.point_labels
        self.calls.append(points.tolist())
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        for (x, y), label in zip(points.long().tolist(), point_labels.tolist()):
            if label == 1:
                mask[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = True
        logits = mask.float()[None] * 2 - 1
        return GranularityMasks(
            mask_logits=logits, iou_pred=torch.tensor([0.5]), stability=torch.ones(1), masks=mask[None], areas=mask.sum()[None],
            part_of=torch.zeros(1, 1, dtype=torch.bool), prompt_index=torch.zeros(1, dtype=torch.long),
            mask_index=torch.zeros(1, dtype=torch.long), fit=fit,
        )  # fmt: skip


class _StubBackbone(torch.nn.Module):
    def prepare_with_fits(self, images):
        h, w = images[0].shape[-2:]
        return torch.zeros(1), [ImageFit((h, w), (h, w), (1.0, 1.0), (0.0, 0.0), (0, 0, w, h))]

    def forward(self, x):
        return {}


def test_click_segmenter_follows_its_own_prediction_by_hand():
    # GT rows 2-4, cols 1-6 of 8 x 8 (18 px). Click 1: deepest pixel (2, 3) -> the stub's 3 x 3 square,
    # cols 1-3 (IoU 9/18); click 2: the false negatives' centre (5, 3), positive -> cols 1-6 = GT
    # (IoU 1); click 3: nothing left to correct (label -1), the answer stays.
    gt = _box(8, 8, (2, 4), (1, 6))
    instances = Instances((8, 8))
    instances.gt_masks = BitMasks(gt[None])
    instances.gt_classes = torch.tensor([0])
    x = {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "height": 8, "width": 8, "instances": instances}
    stub = _StubDecoder(8)
    model = ClickSegmenter(backbone=_StubBackbone(), granularity=stub, max_clicks=3).eval()
    clicks = model([x])[0]["clicks"]
    assert clicks["points"].tolist() == [[[2.0, 3.0], [5.0, 3.0], [0.0, 0.0]]]
    assert clicks["point_labels"].tolist() == [[1, 1, NO_CLICK]]
    assert stub.calls == [[[2.0, 3.0]], [[2.0, 3.0], [5.0, 3.0]]]  # the clicks accumulate; none in round 3
    assert torch.equal(clicks["masks"][1][0, 0], gt) and torch.equal(clicks["masks"][2][0, 0], gt)
    evaluator = ClickEvaluator(max_clicks=3, miou_clicks=(1, 2, 3))
    evaluator.process([x], [{"clicks": clicks}])
    results = evaluator.evaluate()["click"]
    assert results == pytest.approx({"Max": 50.0, "Oracle": 50.0, "num_segments": 1, "NoC@85": 2.0, "NoC@90": 2.0,
                                     "mIoU@1": 50.0, "mIoU@2": 100.0, "mIoU@3": 100.0})


def test_fit_to_size_maps_original_pixels_through_the_resize():
    # a 40 x 60 image shown to the encoder resized to 80 x 120, then fitted with scale 0.5
    fit = ImageFit((80, 120), (64, 64), (0.5, 0.5), (0.0, 0.0), (0, 0, 60, 40))
    original = fit_to_size(fit, (40, 60))
    assert original.original_size == (40, 60) and original.scale == (1.0, 1.0)
    assert original.points_to_input(torch.tensor([[10.0, 20.0]])).tolist() == [[10.0, 20.0]]


@pytest.fixture(scope="module", params=["sam_vit_b", "sam2.1_hiera_t"])
def tiny_sam(request):
    from samantics_d2.modeling.backbone import build_encoder
    from samantics_d2.modeling.proposals import build_prompt_decoder
    from samantics_d2.modeling.proposals.granularity import MultiGranularityDecoder

    torch.manual_seed(0)
    out = ["p2", "p3", "p4"] if request.param.startswith("sam2") else None
    backbone = build_encoder(request.param, size="tiny", out_features=out).eval()
    return backbone, MultiGranularityDecoder(decoder=build_prompt_decoder(backbone), box_scales=(0.5,))


def test_click_segmenter_on_a_tiny_random_sam_gives_the_evaluated_format(tiny_sam):
    backbone, granularity = tiny_sam
    rng = np.random.default_rng(0)
    masks = torch.stack([_box(30, 40, (2, 20), (3, 30)), _box(30, 40, (20, 29), (30, 39))])
    instances = Instances((30, 40))
    instances.gt_masks = BitMasks(masks)
    instances.gt_classes = torch.tensor([0, 1])
    image = torch.from_numpy(rng.integers(0, 256, (3, 45, 60), dtype=np.uint8))  # resized by 1.5 by a mapper
    x = {"file_name": "random.png", "image": image, "height": 30, "width": 40, "instances": instances}
    model = ClickSegmenter(backbone=backbone, granularity=granularity, max_clicks=2, click_box=3.0).eval()
    clicks = model([x])[0]["clicks"]
    assert clicks["masks"][0].shape[0] == 2 and clicks["masks"][0].shape[2:] == (30, 40)
    assert clicks["masks"][1].shape[1] == 1  # later rounds keep the Max candidate only
    assert torch.equal(clicks["points"][:, 0], click_points(masks))
    assert set(clicks["point_labels"][:, 1].tolist()) <= {0, 1, NO_CLICK}
    evaluator = ClickEvaluator(max_clicks=2, miou_clicks=(1, 2))
    evaluator.process([x], [{"clicks": clicks}])
    results = evaluator.evaluate()["click"]
    assert results["num_segments"] == 2 and 0.0 <= results["Max"] <= results["Oracle"] <= 100.0
