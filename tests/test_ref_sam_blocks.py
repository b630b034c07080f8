"""RefSAM building blocks: deformable attention (vs a naive per-point reference), the Deformable
DETR head, neck, token fuser, Hungarian matcher (vs brute force) and set losses."""
import itertools
import math

import pytest
import torch

from samantics_d2.d2 import ShapeSpec
from samantics_d2.modeling.ref_sam import (
    DeformableTransformer,
    HungarianMatcher,
    MSDeformAttn,
    MultiLevelNeck,
    RefDETRHead,
    SetCriterion,
    TokenFuser,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    multi_scale_deformable_attention,
)
from samantics_d2.modeling.meta_arch.ref_sam import ref_sam_lr_factor
from samantics_d2.modeling.ref_sam.deformable_detr import _FeedForward


# ----------------------------------------------------------------------------- deformable attention
def _bilinear_zero_padded(value_map, x, y):
    """Explicit bilinear interpolation of value_map [H, W, D] at normalised (x, y), pixel centres at
    (i + 0.5) / size (align_corners=False), zero outside the map."""
    height, width, channels = value_map.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px.item()), math.floor(py.item())
    fx, fy = px - x0, py - y0
    out = value_map.new_zeros(channels)
    for dx, wx in ((0, 1 - fx), (1, fx)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            xi, yi = x0 + dx, y0 + dy
            if 0 <= xi < width and 0 <= yi < height:
                out = out + wx * wy * value_map[yi, xi]
    return out


def _naive_deformable_attention(value, spatial_shapes, level_start_index, locations, weights):
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    rows = []
    for b in range(batch):
        for q in range(queries):
            per_head = []
            for m in range(heads):
                acc = value.new_zeros(channels)
                for lvl in range(levels):
                    h, w = spatial_shapes[lvl].tolist()
                    start = level_start_index[lvl].item()
                    value_map = value[b, start : start + h * w, m].reshape(h, w, channels)
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p]
                        acc = acc + weights[b, q, m, lvl, p] * _bilinear_zero_padded(value_map, x, y)
                per_head.append(acc)
            rows.append(torch.cat(per_head))
    return torch.stack(rows).view(batch, queries, heads * channels)


def test_grid_sample_deformable_attention_matches_naive_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[3, 4], [2, 2]])
    starts = torch.tensor([0, 12])
    batch, queries, heads, channels, levels, points = 2, 3, 2, 3, 2, 2
    value = torch.randn(batch, 16, heads, channels, generator=gen, dtype=torch.float64, requires_grad=True)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=torch.float64) * 1.6 - 0.3
    locations[0, 0, 0, 0, 0] = torch.tensor([1.7, -0.6], dtype=torch.float64)  # entirely outside
    locations[0, 0, 0, 1, 1] = torch.tensor([0.9, 0.1], dtype=torch.float64)  # corners partly outside
    locations.requires_grad_(True)
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=torch.float64, requires_grad=True)
    outside = ((locations < 0) | (locations > 1)).any(-1)
    assert outside.sum() >= 5, "the random draw must include points outside the maps"

    fast = multi_scale_deformable_attention(value, shapes, starts, locations, weights)
    naive = _naive_deformable_attention(value, shapes, starts, locations, weights)
    assert fast.shape == (batch, queries, heads * channels)
    torch.testing.assert_close(fast, naive, atol=1e-6, rtol=1e-6)

    upstream = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
    grads_fast = torch.autograd.grad((fast * upstream).sum(), (value, locations, weights))
    grads_naive = torch.autograd.grad((naive * upstream).sum(), (value, locations, weights))
    for name, g_fast, g_naive in zip(("value", "locations", "weights"), grads_fast, grads_naive):
        torch.testing.assert_close(g_fast, g_naive, atol=1e-6, rtol=1e-6, msg=f"gradient w.r.t. {name}")
        assert g_fast.abs().sum() > 0, name
    # The entirely-outside point reads zeros: no gradient to its location.
    assert grads_fast[1][0, 0, 0, 0, 0].abs().max() == 0


