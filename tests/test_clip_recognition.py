"""Mask recognition with CLIP (issue 14, item 2): the batched crop and dense-pool paths against naive
per-mask loops, mask pooling of a full-image mask against open_clip's ``encode_image``, the
convolutional CLIP towers loaded from official-format files (image and text tower from one file),
and the probabilities / fusion on hand-made numbers.

The official-format files are tiny, randomly initialised open_clip ``CLIP`` models (ModifiedResNet;
a timm ConvNeXt trunk with the MLP head of ``convnext_large_d_320``) saved as their state dicts.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.backbone.clip import CLIPConvNeXtBackbone, CLIPResNetBackbone
from samantics_d2.modeling.semantic.clip_recognition import (
    CropRecognizer,
    DensePoolRecognizer,
    fuse_class_probabilities,
    open_vocab_probabilities,
)
from samantics_d2.modeling.preprocess import ImageFit
from samantics_d2.modeling.semantic.mask_ops import identity_fit, resample_masks
from samantics_d2.modeling.semantic.text_prototypes import CLIPTextEncoder, load_clip_text_weights
from samantics_d2.modeling.weights import guess_family, load_encoder_weights, read_state_dict

TEXT_CFG = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)


def _randomise(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("norm.weight") or ".bn" in name and name.endswith("weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
        model.logit_scale.fill_(4.0)
    return model.eval()


def _tiny_resnet_clip():
    import open_clip

    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=[1, 1, 1, 1], width=8, head_width=64, image_size=64),
        text_cfg=open_clip.CLIPTextCfg(**TEXT_CFG),
        quick_gelu=True,
    )
    return _randomise(model, 5)


def _tiny_convnext_clip(monkeypatch):
    import open_clip
    import timm

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: create(name, depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), **kw))
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(
            timm_model_name="convnext_large", timm_pool="", timm_proj="mlp", timm_drop=0.0, image_size=64
        ),
        text_cfg=open_clip.CLIPTextCfg(**TEXT_CFG),
        quick_gelu=False,
    )
    monkeypatch.setattr(timm, "create_model", create)
    return _randomise(model, 6)


@pytest.fixture(scope="module", params=["clip_resnet", "clip_convnext"])
def conv_clip(request, tmp_path_factory):
    """(family, open_clip model, official-format file, our backbone loaded from it)."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        if request.param == "clip_resnet":
            model, backbone = _tiny_resnet_clip(), CLIPResNetBackbone(variant="rn50x16", size="tiny")
        else:
            model, backbone = _tiny_convnext_clip(monkeypatch), CLIPConvNeXtBackbone(variant="convnext_large_d_320", size="tiny")
    finally:
        monkeypatch.undo()
    state = dict(model.state_dict())
    state["attn_mask"] = model.attn_mask  # OpenAI files carry the causal mask
    path = tmp_path_factory.mktemp(request.param) / "tiny.bin"
    torch.save(state, path)
    return request.param, model, path, load_encoder_weights(backbone, path).eval()


def _normalised(images: torch.Tensor, backbone) -> torch.Tensor:
    spec = backbone.preprocess
    return (images.float() - torch.tensor(spec.pixel_mean)[:, None, None]) / torch.tensor(spec.pixel_std)[:, None, None]


