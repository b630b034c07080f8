"""The "No Time to Train" recipe, step by step, on hand-made inputs (issue 13).

Each expectation is either computed by hand or a direct transcription, in this file, of the
authors' formula (no-time-to-train, ``no_time_to_train/models/Sam2MatchingBaseline_noAMG.py``,
``Sam2MatchingBaselineNoAMG._forward_sam`` / ``forward_test`` / ``_compute_sim_global_avg`` /
``_compute_semantic_ios``, and sam2's ``batched_mask_to_box``), never our own output.
"""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from samantics_d2.modeling.backbone.sam2 import SAM2Backbone
from samantics_d2.modeling.preprocess import ImageFit
from samantics_d2.modeling.proposals import PointGridProposals, build_prompt_decoder, point_grid
from samantics_d2.modeling.proposals.point_grid import input_linspace_grid
from samantics_d2.modeling.semantic import (
    PrototypeClassifier,
    mask_grid_weights,
    mask_pooling,
    masks_to_boxes,
    masks_to_original,
    resample_masks,
    soft_merge_scores,
)

FAITHFUL = dict(nms_rank="predicted_iou", merge_order="nms", box_convention="inclusive", nms_cap_factor=8,
                pooling="mask_grid", merge_resolution="original", score_floor=0.0, nms_thresh=0.5, merge="soft")


def _stretch_fit(original: tuple[int, int], side: int) -> ImageFit:
    """The authors' preprocessing: the whole image stretched to a ``side x side`` input."""
    h, w = original
    return ImageFit((h, w), (side, side), (side / h, side / w), (0.0, 0.0), (0, 0, side, side))


# ------------------------------------------------------------------------------------------ transcriptions


def _their_grid(points_per_side: int, sam_input_size: int) -> torch.Tensor:
    # Sam2MatchingBaselineNoAMG._forward_sam (torch.meshgrid's default indexing is "ij")
    x, y = torch.meshgrid(
        torch.linspace(0, sam_input_size - 1, points_per_side),
        torch.linspace(0, sam_input_size - 1, points_per_side),
        indexing="ij",
    )
    query_points = torch.stack((x.reshape(-1), y.reshape(-1)), dim=-1)
    return query_points + 0.5


def _their_boxes(masks: torch.Tensor) -> torch.Tensor:
    # sam2.utils.amg.batched_mask_to_box for [N, H, W]
    if torch.numel(masks) == 0:
        return torch.zeros(*masks.shape[:-2], 4, device=masks.device)
    h, w = masks.shape[-2:]
    in_height, _ = torch.max(masks, dim=-1)
    in_height_coords = in_height * torch.arange(h, device=in_height.device)[None, :]
    bottom_edges, _ = torch.max(in_height_coords, dim=-1)
    in_height_coords = in_height_coords + h * (~in_height)
    top_edges, _ = torch.min(in_height_coords, dim=-1)
    in_width, _ = torch.max(masks, dim=-2)
    in_width_coords = in_width * torch.arange(w, device=in_width.device)[None, :]
    right_edges, _ = torch.max(in_width_coords, dim=-1)
    in_width_coords = in_width_coords + w * (~in_width)
    left_edges, _ = torch.min(in_width_coords, dim=-1)
    empty_filter = (right_edges < left_edges) | (bottom_edges < top_edges)
    out = torch.stack([left_edges, top_edges, right_edges, bottom_edges], dim=-1)
    return out * (~empty_filter).unsqueeze(-1)


def _their_pooling(features: torch.Tensor, lr_masks: torch.Tensor) -> torch.Tensor:
    # forward_test: features upsampled to the mask grid; _compute_sim_global_avg: mean where logit > 0
    c = features.shape[0]
    n_masks = lr_masks.shape[0]
    tar_feat = F.interpolate(
        features[None], size=tuple(lr_masks.shape[-2:]), mode="bilinear", align_corners=False, antialias=True
    ).reshape(c, -1).t()
    masks = (lr_masks > 0).reshape(n_masks, -1).to(dtype=tar_feat.dtype)
    return (masks @ tar_feat) / masks.sum(dim=-1, keepdim=True)


def _their_semantic_ios(masks_binary, labels, obj_sim, n_classes):
    # _compute_semantic_ios(use_semantic=True, rank_score=True)
    n_masks = masks_binary.shape[0]
    masks = masks_binary.reshape(n_masks, -1).to(dtype=torch.float32)
    ios = torch.zeros((n_masks,), dtype=torch.float32)
    for cat_ind in range(n_classes):
        select_idxs = labels == cat_ind
        _masks = masks[select_idxs]
        _obj_sim = obj_sim[select_idxs][:, select_idxs]
        if _masks.shape[0] == 0:
            continue
        pos_num = _masks.sum(dim=-1).to(dtype=torch.float32)
        inter_num = _masks @ _masks.t()
        inter_num.fill_diagonal_(0.0)
        inter_num = torch.tril(inter_num, diagonal=0)
        _ios = (inter_num / pos_num[:, None]) * _obj_sim
        ios[select_idxs] += _ios.max(dim=-1)[0]
    return ios