def test_msdeformattn_shapes_and_circle_initialisation():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    offsets = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x, head 1 (90 degrees) along +y, point p at distance p + 1.
    torch.testing.assert_close(offsets[0, 1, :, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(offsets[1, 0, :, 1], torch.tensor([1.0, 2.0, 3.0]))
    assert offsets[1, 0, :, 0].abs().max() < 1e-6

    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    memory = torch.randn(2, 26, 16)
    query = torch.randn(2, 7, 16)
    for ref in (torch.rand(2, 7, 2, 2), torch.rand(2, 7, 2, 4)):
        out = attn(query, ref, memory, shapes, starts)
        assert out.shape == (2, 7, 16) and torch.isfinite(out).all()
    padded = torch.zeros(2, 26, dtype=torch.bool)
    padded[:, 20:] = True
    out_masked = attn(query, torch.rand(2, 7, 2, 2), memory, shapes, starts, padded)
    assert torch.isfinite(out_masked).all()
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="n_levels=2"):
        attn(query, torch.rand(2, 7, 1, 2), memory[:, :20], shapes[:1], starts[:1])


# ----------------------------------------------------------------------------- head
def _tiny_head(**transformer_options):
    options = dict(d_model=32, num_encoder_layers=1, num_decoder_layers=3, n_levels=2, n_heads=4, enc_n_points=2,
                   dec_n_points=2, d_ffn=64)
    options.update(transformer_options)
    return RefDETRHead(transformer=DeformableTransformer(**options), num_queries=7)


def test_ref_detr_head_shapes_and_prompt_dependence():
    torch.manual_seed(0)
    head = _tiny_head().eval()
    features = [torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4)]
    prompt = torch.randn(2, 32)
    with torch.no_grad():
        out = head(features, prompt)
        other = head(features, torch.randn(2, 32))
    assert out["pred_logits"].shape == (2, 7, 1)
    assert out["pred_boxes"].shape == (2, 7, 4)
    assert len(out["aux_outputs"]) == 2
    for layer in [out, *out["aux_outputs"]]:
        assert layer["pred_logits"].shape == (2, 7, 1) and layer["pred_boxes"].shape == (2, 7, 4)
        assert torch.isfinite(layer["pred_logits"]).all()
        assert ((layer["pred_boxes"] > 0) & (layer["pred_boxes"] < 1)).all()
    assert not torch.allclose(out["pred_logits"], other["pred_logits"]), "the prompt must change the logits"

    masks = [torch.zeros(2, 8, 8, dtype=torch.bool), torch.zeros(2, 4, 4, dtype=torch.bool)]
    masks[0][1, :, 6:] = True
    masks[1][1, :, 3:] = True
    with torch.no_grad():
        padded = head(features, prompt, masks)
    assert torch.isfinite(padded["pred_boxes"]).all() and torch.isfinite(padded["pred_logits"]).all()
    with pytest.raises(ValueError, match="2 feature levels"):
        head(features[:1], prompt)
    with pytest.raises(ValueError, match="prompt"):
        head(features, torch.randn(2, 16))


def test_ref_detr_head_refinement_detaches_boxes_between_layers():
    torch.manual_seed(0)
    head = _tiny_head(dropout=0.0)
    out = head([torch.randn(1, 32, 6, 6), torch.randn(1, 32, 3, 3)], torch.randn(1, 32))
    out["pred_boxes"].sum().backward()
    bbox_embed = head.transformer.bbox_embed
    # The last layer's boxes are its own MLP's correction of the (detached) boxes of layer 2.
    assert bbox_embed[-1].layers[-1].weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in bbox_embed[0].parameters())


