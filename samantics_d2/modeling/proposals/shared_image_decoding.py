"""SAM's and SAM 2's mask decoder for many prompts on ONE image, without per-prompt image copies.

The upstream mask decoders (``segment_anything`` ``MaskDecoder.predict_masks`` and ``sam2``
``MaskDecoder.predict_masks``) copy the image embedding once per prompt (``repeat_interleave``)
and run the two-way transformer's image side per prompt. :func:`decode_shared_image` computes the
same function with the same module weights, reordered so that what is the same for every prompt is
computed once and the per-prompt work is as small as the math allows. Every step is an exact
algebraic identity; only the float summation order changes (outputs agree to float rounding,
``tests/test_decoder_speedups.py`` compares them to the upstream decoders):

1. The dense prompt embedding is the same for every prompt (no mask input: ``no_mask_embed``), so
   the image tokens entering the transformer are shared: in the first block the keys/values of the
   token-to-image attention and the queries of the image-to-token attention are projected once
   per image instead of once per prompt.
2. Token-to-image attention of later blocks (``T`` tokens against ``N = h * w`` per-prompt image
   tokens): the key projection is folded into the queries (``q . (W_k x + b_k) = (W_k^T q) . x +
   q . b_k``) and the value projection applied after the weighted sum (softmax rows sum to one:
   ``sum_n a_n (W_v x_n + b_v) = W_v (sum_n a_n x_n) + b_v``): two ``[T * heads, C] x [C, N]``
   products per prompt instead of projecting all ``N`` tokens twice.
3. Image-to-token attention: the query projection is folded into the ``T`` keys the same way, and
   the output projection into the ``T`` values (``W_o (sum_t a_t v_t) = sum_t a_t (W_o v_t)``): two
   ``[N, C] x [C, T * heads]``-sized products instead of three ``[N, C] x [C, C/2]`` ones.
   The image positional encoding enters by linearity (``W (x + pe) = W x + W pe``, ``W pe``
   projected once per image), never added to per-prompt image tokens.
4. The predicted IoU comes from the IoU token alone, so the mask to keep (best of 3) and whether
   it is wanted at all (``mask_iou_floor``) are known before the upscaling: only the kept
   prompts are upscaled, and the hypernetwork product runs only for the kept mask tokens.
5. The two 2x2 stride-2 transposed convolutions of the upscaling are per-pixel linear maps: they
   run as matrix products on the channels-last image tokens, with the sub-pixel positions kept as
   extra axes (the high-resolution features of SAM 2 are permuted once per image into that
   layout), so no per-prompt pixel shuffle is needed; only the final one-channel masks are
   permuted into image order.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["decode_shared_image", "supports_shared_image"]

#: prompts upscaled together (bounds the ``[R, 16 * N, C / 8]`` upscaled embedding of step 5)
UPSCALE_ROWS = 16


def supports_shared_image(mask_decoder: nn.Module) -> bool:
    """True for the mask decoders :func:`decode_shared_image` reproduces (segment_anything's and
    sam2's ``MaskDecoder``: 2x2 stride-2 upscaling, ``TwoWayTransformer``)."""
    upscaling = getattr(mask_decoder, "output_upscaling", None)
    transformer = getattr(mask_decoder, "transformer", None)
    return (
        isinstance(upscaling, nn.Sequential)
        and len(upscaling) == 5
        and all(isinstance(upscaling[i], nn.ConvTranspose2d) for i in (0, 3))
        and all(tuple(upscaling[i].kernel_size) == (2, 2) and tuple(upscaling[i].stride) == (2, 2) for i in (0, 3))
        and hasattr(transformer, "layers")
        and hasattr(transformer, "final_attn_token_to_image")
        and not hasattr(mask_decoder, "hf_token")  # HQ-SAM: extra HQ token and features
    )


def _heads(attn: nn.Module) -> tuple[int, int]:
    return attn.num_heads, attn.internal_dim // attn.num_heads


def _tokens_to_image(attn: nn.Module, q_in: torch.Tensor, keys: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """``attn(q=q_in, k=keys + pe, v=keys)``: ``q_in [B, T, C]``, ``keys [N, C]`` (shared) or ``[B, N, C]``,
    ``pe [N, C]`` -> ``[B, T, C]``."""
    b, t, c = q_in.shape
    heads, d = _heads(attn)
    scale = 1.0 / math.sqrt(d)
    q = attn.q_proj(q_in).view(b, t, heads, d)
    if keys.ndim == 2:  # shared keys: project them once, every prompt's queries in one attention
        k = attn.k_proj(keys + pe).view(-1, heads, d).transpose(0, 1)  # [H, N, d]
        v = attn.v_proj(keys).view(-1, heads, d).transpose(0, 1)
        q = q.permute(2, 0, 1, 3).reshape(heads, b * t, d)
        out = F.scaled_dot_product_attention(q, k, v)  # [H, B*T, d]
        out = out.view(heads, b, t, d).permute(1, 2, 0, 3).reshape(b, t, heads * d)
        return attn.out_proj(out)
    # per-prompt keys: fold W_k into the queries and W_v after the weighted sum (module doc, step 2)
    w_k = attn.k_proj.weight.view(heads, d, c)
    w_v = attn.v_proj.weight.view(heads, d, c)
    q_folded = torch.einsum("bthd,hdc->bthc", q, w_k).reshape(b, t * heads, c)  # [B, T*H, C]
    q_bias = torch.einsum("bthd,hd->bth", q, attn.k_proj.bias.view(heads, d)).reshape(b, t * heads, 1)
    logits = torch.baddbmm(q_bias, q_folded, keys.transpose(1, 2))  # [B, T*H, N]
    pe_keys = F.linear(pe, attn.k_proj.weight).view(-1, heads, d).transpose(0, 1)  # [H, N, d], once per call
    pe_logits = torch.bmm(q.permute(2, 0, 1, 3).reshape(heads, b * t, d), pe_keys.transpose(1, 2))  # [H, B*T, N]
    logits += pe_logits.view(heads, b, t, -1).permute(1, 2, 0, 3).reshape(b, t * heads, -1)
    weights = torch.softmax(logits * scale, dim=-1)
    pooled = torch.bmm(weights, keys).view(b, t, heads, c)  # [B, T, H, C]
    out = torch.einsum("bthc,hdc->bthd", pooled, w_v).reshape(b, t, heads * d) + attn.v_proj.bias
    return attn.out_proj(out)


def _image_to_tokens_residual(
    attn: nn.Module, keys: torch.Tensor, pe: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor
) -> torch.Tensor:
    """``keys + attn(q=keys + pe, k=k_in, v=v_in)``: ``keys [N, C]`` (shared) or ``[B, N, C]``, ``pe [N, C]``,
    ``k_in, v_in [B, T, C]`` -> ``[B, N, C]``."""
    b, t, c = k_in.shape
    heads, d = _heads(attn)
    scale = 1.0 / math.sqrt(d)
    k = attn.k_proj(k_in).view(b, t, heads, d)
    v = attn.v_proj(v_in).view(b, t, heads, d)
    n = keys.shape[-2]
    pe_queries = F.linear(pe, attn.q_proj.weight).view(n, heads, d).transpose(0, 1)  # [H, N, d], once per call
    if keys.ndim == 2:  # shared image queries: projected once, with their bias
        pe_queries = pe_queries + F.linear(keys, attn.q_proj.weight, attn.q_proj.bias).view(n, heads, d).transpose(0, 1)
    logits = torch.bmm(pe_queries, k.permute(2, 3, 0, 1).reshape(heads, d, b * t))  # [H, N, B*T]
    logits = logits.view(heads, n, b, t).permute(2, 1, 3, 0)  # [B, N, T, H]
    if keys.ndim == 3:  # fold W_q into the T keys (module doc, step 3)
        w_q = attn.q_proj.weight.view(heads, d, c)
        k_folded = torch.einsum("bthd,hdc->bcth", k, w_q).reshape(b, c, t * heads)  # [B, C, T*H]
        k_bias = torch.einsum("bthd,hd->bth", k, attn.q_proj.bias.view(heads, d)).reshape(b, 1, t * heads)
        logits = torch.baddbmm(k_bias, keys, k_folded).view(b, n, t, heads).add_(logits)
    # softmax over the T tokens of each head (dim -2: faster than a softmax over a short last dim)
    weights = torch.softmax(logits * scale, dim=-2).reshape(b, n, t * heads)
    w_o = attn.out_proj.weight.view(c, heads, d)
    # W_o applied to each value; every head's weights sum to one, so bias / heads on every value adds the bias
    v_out = torch.einsum("bthd,chd->bthc", v, w_o).reshape(b, t * heads, c) + attn.out_proj.bias / heads
    return torch.baddbmm(keys, weights, v_out)


def _two_way_transformer(
    transformer: nn.Module, image: torch.Tensor, pe: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward`` with a shared image: ``image, pe [N, C]``, ``tokens [B, T, C]``
    -> ``(queries [B, T, C], keys [B, N, C])`` (keys ``[N, C]`` if no block updates them)."""
    queries, keys, query_pe = tokens, image, tokens
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        queries = layer.norm2(queries + _tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys, pe))
        queries = layer.norm3(queries + layer.mlp(queries))
        keys = layer.norm4(_image_to_tokens_residual(layer.cross_attn_image_to_token, keys, pe, queries + query_pe, queries))
    final = _tokens_to_image(transformer.final_attn_token_to_image, queries + query_pe, keys, pe)
    return transformer.norm_final_attn(queries + final), keys


def _layer_norm_channels_last(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LayerNorm2d`` (segment_anything / sam2) on a channels-last tensor."""
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _transposed_conv_matrix(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 stride-2 ``ConvTranspose2d`` as ``x [.., C_in] @ W [C_in, 2*2*C_out] + b``, outputs ordered
    (row offset, column offset, channel)."""
    c_in, c_out = conv.weight.shape[:2]
    return conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out), conv.bias.repeat(4)


def _upscaled_masks(
    mask_decoder: nn.Module,
    keys: torch.Tensor,
    hyper: torch.Tensor,
    size: tuple[int, int],
    high_res: Optional[Sequence[torch.Tensor]],
) -> torch.Tensor:
    """``hyper @ output_upscaling(keys)``: ``keys [R, N, C]``, ``hyper [R, M, C/8]`` -> ``[R, M, 4h, 4w]``."""
    dc1, ln1, act1, dc2, act2 = mask_decoder.output_upscaling
    h, w = size
    r = keys.shape[0]
    c1, c2 = dc1.out_channels, dc2.out_channels
    w1, b1 = _transposed_conv_matrix(dc1)
    w2, b2 = _transposed_conv_matrix(dc2)
    n = h * w
    if high_res is None:
        bias1, bias2 = b1, b2
    else:  # [1, c2, 4h, 4w], [1, c1, 2h, 2w] -> our sub-pixel layout, plus the biases (once per call)
        s0, s1 = high_res
        # [h, w, a, b, c1]: pixel (2i+a, 2j+b); [h, w, a, b, e, f, c2]: pixel (4i+2a+e, 4j+2b+f)
        bias1 = s1.reshape(c1, h, 2, w, 2).permute(1, 3, 2, 4, 0).reshape(n, 4 * c1) + b1
        bias2 = s0.reshape(c2, h, 2, 2, w, 2, 2).permute(1, 4, 2, 5, 3, 6, 0).reshape(4 * n, 4 * c2) + b2
    x = torch.matmul(keys, w1).add_(bias1).view(r, 4 * n, c1)
    x = act1(_layer_norm_channels_last(ln1, x))
    y = torch.matmul(x.view(r, 4 * n, c1), w2).add_(bias2)  # [R, 4N, 4 * c2]
    y = act2(y)
    masks = torch.bmm(y.view(r, 16 * n, c2), hyper.transpose(1, 2))  # [R, 16N, M]
    m = hyper.shape[1]
    masks = masks.view(r, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)  # [R, M, i, a, e, j, b, f]
    return masks.reshape(r, m, 4 * h, 4 * w)


def _stability(mask_logits: torch.Tensor, delta: float) -> torch.Tensor:
    """sam2 ``MaskDecoder._get_stability_scores``: ``[B, H, W]`` -> ``[B]``."""
    flat = mask_logits.flatten(-2)
    area_i = torch.sum(flat > delta, dim=-1).float()
    area_u = torch.sum(flat > -delta, dim=-1).float()
    return torch.where(area_u > 0, area_i / area_u, 1.0)


def decode_shared_image(
    mask_decoder: nn.Module,
    *,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    dense_embedding: torch.Tensor,
    sparse_embeddings: torch.Tensor,
    multimask_output: bool,
    high_res_features: Optional[Sequence[torch.Tensor]] = None,
    best_only: bool = False,
    mask_iou_floor: Optional[float] = None,
    return_mask_tokens: bool = False,
) -> tuple:
    """The upstream mask decoder's masks and predicted IoU for ``B`` prompts on one image.

    Args:
        mask_decoder: segment_anything's or sam2's ``MaskDecoder`` (:func:`supports_shared_image`).
        image_embedding: ``[1, C, h, w]``; image_pe: ``[1, C, h, w]`` (``get_dense_pe()``).
        dense_embedding: ``[1, C, h, w]``, the dense prompt embedding shared by every prompt.
        sparse_embeddings: ``[B, T, C]``.
        multimask_output: the upstream flag (mask tokens 1..3; False: token 0, with sam2's
            ``dynamic_multimask_via_stability`` fallback when the decoder has it on).
        high_res_features: sam2's ``[conv_s0(p2), conv_s1(p3)]`` (``[1, C/8, 4h, 4w]``,
            ``[1, C/4, 2h, 2w]``) when the decoder uses them.
        best_only: keep only the mask with the highest predicted IoU per prompt (``M = 1``).
        mask_iou_floor: the masks of prompts whose kept masks all have a predicted IoU
            ``<= mask_iou_floor`` are not computed (for callers that drop them anyway); one
            host-device synchronisation. None: every prompt's masks.
        return_mask_tokens: also return the two-way transformer's output of the mask token of
            every returned mask (its "mask embedding"; sam2's single-mask output: token 0, as
            sam2's ``sam_tokens_out``, also where the stability fallback returns another mask).

    Returns:
        ``masks [R, M, 4h, 4w]``, ``iou_pred [B, M]`` (``M`` as the upstream forward returns, 1
        with ``best_only``) and ``rows [R]``, the prompts whose masks were computed (None: all,
        ``R = B``); with ``return_mask_tokens``, fourth: ``mask_tokens [B, M, C]`` (every prompt's).
    """
    b = sparse_embeddings.shape[0]
    _, c, h, w = image_embedding.shape
    s = 1 if getattr(mask_decoder, "pred_obj_scores", False) else 0
    token_weights = [mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight]
    if s:
        token_weights.insert(0, mask_decoder.obj_score_token.weight)
    output_tokens = torch.cat(token_weights, dim=0).unsqueeze(0).expand(b, -1, -1)
    tokens = torch.cat((output_tokens, sparse_embeddings), dim=1)
    image = (image_embedding + dense_embedding).reshape(c, h * w).T  # [N, C]
    pe = image_pe.reshape(c, h * w).T
    hs, keys = _two_way_transformer(mask_decoder.transformer, image, pe, tokens)
    if keys.ndim == 2:
        keys = keys.expand(b, -1, -1)
    iou_pred = mask_decoder.iou_prediction_head(hs[:, s])  # [B, 1 + 3]
    num_tokens = mask_decoder.num_mask_tokens
    mask_tokens_out = hs[:, s + 1 : s + 1 + num_tokens]
    hyper = torch.stack([mask_decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i]) for i in range(num_tokens)], 1)

    dynamic = not multimask_output and getattr(mask_decoder, "dynamic_multimask_via_stability", False)
    dynamic = dynamic and not mask_decoder.training
    arange = torch.arange(num_tokens, device=hs.device)
    if multimask_output:
        chosen = arange[1:].expand(b, -1)
        if best_only:
            chosen = iou_pred[:, 1:].argmax(dim=1, keepdim=True) + 1
    elif dynamic:  # token 0 and the best multimask token: which one is kept depends on token 0's mask
        chosen = torch.cat([arange[:1].expand(b, 1), iou_pred[:, 1:].argmax(dim=1, keepdim=True) + 1], dim=1)
    else:
        chosen = arange[:1].expand(b, 1)
    chosen_iou = iou_pred.gather(1, chosen)
    chosen_hyper = hyper.gather(1, chosen[:, :, None].expand(-1, -1, hyper.shape[-1]))
    rows = None
    if mask_iou_floor is not None and not dynamic:  # only the prompts with a wanted mask
        rows = (chosen_iou > mask_iou_floor).any(dim=1).nonzero()[:, 0]
        keys, chosen_hyper = keys[rows], chosen_hyper[rows]
    parts = [
        _upscaled_masks(mask_decoder, keys[i : i + UPSCALE_ROWS], chosen_hyper[i : i + UPSCALE_ROWS], (h, w), high_res_features)
        for i in range(0, keys.shape[0], UPSCALE_ROWS)
    ]
    masks = torch.cat(parts) if parts else keys.new_zeros((0, chosen.shape[1], 4 * h, 4 * w))
    if dynamic:  # sam2 MaskDecoder._dynamic_multimask_via_stability
        stable = _stability(masks[:, 0], mask_decoder.dynamic_multimask_stability_delta)
        stable = stable >= mask_decoder.dynamic_multimask_stability_thresh
        masks = torch.where(stable[:, None, None, None], masks[:, :1], masks[:, 1:])
        chosen_iou = torch.where(stable[:, None], chosen_iou[:, :1], chosen_iou[:, 1:])
    if not return_mask_tokens:
        return masks, chosen_iou, rows
    token_index = chosen[:, :1] if dynamic else chosen
    tokens = mask_tokens_out.gather(1, token_index[:, :, None].expand(-1, -1, mask_tokens_out.shape[-1]))
    return masks, chosen_iou, rows, tokens