def _their_forward_test(features, lr_masks, pred_ious, prototypes, ori_hw, *, num_out_instance, nms_thr=0.5):
    """forward_test's stages after SAM (cls_num_per_mask = 1, no negatives)."""
    obj_feats = F.normalize(_their_pooling(features, lr_masks), p=2, dim=-1)
    sim_global = (obj_feats @ F.normalize(prototypes, p=2, dim=-1).t()).clamp(min=0.0)
    top_scores, labels = torch.topk(sim_global, k=1)
    labels, scores_all_class = labels.flatten(), top_scores.flatten()
    lr_bboxes = _their_boxes(lr_masks > 0)
    out_num = int(min(num_out_instance * 8, labels.shape[0]))
    nms_keep_inds = batched_nms(lr_bboxes.float(), pred_ious.flatten(), labels, iou_threshold=nms_thr)[:out_num]
    scores_out = scores_all_class[nms_keep_inds]
    lr_masks_out, obj_feats_out = lr_masks[nms_keep_inds], obj_feats[nms_keep_inds]
    labels_out = labels[nms_keep_inds]
    pos_inds = scores_out > 0.0
    scores_out, lr_masks_out, obj_feats_out = scores_out[pos_inds], lr_masks_out[pos_inds], obj_feats_out[pos_inds]
    labels_out, kept = labels_out[pos_inds], nms_keep_inds[pos_inds]
    masks_out_binary = F.interpolate(
        lr_masks_out.unsqueeze(dim=1), size=ori_hw, mode="bilinear", align_corners=False, antialias=True
    ).squeeze(dim=1) > 0
    bboxes = _their_boxes(masks_out_binary)
    obj_sim = (obj_feats_out @ obj_feats_out.t()).clamp(min=0.0)
    ios = _their_semantic_ios(masks_out_binary, labels_out, obj_sim, prototypes.shape[0])
    scores_out = scores_out * torch.pow(1 - ios, 0.5)
    final = torch.argsort(scores_out, descending=True)[: min(num_out_instance, scores_out.shape[0])]
    return kept[final], scores_out[final], labels_out[final], masks_out_binary[final], bboxes[final]


# ------------------------------------------------------------------------------------------ 1. point grid


def test_input_linspace_grid_is_theirs_coordinates_and_order():
    grid = input_linspace_grid(32, (0, 0, 1024, 1024))
    torch.testing.assert_close(grid, _their_grid(32, 1024))
    # by hand: 0.5 + 33 i, x varying slowest
    assert grid[0].tolist() == [0.5, 0.5] and grid[1].tolist() == [0.5, 33.5]
    assert grid[32].tolist() == [33.5, 0.5] and grid[-1].tolist() == [1023.5, 1023.5]
    # SAM's automatic mask generator grid (the other layout): 16 + 32 i, x varying fastest
    amg = point_grid(32, (1024, 1024))
    assert amg[0].tolist() == [16.0, 16.0] and amg[1].tolist() == [48.0, 16.0] and amg[32].tolist() == [16.0, 48.0]
    # inside a padded input, the grid spans the image part only
    padded = input_linspace_grid(3, (0, 0, 40, 64))
    assert padded[:, 0].unique().tolist() == [0.5, 20.0, 39.5] and padded[:, 1].unique().tolist() == [0.5, 32.0, 63.5]


def test_point_grid_proposals_send_their_grid_to_the_decoder():
    torch.manual_seed(0)
    backbone = SAM2Backbone(variant="hiera_t", size="tiny", out_features=["p2", "p3", "p4"]).eval()
    decoder = build_prompt_decoder(backbone)
    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    x, fits = backbone.prepare_with_fits([image])
    with torch.no_grad():
        feats = {k: v[0] for k, v in backbone(x).items()}
    fit = fits[0]
    side = fit.input_size[0]
    assert fit.valid_box == (0, 0, side, side)  # SAM 2 stretches the image, as the authors do
    proposals = PointGridProposals(decoder=decoder, points_per_side=4, point_layout="input_linspace", pred_iou_thresh=None)
    with mock.patch.object(decoder, "embed_prompts", wraps=decoder.embed_prompts) as embed, torch.no_grad():
        out = proposals(feats, fit)
    seen = embed.call_args.kwargs
    torch.testing.assert_close(seen["points"][:, 0], _their_grid(4, side))
    # the proposals' points are in original pixels
    assert torch.all(out.points[:, 0] < 50) and torch.all(out.points[:, 1] < 30)
    with pytest.raises(ValueError, match="point_layout"):
        PointGridProposals(decoder=decoder, point_layout="spiral")