class _EncoderLayerBeforeSharing(torch.nn.Module):
    """DeformableEncoderLayer as it was before the decoder shared its block (keys ``self_attn.*``)."""

    def __init__(self, *, d_model, d_ffn, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.dropout = torch.nn.Dropout(dropout)
        self.norm = torch.nn.LayerNorm(d_model)
        self.ffn = _FeedForward(d_model=d_model, d_ffn=d_ffn, dropout=dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        return self.ffn(self.norm(src + self.dropout(attended)))


class _DecoderLayerBeforeSharing(torch.nn.Module):
    """DeformableDecoderLayer as it was before it held a DeformableEncoderLayer (keys ``self_attn.*``,
    ``norm1.*``, ``cross_attn.*``, ``norm2.*``, ``ffn.*``)."""

    def __init__(self, *, d_model, d_ffn, dropout, n_levels, n_heads, n_points):
        super().__init__()
        self.self_attn = torch.nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1, self.norm1 = torch.nn.Dropout(dropout), torch.nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points)
        self.dropout2, self.norm2 = torch.nn.Dropout(dropout), torch.nn.LayerNorm(d_model)
        self.ffn = _FeedForward(d_model=d_model, d_ffn=d_ffn, dropout=dropout)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask):
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        attended = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask
        )
        return self.ffn(self.norm2(tgt + self.dropout2(attended)))


def test_state_dicts_of_the_layers_before_the_shared_block_load_strictly_with_identical_outputs():
    """A head whose layers have the earlier layout (encoder ``self_attn``; decoder ``cross_attn``, ``norm2``,
    ``ffn``) saves a state dict that today's head loads strictly; each loaded layer then returns exactly
    what the earlier layer returns (eval, and train mode with the same dropout draws)."""
    torch.manual_seed(0)
    options = dict(d_model=32, d_ffn=64, dropout=0.1, n_levels=2, n_heads=4, n_points=2)
    before = _tiny_head(num_encoder_layers=2)
    transformer = before.transformer
    transformer.encoder_layers = torch.nn.ModuleList(_EncoderLayerBeforeSharing(**options) for _ in range(2))
    transformer.decoder_layers = torch.nn.ModuleList(_DecoderLayerBeforeSharing(**options) for _ in range(3))
    with torch.no_grad():
        for p in before.parameters():
            p.add_(0.1 * torch.randn_like(p))  # no zero-initialised offsets or weights left
    state = before.state_dict()
    assert "transformer.decoder_layers.0.cross_attn.sampling_offsets.weight" in state
    assert "transformer.decoder_layers.2.norm2.weight" in state
    assert "transformer.decoder_layers.1.ffn.linear1.bias" in state
    assert "transformer.encoder_layers.1.self_attn.value_proj.weight" in state

    after = _tiny_head(num_encoder_layers=2)
    legacy_prefixes = ("transformer.encoder_layers.0.self_attn.", "transformer.decoder_layers.0.cross_attn.")
    assert not any(key.startswith(legacy_prefixes) for key in after.state_dict())
    after.load_state_dict(state, strict=True)
    renamed = after.state_dict()
    assert len(renamed) == len(state)
    torch.testing.assert_close(renamed["transformer.decoder_layers.2.deformable.attn.sampling_offsets.weight"],
                               state["transformer.decoder_layers.2.cross_attn.sampling_offsets.weight"], rtol=0, atol=0)

    shapes = torch.tensor([[6, 6], [3, 3]])
    starts = torch.tensor([0, 36])
    memory, memory_pos = torch.randn(2, 45, 32), torch.randn(2, 45, 32)
    queries, query_pos = torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    mask = torch.zeros(2, 45, dtype=torch.bool)
    mask[1, 30:36] = True
    memory_points, query_boxes = torch.rand(2, 45, 2, 2), torch.rand(2, 7, 2, 4)
    for train in (False, True):
        before.train(train)
        after.train(train)
        # Encoder: (src, pos, points) before, (query, query_pos, points, value) now; decoder: unchanged.
        pairs = [(old, new, (memory, memory_pos, memory_points), (memory, memory_pos, memory_points, memory))
                 for old, new in zip(before.transformer.encoder_layers, after.transformer.encoder_layers)]
        pairs += [(old, new, (queries, query_pos, query_boxes, memory), (queries, query_pos, query_boxes, memory))
                  for old, new in zip(before.transformer.decoder_layers, after.transformer.decoder_layers)]
        for old, new, old_args, new_args in pairs:
            torch.manual_seed(1)
            expected = old(*old_args, shapes, starts, mask)
            torch.manual_seed(1)
            torch.testing.assert_close(new(*new_args, shapes, starts, mask), expected, rtol=0, atol=0)


