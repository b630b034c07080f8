"""SAM / HQ-SAM / SAM 2 prompt decoders and point-grid proposals.

Parity: a tiny randomly initialised *upstream* model (segment_anything ``Sam``, segment_anything_hq
``Sam``, sam2 ``build_sam2`` + ``SAM2ImagePredictor``) is saved in the official file layout, loaded
through our loaders into our backbone + prompt decoder, and both are prompted with the same points
and boxes. The filtering tests recompute the expected kept set from the decoder's raw outputs with
plain formulas written here.
"""
from __future__ import annotations

import os
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn

from samantics_d2.modeling.backbone import HQSAMBackbone, SAM2Backbone, SAMBackbone
from samantics_d2.modeling.proposals import (
    MaskProposals,
    PointGridProposals,
    SAM2PromptDecoder,
    SAMPromptDecoder,
    build_prompt_decoder,
    load_prompt_decoder_weights,
    mask_logits_to_boxes,
    point_grid,
    stability_score,
)
from samantics_d2.modeling.weights import KeyMismatchError, WeightsError, load_encoder_weights

ATOL = 1e-4


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random values for every parameter (zero-initialised ones too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a.float() - b.float()).abs().max().item() <= ATOL * max(1.0, b.abs().max().item())


def _upstream_sam(package: str, seed: int) -> nn.Module:
    """A tiny upstream ``Sam``: SAMBackbone(size="tiny")'s encoder, the official decoder at width 32."""
    if package == "segment_anything":
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

        decoder_cls, extra = MaskDecoder, {}
    else:
        from segment_anything_hq.modeling import ImageEncoderViT, MaskDecoderHQ, PromptEncoder, Sam, TwoWayTransformer

        decoder_cls, extra = MaskDecoderHQ, {"vit_dim": 32}
    encoder = ImageEncoderViT(
        img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4, out_chans=32, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, global_attn_indexes=(1,), window_size=2,
    )
    # segment_anything.build_sam._build_sam, at width 32 and 64 px
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=16)
    decoder = decoder_cls(
        transformer_dim=32,
        transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=2048, num_heads=8),
        num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256, **extra,
    )
    return _randomize(Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder), seed)


def _upstream_sam2(seed: int) -> nn.Module:
    """A tiny upstream SAM2Base from the official SAM 2.1 config (image-prediction postprocessing on)."""
    from sam2.build_sam import build_sam2

    tiny_trunk = [  # the tiny architecture of SAM2Backbone(size="tiny")
        "++model.image_size=128",
        "++model.image_encoder.trunk.embed_dim=16",
        "++model.image_encoder.trunk.num_heads=1",
        "++model.image_encoder.trunk.stages=[1,1,2,1]",
        "++model.image_encoder.trunk.global_att_blocks=[3]",
        "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
        "++model.image_encoder.trunk.window_spec=[4,2,2,1]",
        "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
        "++model.image_encoder.neck.d_model=32",
        "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    ]
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu", mode="eval",
                       hydra_overrides_extra=tiny_trunk)
    return _randomize(model, seed)


@pytest.fixture(scope="module")
def sam_files(tmp_path_factory):
    """Official-layout checkpoints of tiny upstream models: {package: (model, path)}."""
    root = tmp_path_factory.mktemp("weights")
    files = {}
    for seed, package in enumerate(("segment_anything", "segment_anything_hq")):
        model = _upstream_sam(package, seed=seed + 1)
        path = root / f"{package}_tiny.pth"
        torch.save(model.state_dict(), path)  # the official .pth is Sam.state_dict()
        files[package] = (model, path)
    model = _upstream_sam2(seed=3)
    path = root / "sam2.1_tiny.pt"
    torch.save({"model": model.state_dict()}, path)  # the official .pt: {"model": SAM2Base.state_dict()}
    files["sam2"] = (model, path)
    return files


def _ours(package: str, path) -> tuple:
    if package == "sam2":
        backbone = SAM2Backbone(variant="hiera_t", size="tiny", out_features=["p2", "p3", "p4"])
    elif package == "segment_anything":
        backbone = SAMBackbone(variant="vit_b", size="tiny")
    else:
        backbone = HQSAMBackbone(variant="vit_b", size="tiny", out_features=["neck", "block1"])
    load_encoder_weights(backbone.eval(), path)
    return backbone, build_prompt_decoder(backbone, weights=path)


@pytest.fixture(scope="module")
def sam_model(sam_files):
    return _ours("segment_anything", sam_files["segment_anything"][1])


