"""Semantic classifier and memory bank of the training-free pipeline.

Mask resampling against a brute-force area average, pooling against explicit weighted means, the
classifier on hand-made feature maps (known answers), NMS and the soft merge on constructed
masks, and the memory bank with a tiny random DINOv2 on the synthetic shapes (reuse, rebuilds,
k of n shots, edge cases).
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_util

from samantics_d2.data import load_reference_json
from samantics_d2.data.io import read_image
from samantics_d2.data.mapper import segmentation_to_mask
from samantics_d2.data.shapes import generate_shapes
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, fit_image
from samantics_d2.modeling.semantic import (
    MemoryBank,
    MemoryBankConfig,
    PrototypeClassifier,
    connected_component_areas,
    identity_fit,
    kmeans,
    mask_iou_matrix,
    mask_overlap_over_area,
    mask_pooling,
    masks_to_boxes,
    masks_to_original,
    remove_small_regions,
    resample_masks,
    soft_merge_scores,
    weights_identity,
)

H, W = 37, 53  # a non-square original image


def _spec(fit: str, size: int, patch: int, **kw) -> PreprocessSpec:
    return PreprocessSpec(f"test_{fit}", size, IMAGENET_MEAN, IMAGENET_STD, patch, fit, **kw)


def _brute_force_weights(logits, src_fit, dst_fit, grid, patch):
    """Upsample the masks to the original image, then average over each destination patch's area
    (exact pixel-coverage fractions; area outside the image counts as 0)."""
    probs = torch.sigmoid(src_fit.mask_to_original(logits)).double()  # [P, H, W]

    def coverage(n, scale, offset, size):  # [n, size]: how much of original pixel c lies in patch i
        start = (torch.arange(n, dtype=torch.float64)[:, None] * patch - offset) / scale
        end = ((torch.arange(n, dtype=torch.float64)[:, None] + 1) * patch - offset) / scale
        c = torch.arange(size, dtype=torch.float64)[None]
        return (torch.minimum(c + 1, end) - torch.maximum(c, start)).clamp_min(0)

    ay = coverage(grid[0], dst_fit.scale[0], dst_fit.offset[0], src_fit.original_size[0])
    ax = coverage(grid[1], dst_fit.scale[1], dst_fit.offset[1], src_fit.original_size[1])
    patch_area = (patch / dst_fit.scale[0]) * (patch / dst_fit.scale[1])
    return torch.einsum("ih,phw,jw->pij", ay, probs, ax) / patch_area


@pytest.mark.parametrize(
    "dst_spec",
    [
        _spec("resize_square", 56, 14),
        _spec("resize_center_crop", 56, 14, crop_pct=0.875),
        _spec("longest_side_pad", 56, 14),
    ],
    ids=lambda s: s.fit,
)
def test_resample_masks_matches_brute_force(dst_spec):
    image = np.zeros((H, W, 3), np.uint8)
    _, src_fit = fit_image(image, _spec("longest_side_pad", 64, 16))  # SAM-like, masks at 1/4
    _, dst_fit = fit_image(image, dst_spec)
    g = torch.Generator().manual_seed(0)
    logits = F.interpolate(torch.randn(3, 1, 4, 4, generator=g) * 4, size=(16, 16), mode="bilinear")[:, 0]
    brute = _brute_force_weights(logits, src_fit, dst_fit, (4, 4), 14).float()
    fine = resample_masks(logits, src_fit=src_fit, dst_fit=dst_fit, grid_size=(4, 4), patch_size=14, samples_per_patch=8)
    coarse = resample_masks(logits, src_fit=src_fit, dst_fit=dst_fit, grid_size=(4, 4), patch_size=14)
    assert fine.shape == (3, 4, 4) and coarse.shape == (3, 4, 4)
    # the residual is the brute force's own per-pixel discretisation (about 10 original px per patch)
    assert (fine - brute).abs().max() < 0.05
    assert (coarse - brute).abs().mean() < 0.05
    assert fine.min() >= 0 and fine.max() <= 1
    if dst_spec.fit == "longest_side_pad":  # the last patch row lies in the padding below the image
        assert torch.all(fine[:, -1] == 0) and torch.all(brute[:, -1] == 0)
    # probabilities in, same result as logits in
    probs_in = resample_masks(
        logits.sigmoid(), src_fit=src_fit, dst_fit=dst_fit, grid_size=(4, 4), patch_size=14, probabilities=True
    )
    assert (probs_in - coarse).abs().max() < 0.1
    empty = resample_masks(logits[:0], src_fit=src_fit, dst_fit=dst_fit, grid_size=(4, 4), patch_size=14)
    assert empty.shape == (0, 4, 4)


def test_resample_masks_rejects_fits_of_different_images():
    _, a = fit_image(np.zeros((H, W, 3), np.uint8), _spec("resize_square", 56, 14))
    _, b = fit_image(np.zeros((W, H, 3), np.uint8), _spec("resize_square", 56, 14))
    with pytest.raises(ValueError, match="same image"):
        resample_masks(torch.zeros(1, 8, 8), src_fit=a, dst_fit=b, grid_size=(4, 4), patch_size=14)


def test_remove_small_regions_matches_segment_anything():
    """All masks at once, the same as upstream's OpenCV version applied per mask (holes, then islands)."""
    import cv2
    from segment_anything.utils.amg import remove_small_regions as upstream

    g = torch.Generator().manual_seed(0)
    masks = torch.stack([torch.rand(20, 24, generator=g) < p for p in torch.linspace(0.1, 0.9, 40).tolist()])
    masks[0] = False  # empty
    masks[1] = True  # full
    for area in (1.0, 4.0, 9.5, 30.0):
        cleaned, changed = remove_small_regions(masks, area)
        for mask, ours, ours_changed in zip(masks.numpy(), cleaned.numpy(), changed.tolist()):
            expected, _ = upstream(mask, area, "holes")
            expected, _ = upstream(expected, area, "islands")
            np.testing.assert_array_equal(ours, expected)
            assert ours_changed == (not np.array_equal(expected, mask))
    areas = connected_component_areas(masks)
    for mask, ours in zip(masks.numpy()[2:6], areas.numpy()[2:6]):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        np.testing.assert_array_equal(ours, np.where(labels > 0, stats[labels, cv2.CC_STAT_AREA], 0))
    unchanged, none = remove_small_regions(masks, 0.0)
    assert torch.equal(unchanged, masks) and not none.any()
    with pytest.raises(ValueError, match="P, h, w"):
        remove_small_regions(masks[0], 4.0)