# ------------------------------------------------------------------------------------------ 6. pooling


@pytest.mark.parametrize("original", [(48, 40), (20, 30)])
def test_mask_grid_pooling_is_their_upsample_and_mean(original):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(6, 5, 5, generator=g)  # DINOv2-like 5x5 grid, patch 14 -> 70 px input
    logits = torch.randn(7, 16, 16, generator=g)  # SAM-like 16x16 mask grid over a 64 px input
    logits[3] = -1.0
    logits[3, 4:6, 9:12] = 2.0  # a small mask: 6 mask pixels
    weights = mask_grid_weights(
        logits, src_fit=_stretch_fit(original, 64), dst_fit=_stretch_fit(original, 70), grid_size=(5, 5), patch_size=14
    )
    pooled, valid = mask_pooling(features, weights)
    assert valid.all()
    torch.testing.assert_close(pooled, _their_pooling(features, logits), rtol=1e-5, atol=1e-5)
    # the weights are in patches: 6 mask pixels of (5/16)^2 patches each
    assert float(weights[3].sum()) == pytest.approx(6 * (5 / 16) ** 2, rel=1e-5)
    # the patch-grid option is a different computation (sigmoid weights on the patch grid)
    patch = resample_masks(logits, src_fit=_stretch_fit(original, 64), dst_fit=_stretch_fit(original, 70),
                           grid_size=(5, 5), patch_size=14)
    assert not torch.allclose(mask_pooling(features, patch)[0], pooled, atol=1e-3)


def test_mask_grid_pooling_ignores_padding():
    # a 32 x 64 image in a 64 px input padded at the bottom (longest side + pad): rows 8..15 of the
    # 16x16 mask grid are padding and never count, even where the logit is > 0
    fit = ImageFit((32, 64), (64, 64), (1.0, 1.0), (0.0, 0.0), (0, 0, 64, 32))
    logits = torch.full((2, 16, 16), -1.0)
    logits[0, 10:14, 2:6] = 1.0  # only in the padding
    logits[1, 2:6, 2:6] = 1.0
    logits[1, 10:14, 2:6] = 1.0
    dst = _stretch_fit((32, 64), 28)
    weights = mask_grid_weights(logits, src_fit=fit, dst_fit=dst, grid_size=(2, 2), patch_size=14)
    assert float(weights[0].sum()) == 0.0
    inside_only = logits[1].clone()
    inside_only[8:] = -1.0
    torch.testing.assert_close(
        weights[1], mask_grid_weights(inside_only[None], src_fit=fit, dst_fit=dst, grid_size=(2, 2), patch_size=14)[0]
    )


# ------------------------------------------------------------------------------------------ 9. boxes


def test_inclusive_boxes_are_batched_mask_to_box():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(6, 9, 11, generator=g) > 0.8
    masks[3] = False
    masks[4] = False
    masks[4, 2, 6] = True
    torch.testing.assert_close(masks_to_boxes(masks, convention="inclusive"), _their_boxes(masks).float())
    assert masks_to_boxes(masks[4:5], convention="inclusive").tolist() == [[6.0, 2.0, 6.0, 2.0]]
    assert masks_to_boxes(masks[4:5], convention="exclusive").tolist() == [[6.0, 2.0, 7.0, 3.0]]
    with pytest.raises(ValueError, match="convention"):
        masks_to_boxes(masks, convention="centre")


def _one_class_scene(masks: torch.Tensor, directions: torch.Tensor):
    """Proposals ``masks [P, 4, 4]`` on a 4x4 feature grid: every proposal gets a uniform feature
    ``directions[p]`` (patch-grid weights one-hot per proposal); one class whose prototype is e0."""
    P, dim = directions.shape
    features = torch.zeros(dim, 1, P)
    features[:, 0, :] = directions.T
    weights = torch.zeros(P, 1, P)
    weights[torch.arange(P), 0, torch.arange(P)] = 1.0
    prototypes = torch.zeros(1, 1, dim)
    prototypes[0, 0, 0] = 1.0
    return dict(features=features, weights=weights, masks=masks, prototypes=prototypes,
                prototype_valid=torch.ones(1, 1, dtype=torch.bool))