def _features(backbone, image: np.ndarray) -> tuple[dict, object]:
    x, fits = backbone.prepare_with_fits([image])
    with torch.no_grad():
        feats = backbone(x)
    return {k: v[0] for k, v in feats.items()}, fits[0]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("package", ["segment_anything", "segment_anything_hq"])
def test_sam_and_hq_sam_decode_match_upstream_sam(sam_files, package):
    upstream, path = sam_files[package]
    backbone, decoder = _ours(package, path)
    image = _image(48, 64)  # longest side = 64 = input size: no resize, only padding
    feats, fit = _features(backbone, image)
    g = torch.Generator().manual_seed(0)
    points = torch.rand(11, 2, 2, generator=g) * torch.tensor([64.0, 48.0])  # two points per prompt, input frame
    labels = torch.tensor([[1, 0]]).repeat(11, 1)
    boxes = torch.tensor([[2.0, 3.0, 40.0, 30.0], [10.0, 5.0, 63.0, 47.0], [0.0, 0.0, 8.0, 9.0]])
    record = {"image": torch.from_numpy(image).permute(2, 0, 1).float(), "original_size": (48, 64)}
    extra = {"hq_token_only": False} if package == "segment_anything_hq" else {}
    with torch.no_grad():
        ref_points = upstream([{**record, "point_coords": points, "point_labels": labels}], multimask_output=True, **extra)[0]
        ref_boxes = upstream([{**record, "boxes": boxes}], multimask_output=False, **extra)[0]
        got_logits, got_iou = decoder.decode(feats, points=points, point_labels=labels, multimask_output=True, points_per_batch=4)
        box_logits, box_iou = decoder.decode(feats, boxes=boxes, multimask_output=False, points_per_batch=2)
    m = 3 if package == "segment_anything" else 1  # HQ-SAM's multimask output is its best mask + HQ mask
    assert got_logits.shape == (11, m, 16, 16) and decoder.num_masks(True) == m
    _close(got_logits, ref_points["low_res_logits"])
    _close(got_iou, ref_points["iou_predictions"])
    _close(box_logits, ref_boxes["low_res_logits"])
    _close(box_iou, ref_boxes["iou_predictions"])


def test_sam2_decode_matches_sam2_image_predictor(sam_files):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    upstream, path = sam_files["sam2"]
    backbone, decoder = _ours("sam2", path)
    image = _image(128, 128, seed=1)  # the input size: no resize on either side
    feats, fit = _features(backbone, image)
    predictor = SAM2ImagePredictor(upstream)
    predictor._bb_feat_sizes = [(32, 32), (16, 16), (8, 8)]  # its table is for 1024 px inputs
    predictor.set_image(image)
    g = torch.Generator().manual_seed(1)
    points = torch.rand(9, 1, 2, generator=g) * 128
    labels = torch.ones(9, 1, dtype=torch.int64)
    boxes = torch.tensor([[5.0, 8.0, 90.0, 70.0], [40.0, 30.0, 127.0, 120.0]])
    with torch.no_grad():
        _, ref_iou, ref_logits = predictor._predict(points, labels, multimask_output=True, return_logits=True)
        _, ref_box_iou, ref_box_logits = predictor._predict(None, None, boxes=boxes, multimask_output=False, return_logits=True)
        got_logits, got_iou = decoder.decode(feats, points=points, point_labels=labels, multimask_output=True, points_per_batch=4)
        box_logits, box_iou = decoder.decode(feats, boxes=boxes, multimask_output=False, points_per_batch=1)
    assert got_logits.shape == (9, 3, 32, 32)
    _close(got_logits, ref_logits)
    _close(got_iou, ref_iou)
    _close(box_logits, ref_box_logits)
    _close(box_iou, ref_box_iou)


# ----------------------------------------------------------------------------- decode and grid