def test_lr_factor_slows_exactly_the_sampling_offsets_and_reference_points_of_a_built_head():
    """ref_sam_lr_factor on the real parameter names (encoder and decoder layers): 0.1 for the parameters of
    every MSDeformAttn's ``sampling_offsets`` and of the transformer's ``reference_points``, 1 otherwise."""
    head = _tiny_head(num_encoder_layers=2)
    slow_modules = [m.sampling_offsets for m in head.modules() if isinstance(m, MSDeformAttn)]
    slow_modules.append(head.transformer.reference_points)
    assert len(slow_modules) == 2 + 3 + 1
    slow = {id(p) for module in slow_modules for p in module.parameters()}
    names = [name for name, _ in head.named_parameters()]
    assert "transformer.encoder_layers.1.attn.sampling_offsets.weight" in names
    assert "transformer.decoder_layers.2.deformable.attn.sampling_offsets.bias" in names
    for name, p in head.named_parameters():
        assert ref_sam_lr_factor(f"head.{name}") == (0.1 if id(p) in slow else 1.0), name


# ----------------------------------------------------------------------------- neck, token fuser
def test_multi_level_neck_shapes_and_errors():
    shapes = [ShapeSpec(channels=16, stride=16)] * 4
    neck = MultiLevelNeck(input_shapes=shapes, out_channels=32)
    blocks = [torch.randn(2, 16, 8, 10) for _ in range(4)]
    outs = neck(blocks)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 20), (2, 32, 8, 10), (2, 32, 4, 5), (2, 32, 2, 2)]
    assert all(torch.isfinite(o).all() for o in outs)
    with pytest.raises(ValueError, match="4 block outputs"):
        neck(blocks[:3])
    with pytest.raises(ValueError, match=r"block_outputs\[1\] has shape \(2, 8, 8, 10\); expected \[B, 16, H, W\]"):
        neck([blocks[0], torch.randn(2, 8, 8, 10), *blocks[2:]])
    with pytest.raises(ValueError, match="stride 24"):
        MultiLevelNeck(input_shapes=shapes, out_channels=32, strides=(8, 16, 24, 64))
    with pytest.raises(ValueError, match="num_groups"):
        MultiLevelNeck(input_shapes=shapes, out_channels=48)
    with pytest.raises(ValueError, match="one stride per input"):
        MultiLevelNeck(input_shapes=shapes[:3], out_channels=32)
    # Levels of other widths and strides (e.g. a hierarchical backbone): each is sized from its own shape.
    mixed = MultiLevelNeck(input_shapes=[ShapeSpec(channels=8, stride=8), ShapeSpec(channels=24, stride=32)],
                           out_channels=32, strides=(8, 16))
    outs = mixed([torch.randn(1, 8, 16, 16), torch.randn(1, 24, 4, 4)])
    assert [tuple(o.shape) for o in outs] == [(1, 32, 16, 16), (1, 32, 8, 8)]


def test_token_fuser_shape_and_wrong_token_count():
    fuser = TokenFuser(num_tokens=5)
    assert fuser(torch.randn(3, 5, 256)).shape == (3, 256)
    with pytest.raises(ValueError, match=r"\[B, 5, 256\].*\(3, 4, 256\)"):
        fuser(torch.randn(3, 4, 256))