def test_mask_pooling_is_the_weighted_mean():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(6, 5, 7, generator=g)
    weights = torch.rand(4, 5, 7, generator=g)
    weights[2] = 0  # a mask with no weight
    pooled, valid = mask_pooling(features, weights)
    for p in range(4):
        total = weights[p].sum()
        expected = (features * weights[p]).sum(dim=(1, 2)) / total if total > 0 else torch.zeros(6)
        torch.testing.assert_close(pooled[p], expected)
    assert valid.tolist() == [True, True, False, True]
    assert torch.all(pooled[2] == 0)
    # batched: mask n on image n, and P masks per image
    batch = torch.randn(3, 6, 5, 7, generator=g)
    per_image, _ = mask_pooling(batch, weights[:3])
    for n in range(3):
        torch.testing.assert_close(per_image[n], mask_pooling(batch[n], weights[n : n + 1])[0][0])
    many, many_valid = mask_pooling(batch, weights[None].expand(3, -1, -1, -1))
    assert many.shape == (3, 4, 6) and many_valid.shape == (3, 4)
    torch.testing.assert_close(many[1], mask_pooling(batch[1], weights)[0])
    with pytest.raises(ValueError, match="grid"):
        mask_pooling(features, weights[:, :4])


def test_boxes_overlaps_and_final_masks():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(5, 9, 11, generator=g) > 0.7
    masks[3] = False  # empty
    masks[4] = False
    masks[4, 2, 6] = True  # one pixel
    boxes = masks_to_boxes(masks)
    for p in range(5):
        ys, xs = torch.nonzero(masks[p], as_tuple=True)
        expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(ys) else [0, 0, 0, 0]
        assert boxes[p].tolist() == [float(v) for v in expected]
    inter = torch.tensor([[float((masks[i] & masks[j]).sum()) for j in range(5)] for i in range(5)])
    union = torch.tensor([[float((masks[i] | masks[j]).sum()) for j in range(5)] for i in range(5)])
    area = masks.flatten(1).sum(1).float()
    torch.testing.assert_close(mask_iou_matrix(masks), inter / union.clamp_min(1))
    torch.testing.assert_close(mask_overlap_over_area(masks), inter / area.clamp_min(1)[:, None])

    _, fit = fit_image(np.zeros((H, W, 3), np.uint8), _spec("longest_side_pad", 64, 16))
    logits = torch.randn(2, 16, 16, generator=g)
    final = masks_to_original(logits, fit)
    assert final.shape == (2, H, W) and final.dtype == torch.bool
    assert torch.equal(final, fit.mask_to_original(logits) > 0)
    assert masks_to_original(logits[:0], fit).shape == (0, H, W)
    # boxes in original pixels: a mask cell (4x4 input px) maps back through the fit
    cell = torch.zeros(1, 16, 16, dtype=torch.bool)
    cell[0, 2, 3] = True
    sy, sx = fit.scale
    expected = torch.tensor([[3 * 4 / sx, 2 * 4 / sy, 4 * 4 / sx, 3 * 4 / sy]])
    torch.testing.assert_close(masks_to_boxes(cell, fit=fit), expected)


