"""The "No Time to Train" recipe, step by step, on hand-made inputs (issue 13).

Each expectation is either computed by hand or a direct transcription, in this file, of the
authors' formula (no-time-to-train, ``no_time_to_train/models/Sam2MatchingBaseline_noAMG.py``,
``Sam2MatchingBaselineNoAMG._forward_sam`` / ``forward_test`` / ``_compute_sim_global_avg`` /
``_compute_semantic_ios``, and sam2's ``batched_mask_to_box``; for deviations 2-5 also
``_forward_sam_decoder``, ``forward_fill_memory`` / ``postprocess_memory``,
``no_time_to_train/dataset/coco_ref_dataset.py`` and sam2's ``_load_img_as_tensor``), never our
own output.
"""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import batched_nms

from samantics_d2.data import load_reference_json
from samantics_d2.data.shapes import generate_shapes
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.backbone.sam2 import SAM2Backbone
from samantics_d2.modeling.preprocess import ImageFit, prepare_batch, preprocess_spec
from samantics_d2.modeling.proposals import PointGridProposals, build_prompt_decoder, point_grid
from samantics_d2.modeling.proposals.point_grid import input_linspace_grid
from samantics_d2.modeling.semantic import (
    MemoryBank,
    MemoryBankConfig,
    PrototypeClassifier,
    mask_grid_weights,
    mask_pooling,
    masks_to_boxes,
    masks_to_original,
    resample_masks,
    soft_merge_scores,
)
from samantics_d2.modeling.semantic.memory_bank import clipped_context_window, crop_mask_weights
from samantics_d2.references.ordering import order_references

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


# ================================================================================== deviations 2-5, best of 3
# Transcriptions of: Sam2MatchingBaselineNoAMG._forward_sam / _forward_sam_decoder (the bare sam_mask_decoder on
# _prepare_backbone_features' output, all four outputs, argmax(ious[:, 1:]) + 1), sam2's _load_img_as_tensor
# (PIL resize to 1024 x 1024), COCOMemoryFillCropDataset.__getitem__ (the crop window, the crop's bicubic and the
# mask's bilinear resize to 518) and forward_fill_memory / postprocess_memory (nearest to 37 x 37, weighted mean).