def test_chunking_does_not_change_results(sam_files):
    backbone, decoder = _ours("sam2", sam_files["sam2"][1])
    feats, fit = _features(backbone, _image(96, 128, seed=2))
    grid = fit.points_to_input(point_grid(5, fit.original_size))[:, None]
    decoded, proposed = [], []
    for points_per_batch in (7, 64):
        with torch.no_grad():
            decoded.append(decoder.decode(feats, points=grid, point_labels=torch.ones(25, 1), multimask_output=True,
                                          points_per_batch=points_per_batch))
            proposed.append(PointGridProposals(decoder=decoder, points_per_side=5, points_per_batch=points_per_batch,
                                               pred_iou_thresh=None)(feats, fit))
    for small, large in zip(*decoded):
        torch.testing.assert_close(small, large, rtol=0, atol=1e-5)
    # the same proposals (their order is by predicted IoU, which float rounding may swap when tied)
    small, large = (p[torch.argsort(p.points[:, 1] * 1000 + p.points[:, 0])] for p in proposed)
    assert len(small) == len(large) > 0
    assert torch.equal(small.points, large.points)
    torch.testing.assert_close(small.mask_logits, large.mask_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(small.iou_pred, large.iou_pred, rtol=0, atol=1e-6)


def test_grid_covers_the_original_image(sam_model):
    from segment_anything.utils.amg import build_point_grid

    for h, w in ((90, 40), (30, 100)):
        grid = point_grid(6, (h, w))
        expected = torch.from_numpy(build_point_grid(6) * np.array([w, h])).float()
        torch.testing.assert_close(grid, expected)
    backbone, decoder = sam_model
    feats, fit = _features(backbone, _image(90, 40, seed=3))  # tall: SAM pads on the right
    seen = {}
    original_embed = decoder.embed_prompts

    def spy(**prompts):
        seen.update(prompts)
        return original_embed(**prompts)

    decoder.embed_prompts = spy
    try:
        with torch.no_grad():
            PointGridProposals(decoder=decoder, points_per_side=4, pred_iou_thresh=None)(feats, fit)
    finally:
        del decoder.embed_prompts
    sent = seen["points"][:, 0]  # input-frame prompts
    torch.testing.assert_close(sent, fit.points_to_input(point_grid(4, (90, 40))))
    x0, y0, x1, y1 = fit.valid_box
    assert (x1, y1) == (round(40 * 64 / 90), 64)  # the image fills the left of the input square
    assert sent[:, 0].min() > x0 and sent[:, 0].max() < x1 and sent[:, 1].min() > y0 and sent[:, 1].max() < y1
    # the grid spans the whole image: first and last columns/rows half a cell from the borders
    torch.testing.assert_close(sent[:, 0].unique(), (torch.arange(4) + 0.5) / 4 * x1)
    torch.testing.assert_close(sent[:, 1].unique(), (torch.arange(4) + 0.5) / 4 * y1)


def _expected_stability(logits: torch.Tensor, offset: float) -> torch.Tensor:
    high = (logits > offset).sum(dim=(1, 2)).float()
    low = (logits > -offset).sum(dim=(1, 2)).float()
    return torch.where(low > 0, high / low.clamp(min=1), torch.zeros_like(low))


class _ScriptedDecoder(SAMPromptDecoder):
    """The real chunk loop and best-of-M selection, with scripted masks: mask ``m`` of a point
    prompt is a disc-like logit map around the point (amplitude, radius and predicted IoU vary with
    the point), so proposals differ in predicted IoU, stability, emptiness and overlap."""

    def __init__(self) -> None:
        super().__init__(embed_dim=32, image_size=64)

    def prepare_image(self, image_features):
        return {}

    def embed_prompts(self, *, points=None, point_labels=None, boxes=None):
        return points.float(), torch.zeros(points.shape[0], 1)  # the points themselves, as "embeddings"

    def _decode_chunk(self, image, sparse, dense, multimask_output):
        xy = sparse[:, 0]  # [B, 2] input pixels
        seed = torch.sin(xy[:, :1] * 12.9898 + xy[:, 1:] * 78.233 + torch.arange(3.0)) * 43758.5453
        noise = seed - seed.floor()  # [B, 3] in [0, 1)
        centres = (torch.arange(16.0) + 0.5) * 4  # low-res pixel centres in input pixels
        x, y = xy[:, 0, None, None], xy[:, 1, None, None]
        dist = ((centres[None, :, None] - y) ** 2 + (centres[None, None, :] - x) ** 2).sqrt()  # [B, 16, 16]
        radius = 4 + 12 * noise  # [B, 3]
        amplitude = 5 * torch.frac(noise * 7) - 1.5  # negative: an empty mask
        logits = amplitude[:, :, None, None] - dist[:, None] / radius[:, :, None, None]
        return logits, noise.flip(1)


def test_thresholds_filter_as_documented(sam_model):
    backbone, _ = sam_model
    decoder = _ScriptedDecoder()
    feats, fit = _features(backbone, _image(40, 64, seed=4))  # wide: rows below 40 px are padding
    n = 8
    grid = point_grid(n, fit.original_size)
    all_logits, all_iou = decoder.decode(feats, points=fit.points_to_input(grid)[:, None],
                                         point_labels=torch.ones(n * n, 1), multimask_output=True)
    best = all_iou.argmax(dim=1)
    logits, iou = all_logits[torch.arange(n * n), best], all_iou[torch.arange(n * n), best]
    inside = logits[:, :10, :]  # 40 px of 64 -> 10 of the 16 low-res rows
    stability = _expected_stability(inside, 1.0)
    nonempty = (inside > 0).flatten(1).any(1)
    iou_thresh = iou[nonempty].median().item()
    stability_thresh = stability[nonempty].median().item()

    def run(**options) -> MaskProposals:
        return PointGridProposals(decoder=decoder, points_per_side=n, points_per_batch=10, **options)(feats, fit)

    def as_indices(out: MaskProposals) -> list[int]:
        # match back to grid positions by coordinates
        return [int(((grid - p).abs().sum(1) < 1e-4).nonzero()[0, 0]) for p in out.points]

    def ranked(mask: torch.Tensor) -> list[int]:
        kept = mask.nonzero()[:, 0].tolist()
        return sorted(kept, key=lambda i: (-iou[i].item(), i))

    assert 0 < int(nonempty.sum()) < n * n
    out = run(pred_iou_thresh=None)
    assert as_indices(out) == ranked(nonempty)  # empty masks are always dropped

    out = run(pred_iou_thresh=iou_thresh)
    expected = ranked((iou > iou_thresh) & nonempty)
    assert 0 < len(expected) < int(nonempty.sum())
    assert as_indices(out) == expected
    torch.testing.assert_close(out.iou_pred, iou[expected])
    torch.testing.assert_close(out.mask_logits, logits[expected])
    torch.testing.assert_close(out.stability, stability[expected])

    out = run(pred_iou_thresh=None, stability_score_thresh=stability_thresh)
    expected = ranked((stability >= stability_thresh) & nonempty)
    assert 0 < len(expected) < int(nonempty.sum())
    assert as_indices(out) == expected

    out = run(pred_iou_thresh=iou_thresh, stability_score_thresh=stability_thresh, max_proposals=3)
    assert as_indices(out) == ranked((iou > iou_thresh) & (stability >= stability_thresh) & nonempty)[:3]

    # NMS on the boxes of the low-res masks (inside the image), boxes computed here pixel by pixel
    from torchvision.ops import box_iou

    candidates = ranked(nonempty)
    boxes = []
    for i in candidates:
        ys, xs = (inside[i] > 0).nonzero(as_tuple=True)
        boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    boxes = torch.tensor(boxes, dtype=torch.float32)
    torch.testing.assert_close(mask_logits_to_boxes(inside[candidates]), boxes)
    overlaps = box_iou(boxes, boxes)
    expected = []
    for k in range(len(candidates)):  # greedy NMS in decreasing predicted IoU
        if all(overlaps[k, j] <= 0.5 for j in expected):
            expected.append(k)
    out = run(pred_iou_thresh=None, box_nms_thresh=0.5)
    assert 1 < len(expected) < len(candidates)
    assert as_indices(out) == [candidates[k] for k in expected]


def test_stability_score_and_boxes_on_known_masks():
    logits = torch.full((3, 4, 5), -5.0)
    logits[0, 1:3, 1:4] = 5.0  # 6 pixels, stable
    logits[0, 0, 0] = 0.5  # above -1 only
    logits[1, 2, 2] = 0.5  # 1 pixel above 0, none above 1
    scores = stability_score(logits, offset=1.0)
    torch.testing.assert_close(scores, torch.tensor([6 / 7, 0.0, 0.0]))
    torch.testing.assert_close(mask_logits_to_boxes(logits), torch.tensor([[0.0, 0, 4, 3], [2, 2, 3, 3], [0, 0, 0, 0]]))


def test_box_prompts_one_proposal_per_box(sam_model):
    backbone, decoder = sam_model
    feats, fit = _features(backbone, _image(60, 120, seed=5))  # 2x downscale into 64 px
    boxes = torch.tensor([[0.0, 0.0, 50.0, 40.0], [30.0, 10.0, 119.0, 59.0], [60.0, 20.0, 61.0, 21.0]])
    with torch.no_grad():
        out = PointGridProposals(decoder=decoder, pred_iou_thresh=10.0)(feats, fit, boxes=boxes)  # no filtering
        logits, iou = decoder.decode(feats, boxes=boxes * 64 / 120, multimask_output=False)
    assert len(out) == 3
    torch.testing.assert_close(out.prompt_boxes, boxes)
    torch.testing.assert_close(out.points, torch.tensor([[25.0, 20.0], [74.5, 34.5], [60.5, 20.5]]))
    torch.testing.assert_close(out.mask_logits, logits[:, 0])
    torch.testing.assert_close(out.iou_pred, iou[:, 0])
    assert out.original_masks().shape == (3, 60, 120)
    assert len(out[torch.tensor([True, False, True])]) == 2


def test_no_surviving_proposals_gives_empty_tensors(sam_model):
    backbone, decoder = sam_model
    feats, fit = _features(backbone, _image(50, 30, seed=6))
    with torch.no_grad():
        out = PointGridProposals(decoder=decoder, points_per_side=3, pred_iou_thresh=1e9)(feats, fit)
        no_boxes = PointGridProposals(decoder=decoder)(feats, fit, boxes=torch.zeros(0, 4))
    for result in (out, no_boxes):
        assert len(result) == 0
        assert result.mask_logits.shape == (0, 16, 16)
        assert result.iou_pred.shape == result.stability.shape == (0,)
        assert result.points.shape == (0, 2)
        assert result.original_masks().shape == (0, 50, 30)


def test_half_precision_keeps_the_prompt_encoder_float32(sam_model):
    backbone, _ = sam_model
    decoder = build_prompt_decoder(backbone).to(torch.bfloat16)
    assert decoder.dtype == torch.bfloat16
    assert decoder.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    feats, fit = _features(backbone, _image(64, 64, seed=7))
    with torch.no_grad():
        out = PointGridProposals(decoder=decoder, points_per_side=2, pred_iou_thresh=None)(feats, fit)
    assert out.mask_logits.dtype == torch.bfloat16 and torch.isfinite(out.mask_logits.float()).all()


# ----------------------------------------------------------------------------- weights and building


def test_strict_weight_loading_fails_clearly(sam_files, tmp_path):
    sam_path = sam_files["segment_anything"][1]
    state = torch.load(sam_path, weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    broken = tmp_path / "missing.pth"
    torch.save(state, broken)
    with pytest.raises(KeyMismatchError, match=r"mask_decoder\.iou_token\.weight"):
        load_prompt_decoder_weights(SAMPromptDecoder(embed_dim=32, image_size=64), broken)
    with pytest.raises(KeyMismatchError, match="hf_token"):  # HQ-SAM file into the SAM decoder
        load_prompt_decoder_weights(SAMPromptDecoder(embed_dim=32, image_size=64), sam_files["segment_anything_hq"][1])
    with pytest.raises(KeyMismatchError, match="'sam' weights"):  # SAM file into the SAM 2 decoder
        load_prompt_decoder_weights(SAM2PromptDecoder(embed_dim=32, image_size=128), sam_path)
    with pytest.raises(WeightsError, match="sam_vit_b"):  # a tag of another family, refused before any file lookup
        load_prompt_decoder_weights(SAM2PromptDecoder(variant="hiera_t", embed_dim=32, image_size=128), "sam_vit_b")


@pytest.mark.parametrize("package", ["segment_anything", "segment_anything_hq", "sam2"])
def test_encoder_and_decoder_of_one_checkpoint_read_it_once(sam_files, package, monkeypatch, tmp_path):
    """build: load_encoder_weights + build_prompt_decoder(backbone, weights=same file) read the file
    once; the decoder gets the same tensors as from a read of its own; a changed file is read again."""
    import samantics_d2.modeling.weights as weights_module

    reads = []
    original = weights_module.read_state_dict
    monkeypatch.setattr(weights_module, "read_state_dict", lambda path, **kw: reads.append(path) or original(path, **kw))
    path = sam_files[package][1]
    backbone, decoder = _ours(package, path)
    assert len(reads) == 1
    alone = type(decoder)(**type(decoder).options_for_backbone(backbone))
    load_prompt_decoder_weights(alone, path)  # no backbone: reads the file
    assert len(reads) == 2
    for key, value in alone.state_dict().items():
        assert torch.equal(value, decoder.state_dict()[key]), key
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    load_encoder_weights(backbone, copy)
    os.utime(copy, ns=(0, 0))  # the file changed since the backbone's read (another modification time)
    build_prompt_decoder(backbone, weights=copy)
    assert len(reads) == 4  # the part kept with the backbone is not used for a changed file


def test_build_prompt_decoder_checks_the_backbone_outputs():
    with pytest.raises(ValueError, match="block1"):
        build_prompt_decoder(HQSAMBackbone(variant="vit_b", size="tiny"))  # default outputs lack the block
    with pytest.raises(ValueError, match="p2"):
        build_prompt_decoder(SAM2Backbone(variant="hiera_t", size="tiny"))
    decoder = SAMPromptDecoder(embed_dim=32, image_size=128)  # built for another input size
    with pytest.raises(ValueError, match="128 px"):
        decoder.decode({"neck": torch.zeros(32, 4, 4)}, points=torch.zeros(1, 1, 2), point_labels=torch.ones(1, 1),
                       multimask_output=True)
    with pytest.raises(KeyError, match="neck"):
        decoder.decode({"p4": torch.zeros(32, 8, 8)}, boxes=torch.zeros(1, 4), multimask_output=False)


class _IslandDecoder(_ScriptedDecoder):
    """The scripted discs plus a one-pixel island in the top-right low-res pixel of every mask."""

    def _decode_chunk(self, image, sparse, dense, multimask_output):
        logits, iou = super()._decode_chunk(image, sparse, dense, multimask_output)
        logits = logits.clone()
        logits[..., 0, 15] = 5.0
        return logits, iou


def test_min_region_area_drops_islands_in_original_pixels(sam_model):
    backbone, _ = sam_model
    feats, fit = _features(backbone, _image(40, 64, seed=4))  # scale 1: a low-res pixel is 4x4 = 16 image pixels

    def run(area: float) -> MaskProposals:
        return PointGridProposals(decoder=_IslandDecoder(), points_per_side=8, points_per_batch=16,
                                  pred_iou_thresh=None, min_region_area=area)(feats, fit)

    plain, kept, cleaned = run(0.0), run(10.0), run(20.0)  # the island is 16 image pixels
    assert len(plain) == len(kept) == len(cleaned) > 0
    torch.testing.assert_close(kept.mask_logits, plain.mask_logits)  # 10 < 16: nothing changes
    masks = plain.mask_logits > 0
    neighbours = masks[:, :2, 14:].flatten(1).sum(1) - 1  # foreground around the island pixel
    # masks whose island is isolated and whose disc (the rest, inside the 10 image rows) is >= 2 pixels
    isolated = masks[:, 0, 15] & (neighbours == 0) & (masks[:, :10].flatten(1).sum(1) > 2)
    assert isolated.any()
    assert (cleaned.mask_logits[isolated, 0, 15] == -10.0).all()  # removed
    other = torch.ones_like(masks[0])
    other[0, 15] = False
    before, after = plain.mask_logits[isolated][:, other], cleaned.mask_logits[isolated][:, other]
    changed = before != after
    # elsewhere only small holes change: background pixels enclosed by the mask (or by the mask and
    # the image border, as upstream counts them) become foreground
    assert ((before[changed] <= 0) & (after[changed] == 10.0)).all()
    assert changed.float().mean() < 0.01
    with pytest.raises(ValueError, match="min_region_area"):
        PointGridProposals(decoder=_IslandDecoder(), min_region_area=-1.0)


# ----------------------------------------------------------------------------- shared-image decoding (issue 13)


@pytest.mark.parametrize("package", ["segment_anything", "sam2"])
def test_point_grid_proposals_are_the_same_with_shared_image_decoding(sam_files, package):
    """The optimised decoder (masks below pred_iou_thresh not computed) proposes what the upstream call does."""
    backbone, decoder = _ours(package, sam_files[package][1])
    feats, fit = _features(backbone, _image(96, 128, seed=3) if package == "sam2" else _image(48, 64, seed=3))
    with torch.no_grad():
        iou = PointGridProposals(decoder=decoder, points_per_side=6, pred_iou_thresh=None)(feats, fit).iou_pred
        thresh = float(iou.median())  # half the prompts dropped: their masks are skipped
        proposed = {}
        for shared in (True, False):
            decoder.shared_image_decoding = shared
            proposed[shared] = PointGridProposals(
                decoder=decoder, points_per_side=6, points_per_batch=16, pred_iou_thresh=thresh, box_nms_thresh=0.7
            )(feats, fit)
    decoder.shared_image_decoding = True
    fast, upstream = proposed[True], proposed[False]
    assert 0 < len(upstream) < 36
    torch.testing.assert_close(fast.points, upstream.points)
    torch.testing.assert_close(fast.iou_pred, upstream.iou_pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.mask_logits, upstream.mask_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(fast.stability, upstream.stability)