# ------------------------------------------------------------------------------------------------
# Classifier on hand-made feature maps


def _class_embeddings(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)))
    return q[:num_classes]  # orthonormal rows


def _region_scene(num_classes=5, dim=16, seed=0):
    """An 8x10 feature map cut into vertical stripes, stripe c of class c % num_classes."""
    emb = _class_embeddings(num_classes, dim, seed)
    h, w = 8, 10
    stripes = [(c, slice(2 * c, 2 * c + 2)) for c in range(5)]
    features = torch.zeros(dim, h, w)
    masks = torch.zeros(len(stripes), h, w, dtype=torch.bool)
    labels = []
    noise = torch.randn(dim, h, w, generator=torch.Generator().manual_seed(seed + 1)) * 0.05
    for p, (c, cols) in enumerate(stripes):
        features[:, :, cols] = emb[c % num_classes][:, None, None]
        masks[p, :, cols] = True
        labels.append(c % num_classes)
    return features + noise, masks, torch.tensor(labels)


def test_classifier_oracle_and_shuffled_prototypes():
    features, masks, labels = _region_scene()
    weights = masks.float()
    pooled, _ = mask_pooling(features, weights)
    prototypes = torch.stack([pooled[labels == c].mean(0) for c in range(5)])[:, None]  # [K, 1, D]
    valid = torch.ones(5, 1, dtype=torch.bool)
    classifier = PrototypeClassifier()
    out = classifier(features=features, weights=weights, masks=masks, prototypes=prototypes, prototype_valid=valid)
    assert sorted(out.indices.tolist()) == list(range(5))
    assert torch.equal(out.classes, labels[out.indices])  # accuracy 1.0
    assert torch.all(out.scores > 0.9) and torch.all(out.scores[:-1] >= out.scores[1:])
    shuffled = classifier(
        features=features, weights=weights, masks=masks, prototypes=prototypes.roll(1, dims=0), prototype_valid=valid
    )
    accuracy = (shuffled.classes == labels[shuffled.indices]).float().mean()
    assert accuracy == 0.0