def _images(seed: int, b: int, h: int, w: int) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _masks(seed: int, counts, h: int, w: int) -> list[torch.Tensor]:
    """Random blobs (boxes and discs), a one-pixel mask, a soft mask and an empty mask."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.arange(h)[:, None].float(), torch.arange(w)[None, :].float()
    out = []
    for count in counts:
        masks = []
        for j in range(count):
            cy, cx = torch.rand(2, generator=g) * torch.tensor([h, w])
            r = 2 + torch.rand(1, generator=g).item() * min(h, w) / 3
            kind = j % 5
            if kind == 0:
                m = ((ys - cy).abs() < r) & ((xs - cx).abs() < r * 1.5)
            elif kind == 1:
                m = (ys - cy) ** 2 + (xs - cx) ** 2 < r**2
            elif kind == 2:
                m = torch.zeros(h, w, dtype=torch.bool)
                m[int(cy), int(cx)] = True
            elif kind == 3:
                m = torch.sigmoid((r - ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()) / 2)  # soft
            else:
                m = torch.zeros(h, w, dtype=torch.bool) if j == 4 else (ys > cy)  # empty, then a half plane
            masks.append(m.float())
        out.append(torch.stack(masks) if masks else torch.zeros(0, h, w))
    return out


# ----------------------------------------------------------------------------- the convolutional towers


def test_conv_towers_load_official_files_and_equal_open_clip(conv_clip):
    family, model, path, backbone = conv_clip
    state = read_state_dict(path)
    assert guess_family(state) == family  # a ResNet file also has visual.conv1.weight ("clip")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(backbone(images)["image_embed"], model.encode_image(images), rtol=1e-4, atol=1e-4)
        # the text tower from the same file
        variant = backbone.variant
        text = load_clip_text_weights(CLIPTextEncoder(variant=variant, size="tiny"), path).eval()
        tokens = text.tokenize(["a photo of a cat.", "a red circle"])
        torch.testing.assert_close(text(tokens), model.encode_text(tokens), rtol=1e-5, atol=1e-5)


def test_full_image_mask_pooling_is_encode_image(conv_clip):
    _, model, _, backbone = conv_clip
    images = _images(2, 2, 64, 64)
    recognizer = DensePoolRecognizer(clip=backbone, samples_per_cell=2)
    full = [torch.ones(1, 64, 64, dtype=torch.bool)] * 2
    with torch.no_grad():
        ours = torch.cat(recognizer(images, full))
        expected = F.normalize(model.encode_image(_normalised(images, backbone)), dim=-1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    # on a larger grid than the native one (ResNet: resampled position embedding) too: the backbone's own embedding
    big = _images(3, 1, 96, 128)
    with torch.no_grad():
        ours = recognizer(big, [torch.ones(1, 96, 128)])[0]
        expected = F.normalize(backbone(_normalised(big, backbone))["image_embed"], dim=-1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def _naive_dense_embedding(model, family: str, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One mask, written out with open_clip's own modules: ``features [C, h, w]``, ``weight [h, w]``."""
    visual = model.visual
    if family == "clip_convnext":
        pooled = (features * weight).sum(dim=(1, 2)) / weight.sum()
        return visual.head(visual.trunk.head.norm(pooled[None, :, None, None]).flatten(1))[0]
    pool = visual.attnpool
    c, h, w = features.shape
    side = int(math.isqrt(pool.positional_embedding.shape[0] - 1))
    pos = pool.positional_embedding
    if (h, w) != (side, side):
        grid = F.interpolate(pos[1:].T.reshape(1, c, side, side), size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.reshape(c, h * w).T])
    tokens = features.flatten(1).T  # [hw, C]
    mean = (tokens * weight.flatten()[:, None]).sum(0) / weight.sum()
    sequence = (torch.cat([mean[None], tokens]) + pos)[:, None]  # [1 + hw, 1, C]
    bias = torch.cat([torch.zeros(1), weight.flatten().log()])[None]  # the query may see itself and the mask
    out, _ = F.multi_head_attention_forward(
        query=sequence[:1], key=sequence, value=sequence, embed_dim_to_check=c, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False,
        attn_mask=bias,
    )
    return out[0, 0]