def _their_sam2_decode(decoder, feats: dict, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``points [B, 2]`` in the input frame -> their best mask ``[B, h, w]`` and its IoU ``[B]``."""
    B = points.shape[0]
    md = decoder.mask_decoder
    img_feats = feats["p4"][None].expand(B, -1, -1, -1)  # no no_mem_embed
    hr_feats = [md.conv_s0(feats["p2"][None]).expand(B, -1, -1, -1), md.conv_s1(feats["p3"][None]).expand(B, -1, -1, -1)]
    sparse, dense = decoder.prompt_encoder(
        points=(points.reshape(B, 1, 2), torch.ones(B, 1, dtype=torch.int32)), boxes=None, masks=None
    )
    # sam_mask_decoder(..., multimask_output=True, repeat_image=False, output_all_masks=True): the four outputs
    masks, ious, _, _ = md.predict_masks(
        image_embeddings=img_feats,
        image_pe=decoder.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=hr_feats,
    )
    best = torch.argmax(ious[:, 1:], dim=-1) + 1
    return masks[torch.arange(B), best], ious[torch.arange(B), best]  # (no clamp)


def _random_sam2(seed: int = 0):
    torch.manual_seed(seed)
    backbone = SAM2Backbone(variant="hiera_t", size="tiny", out_features=["p2", "p3", "p4"]).eval()
    decoders = {}
    for steps in (False, True):
        decoder = build_prompt_decoder(backbone, predictor_steps=steps)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in decoder.parameters():  # every weight random, no_mem_embed included (zeros when built)
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        decoders[steps] = decoder.eval()
    return backbone, decoders


def test_sam2_decoder_without_predictor_steps_is_their_bare_decoder_call():
    backbone, decoders = _random_sam2()
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    x, _ = backbone.prepare_with_fits([image])
    g = torch.Generator().manual_seed(2)
    points = torch.rand(10, 2, generator=g) * 128
    with torch.no_grad():
        feats = {k: v[0] for k, v in backbone(x).items()}
        want_logits, want_iou = _their_sam2_decode(decoders[False], feats, points)
        got = {
            steps: d.decode(feats, points=points[:, None], point_labels=torch.ones(10, 1), multimask_output=True,
                            best_only=True, points_per_batch=4)
            for steps, d in decoders.items()
        }
    torch.testing.assert_close(got[False][0][:, 0], want_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(got[False][1][:, 0], want_iou, rtol=0, atol=1e-5)
    # the image predictor's steps (no_mem_embed, clamp) change the masks: the option is not a no-op
    assert (got[True][0][:, 0] - want_logits).abs().max() > 1e-2
    assert decoders[False].predictor_steps is False and decoders[True].predictor_steps is True


@pytest.mark.parametrize("tag", ["sam_vit_b", "sam2.1_hiera_t"])
def test_best_of_three_is_their_argmax_over_the_multimask_outputs(tag):
    backbone = build_encoder(tag, size="tiny", out_features=["p2", "p3", "p4"] if tag.startswith("sam2") else None)
    decoder = build_prompt_decoder(backbone)
    # the decoder's four IoU predictions (single-mask token first); ties go to the first, as torch.argmax
    all_ious = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.7, 0.7, 0.1], [0.0, 0.1, 0.2, 0.9], [0.5, 0.4, 0.4, 0.4]])
    all_masks = torch.arange(4.0)[None, :, None, None].expand(4, 4, 2, 2) + 10 * torch.arange(4.0)[:, None, None, None]
    their_best = torch.argmax(all_ious[:, 1:], dim=-1) + 1

    def stock_multimask(image, sparse, dense, multimask_output):  # upstream forward: the outputs 1..3
        n = sparse.shape[0]
        return all_masks[:n, 1:], all_ious[:n, 1:]

    with mock.patch.object(decoder, "_decode_chunk", side_effect=stock_multimask):
        logits, iou = decoder.decode_embeddings(
            {}, torch.zeros(4, 2, 8), torch.zeros(4, 8, 2, 2), multimask_output=True, best_only=True, points_per_batch=4
        )
    assert their_best.tolist() == [2, 1, 3, 1]
    torch.testing.assert_close(iou[:, 0], all_ious[torch.arange(4), their_best])
    torch.testing.assert_close(logits[:, 0], all_masks[torch.arange(4), their_best])


def test_sam_input_is_their_pil_resize_to_a_square():
    image = np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    spec = preprocess_spec("sam2.1_hiera_l", fit="resize_square", interpolation="pil_bicubic")
    x, fits = prepare_batch([image], spec)
    # sam2.utils.misc._load_img_as_tensor (Image.resize's default filter: bicubic), /255, then sam_transform
    theirs = torch.from_numpy(np.array(Image.fromarray(image).convert("RGB").resize((1024, 1024))) / 255.0)
    theirs = theirs.permute(2, 0, 1).float()
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(x[0], (theirs - mean) / std, rtol=0, atol=1e-5)
    # their grid point (x, y) in the 1024 frame is (x * W / 1024, y * H / 1024) in the image
    fit = fits[0]
    assert fit.scale == (1024 / 48, 1024 / 80) and fit.valid_box == (0, 0, 1024, 1024)
    torch.testing.assert_close(fit.points_to_original(torch.tensor([[512.5, 16.5]])), torch.tensor([[512.5 * 80 / 1024, 16.5 * 48 / 1024]]))


def test_dinov2_target_input_is_the_whole_image_stretched():
    crop = build_encoder("dinov2_vitl14", size="tiny", input_size=518)  # the tag's centre crop
    whole = build_encoder("dinov2_vitl14", size="tiny", input_size=518, fit="resize_square")
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    _, (crop_fit,) = crop.prepare_with_fits([image])
    _, (whole_fit,) = whole.prepare_with_fits([image])
    seen = {name: f.mask_to_original(torch.ones(1, 518, 518, dtype=torch.bool))[0] for name, f in
            (("crop", crop_fit), ("whole", whole_fit))}
    assert bool(seen["whole"].all())  # theirs: F.interpolate(target, (518, 518)): every pixel seen
    assert seen["crop"].float().mean() < 0.7  # 0.875 centre crop of a 4:3 image loses a third of its width
    assert whole_fit.scale == (518 / 480, 518 / 640)


def _their_crop_window(bbox_xywh, img_w_ori, img_h_ori, context_ratio):
    # COCOMemoryFillCropDataset.__getitem__ ("Method 2: keep aspect ratio")
    bx1, by1, bw, bh = bbox_xywh
    x1, y1, x2, y2 = [int(x) for x in (bx1, by1, bx1 + bw, by1 + bh)]
    box_w, box_h = x2 - x1, y2 - y1
    mid_x, mid_y = (x1 + x2) * 0.5, (y1 + y2) * 0.5
    crop_size = max(box_w, box_h) * (1.0 + context_ratio)
    crop_x1 = max(0, int(mid_x - crop_size * 0.5))
    crop_y1 = max(0, int(mid_y - crop_size * 0.5))
    crop_x2 = min(img_w_ori, int(mid_x + crop_size * 0.5))
    crop_y2 = min(img_h_ori, int(mid_y + crop_size * 0.5))
    return (crop_y1, crop_x1, crop_y2, crop_x2)


@pytest.mark.parametrize(
    "box", [(10.7, 20.2, 30.5, 10.9), (0.0, 0.0, 12.0, 40.0), (90.5, 55.3, 9.4, 8.6), (3.0, 50.0, 96.9, 5.5)]
)
def test_clipped_crop_window_is_theirs(box):
    # their context_ratio 0.2 is the whole margin: 0.1 per side here
    assert clipped_context_window(box, 0.1, (64, 100)) == _their_crop_window(box, 100, 64, 0.2)


def test_bilinear_nearest_mask_weights_by_hand():
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[:, :5] = 1  # left half
    # bilinear to 28 x 28, then nearest to 2 x 2 reads input pixels 0 and 14: column 14 samples the
    # 10-px mask at x = 14.5 * 10 / 28 - 0.5 = 4.679, i.e. 1 - 0.679 of column 4
    weights = crop_mask_weights([mask], (2, 2), mode="bilinear_nearest", input_size=28)[0]
    right = 1.0 - (14.5 * 10 / 28 - 0.5 - 4)
    torch.testing.assert_close(weights, torch.tensor([[1.0, right], [1.0, right]]))
    torch.testing.assert_close(crop_mask_weights([mask], (2, 2))[0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # area


def test_reference_feature_is_their_memory_fill(tmp_path):
    json_file = generate_shapes(str(tmp_path), num_images=1, image_size=96, seed=1, instances_per_image=(3, 3))
    dicts, class_names = load_reference_json(json_file, str(tmp_path / "images"))
    torch.manual_seed(0)
    encoder = build_encoder("dinov2_vits14", size="tiny").eval()  # 56 px: a 4 x 4 patch grid
    config = MemoryBankConfig(crop="square_clipped", context=0.1, mask_weights="bilinear_nearest",
                              crop_interpolation="bicubic_float")
    bank = MemoryBank.build(references=dicts, backbone=encoder, config=config, weights_id="w",
                            num_classes=len(class_names))
    S = encoder.preprocess.input_size
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    items = order_references(dicts, len(class_names))
    assert len(items) == len(bank) == 3
    for item, got in zip(items, bank.features):
        image = torch.from_numpy(np.array(Image.open(item.file_name).convert("RGB")) / 255.0).permute(2, 0, 1).float()
        mask = torch.from_numpy(item.mask()).float()[None]
        H, W = mask.shape[-2:]
        y0, x0, y1, x1 = _their_crop_window(item.annotation["bbox"], W, H, 0.2)
        crop = F.interpolate(image[None, :, y0:y1, x0:x1], size=(S, S), mode="bicubic")
        mask_crop = F.interpolate(mask[None, :, y0:y1, x0:x1], size=(S, S), mode="bilinear")
        with torch.no_grad():
            feats = encoder((crop - mean) / std)[encoder.dense_feature][0]  # [C, h, w]
        weights = F.interpolate(mask_crop, size=tuple(feats.shape[-2:]), mode="nearest").reshape(1, -1)
        feats = feats.reshape(feats.shape[0], -1).t()
        want = (feats * weights.t()).sum(0) / weights.sum()  # postprocess_memory's per-instance mean
        torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