def test_classifier_empty_class_more_classes_than_proposals_and_zero_proposals():
    features, masks, labels = _region_scene(num_classes=5)
    weights = masks.float()
    emb = _class_embeddings(5, 16)
    # 12 classes, 5 proposals; class 2 has no references: its rows are invalid (zero) and never win
    prototypes = torch.zeros(12, 2, 16)
    valid = torch.zeros(12, 2, dtype=torch.bool)
    for c in (0, 1, 3, 4):
        prototypes[c, 0] = emb[c]
        valid[c, 0] = True
    prototypes[7, 0], valid[7, 0] = torch.randn(16, generator=torch.Generator().manual_seed(5)), True
    classifier = PrototypeClassifier(merge="none")
    out = classifier(features=features, weights=weights, masks=masks, prototypes=prototypes, prototype_valid=valid)
    assert 2 not in out.classes.tolist()
    keep = labels[out.indices] != 2
    assert torch.equal(out.classes[keep], labels[out.indices][keep])
    # no valid prototype at all: nothing is labelled
    none = classifier(
        features=features, weights=weights, masks=masks, prototypes=prototypes, prototype_valid=torch.zeros_like(valid)
    )
    assert len(none.indices) == 0
    # zero proposals
    zero = classifier(
        features=features, weights=weights[:0], masks=masks[:0], prototypes=prototypes, prototype_valid=valid
    )
    assert zero.indices.shape == (0,) and zero.scores.shape == (0,) and zero.classes.shape == (0,)
    # a proposal that covers nothing of the feature map is dropped
    weights[0] = 0
    dropped = classifier(features=features, weights=weights, masks=masks, prototypes=prototypes, prototype_valid=valid)
    assert 0 not in dropped.indices.tolist()


def test_nms_is_per_class():
    emb = _class_embeddings(2, 8)
    features = torch.zeros(8, 4, 4)
    features[:, :, :2] = emb[0][:, None, None]
    features[:, :, 2:] = emb[1][:, None, None]
    features[:, 0, 0] += 0.3 * emb[1]  # an impure class-0 patch
    left, right = torch.zeros(4, 4), torch.zeros(4, 4)
    left[:, :2], right[:, 2:] = 1, 1
    clean_left, corner = left.clone(), torch.zeros(4, 4)
    clean_left[0, 0], corner[0, 0] = 0, 1
    # 0: left half (one impure patch), 1: right half, 2: left half without the impure patch, 3: that patch
    weights = torch.stack([left, right, clean_left, corner])
    # all four low-resolution masks are the same square: box IoU 1 between every pair
    masks = torch.zeros(4, 6, 6, dtype=torch.bool)
    masks[:, 1:5, 1:5] = True
    prototypes = emb[:, None]
    valid = torch.ones(2, 1, dtype=torch.bool)
    out = PrototypeClassifier(merge="none")(
        features=features, weights=weights, masks=masks, prototypes=prototypes, prototype_valid=valid
    )
    # 0, 2, 3 are class 0 with the same box: only the best (2, pure) survives; 1 is class 1 and stays
    kept = dict(zip(out.indices.tolist(), out.classes.tolist()))
    assert kept == {2: 0, 1: 1}
    out_off = PrototypeClassifier(merge="none", nms_thresh=1.0)(
        features=features, weights=weights, masks=masks, prototypes=prototypes, prototype_valid=valid
    )
    assert sorted(out_off.indices.tolist()) == [0, 1, 2, 3]