@pytest.mark.parametrize("input_size", [None, 160])
def test_dense_pool_equals_a_per_mask_loop(conv_clip, input_size):
    family, model, _, backbone = conv_clip
    H, W = 72, 100
    images = _images(4, 2, H, W)
    sizes = [(72, 100), (60, 90)]
    masks = _masks(5, [6, 3], H, W)
    masks[1][:, 60:, :] = 0  # within the valid size
    recognizer = DensePoolRecognizer(clip=backbone, input_size=input_size, samples_per_cell=3)
    with torch.no_grad():
        ours = recognizer(images, masks, image_sizes=sizes)
        # the loop: its own preprocessing, open_clip's trunk, then one mask at a time
        expected = []
        for image, (h, w), image_masks in zip(images, sizes, masks):
            x = image.float().clone()
            x[:, h:, :] = torch.tensor(backbone.preprocess.pixel_mean)[:, None, None]  # padding: the mean colour
            x[:, :, w:] = torch.tensor(backbone.preprocess.pixel_mean)[:, None, None]
            x = _normalised(x, backbone)[None]
            scale = 1.0 if input_size is None else input_size / max(H, W)
            rh, rw = round(H * scale), round(W * scale)
            if (rh, rw) != (H, W):
                x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
            x = F.pad(x, (0, -(-rw // 32) * 32 - rw, 0, -(-rh // 32) * 32 - rh))
            visual = model.visual
            if family == "clip_convnext":
                features = visual.trunk.forward_features(x)[0]
            else:
                features = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))[0]
            fit_in = ImageFit((H, W), tuple(x.shape[-2:]), (rh / H, rw / W), (0.0, 0.0), (0, 0, rw, rh))
            rows = []
            for mask in image_masks:
                weight = resample_masks(
                    mask[None], src_fit=identity_fit(H, W), dst_fit=fit_in, grid_size=tuple(features.shape[-2:]),
                    patch_size=32, samples_per_patch=3, probabilities=True,
                )[0]
                rows.append(F.normalize(_naive_dense_embedding(model, family, features, weight), dim=0))
            expected.append(torch.stack(rows))
    assert [o.shape for o in ours] == [(6, 32), (3, 32)]
    for o, e, image_masks in zip(ours, expected, masks):
        # a mask with no weight on the grid (empty, or one pixel between the samples) has no mean: ours is only finite
        nonempty = torch.isfinite(e).all(dim=1)
        assert int(nonempty.sum()) >= len(image_masks) - 2
        torch.testing.assert_close(o[nonempty], e[nonempty], rtol=1e-4, atol=1e-4)
        assert torch.isfinite(o).all()


def test_dense_pool_two_steps_and_no_masks(conv_clip):
    _, _, _, backbone = conv_clip
    recognizer = DensePoolRecognizer(clip=backbone)
    images = _images(6, 2, 64, 64)
    masks = _masks(7, [0, 2], 64, 64)
    with torch.no_grad():
        features, fit = recognizer.encode(images)
        two_steps = recognizer.embed(features, fit, masks)
        one_step = recognizer(images, masks)
        empty = recognizer(images, [torch.zeros(0, 64, 64)] * 2)
    assert two_steps[0].shape == (0, 32) and [e.shape for e in empty] == [(0, 32), (0, 32)]
    torch.testing.assert_close(two_steps[1], one_step[1])


# ----------------------------------------------------------------------------- crops


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_encoder("clip_vit_b16_openai", size="tiny").eval()  # 64 px, random weights


@pytest.mark.parametrize("background", ["grey", "blur", "keep"])
def test_crops_equal_a_per_mask_loop(vit, background):
    H, W = 70, 90
    images = _images(8, 2, H, W)
    sizes = [(70, 90), (64, 80)]
    masks = _masks(9, [7, 4], H, W)
    recognizer = CropRecognizer(clip=vit, context=0.3, background=background, blur_sigma=3.0, supersample=2, chunk_size=3)
    with torch.no_grad():
        ours = recognizer(images, masks, image_sizes=sizes)
        as_float = recognizer(images.float(), masks, image_sizes=sizes)
    mean = torch.tensor(vit.preprocess.pixel_mean)[:, None, None]
    std = torch.tensor(vit.preprocess.pixel_std)[:, None, None]
    S, k = vit.img_size, 2
    n = S * k
    expected = []
    with torch.no_grad():
        for image, (h, w), image_masks in zip(images, sizes, masks):
            centred = image.float() - mean
            centred[:, h:, :] = 0
            centred[:, :, w:] = 0
            if background == "blur":  # a plain 2-D Gaussian, edges replicated
                r = math.ceil(3 * 3.0)
                t = torch.arange(-r, r + 1).float()
                g1 = torch.exp(-(t**2) / 18.0)
                kernel = (g1[:, None] * g1[None, :]) / g1.sum() ** 2
                padded = F.pad(centred[None], (r, r, r, r), mode="replicate")
                blurred = F.conv2d(padded, kernel.expand(3, 1, -1, -1).contiguous(), groups=3)[0]
            rows = []
            for mask in image_masks:
                on = (mask > 0.5).nonzero()
                if len(on) == 0:
                    x0 = y0 = x1 = y1 = 0.0
                else:
                    y0, x0 = on.min(0).values.tolist()
                    y1, x1 = (on.max(0).values + 1).tolist()
                side = max(max(x1 - x0, y1 - y0) * 1.3, 1.0)
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                xs = cx - side / 2 + (torch.arange(n) + 0.5) / n * side
                ys = cy - side / 2 + (torch.arange(n) + 0.5) / n * side
                grid = torch.stack(torch.meshgrid(ys / H * 2 - 1, xs / W * 2 - 1, indexing="ij")[::-1], -1)[None]
                read = lambda t: F.grid_sample(t[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
                crop = read(centred)
                if background == "grey":
                    crop = crop * read(mask[None])
                elif background == "blur":
                    crop = read(blurred) + read(mask[None]) * (crop - read(blurred))
                crop = F.avg_pool2d(crop[None], k)[0] / std
                rows.append(F.normalize(vit(crop[None])["image_embed"][0], dim=0))
            expected.append(torch.stack(rows))
    for o, f, e in zip(ours, as_float, expected):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(f, o)


def test_crop_boxes_are_squares_with_context(vit):
    recognizer = CropRecognizer(clip=vit, context=0.5)
    mask = torch.zeros(1, 40, 60, dtype=torch.bool)
    mask[0, 10:20, 5:45] = True  # 40 wide, 10 high
    assert recognizer.crop_boxes(mask).tolist() == [[-5.0, -15.0, 55.0, 45.0]]


def test_bad_arguments_are_refused(vit, conv_clip):
    with pytest.raises(ValueError, match="background='black'"):
        CropRecognizer(clip=vit, background="black")
    with pytest.raises(TypeError, match="convolutional CLIP"):
        DensePoolRecognizer(clip=vit)
    recognizer = CropRecognizer(clip=vit)
    with pytest.raises(ValueError, match=r"masks\[0\] has shape \(2, 10, 10\); expected \[N, 20, 20\]"):
        recognizer(torch.zeros(1, 3, 20, 20), [torch.zeros(2, 10, 10)])
    with pytest.raises(ValueError, match="2 images but 1 mask"):
        recognizer(torch.zeros(2, 3, 20, 20), [torch.zeros(2, 20, 20)])
    with pytest.raises(ValueError, match="image_sizes"):
        recognizer(torch.zeros(1, 3, 20, 20), [torch.zeros(2, 20, 20)], image_sizes=[(30, 20)])


# ----------------------------------------------------------------------------- probabilities and fusion


def test_open_vocab_probabilities_by_hand():
    embeddings = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised inside
    prototypes = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    probs = open_vocab_probabilities(embeddings, prototypes, logit_scale=10.0, background=0.5)
    # mask 0: cosines 1, 0.6, background 0.5 -> logits 10, 6, 5
    e = torch.tensor([math.exp(10), math.exp(6), math.exp(5)])
    torch.testing.assert_close(probs[0], e / e.sum())
    # mask 1: cosines 0, 0.8 -> logits 0, 8, 5
    e = torch.tensor([1.0, math.exp(8), math.exp(5)])
    torch.testing.assert_close(probs[1], e / e.sum())
    # no background: its column is 0
    none = open_vocab_probabilities(embeddings, prototypes, logit_scale=10.0)
    assert none[:, 2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(none[0, :2], torch.tensor([math.exp(10), math.exp(6)]) / (math.exp(10) + math.exp(6)))
    # a background embedding [0, 1] (un-normalised [0, 3]): cosines 0 and 1 -> logits 0 and 10
    emb = open_vocab_probabilities(embeddings, prototypes, logit_scale=10.0, background=torch.tensor([0.0, 3.0]))
    e = torch.tensor([1.0, math.exp(8), math.exp(10)])
    torch.testing.assert_close(emb[1], e / e.sum())


def test_a_class_scores_as_its_best_synonym():
    embeddings = torch.tensor([[0.0, 1.0]])
    rows = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])  # class 1 has rows 1 and 2
    classes = torch.tensor([0, 1, 1, 2])
    probs = open_vocab_probabilities(embeddings, rows, logit_scale=5.0, background=0.0, prototype_classes=classes)
    e = torch.tensor([1.0, math.exp(5.0), math.exp(3.0), 1.0])  # logits 0, max(4, 5), 3, background 0
    torch.testing.assert_close(probs[0], e / e.sum())
    wider = open_vocab_probabilities(embeddings, rows, logit_scale=5.0, prototype_classes=classes, num_classes=4)
    assert wider.shape == (1, 5) and wider[0, 3] == 0  # a class without rows can never win
    with pytest.raises(ValueError, match=r"expected \[4\]"):
        open_vocab_probabilities(embeddings, rows, logit_scale=5.0, prototype_classes=classes[:3])


def test_fusion_by_hand():
    text = torch.tensor([[0.6, 0.3, 0.1]])
    image = torch.tensor([[0.2, 0.2, 0.6]])
    # class 0 by words (w = 1), class 1 by examples (w = 0); background: the mean weight 0.5
    fused = fuse_class_probabilities(text, image, text_weight=torch.tensor([1.0, 0.0]))
    raw = torch.tensor([0.6, 0.2, math.sqrt(0.1 * 0.6)])
    torch.testing.assert_close(fused[0], raw / raw.sum())
    # one weight: the weighted geometric mean of the two distributions
    fused = fuse_class_probabilities(text, image, text_weight=0.25)
    raw = text[0] ** 0.25 * image[0] ** 0.75
    torch.testing.assert_close(fused[0], raw / raw.sum())
    torch.testing.assert_close(fuse_class_probabilities(text, image, text_weight=1.0), text)
    # a zero probability with weight 0 does not vote; the background's own weight
    zero = torch.tensor([[0.0, 0.5, 0.5]])
    fused = fuse_class_probabilities(zero, image, text_weight=torch.tensor([0.0, 0.5]), background_text_weight=1.0)
    raw = torch.tensor([0.2, math.sqrt(0.5 * 0.2), 0.5])
    torch.testing.assert_close(fused[0], raw / raw.sum())
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fuse_class_probabilities(text, image, text_weight=1.5)
    with pytest.raises(ValueError, match="same shape"):
        fuse_class_probabilities(text, image[:, :2], text_weight=0.5)
