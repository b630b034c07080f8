"""MultiGranularityDecoder: candidate prompts, deduplication, order, part-of (hand-made answers) and
the decoder calls it makes; ClickSet's validation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.preprocess import ImageFit
from samantics_d2.modeling.proposals import build_prompt_decoder
from samantics_d2.modeling.semantic import masks_to_original
from samantics_d2.modeling.proposals.granularity import (
    ClickSet,
    GranularityMasks,
    MultiGranularityDecoder,
    click_boxes,
    greedy_mask_nms,
    part_of_matrix,
)


def _square(size: int, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_greedy_mask_nms_keeps_best_of_each_duplicate_group():
    masks = torch.stack([
        _square(10, 0, 0, 4, 4),  # 16 px
        _square(10, 0, 0, 4, 5),  # IoU 16/20 = 0.8 with mask 0
        _square(10, 5, 5, 10, 10),
        _square(10, 0, 0, 10, 10),
    ])
    scores = torch.tensor([0.5, 0.9, 0.7, 0.7])
    # 0.8 is not above 0.8: both stay; ties (0.7) keep index order
    assert greedy_mask_nms(masks, scores, 0.8).tolist() == [1, 2, 3, 0]
    assert greedy_mask_nms(masks, scores, 0.79).tolist() == [1, 2, 3]


def test_part_of_rule():
    whole = _square(10, 0, 0, 10, 10)
    half = _square(10, 0, 0, 10, 5)
    mostly_inside = _square(10, 0, 3, 10, 8)  # 50 px, 20 of them in `half` (40 %), all in `whole`
    empty = torch.zeros(10, 10, dtype=torch.bool)
    part = part_of_matrix(torch.stack([half, mostly_inside, whole, empty, whole.clone()]), threshold=0.8)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[0, 2] = expected[0, 4] = True  # half is part of both (identical) wholes
    expected[1, 2] = expected[1, 4] = True  # 100 % inside the whole; 40 % in half: not part of it
    assert torch.equal(part, expected)  # equal masks are not part of each other; empty is part of nothing
    assert part_of_matrix(torch.stack([mostly_inside, half]), threshold=0.4)[0, 1] == torch.tensor(False)  # same area


def test_click_boxes_centre_scale_and_clipping():
    points = torch.tensor([[5.0, 5.0], [30.0, 20.0]])
    labels = torch.tensor([0, 1])  # centred on the first POSITIVE point
    boxes = click_boxes(points, labels, (0.25, 1.0), (0, 0, 64, 48))
    torch.testing.assert_close(boxes, torch.tensor([[22.0, 12.0, 38.0, 28.0], [0.0, 0.0, 62.0, 48.0]]))


def test_parents_and_indexing():
    part_of = torch.tensor([[False, True, True], [False, False, True], [False, False, False]])
    result = GranularityMasks(
        mask_logits=torch.zeros(3, 4, 4), iou_pred=torch.tensor([0.1, 0.2, 0.3]), stability=torch.zeros(3),
        masks=torch.zeros(3, 4, 4, dtype=torch.bool), areas=torch.tensor([1, 2, 3]), part_of=part_of, prompt_index=torch.zeros(3, dtype=torch.long),
        mask_index=torch.arange(3), fit=ImageFit((4, 4), (4, 4), (1.0, 1.0), (0.0, 0.0), (0, 0, 4, 4)),
    )
    assert result.parents().tolist() == [1, 2, -1]
    sub = result[torch.tensor([0, 2])]
    assert len(sub) == 2 and sub.part_of.tolist() == [[False, True], [False, False]]


@pytest.fixture(scope="module", params=["sam_vit_b", "sam2.1_hiera_t"])
def tiny(request):
    torch.manual_seed(0)
    out = ["p2", "p3", "p4"] if request.param.startswith("sam2") else None
    backbone = build_encoder(request.param, size="tiny", out_features=out).eval()
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    x, fits = backbone.prepare_with_fits([image])
    with torch.no_grad():
        features = {k: v[0] for k, v in backbone(x).items()}
    return build_prompt_decoder(backbone), features, fits[0]


def test_candidates_come_from_one_call_per_token_layout(tiny, monkeypatch):
    decoder, features, fit = tiny
    calls = []
    original = decoder.decode_embeddings

    def spy(image, sparse, dense, **kwargs):
        calls.append((tuple(sparse.shape[:2]), kwargs["multimask_output"]))
        return original(image, sparse, dense, **kwargs)

    monkeypatch.setattr(decoder, "decode_embeddings", spy)
    granularity = MultiGranularityDecoder(decoder=decoder, box_scales=(0.1, 0.3, 0.6))
    click = fit.points_to_input(torch.tensor([[50.0, 40.0]]))
    with torch.no_grad():
        image = granularity.prepare_image(features)
        clicks = ClickSet(points=click, point_labels=torch.tensor([1]))
        logits, iou, prompt, mask = granularity.candidates(image, fit, clicks)
        assert [n for (n, _), _ in calls] == [1, 3]  # the click; its three boxes together
        # the click's own outputs are exactly the decoder's multimask answer to the click
        ref_logits, ref_iou = decoder.decode(features, points=click[None], point_labels=torch.ones(1, 1),
                                             multimask_output=True)
    assert prompt.tolist() == [0, 0, 0, 1, 2, 3] and mask.tolist() == [0, 1, 2, 0, 0, 0]
    torch.testing.assert_close(logits[:3], ref_logits[0])
    torch.testing.assert_close(iou[:3], ref_iou[0])
    calls.clear()
    box = fit.boxes_to_input(torch.tensor([10.0, 10.0, 60.0, 50.0]))
    both = MultiGranularityDecoder(decoder=decoder, box_scales=(0.1, 0.3), box_multimask_output=True)
    with torch.no_grad():
        _, _, prompt, _ = both.candidates(image, fit, ClickSet(points=click, point_labels=torch.tensor([1]), box=box))
    assert calls == [((3, calls[0][0][1]), True)]  # given box + same multimask flag: one call for all
    assert prompt.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_selection_is_deduplicated_sorted_and_capped(tiny):
    decoder, features, fit = tiny
    granularity = MultiGranularityDecoder(decoder=decoder, box_scales=(0.05, 0.1, 0.2, 0.4, 0.8, 1.0), max_masks=4,
                                          dedup_iou=0.7)
    click = fit.points_to_input(torch.tensor([[60.0, 45.0]]))
    with torch.no_grad():
        result = granularity(features, fit, points=click, point_labels=torch.tensor([1]))
        logits, iou, _, _ = granularity.candidates(granularity.prepare_image(features), fit,
                                                  ClickSet(points=click, point_labels=torch.tensor([1])))
    assert 1 <= len(result) <= 4
    assert torch.all(result.areas[1:] >= result.areas[:-1]) and torch.all(result.areas > 0)
    masks = result.mask_logits > 0
    iou_matrix = torch.triu((masks.flatten(1).float() @ masks.flatten(1).float().T), diagonal=1)
    union = masks.flatten(1).sum(1)[:, None] + masks.flatten(1).sum(1)[None] - iou_matrix
    assert torch.all(torch.triu(iou_matrix / union.clamp_min(1), diagonal=1) <= 0.7)
    # every kept mask is one of the candidates, with its predicted IoU
    for k in range(len(result)):
        match = [c for c in range(len(iou)) if torch.equal(logits[c], result.mask_logits[k])]
        assert match and torch.isclose(iou[match[0]], result.iou_pred[k])
    # areas, order and part-of on the masks as the image shows them
    assert result.masks.shape == (len(result), 90, 120)
    torch.testing.assert_close(result.masks, masks_to_original(result.mask_logits, fit))
    assert torch.equal(result.areas, result.masks.flatten(1).sum(1))
    assert torch.equal(result.part_of, part_of_matrix(result.masks, threshold=0.8))


def test_click_set_validates_once_and_moves_with_its_values():
    with pytest.raises(ValueError, match=r"points \[N, 2\].*got \(1, 1, 2\) and \(1, 1\)"):
        ClickSet(points=torch.zeros(1, 1, 2), point_labels=torch.ones(1, 1))
    with pytest.raises(ValueError, match=r"point_labels \[N\]; got \(2, 2\) and \(3,\)"):
        ClickSet(points=torch.zeros(2, 2), point_labels=torch.ones(3))
    with pytest.raises(ValueError, match=r"box \[4\] XYXY in input pixels; got \(3,\)"):
        ClickSet(points=torch.zeros(1, 2), point_labels=torch.ones(1), box=torch.zeros(3))
    with pytest.raises(ValueError, match="no point and no box: give at least one click or a box"):
        ClickSet(points=torch.zeros(0, 2), point_labels=torch.zeros(0))
    clicks = ClickSet(points=torch.tensor([[1.5, 2.0]], dtype=torch.float64), point_labels=torch.tensor([1.0]),
                      box=torch.tensor([[0.0, 1.0, 5.0, 6.5]]))
    assert clicks.points.dtype == torch.float32 and clicks.point_labels.dtype == torch.int64
    assert clicks.box.shape == (4,)  # 4 values of any shape -> [4]
    box_only = ClickSet(points=torch.zeros(0, 2), point_labels=torch.zeros(0), box=torch.tensor([0.0, 0.0, 2.0, 2.0]))
    assert box_only.points.shape == (0, 2)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        moved = clicks.to(device)
        assert moved.points.device.type == device and moved.box.device.type == device
        assert moved.points.cpu().tolist() == [[1.5, 2.0]] and moved.point_labels.cpu().tolist() == [1]
        assert moved.box.cpu().tolist() == [0.0, 1.0, 5.0, 6.5]
        assert moved.points.dtype == torch.float32 and moved.point_labels.dtype == torch.int64
    no_box = ClickSet(points=clicks.points, point_labels=clicks.point_labels)
    assert no_box.to("cpu").box is None


def test_errors_name_the_problem(tiny):
    decoder, features, fit = tiny
    with pytest.raises(ValueError, match="box_scales"):
        MultiGranularityDecoder(decoder=decoder, box_scales=(0.0,))
    granularity = MultiGranularityDecoder(decoder=decoder)
    with pytest.raises(ValueError, match=r"points \[N, 2\]"):
        granularity(features, fit, points=torch.zeros(1, 1, 2), point_labels=torch.ones(1, 1))
    with pytest.raises(ValueError, match="no point and no box"):
        granularity(features, fit, points=torch.zeros(0, 2), point_labels=torch.zeros(0))
    with pytest.raises(TypeError, match="ClickSet"):
        granularity.decode_prepared(granularity.prepare_image(features), fit, torch.zeros(1, 2))