# ----------------------------------------------------------------------------- boxes, matcher
def test_box_conversions_and_generalized_iou():
    xyxy = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [10.0, 10.0, 11.0, 11.0]])
    cxcywh = box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh[0], torch.tensor([1.0, 1.0, 2.0, 2.0]))
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    giou = generalized_box_iou(xyxy, xyxy)
    torch.testing.assert_close(giou.diagonal(), torch.ones(3))
    # Overlap 1, union 7, enclosing box 3 x 3 = 9: IoU - (9 - 7) / 9.
    torch.testing.assert_close(giou[0, 1], torch.tensor(1 / 7 - 2 / 9))
    assert giou[0, 2] < -0.5 and giou[1, 2] < 0


def _assignment_cost(cost, rows, cols):
    return cost[rows, cols].sum().item()


def test_hungarian_matcher_hand_made_and_zero_targets():
    matcher = HungarianMatcher()
    pred = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.2, 0.1, 0.3], [0.3, 0.7, 0.2, 0.1]])
    outputs = {"pred_logits": torch.zeros(2, 4, 1), "pred_boxes": torch.stack([pred, pred])}
    targets = [{"boxes": pred[[3, 1]] + 0.01}, {"boxes": torch.zeros(0, 4)}]
    (rows, cols), (empty_rows, empty_cols) = matcher(outputs, targets)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 3, 1: 1}
    assert empty_rows.numel() == 0 and empty_cols.numel() == 0 and empty_rows.dtype == torch.int64


def test_hungarian_matcher_is_optimal_against_brute_force():
    gen = torch.Generator().manual_seed(1)
    matcher = HungarianMatcher()
    for num_queries, num_targets in [(5, 3), (4, 4), (6, 2)]:
        logits = torch.randn(1, num_queries, 1, generator=gen)
        boxes = torch.rand(1, num_queries, 4, generator=gen) * 0.5 + 0.1
        gt = torch.rand(num_targets, 4, generator=gen) * 0.5 + 0.1
        (rows, cols), = matcher({"pred_logits": logits, "pred_boxes": boxes}, [{"boxes": gt}])
        # Cost recomputed independently: focal difference, L1 and -GIoU written out here.
        p = logits[0, :, 0].sigmoid()
        focal = 0.25 * (1 - p) ** 2 * -p.log() - 0.75 * p**2 * -(1 - p).log()
        l1 = (boxes[0][:, None] - gt[None]).abs().sum(-1)
        cost = 2 * focal[:, None] + 5 * l1 - 2 * generalized_box_iou(box_cxcywh_to_xyxy(boxes[0]), box_cxcywh_to_xyxy(gt))
        best = min(
            sum(cost[q, t].item() for t, q in enumerate(perm))
            for perm in itertools.permutations(range(num_queries), num_targets)
        )
        assert len(rows) == num_targets and sorted(cols.tolist()) == list(range(num_targets))
        assert _assignment_cost(cost, rows, cols) == pytest.approx(best, abs=1e-5)


# ----------------------------------------------------------------------------- losses
def test_set_criterion_with_zero_ground_truth_is_finite_and_differentiable():
    criterion = SetCriterion(matcher=HungarianMatcher())
    logits = torch.randn(2, 5, 1, requires_grad=True)
    boxes = torch.rand(2, 5, 4).mul(0.5).add(0.2).requires_grad_(True)
    aux = [{"pred_logits": logits * 1.0, "pred_boxes": boxes * 1.0}]
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": aux},
                       [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.zeros(0, 4)}])
    assert set(losses) == {"loss_focal", "loss_bbox", "loss_giou", "loss_focal_0", "loss_bbox_0", "loss_giou_0"}
    for name, value in losses.items():
        assert torch.isfinite(value) and value.grad_fn is not None, name
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0 and losses["loss_focal"] > 0
    sum(losses.values()).backward()
    assert logits.grad.abs().sum() > 0 and torch.isfinite(boxes.grad).all()