def test_nms_boxes_follow_the_convention():
    # two 2x2 squares sharing one column: exclusive boxes IoU 1/3, inclusive boxes IoU 0
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, 0:2, 0:2] = True
    masks[1, 0:2, 1:3] = True
    scene = _one_class_scene(masks, torch.tensor([[1.0, 0.0], [0.8, 0.6]]))
    inclusive = PrototypeClassifier(merge="none", nms_thresh=0.3, box_convention="inclusive")(**scene)
    exclusive = PrototypeClassifier(merge="none", nms_thresh=0.3, box_convention="exclusive")(**scene)
    assert inclusive.indices.tolist() == [0, 1] and exclusive.indices.tolist() == [0]


# ------------------------------------------------------------------------------------------ 7. NMS order


def test_nms_ranks_by_predicted_iou():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, 0:3, 0:3] = True  # same box
    scene = _one_class_scene(masks, torch.tensor([[1.0, 0.0], [0.6, 0.8]]))  # scores 1.0 and 0.6
    iou_pred = torch.tensor([0.5, 0.9])
    faithful = PrototypeClassifier(merge="none", nms_rank="predicted_iou")(**scene, iou_pred=iou_pred)
    by_score = PrototypeClassifier(merge="none", nms_rank="score")(**scene, iou_pred=iou_pred)
    assert faithful.indices.tolist() == [1] and faithful.scores.tolist() == [pytest.approx(0.6)]
    assert by_score.indices.tolist() == [0]
    with pytest.raises(ValueError, match="iou_pred"):
        PrototypeClassifier(nms_rank="predicted_iou")(**scene)


# ------------------------------------------------------------------------------------------ 8. merge order


def test_soft_merge_in_nms_order():
    # A (4x4) contains B (2x2); identical features; B has the higher score but A the higher predicted IoU
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, 0:4, 0:4] = True
    masks[1, 1:3, 1:3] = True
    scene = _one_class_scene(masks, torch.tensor([[0.6, 0.8], [0.6, 0.8]]))  # both score 0.6
    scene["features"][:, 0, 1] *= 2  # same direction, so the same score and cosine 1
    iou_pred = torch.tensor([0.9, 0.5])
    # NMS order (A first): B is fully covered by the earlier A -> 0; A keeps its score
    out = PrototypeClassifier(nms_rank="predicted_iou", nms_thresh=1.0, merge_order="nms")(**scene, iou_pred=iou_pred)
    assert dict(zip(out.indices.tolist(), out.scores.tolist())) == {0: pytest.approx(0.6), 1: 0.0}
    # the direct function, hand-computed: given order B, A -> A is decayed by x = 4/16
    scores = torch.tensor([0.6, 0.6])
    features = torch.ones(2, 3)
    merged = soft_merge_scores(scores, torch.zeros(2, dtype=torch.long), masks.flip(0), features, in_given_order=True)
    torch.testing.assert_close(merged, torch.tensor([0.6, 0.6 * 0.75**0.5]))


def test_soft_merge_of_an_empty_mask():
    """A deliberate difference: the authors' overlap of an empty mask is 0 / 0 (NaN score, sorted
    first); ours is 0, so an empty mask keeps its score."""
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0] = True
    merged = soft_merge_scores(torch.tensor([0.9, 0.5]), torch.zeros(2, dtype=torch.long), masks, torch.ones(2, 3),
                               in_given_order=True)
    assert merged.tolist() == [pytest.approx(0.9), pytest.approx(0.5)]


# ------------------------------------------------------------------------------------------ drop, cap, empty


def test_scores_at_most_zero_are_dropped_after_the_nms():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0:2, 0:4, 0:4] = True  # 0 and 1: the same box
    masks[2, 5:8, 5:8] = True
    # 0: cosine -1 (score 0) with the best predicted IoU, 1: score 1, 2: score 0 (orthogonal)
    scene = _one_class_scene(masks, torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    iou_pred = torch.tensor([0.9, 0.8, 0.7])
    out = PrototypeClassifier(merge="none", nms_rank="predicted_iou")(**scene, iou_pred=iou_pred)
    # 0 suppresses 1 in the NMS, then 0 and 2 are dropped for score <= 0: nothing left
    assert out.indices.tolist() == []
    by_score = PrototypeClassifier(merge="none", nms_rank="score")(**scene, iou_pred=iou_pred)
    assert by_score.indices.tolist() == [1]


def test_nms_survivors_capped_before_the_drop():
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    for p in range(4):
        masks[p, 2 * p: 2 * p + 2, 2 * p: 2 * p + 2] = True  # disjoint
    scene = _one_class_scene(masks, torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]))
    iou_pred = torch.tensor([0.9, 0.8, 0.7, 0.6])  # the two zero-score ones first
    capped = PrototypeClassifier(merge="none", nms_rank="predicted_iou", topk=2, nms_cap_factor=1)
    assert capped(**scene, iou_pred=iou_pred).indices.tolist() == []
    wider = PrototypeClassifier(merge="none", nms_rank="predicted_iou", topk=2, nms_cap_factor=2)  # 4 survivors
    assert sorted(wider(**scene, iou_pred=iou_pred).indices.tolist()) == [2, 3]
    uncapped = PrototypeClassifier(merge="none", nms_rank="predicted_iou", topk=2, nms_cap_factor=None)
    assert sorted(uncapped(**scene, iou_pred=iou_pred).indices.tolist()) == [2, 3]
    with pytest.raises(ValueError, match="nms_cap_factor"):
        PrototypeClassifier(nms_cap_factor=0)


