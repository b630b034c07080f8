"""SAM mask embeddings from the batched decoder call (issue 16, item 1) against the upstream decoders.

Every parameter of the segment_anything / segment_anything_hq / sam2 mask decoder is random; the
reference mask tokens come from the UPSTREAM ``mask_decoder(...)`` call on all prompts (a forward
hook on its two-way transformer for SAM and HQ-SAM, sam2's own ``sam_tokens_out`` for SAM 2), and
``decode_embeddings(..., return_mask_tokens=True)`` must give them, on the shared-image path and on the
upstream-call path, while its masks and IoU stay exactly those of the call without the option.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from samantics_d2.modeling.preprocess import ImageFit
from samantics_d2.modeling.proposals import HQSAMPromptDecoder, PointGridProposals, SAM2PromptDecoder, SAMPromptDecoder
from samantics_d2.modeling.proposals.point_grid import MASK_EMBEDDINGS

EMBED, SIDE = 32, 128
H = SIDE // 16


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.eval()


def _decoder(family: str, seed: int = 0, **options):
    cls = {"sam": SAMPromptDecoder, "sam2": SAM2PromptDecoder, "hq_sam": HQSAMPromptDecoder}[family]
    if family == "hq_sam":
        options = {"vit_dim": 32, "interm_feature": "block1", **options}
    torch.manual_seed(seed)  # buffers drawn at construction (the prompt encoder's Fourier matrix) too
    return _randomize(cls(embed_dim=EMBED, image_size=SIDE, **options), seed)


def _features(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    feats = {name: torch.randn(EMBED, H * s, H * s, generator=g) for name, s in (("neck", 1), ("p4", 1), ("p3", 2), ("p2", 4))}
    feats["block1"] = torch.randn(32, H, H, generator=g)
    return feats


def _prompts(count: int = 11, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(count, 2, 2, generator=g) * SIDE
    labels = torch.tensor([[1, 0]]).repeat(count, 1)
    labels[::3, 1] = -1
    return points, labels


def _decode_with_tokens(decoder, feats, *, points=None, point_labels=None, boxes=None, **options):
    """``decode`` with the mask tokens: its three steps, with ``return_mask_tokens=True``."""
    sparse, dense = decoder.embed_prompts(points=points, point_labels=point_labels, boxes=boxes)
    return decoder.decode_embeddings(decoder.prepare_image(feats), sparse, dense, return_mask_tokens=True, **options)


def _upstream_tokens(decoder, feats, points, labels, multimask_output: bool):
    """The upstream decoder's masks, IoU and the mask tokens of its returned masks, for all prompts in one call."""
    image = decoder.prepare_image(feats)
    sparse, dense = decoder.embed_prompts(points=points, point_labels=labels)
    md = decoder.mask_decoder
    inputs = dict(image_embeddings=image["embedding"], image_pe=image["pe"], sparse_prompt_embeddings=sparse,
                  dense_prompt_embeddings=dense, multimask_output=multimask_output)
    if isinstance(decoder, SAM2PromptDecoder):
        logits, iou, sam_tokens_out, _ = md(**inputs, repeat_image=True, high_res_features=[image["s0"], image["s1"]])
        return decoder._postprocess_logits(logits), iou, sam_tokens_out  # sam2 returns the tokens itself
    captured = {}
    hooks = [md.transformer.register_forward_hook(lambda m, i, o: captured.__setitem__("hs", o[0])),
             md.iou_prediction_head.register_forward_hook(lambda m, i, o: captured.__setitem__("iou", o))]
    try:
        if isinstance(decoder, HQSAMPromptDecoder):
            logits, iou = md(**inputs, hq_token_only=decoder.hq_token_only, interm_embeddings=[image["interm"]])
        else:
            logits, iou = md(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    hs = captured["hs"]
    if isinstance(decoder, HQSAMPromptDecoder):
        if decoder.hq_token_only:
            return logits, iou, hs[:, 5:6]  # tokens: iou, 4 SAM mask tokens, HQ token
        if multimask_output:  # MaskDecoderHQ.forward: its SAM mask is the best of tokens 1..3
            best = captured["iou"][:, 1:4].argmax(dim=1) + 2
            return logits, iou, hs[torch.arange(hs.shape[0]), best][:, None]
        return logits, iou, hs[:, 1:2]
    return logits, iou, hs[:, 2:5] if multimask_output else hs[:, 1:2]


@pytest.mark.parametrize("family", ["sam", "sam2"])
@pytest.mark.parametrize("multimask_output", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_mask_tokens_are_the_upstream_decoders(family, multimask_output, shared):
    decoder = _decoder(family, shared_image_decoding=shared)
    feats, (points, labels) = _features(), _prompts()
    with torch.no_grad():
        want_logits, want_iou, want_tokens = _upstream_tokens(decoder, feats, points, labels, multimask_output)
        plain = decoder.decode(feats, points=points, point_labels=labels, multimask_output=multimask_output, points_per_batch=4)
        logits, iou, tokens = _decode_with_tokens(decoder, feats, points=points, point_labels=labels,
                                                  multimask_output=multimask_output, points_per_batch=4)
    m = 3 if multimask_output else 1
    assert tokens.shape == (11, m, EMBED) and want_tokens.shape == (11, m, EMBED)
    assert want_tokens.abs().max() > 0.1  # a real comparison
    torch.testing.assert_close(tokens, want_tokens, rtol=0, atol=1e-4)
    assert torch.equal(logits, plain[0]) and torch.equal(iou, plain[1])  # the option changes nothing else
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(iou, want_iou, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("multimask_output", [True, False])
@pytest.mark.parametrize("hq_token_only", [False, True])
def test_hq_sam_mask_tokens_are_the_upstream_decoders(multimask_output, hq_token_only):
    decoder = _decoder("hq_sam", seed=3, hq_token_only=hq_token_only)
    feats, (points, labels) = _features(seed=4), _prompts(seed=5)
    with torch.no_grad():
        _, _, want_tokens = _upstream_tokens(decoder, feats, points, labels, multimask_output)
        plain = decoder.decode(feats, points=points, point_labels=labels, multimask_output=multimask_output, points_per_batch=3)
        logits, iou, tokens = _decode_with_tokens(decoder, feats, points=points, point_labels=labels,
                                                  multimask_output=multimask_output, points_per_batch=3)
    assert tokens.shape == (11, 1, EMBED)
    torch.testing.assert_close(tokens, want_tokens, rtol=0, atol=1e-5)
    assert torch.equal(logits, plain[0]) and torch.equal(iou, plain[1])


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_best_only_tokens_follow_the_kept_mask(family):
    decoder = _decoder(family, seed=6)
    feats, (points, labels) = _features(seed=7), _prompts(count=24, seed=8)
    with torch.no_grad():
        _, all_iou, all_tokens = _decode_with_tokens(decoder, feats, points=points, point_labels=labels, multimask_output=True)
        _, iou, tokens = _decode_with_tokens(decoder, feats, points=points, point_labels=labels, multimask_output=True,
                                             best_only=True, mask_iou_floor=float(all_iou.max(dim=1).values.median()))
    best = all_iou.argmax(dim=1)
    torch.testing.assert_close(tokens[:, 0], all_tokens[torch.arange(24), best], rtol=0, atol=1e-5)
    torch.testing.assert_close(iou[:, 0], all_iou[torch.arange(24), best], rtol=1e-5, atol=1e-5)


def test_mask_tokens_keep_gradients_in_training():
    decoder = _decoder("sam").train()
    feats, (points, labels) = _features(), _prompts(count=4)
    logits, _, tokens = _decode_with_tokens(decoder, feats, points=points, point_labels=labels, multimask_output=True)
    tokens.sum().backward()
    assert decoder.mask_decoder.mask_tokens.weight.grad.abs().sum() > 0
    assert logits.shape == (4, 3, 4 * H, 4 * H)


def test_no_prompts_give_empty_tokens():
    decoder = _decoder("sam")
    with torch.no_grad():
        logits, iou, tokens = _decode_with_tokens(decoder, _features(), boxes=torch.zeros(0, 4), multimask_output=False)
    assert logits.shape[0] == iou.shape[0] == 0 and tokens.shape == (0, 1, EMBED)


@pytest.mark.parametrize("family,min_region_area", [("sam", 0.0), ("sam2", 0.0), ("sam", 30.0)])
def test_proposals_carry_embeddings_of_their_own_masks(family, min_region_area):
    decoder = _decoder(family, seed=9)
    feats = _features(seed=10)
    fit = ImageFit(original_size=(SIDE, SIDE), input_size=(SIDE, SIDE), scale=(1.0, 1.0), offset=(0.0, 0.0), valid_box=(0, 0, SIDE, SIDE))
    options = dict(decoder=decoder, points_per_side=6, pred_iou_thresh=None, max_proposals=20, min_region_area=min_region_area)
    with torch.no_grad():
        plain = PointGridProposals(**options)(feats, fit)
        got = PointGridProposals(**options, mask_embeddings=MASK_EMBEDDINGS)(feats, fit)
        boxes = torch.tensor([[5.0, 10.0, 60.0, 100.0], [0.0, 0.0, 127.0, 127.0]])
        box_props = PointGridProposals(**options, mask_embeddings=["mask_token"])(feats, fit, boxes=boxes)
        _, _, box_tokens = _decode_with_tokens(decoder, feats, boxes=boxes, multimask_output=False)
    assert plain.mask_tokens is None and plain.image_pooled is None
    assert len(got) == 20 and torch.equal(got.mask_logits, plain.mask_logits) and torch.equal(got.iou_pred, plain.iou_pred)
    # the kept proposals' tokens: those of their prompts' best masks
    grid = torch.stack(torch.meshgrid((torch.arange(6) + 0.5) * SIDE / 6, (torch.arange(6) + 0.5) * SIDE / 6,
                                      indexing="ij")[::-1], -1).reshape(-1, 2)
    index = torch.cdist(got.points, grid).argmin(dim=1)
    with torch.no_grad():
        _, _, all_tokens = _decode_with_tokens(decoder, feats, points=grid[index][:, None], point_labels=torch.ones(len(index), 1),
                                            multimask_output=True, best_only=True)
    torch.testing.assert_close(got.mask_tokens, all_tokens[:, 0], rtol=0, atol=1e-5)
    # image_pooled: the image embedding averaged under each mask (share of each cell covered)
    embedding = decoder.prepare_image(feats)["embedding"][0]
    cover = (got.mask_logits > 0).float().reshape(len(got), H, 4, H, 4).mean(dim=(2, 4))
    want = torch.einsum("phw,chw->pc", cover, embedding) / cover.sum(dim=(1, 2))[:, None]
    torch.testing.assert_close(got.image_pooled, want, rtol=1e-5, atol=1e-5)
    assert got[:2].mask_tokens.shape == (2, EMBED)  # indexing keeps them
    torch.testing.assert_close(box_props.mask_tokens, box_tokens[:, 0], rtol=0, atol=1e-6)


def test_unknown_embedding_name_is_an_error():
    with pytest.raises(ValueError, match="mask_embeddings"):
        PointGridProposals(decoder=_decoder("sam"), mask_embeddings=["cls"])