def test_soft_merge():
    # A: 4x4 square; B: 2x2 inside A; C: disjoint; D: half inside A
    masks = torch.zeros(4, 10, 10, dtype=torch.bool)
    masks[0, 0:4, 0:4] = True
    masks[1, 1:3, 1:3] = True
    masks[2, 6:9, 6:9] = True
    masks[3, 2:4, 3:5] = True  # 4 pixels, 2 of them in A
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    same = torch.zeros(4, dtype=torch.long)
    identical = torch.ones(4, 3)
    merged = soft_merge_scores(scores, same, masks, identical)
    torch.testing.assert_close(merged, torch.tensor([0.9, 0.0, 0.7, 0.6 * 0.5**0.5]))
    # other class, or orthogonal features: no decay
    assert torch.equal(soft_merge_scores(scores, torch.tensor([0, 1, 0, 1]), masks, identical), scores)
    orthogonal = torch.eye(4)
    assert torch.equal(soft_merge_scores(scores, same, masks, orthogonal), scores)
    # only earlier (higher-scoring) masks count: A inside nothing, B scored above A now decays A by x = 4/16
    swapped = soft_merge_scores(torch.tensor([0.5, 0.8, 0.7, 0.6]), same, masks, identical)
    torch.testing.assert_close(swapped[:2], torch.tensor([0.5 * 0.75**0.5, 0.8]))
    assert soft_merge_scores(scores[:0], same[:0], masks[:0], identical[:0]).shape == (0,)

    # through the classifier: a uniform feature map gives every proposal the same feature and score 1
    features = torch.ones(3, 5, 5)
    weights = torch.ones(4, 5, 5)
    weights[1:] *= 0.5  # lower totals do not change the mean
    out = PrototypeClassifier(merge="soft")(
        features=features, weights=weights, masks=masks, prototypes=torch.ones(1, 1, 3),
        prototype_valid=torch.ones(1, 1, dtype=torch.bool),
    )
    result = dict(zip(out.indices.tolist(), out.scores.tolist()))
    assert result[0] == pytest.approx(1.0) and result[1] == pytest.approx(0.0, abs=1e-6)
    assert result[2] == pytest.approx(1.0) and result[3] == pytest.approx(0.5**0.5)
    assert out.indices[-1] == 1  # re-sorted by the merged score
    assert len(PrototypeClassifier(topk=2)(
        features=features, weights=weights, masks=masks, prototypes=torch.ones(1, 1, 3),
        prototype_valid=torch.ones(1, 1, dtype=torch.bool),
    ).indices) == 2


def test_kmeans_is_seeded_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(3)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    points = (centres[:, None] + 0.1 * torch.randn(3, 10, 2, generator=g)).reshape(-1, 2)
    found = kmeans(points, 3, seed=0)
    assert torch.equal(found, kmeans(points, 3, seed=0))
    distance = torch.cdist(found, centres).min(dim=0).values
    assert torch.all(distance < 0.2)


# ------------------------------------------------------------------------------------------------
# Memory bank on the synthetic shapes with a tiny random DINOv2


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    json_file = generate_shapes(str(root), num_images=4, image_size=96, seed=0, instances_per_image=(3, 4))
    dicts, class_names = load_reference_json(json_file, os.path.join(str(root), "images"))
    return dicts, class_names


def _tiny_dinov2(tag="dinov2_vits14", **kw):
    torch.manual_seed(0)
    backbone = build_encoder(tag, size="tiny", **kw)
    backbone.calls = 0
    backbone.register_forward_hook(lambda *args: setattr(backbone, "calls", backbone.calls + 1))
    return backbone


def _first_k(dicts, k):
    seen, out = {}, []
    for record in dicts:
        anns = []
        for ann in record["annotations"]:
            if seen.get(ann["category_id"], 0) < k:
                seen[ann["category_id"]] = seen.get(ann["category_id"], 0) + 1
                anns.append(ann)
        out.append({**record, "annotations": anns})
    return out


def test_load_reference_json(shapes):
    dicts, class_names = shapes
    ids = [a["category_id"] for d in dicts for a in d["annotations"]]
    assert all(0 <= c < len(class_names) for c in ids)
    assert all("id" in a for d in dicts for a in d["annotations"])