def test_set_criterion_values_on_a_perfect_box():
    criterion = SetCriterion(matcher=HungarianMatcher())
    logits = torch.tensor([[[2.0], [-1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.3, 0.1, 0.1]]])
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, [{"boxes": boxes[0, :1].clone()}])
    p = torch.sigmoid(torch.tensor([2.0, -1.0]))
    expected_focal = 0.25 * (1 - p[0]) ** 2 * -p[0].log() + 0.75 * p[1] ** 2 * -(1 - p[1]).log()
    torch.testing.assert_close(losses["loss_focal"], 2.0 * expected_focal)  # one box: divided by 1
    assert losses["loss_bbox"].abs() < 1e-6 and losses["loss_giou"].abs() < 1e-6


def test_set_criterion_gradients_reach_the_head():
    torch.manual_seed(0)
    head = _tiny_head(dropout=0.0)
    out = head([torch.randn(2, 32, 6, 6), torch.randn(2, 32, 3, 3)], torch.randn(2, 32, requires_grad=True))
    targets = [{"boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])}, {"boxes": torch.zeros(0, 4)}]
    losses = SetCriterion(matcher=HungarianMatcher())(out, targets)
    assert len(losses) == 3 * 3
    sum(losses.values()).backward()
    transformer = head.transformer
    # (Offset and attention-weight layers start at zero weight, so at initialisation the gradient reaches
    # those weights, not the queries and positional embeddings feeding them.)
    reached = {
        "class_embed": head.class_embed[0].weight,
        "bbox_embed": transformer.bbox_embed[0].layers[-1].weight,
        "reference_points": transformer.reference_points.weight,
        "encoder_offsets": transformer.encoder_layers[0].attn.sampling_offsets.weight,
        "encoder_values": transformer.encoder_layers[0].attn.value_proj.weight,
        "decoder_self_attention": transformer.decoder_layers[0].self_attn.in_proj_weight,
    }
    for name, param in reached.items():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_set_criterion_loss_weight_follows_detectron2s_convention():
    """``loss_weight``: a number for every loss or ``{loss name: weight}``; a loss left out keeps its default."""
    torch.manual_seed(0)
    logits, boxes = torch.randn(1, 4, 1), torch.rand(1, 4, 4).mul(0.5).add(0.2)
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [{"pred_logits": logits, "pred_boxes": boxes}]}
    targets = [{"boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3], [0.6, 0.4, 0.1, 0.2]])}]
    default = SetCriterion(matcher=HungarianMatcher())(outputs, targets)
    assert SetCriterion.DEFAULT_LOSS_WEIGHT == {"loss_focal": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    changed = SetCriterion(matcher=HungarianMatcher(), loss_weight={"loss_bbox": 0.5})(outputs, targets)
    for suffix in ("", "_0"):  # the auxiliary layer's losses take the same weights
        torch.testing.assert_close(changed["loss_bbox" + suffix], default["loss_bbox" + suffix] / 10)
        assert torch.equal(changed["loss_focal" + suffix], default["loss_focal" + suffix])
        assert torch.equal(changed["loss_giou" + suffix], default["loss_giou" + suffix])
    ones = SetCriterion(matcher=HungarianMatcher(), loss_weight=1)(outputs, targets)
    torch.testing.assert_close(ones["loss_giou"], default["loss_giou"] / 2)
    torch.testing.assert_close(ones["loss_bbox"], default["loss_bbox"] / 5)
    with pytest.raises(ValueError, match=r"SetCriterion: loss_weight names \['loss_box'\].*'loss_bbox'"):
        SetCriterion(matcher=HungarianMatcher(), loss_weight={"loss_box": 1.0})
    with pytest.raises(ValueError, match=r"loss_weight\['loss_giou'\]=-1.0 must be a number >= 0"):
        SetCriterion(matcher=HungarianMatcher(), loss_weight={"loss_giou": -1.0})
    with pytest.raises(TypeError, match="loss_weight must be a number or a mapping"):
        SetCriterion(matcher=HungarianMatcher(), loss_weight="5")