def test_empty_image():
    fit, dst = _stretch_fit((12, 10), 64), _stretch_fit((12, 10), 70)
    out = PrototypeClassifier(**FAITHFUL)(
        features=torch.randn(6, 5, 5), prototypes=torch.randn(3, 1, 6), prototype_valid=torch.ones(3, 1, dtype=torch.bool),
        mask_logits=torch.zeros(0, 16, 16), iou_pred=torch.zeros(0), mask_fit=fit, feature_fit=dst, patch_size=14,
    )
    assert out.indices.shape == (0,) and out.scores.shape == (0,) and out.classes.shape == (0,)
    assert out.masks.shape == (0, 12, 10) and out.masks.dtype == torch.bool and out.boxes.shape == (0, 4)


# ------------------------------------------------------------------------------------------ final masks


@pytest.mark.parametrize("original", [(12, 10), (40, 36)])
def test_final_masks_are_their_antialiased_resize(original):
    logits = torch.randn(5, 16, 16, generator=torch.Generator().manual_seed(3))
    expected = F.interpolate(logits[:, None], size=original, mode="bilinear", align_corners=False, antialias=True)[:, 0] > 0
    fit = _stretch_fit(original, 64)
    assert torch.equal(masks_to_original(logits, fit, antialias=True), expected)
    if original[0] > 16:  # upsampling: antialiasing changes nothing
        assert torch.equal(masks_to_original(logits, fit), expected)


# ------------------------------------------------------------------------------------------ all stages together


@pytest.mark.parametrize("original,seed", [((12, 10), 0), ((12, 10), 3), ((40, 36), 1), ((40, 36), 2), ((25, 70), 5)])
def test_classifier_is_their_forward_test(original, seed):
    """Random features, logits, predicted IoUs and prototypes through the faithful classifier and
    through the transcription of forward_test: the same detections, scores, masks and boxes."""
    g = torch.Generator().manual_seed(seed)
    C, P, K = 8, 60, 3
    features = torch.randn(C, 5, 5, generator=g)
    # blob-like masks: smooth random logits (a 4x4 field upsampled), shifted so that they vary in size
    logits = F.interpolate(torch.randn(P, 1, 4, 4, generator=g), size=(16, 16), mode="bilinear")[:, 0]
    logits = logits + torch.linspace(-0.5, 1.0, P)[:, None, None]
    # no empty masks, at 16x16 or after the resize: the authors' merge divides by the mask area
    # (0 / 0 = NaN, which then sorts first); ours counts an empty mask as not covered
    # (test_soft_merge_of_an_empty_mask)
    logits[(logits > 0).flatten(1).sum(1) < 12] += 3.0
    iou_pred = torch.rand(P, generator=g)
    prototypes = torch.randn(K, C, generator=g)
    topk = 4
    ours = PrototypeClassifier(**FAITHFUL, topk=topk)(
        features=features, prototypes=prototypes[:, None], prototype_valid=torch.ones(K, 1, dtype=torch.bool),
        mask_logits=logits, iou_pred=iou_pred, mask_fit=_stretch_fit(original, 64),
        feature_fit=_stretch_fit(original, 70), patch_size=14,
    )
    indices, scores, classes, masks, boxes = _their_forward_test(
        features, logits, iou_pred, prototypes, original, num_out_instance=topk
    )
    assert 2 <= len(indices) <= topk
    assert torch.isfinite(scores).all() and masks.flatten(1).any(1).all()
    assert ours.indices.tolist() == indices.tolist()
    torch.testing.assert_close(ours.scores, scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours.classes, classes)
    assert torch.equal(ours.masks, masks)
    torch.testing.assert_close(ours.boxes, boxes.float())