def test_memory_bank_oracle_on_shapes(shapes):
    """GT masks of the reference images as proposals, every shot its own prototype: each GT mask
    finds its own shot, so its true class; shuffled class rows get (almost) everything wrong."""
    dicts, class_names = shapes
    backbone = _tiny_dinov2(input_size=112, fit="resize_square")
    bank = MemoryBank.build(
        references=dicts, backbone=backbone, config=MemoryBankConfig(crop="full", batch_size=5),
        weights_id="random-init:0", num_classes=len(class_names),
    )
    assert backbone.calls == 3  # 14 instances (3-4 per image), 5 per forward
    prototypes, valid = bank.prototypes(aggregation="all")
    present = valid.any(dim=1)
    classifier = PrototypeClassifier(merge="none", nms_thresh=1.0)
    correct = shuffled_correct = total = 0
    for record in dicts:
        image = read_image(record["file_name"])
        x, fits = backbone.prepare_with_fits([image])
        with torch.no_grad():
            features = backbone(x)[backbone.dense_feature][0]
        gt = torch.stack(
            [torch.from_numpy(segmentation_to_mask(a["segmentation"], record["height"], record["width"])) for a in record["annotations"]]
        ).bool()
        labels = torch.tensor([a["category_id"] for a in record["annotations"]])
        weights = resample_masks(
            gt, src_fit=identity_fit(*gt.shape[1:]), dst_fit=fits[0], grid_size=tuple(features.shape[1:]),
            patch_size=14, samples_per_patch=4,
        )
        out = classifier(features=features, weights=weights, masks=gt, prototypes=prototypes, prototype_valid=valid)
        assert sorted(out.indices.tolist()) == list(range(len(labels)))
        correct += int((out.classes == labels[out.indices]).sum())
        # shuffle the class rows among the classes that have references
        perm = torch.arange(len(class_names))
        idx = torch.nonzero(present).squeeze(1)
        perm[idx] = idx.roll(1)
        wrong = classifier(features=features, weights=weights, masks=gt, prototypes=prototypes[perm], prototype_valid=valid[perm])
        shuffled_correct += int((wrong.classes == labels[wrong.indices]).sum())
        total += len(labels)
    assert correct == total
    assert shuffled_correct <= 0.2 * total


