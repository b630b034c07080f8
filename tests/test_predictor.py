"""SamanticsPredictor: the multimask path equals the upstream predictors on the same random weights
(tiny upstream models saved in the official file layout, as tests/test_proposals.py builds them);
labels from image and text prototypes with known answers; caching and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.semantic import TextPrototypes
from samantics_d2.predictor import PrototypeLabeller, SamanticsPredictor
from test_proposals import _ours, _upstream_sam, _upstream_sam2


@pytest.fixture(scope="module")
def upstream_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("predictor_weights")
    sam = _upstream_sam("segment_anything", seed=5)
    torch.save(sam.state_dict(), root / "sam.pth")
    sam2 = _upstream_sam2(seed=6)
    torch.save({"model": sam2.state_dict()}, root / "sam2.pt")
    return {"segment_anything": (sam, root / "sam.pth"), "sam2": (sam2, root / "sam2.pt")}


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


CLICKS = [(np.array([[20.5, 30.0]]), np.array([1])), (np.array([[10.0, 12.0], [40.0, 33.0]]), np.array([1, 0]))]


@pytest.mark.parametrize("click", range(len(CLICKS)))
def test_multimask_path_equals_segment_anything_sam_predictor(upstream_files, click):
    from segment_anything import SamPredictor

    upstream, path = upstream_files["segment_anything"]
    reference = SamPredictor(upstream)
    predictor = SamanticsPredictor(**dict(zip(("backbone", "decoder"), _ours("segment_anything", path))))
    image = _image(48, 64, seed=click)  # longest side = the tiny input size: no resize
    points, labels = CLICKS[click]
    reference.set_image(image)
    predictor.set_image(image)
    masks, iou, low_res = reference.predict(point_coords=points, point_labels=labels, multimask_output=True)
    out = predictor.predict(points=points, point_labels=labels, multi_granularity=False, multimask_output=True)
    assert out.masks.shape == masks.shape == (3, 48, 64)
    np.testing.assert_array_equal(out.masks, masks)
    np.testing.assert_allclose(out.iou_pred, iou, atol=1e-5)
    np.testing.assert_allclose(out.low_res_logits, low_res, atol=1e-4)
    # single-mask output too
    masks1, iou1, _ = reference.predict(point_coords=points, point_labels=labels, multimask_output=False)
    out1 = predictor.predict(points=points, point_labels=labels, multi_granularity=False, multimask_output=False)
    np.testing.assert_array_equal(out1.masks, masks1)
    np.testing.assert_allclose(out1.iou_pred, iou1, atol=1e-5)


def test_resized_image_masks_agree_with_sam_predictor_up_to_resampling(upstream_files):
    """A resized image: segment_anything resizes with PIL and resamples masks twice; we resize with
    torch and resample once (module docstring): nearly all pixels agree."""
    from segment_anything import SamPredictor

    upstream, path = upstream_files["segment_anything"]
    reference = SamPredictor(upstream)
    predictor = SamanticsPredictor(**dict(zip(("backbone", "decoder"), _ours("segment_anything", path))))
    image = _image(100, 77, seed=3)
    reference.set_image(image)
    predictor.set_image(image)
    points, labels = CLICKS[0]
    masks, iou, low_res = reference.predict(point_coords=points, point_labels=labels, multimask_output=True)
    out = predictor.predict(points=points, point_labels=labels, multi_granularity=False)
    assert (out.masks == masks).mean() > 0.98
    np.testing.assert_allclose(out.iou_pred, iou, atol=1e-3)


@pytest.mark.parametrize("click", range(len(CLICKS)))
def test_multimask_path_equals_sam2_image_predictor(upstream_files, click):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    upstream, path = upstream_files["sam2"]
    reference = SAM2ImagePredictor(upstream)
    reference._bb_feat_sizes = [(32, 32), (16, 16), (8, 8)]  # its table is for 1024 px inputs
    predictor = SamanticsPredictor(**dict(zip(("backbone", "decoder"), _ours("sam2", path))))
    image = _image(128, 128, seed=click)  # the tiny input size: no resize on either side
    points, labels = CLICKS[click]
    points = points * 2
    reference.set_image(image)
    predictor.set_image(image)
    with torch.no_grad():
        masks, iou, low_res = reference.predict(point_coords=points, point_labels=labels, multimask_output=True)
        box_masks, box_iou, _ = reference.predict(box=np.array([10.0, 20.0, 90.0, 100.0]), multimask_output=False)
    out = predictor.predict(points=points, point_labels=labels, multi_granularity=False, multimask_output=True)
    np.testing.assert_array_equal(out.masks, masks.astype(bool))
    np.testing.assert_allclose(out.iou_pred, iou, atol=1e-5)
    np.testing.assert_allclose(out.low_res_logits, low_res, atol=1e-4)
    out_box = predictor.predict(box=[10.0, 20.0, 90.0, 100.0], multi_granularity=False, multimask_output=False)
    np.testing.assert_array_equal(out_box.masks, box_masks.astype(bool))
    np.testing.assert_allclose(out_box.iou_pred, box_iou, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_predictor():
    torch.manual_seed(0)
    predictor = SamanticsPredictor.from_tag("sam_vit_b", size="tiny")
    predictor.set_image(_image(90, 120, seed=7))
    return predictor


def test_multi_granularity_prediction_is_consistent(tiny_predictor):
    out = tiny_predictor.predict(points=[[60, 45]], point_labels=[1])
    assert 1 <= len(out) <= 6 and out.masks.shape[1:] == (90, 120)
    assert np.all(np.diff(out.granularity.areas.numpy()) >= 0)  # small to large
    assert out.part_of.shape == (len(out), len(out)) and not np.tril(out.part_of).any()
    assert out.labels == {}  # no labeller configured
    np.testing.assert_array_equal(out.masks, out.granularity.original_masks().numpy())


def test_labels_from_image_and_text_prototypes(tiny_predictor):
    """Prototypes made from the pooled features of the predicted masks themselves: each mask's own
    class wins, with cosine 1 (image) and the highest softmax probability (text)."""
    torch.manual_seed(1)
    encoder = build_encoder("dinov2_vits14", size="tiny").eval()
    predictor = SamanticsPredictor(backbone=tiny_predictor.backbone, decoder=tiny_predictor.decoder,
                                   granularity=tiny_predictor.granularity)
    predictor.set_image(tiny_predictor._image)
    masks = predictor.predict_masks(points=[[60, 45]], point_labels=[1])
    features, fit = predictor.semantic_features(encoder)
    from samantics_d2.modeling.semantic import mask_grid_weights, mask_pooling

    weights = mask_grid_weights(masks.mask_logits, src_fit=masks.fit, dst_fit=fit, grid_size=tuple(features.shape[-2:]),
                                patch_size=encoder.preprocess.patch_size)
    pooled, _ = mask_pooling(features, weights)
    K = len(masks)
    names = [f"class{k}" for k in range(K)]
    image = PrototypeLabeller(name="image", encoder=encoder, prototypes=pooled[:, None],
                              valid=torch.ones(K, 1, dtype=torch.bool), class_names=names)
    projection = torch.randn(features.shape[0], 16)
    text = TextPrototypes(class_names=names, synonyms=[[n] for n in names],
                          embeddings=torch.nn.functional.normalize(pooled @ projection, dim=-1),
                          synonym_embeddings=torch.zeros(K, 16), synonym_class=torch.arange(K), templates=("{}",))
    predictor.labellers = [image, PrototypeLabeller.from_text(text, encoder=encoder, projection=projection)]
    out = predictor.predict(points=[[60, 45]], point_labels=[1])
    assert K >= 2 and torch.linalg.matrix_rank(pooled) == K  # the masks pool distinct features
    assert out.labels["image"].classes.tolist() == list(range(K))
    assert out.labels["text"].classes.tolist() == list(range(K))
    np.testing.assert_allclose(out.labels["image"].scores, 1.0, atol=1e-5)
    assert out.labels["image"].names == [names[c] for c in out.labels["image"].classes]
    assert np.all((out.labels["text"].scores > 1.0 / K - 1e-6) & (out.labels["text"].scores <= 1.0))
    # the semantic encoder ran once for the image
    calls = []
    handle = encoder.register_forward_hook(lambda *a: calls.append(1))
    predictor.predict(points=[[30, 30]], point_labels=[1])
    handle.remove()
    assert calls == []


def test_errors_say_what_to_do(tiny_predictor):
    fresh = SamanticsPredictor(backbone=tiny_predictor.backbone, decoder=tiny_predictor.decoder,
                               granularity=tiny_predictor.granularity)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(points=[[1, 1]])
    with pytest.raises(ValueError, match="uint8 RGB"):
        fresh.set_image(np.zeros((10, 10), dtype=np.uint8))
    fresh.set_image(np.zeros((10, 12, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="one label"):
        fresh.predict(points=[[1, 1], [2, 2]], point_labels=[1])
    with pytest.raises(ValueError, match="neither points nor a box"):
        fresh.predict()
    with pytest.raises(ValueError, match="no promptable decoder"):
        SamanticsPredictor.from_tag("dinov2_vits14", size="tiny")