def test_memory_bank_reuse_and_rebuilds(shapes, tmp_path, caplog):
    dicts, class_names = shapes
    backbone = _tiny_dinov2()
    path = tmp_path / "bank.safetensors"
    kwargs = dict(backbone=backbone, config=MemoryBankConfig(), weights_id="random-init:0", num_classes=len(class_names))
    first = MemoryBank.load_or_build(path, references=dicts, **kwargs)
    built_calls = backbone.calls
    assert built_calls > 0 and path.exists() and path.with_suffix(".json").exists()
    sidecar = json.loads(path.with_suffix(".json").read_text())
    provenance = sidecar["provenance"]  # the references store's sidecar (docs/references.md)
    assert provenance == first.provenance and provenance["encoder"]["weights"] == "random-init:0"
    assert provenance["kind"] == "memory_bank" and provenance["ordering"] == "category_id, shot_rank, annotation_id"
    assert provenance["reference_set"]["annotation_ids"] == first.annotation_ids
    assert [r["annotation_id"] for r in sidecar["records"]] == first.annotation_ids
    assert provenance["encoder"]["class"] == "DINOv2Backbone" and provenance["options"]["context"] == 0.2

    again = MemoryBank.load_or_build(path, references=dicts, **kwargs)
    assert backbone.calls == built_calls  # loaded: no encoder call
    assert torch.equal(again.features, first.features) and torch.equal(again.class_ids, first.class_ids)
    assert again.annotation_ids == first.annotation_ids

    saved = path.read_bytes()

    def rebuilt(why, **changes):
        path.write_bytes(saved)  # start from the bank of the original inputs
        model = changes.get("backbone", backbone)
        before = model.calls
        with caplog.at_level("INFO", logger="samantics_d2.references.store"):
            caplog.clear()
            MemoryBank.load_or_build(path, **{**kwargs, "references": dicts, **changes})
        assert model.calls > before, why
        messages = [r.message for r in caplog.records if "Recomputing memory bank" in r.message]
        assert len(messages) == 1 and messages[0].endswith(f"changed {why}."), (why, messages)

    fewer = [{**dicts[0], "annotations": dicts[0]["annotations"][1:]}] + dicts[1:]
    rebuilt("reference_set", references=fewer)
    moved = [{**d, "annotations": [{**a, "bbox": [v + 1 for v in a["bbox"]]} for a in d["annotations"]]} for d in dicts]
    rebuilt("reference_set", references=moved)  # same ids and files, other boxes
    rebuilt("options", config=MemoryBankConfig(context=0.3))
    rebuilt("options", config=MemoryBankConfig(crop="full"))  # full images: the encoder's own fit
    rebuilt("encoder", weights_id="random-init:1")
    rebuilt("encoder, options", backbone=_tiny_dinov2("dinov2_vits14_reg"))  # the spec names its tag
    rebuilt("options", backbone=_tiny_dinov2(input_size=70))  # preprocessing
    # a file cut short (or not a bank) is rebuilt, with a warning
    path.write_bytes(saved[: len(saved) // 2])
    with caplog.at_level("WARNING", logger="samantics_d2.references.store"):
        caplog.clear()
        calls = backbone.calls
        repaired = MemoryBank.load_or_build(path, references=dicts, **kwargs)
    assert backbone.calls > calls and any("not a reference-features file" in r.message for r in caplog.records)
    torch.testing.assert_close(repaired.features, first.features)
    path.write_bytes(saved)
    # the batch size is not part of the provenance
    calls = backbone.calls
    MemoryBank.load_or_build(path, references=dicts, **{**kwargs, "config": MemoryBankConfig(batch_size=3)})
    assert backbone.calls == calls


def test_memory_bank_batch_size_by_default_fits_the_device():
    """None: 16 per forward on a GPU, on a CPU as many crops as fit in CPU_TOKENS_PER_FORWARD tokens."""
    from samantics_d2.modeling.semantic.memory_bank import CPU_TOKENS_PER_FORWARD, auto_batch_size

    cpu = torch.device("cpu")
    assert CPU_TOKENS_PER_FORWARD == 4096
    assert auto_batch_size(cpu, 37 * 37) == 2  # DINOv2 at 518 px
    assert auto_batch_size(cpu, 16 * 16) == 16  # DINOv2 at 224 px
    assert auto_batch_size(cpu, 4) == 16 and auto_batch_size(cpu, 10_000) == 1
    assert auto_batch_size(torch.device("cuda"), 37 * 37) == 16
    assert MemoryBankConfig().batch_size is None
    with pytest.raises(ValueError, match="batch_size=0"):
        MemoryBankConfig(batch_size=0)


def test_memory_bank_autocast_is_an_option_with_its_own_provenance(shapes, tmp_path):
    """autocast="bf16": the same references encoded under bf16 autocast, close to float32 but not equal,
    and a bank built one way is never reused for the other."""
    dicts, class_names = shapes
    backbone = _tiny_dinov2()
    kwargs = dict(references=dicts, backbone=backbone, weights_id="w", num_classes=len(class_names))
    exact = MemoryBank.build(config=MemoryBankConfig(), **kwargs)
    bf16 = MemoryBank.build(config=MemoryBankConfig(autocast="bf16"), **kwargs)
    assert bf16.features.dtype == torch.float32 and torch.equal(bf16.valid, exact.valid)
    assert not torch.equal(bf16.features, exact.features)
    cosine = torch.nn.functional.cosine_similarity(bf16.features, exact.features, dim=-1)
    assert float(cosine[exact.valid].min()) > 0.99
    assert bf16.provenance["options"]["autocast"] == "bf16" and "autocast" not in exact.provenance["options"]
    path = tmp_path / "bank.safetensors"
    MemoryBank.load_or_build(path, config=MemoryBankConfig(), **kwargs)
    calls = backbone.calls
    MemoryBank.load_or_build(path, config=MemoryBankConfig(autocast="bf16"), **kwargs)
    assert backbone.calls > calls
    with pytest.raises(ValueError, match="autocast='int8'"):
        MemoryBankConfig(autocast="int8")


def test_weights_identity(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert weights_identity(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    assert weights_identity(seed=3) == "random-init:3"
    with pytest.raises(ValueError):
        weights_identity()


@pytest.mark.parametrize("aggregation", ["mean", "kmeans", "all"])
def test_k_of_n_shots_equals_building_with_k_shots(shapes, aggregation):
    dicts, class_names = shapes
    backbone = _tiny_dinov2()
    common = dict(backbone=backbone, config=MemoryBankConfig(batch_size=4), weights_id="w", num_classes=len(class_names))
    full = MemoryBank.build(references=dicts, **common)
    assert (full.shots_per_class(3) == 3).any()  # with num_centres=2, k=3 runs k-means on some class
    for k in (1, 3):
        calls = backbone.calls
        limited, limited_valid = full.prototypes(shots=k, aggregation=aggregation, num_centres=2)
        assert backbone.calls == calls  # no recomputation
        small = MemoryBank.build(references=_first_k(dicts, k), **common)
        expected, expected_valid = small.prototypes(aggregation=aggregation, num_centres=2)
        assert torch.equal(limited_valid[:, : expected.shape[1]], expected_valid)
        torch.testing.assert_close(limited[:, : expected.shape[1]], expected, atol=1e-5, rtol=1e-5)
        assert not limited_valid[:, expected.shape[1] :].any()
    norms = limited[limited_valid].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_mean_prototype_is_the_normalised_mean_of_shots(shapes):
    dicts, class_names = shapes
    bank = MemoryBank.build(
        references=dicts, backbone=_tiny_dinov2(), config=MemoryBankConfig(), weights_id="w", num_classes=len(class_names)
    )
    prototypes, valid = bank.prototypes()
    for c in range(len(class_names)):
        shots = bank.features[bank.class_ids == c]
        if len(shots):
            torch.testing.assert_close(prototypes[c, 0], F.normalize(shots.mean(0), dim=0))


def test_memory_bank_edge_cases(shapes):
    """An empty reference category, a class with one shot, a single-pixel reference mask."""
    dicts, class_names = shapes
    record = dicts[0]
    single = np.zeros((record["height"], record["width"]), np.uint8, order="F")
    single[40, 7] = 1
    rle = mask_util.encode(single)
    rle["counts"] = rle["counts"].decode("ascii")
    pixel = {"id": 9999, "category_id": 1, "bbox": [7.0, 40.0, 1.0, 1.0], "bbox_mode": 1, "segmentation": rle, "iscrowd": 0}
    references = [{**record, "annotations": [record["annotations"][0], pixel]}]
    K = len(class_names) + 2  # classes 1 and first annotation's class have shots, the rest none
    for crop in ("square_context", "full"):
        bank = MemoryBank.build(
            references=references, backbone=_tiny_dinov2(), config=MemoryBankConfig(crop=crop), weights_id="w", num_classes=K
        )
        assert bank.valid.all(), crop  # the single pixel still weighs on the patch grid
        assert torch.isfinite(bank.features).all()
        present = {record["annotations"][0]["category_id"], 1}
        for aggregation in ("mean", "kmeans", "all"):
            prototypes, valid = bank.prototypes(aggregation=aggregation)
            assert set(torch.nonzero(valid.any(dim=1)).squeeze(1).tolist()) == present
            assert torch.all(prototypes[~valid] == 0)
            assert int(valid[1].sum()) == 1  # one shot: one prototype, the normalised shot
            shot = bank.features[bank.annotation_ids.index(9999)]
            torch.testing.assert_close(prototypes[1][valid[1]][0], F.normalize(shot, dim=0))
    # no references at all: every class is empty
    empty = MemoryBank.build(references=[], backbone=_tiny_dinov2(), config=MemoryBankConfig(), weights_id="w", num_classes=3)
    prototypes, valid = empty.prototypes()
    assert len(empty) == 0 and prototypes.shape == (3, 1, 32) and not valid.any()
    with pytest.raises(ValueError, match="category_id"):
        MemoryBank.build(references=references, backbone=_tiny_dinov2(), config=MemoryBankConfig(), weights_id="w", num_classes=1)
