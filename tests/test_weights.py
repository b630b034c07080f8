"""Weights: parity with the upstream models through each official file format, strict loading,
clear failures, and no code execution while reading.

Each parity test builds a tiny randomly initialised *upstream* model (segment_anything,
segment_anything_hq, sam2, open_clip; for DINOv2, whose hub code is not a package, a reference
written from the hub model's code), saves it exactly as the official files are saved, loads it
through our loader and compares outputs on the same input.
"""
from __future__ import annotations

import math
import os
import pickle
import zipfile
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from samantics_d2.modeling.backbone import CLIPBackbone, DINOv2Backbone, HQSAMBackbone, SAM2Backbone, SAMBackbone
from samantics_d2.modeling.weights import (
    WEIGHTS,
    ChecksumError,
    KeyMismatchError,
    UnsafeCheckpointError,
    WeightsError,
    convert_state_dict,
    guess_family,
    load_encoder_weights,
    match_state_dict,
    read_state_dict,
    resolve_weights,
)

ATOL = 2e-5  # float32 rounding level for these tiny models (outputs are O(1))


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Give every parameter random values (zero-initialised ones too: rel-pos, layer scale...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def _input(size: int, seed: int = 0, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() < ATOL * max(1.0, b.abs().max().item())


# ----------------------------------------------------------------------------- SAM / HQ-SAM


def _tiny_upstream_sam(package: str, seed: int) -> nn.Module:
    """A tiny ``Sam`` from ``package``, with our tiny encoder's architecture (depth 2, width 32)."""
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
    prompt = PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4)
    decoder = decoder_cls(
        transformer_dim=32,
        transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
        num_multimask_outputs=3, iou_head_depth=1, iou_head_hidden_dim=16, **extra,
    )
    return _randomize(Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder), seed)


@pytest.mark.parametrize("package,cls", [("segment_anything", SAMBackbone), ("segment_anything_hq", HQSAMBackbone)])
def test_sam_parity(tmp_path, package, cls):
    sam = _tiny_upstream_sam(package, seed=1)
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)  # the official .pth is Sam.state_dict()
    ours = cls(variant="vit_b", size="tiny", out_features=["neck", "pooled", "block0", "block1"]).eval()
    load_encoder_weights(ours, path)
    x = _input(64)
    captured = {}
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o)) for k, blk in enumerate(sam.image_encoder.blocks)]
    with torch.no_grad():
        reference = sam.image_encoder(x)
        got = ours(x)
    for h in hooks:
        h.remove()
    if package == "segment_anything_hq":  # HQ-SAM's encoder also returns its global-attention block outputs
        reference, interm = reference
        _close(got["block1"], interm[0].permute(0, 3, 1, 2))
    _close(got["neck"], reference)
    _close(got["pooled"], reference.mean(dim=(2, 3)))
    for k in (0, 1):
        _close(got[f"block{k}"], captured[k].permute(0, 3, 1, 2))
    assert ours.global_attn_features == ["block1"]


# ----------------------------------------------------------------------------- SAM 2


def test_sam2_parity(tmp_path):
    from sam2.build_sam import build_sam2

    tiny_trunk = [  # the tiny architecture of SAM2Backbone(size="tiny"), as hydra overrides
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
    torch.manual_seed(0)
    upstream = build_sam2(
        "configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu", mode="eval",
        hydra_overrides_extra=tiny_trunk, apply_postprocessing=False,
    )
    _randomize(upstream.image_encoder, seed=2)
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": upstream.state_dict()}, path)  # the official layout: {"model": SAM2Base.state_dict()}
    ours = SAM2Backbone(variant="hiera_t", size="tiny", out_features=["p2", "p3", "p4", "pooled"]).eval()
    load_encoder_weights(ours, path)
    x = _input(128)
    with torch.no_grad():
        reference = upstream.image_encoder(x)
        got = ours(x)
    for name, level in zip(("p2", "p3", "p4"), reference["backbone_fpn"]):
        _close(got[name], level)
    _close(got["p4"], reference["vision_features"])
    _close(got["pooled"], reference["vision_features"].mean(dim=(2, 3)))


# ----------------------------------------------------------------------------- DINOv2


class _RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


class _RefLayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))


class _RefFFN(nn.Module):
    """DINOv2's Mlp (fc1, GELU, fc2) or fused SwiGLU (w12 -> silu(x1) * x2 -> w3)."""

    def __init__(self, dim: int, swiglu: bool) -> None:
        super().__init__()
        self.swiglu = swiglu
        if swiglu:
            hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8  # SwiGLUFFNFused's hidden width (mlp_ratio 4)
            self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)
        else:
            self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            x1, x2 = self.w12(x).chunk(2, dim=-1)
            return self.w3(F.silu(x1) * x2)
        return self.fc2(F.gelu(self.fc1(x)))


class _RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, swiglu: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _RefAttention(dim, heads), _RefFFN(dim, swiglu)
        self.ls1, self.ls2 = _RefLayerScale(dim), _RefLayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1.gamma * self.attn(self.norm1(x))
        return x + self.ls2.gamma * self.mlp(self.norm2(x))


class _RefDinoV2(nn.Module):
    """DINOv2's torch-hub ``DinoVisionTransformer`` (block_chunks=0), reduced to what the hub
    checkpoints hold: the key layout and the forward of ``forward_features``."""

    def __init__(self, *, dim: int, depth: int, heads: int, grid: int, registers: bool, swiglu: bool) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 14, 14)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.num_register_tokens = 4 if registers else 0
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, 4, dim))
        self.blocks = nn.ModuleList(_RefBlock(dim, heads, swiglu) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        # hub settings: original models offset 0.1 / no antialias; register models 0.0 / antialias
        self.interpolate_offset, self.interpolate_antialias = (0.0, True) if registers else (0.1, False)

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, 0], self.pos_embed[:, 1:]
        w0, h0, m = w // 14, h // 14, int(math.sqrt(n))
        if self.interpolate_offset:
            kwargs = {"scale_factor": ((w0 + self.interpolate_offset) / m, (h0 + self.interpolate_offset) / m)}
        else:
            kwargs = {"size": (w0, h0)}
        patch_pos = F.interpolate(
            patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2), mode="bicubic", antialias=self.interpolate_antialias, **kwargs
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, x.shape[-1])
        return torch.cat((cls_pos.unsqueeze(0), patch_pos), dim=1)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _, _, w, h = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.num_register_tokens:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return {"x_norm_clstoken": x[:, 0], "x_norm_patchtokens": x[:, 1 + self.num_register_tokens :]}


@pytest.mark.parametrize(
    "variant,grid",
    [("vits14", 4), ("vits14", 6), ("vits14_reg", 6), ("vitg14", 6), ("vitg14_reg", 4)],
)
def test_dinov2_parity(tmp_path, variant, grid):
    """Hub layout -> timm trunk; grid 6 != our 4x4 grid exercises DINOv2's pos-embed interpolation."""
    registers, swiglu = variant.endswith("_reg"), variant.startswith("vitg14")
    reference = _randomize(_RefDinoV2(dim=32, depth=2, heads=2, grid=grid, registers=registers, swiglu=swiglu), seed=3)
    path = tmp_path / f"dinov2_{variant}_pretrain.pth"
    torch.save(reference.state_dict(), path)
    ours = DINOv2Backbone(variant=variant, size="tiny").eval()  # 56 px: a 4x4 grid
    load_encoder_weights(ours, path)
    x = _input(56)
    with torch.no_grad():
        expected = reference.forward_features(x)
        got = ours(x)
    _close(got["cls_token"], expected["x_norm_clstoken"])
    _close(got["patch_tokens"].flatten(2).transpose(1, 2), expected["x_norm_patchtokens"])


def test_dinov2_converter_agrees_with_timm(tmp_path):
    """Our DINOv2 converter and timm's own checkpoint filter give the same tensors (same grid)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    reference = _randomize(_RefDinoV2(dim=32, depth=2, heads=2, grid=4, registers=True, swiglu=True), seed=4)
    ours = DINOv2Backbone(variant="vitg14_reg", size="tiny")
    converted = convert_state_dict(reference.state_dict(), ours, family="dinov2").state_dict
    timm_sd = checkpoint_filter_fn(dict(reference.state_dict()), ours.encoder)
    assert sorted(converted) == sorted("encoder." + k for k in timm_sd)
    for key, value in timm_sd.items():
        assert torch.equal(converted["encoder." + key], value), key


# ----------------------------------------------------------------------------- CLIP


def _tiny_upstream_clip(patch_size: int, image_size: int, seed: int) -> nn.Module:
    import open_clip

    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=patch_size, image_size=image_size),
        text_cfg=open_clip.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
        quick_gelu=True,  # as OpenAI's models
    )
    return _randomize(model, seed)


def _save_openai_torchscript(model: nn.Module, path) -> None:
    """An OpenAI-style TorchScript archive: the traced whole CLIP, with OpenAI's extra scalars."""
    for name, value in (("input_resolution", 64), ("context_length", 8), ("vocab_size", 64)):
        if hasattr(model, name):  # open_clip keeps some of them as plain int attributes
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    image, text = torch.zeros(1, 3, 64, 64), torch.zeros(1, 8, dtype=torch.long)
    torch.jit.save(torch.jit.trace(model, (image, text), check_trace=False), str(path))


@pytest.mark.parametrize("file_format", ["open_clip.bin", "open_clip.safetensors", "openai_torchscript.pt"])
def test_clip_parity(tmp_path, file_format):
    upstream = _tiny_upstream_clip(patch_size=16, image_size=64, seed=5)
    path = tmp_path / file_format
    if file_format.endswith(".bin"):
        torch.save(upstream.state_dict(), path)
    elif file_format.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in upstream.state_dict().items()}, str(path))
    else:
        _save_openai_torchscript(upstream, path)
    ours = CLIPBackbone(variant="vit_b16", size="tiny").eval()
    load_encoder_weights(ours, path)
    x = _input(64)
    with torch.no_grad():
        embed = upstream.encode_image(x)
        upstream.visual.output_tokens = True
        _, tokens = upstream.visual(x)
        got = ours(x)
    _close(got["image_embed"], embed)
    _close(got["patch_tokens"].flatten(2).transpose(1, 2), tokens)


def test_torchscript_reader_matches_jit_state_dict(tmp_path):
    """The code-free TorchScript reader returns exactly what torch.jit.load(...).state_dict() does."""
    path = tmp_path / "ViT-tiny.pt"
    _save_openai_torchscript(_tiny_upstream_clip(patch_size=32, image_size=64, seed=6), path)
    ours = read_state_dict(path)
    jit_sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert sorted(ours) == sorted(jit_sd)
    assert all(torch.equal(ours[k], jit_sd[k]) for k in jit_sd)
    assert guess_family(ours) == "clip"


# ----------------------------------------------------------------------------- failures


@pytest.fixture
def sam_file(tmp_path):
    path = tmp_path / "sam_tiny.pth"
    torch.save(_tiny_upstream_sam("segment_anything", seed=7).state_dict(), path)
    return path


def _tiny_sam():
    return SAMBackbone(variant="vit_b", size="tiny")


def _edited(tmp_path, sam_file, edit):
    sd = torch.load(sam_file, weights_only=True)
    edit(sd)
    path = tmp_path / "edited.pth"
    torch.save(sd, path)
    return path


def test_renamed_key_fails_listing_both_names(tmp_path, sam_file):
    path = _edited(tmp_path, sam_file, lambda sd: sd.__setitem__("image_encoder.neck.0.weights", sd.pop("image_encoder.neck.0.weight")))
    with pytest.raises(KeyMismatchError) as info:
        load_encoder_weights(_tiny_sam(), path)
    message = str(info.value)
    assert "Missing keys (1): encoder.neck.0.weight" in message
    assert "Unexpected keys (1): encoder.neck.0.weights" in message
    assert str(path) in message and "'sam'" in message and "looks like Segment Anything" in message


def test_missing_key_fails(tmp_path, sam_file):
    path = _edited(tmp_path, sam_file, lambda sd: sd.pop("image_encoder.blocks.1.attn.rel_pos_h"))
    with pytest.raises(KeyMismatchError, match=r"Missing keys \(1\): encoder\.blocks\.1\.attn\.rel_pos_h"):
        load_encoder_weights(_tiny_sam(), path)


@pytest.mark.parametrize("key", ["image_encoder.extra_head.weight", "bogus_part.weight"])
def test_extra_key_fails(tmp_path, sam_file, key):
    path = _edited(tmp_path, sam_file, lambda sd: sd.__setitem__(key, torch.zeros(2)))
    expected = key.replace("image_encoder.", "encoder.")
    with pytest.raises(KeyMismatchError, match=rf"Unexpected keys \(1\): {expected}"):
        load_encoder_weights(_tiny_sam(), path)


def test_wrong_shape_and_wrong_family_fail(tmp_path, sam_file):
    big = _tiny_sam()
    small = SAMBackbone(variant="vit_b", size="tiny", img_size=32)  # other position-embedding size
    with pytest.raises(KeyMismatchError, match=r"Wrong shapes .*encoder\.pos_embed \(1, 4, 4, 32\) vs \(1, 2, 2, 32\)"):
        load_encoder_weights(small, sam_file)
    load_encoder_weights(big, sam_file)  # the same file fits the model it was made for
    dino_path = tmp_path / "dino.pth"
    torch.save(_RefDinoV2(dim=32, depth=2, heads=2, grid=4, registers=False, swiglu=False).state_dict(), dino_path)
    with pytest.raises(KeyMismatchError, match="looks like DINOv2"):
        load_encoder_weights(_tiny_sam(), dino_path)


def test_truncated_file_fails(tmp_path, sam_file):
    data = sam_file.read_bytes()
    for name, cut in (("truncated.pth", len(data) // 2), ("stub.pth", 100)):
        path = tmp_path / name
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="truncated or corrupt"):
            read_state_dict(path)
    st = tmp_path / "truncated.safetensors"
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1000)}, str(st))
    st.write_bytes(st.read_bytes()[:500])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_state_dict(st)


@pytest.mark.parametrize("obj", [[1, 2, 3], {"epoch": 3, "lr": 0.1}, {"model": {"a": 1}}, {}])
def test_pickle_that_is_not_a_state_dict_fails(tmp_path, obj):
    path = tmp_path / "not_weights.pth"
    torch.save(obj, path)
    with pytest.raises(WeightsError, match="expected a state dict"):
        read_state_dict(path)


def test_wrong_checksum_fails(tmp_path, sam_file, monkeypatch):
    with pytest.raises(ChecksumError, match="expected " + "0" * 64):
        load_encoder_weights(_tiny_sam(), sam_file, sha256="0" * 64)
    # A tag's published checksum is enforced: a file placed under the official name but holding
    # other bytes is refused.
    spec = WEIGHTS["clip_vit_b32_openai"]
    assert spec.sha256 is not None
    monkeypatch.setenv("SAMANTICS_WEIGHTS", str(tmp_path))
    (tmp_path / spec.file_name).write_bytes(sam_file.read_bytes())
    with pytest.raises(ChecksumError, match=spec.sha256):
        load_encoder_weights(CLIPBackbone(variant="vit_b32", size="tiny"), "clip_vit_b32_openai")


class _Payload:
    """A pickle whose loading would create a directory (stand-in for running arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickles_are_never_executed(tmp_path):
    marker = tmp_path / "code_was_executed"
    payload = _Payload(str(marker))
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps({"weight": payload}))
    zipped = tmp_path / "zipped.pth"
    torch.save({"weight": payload}, zipped)
    # A zip dressed as a TorchScript archive whose data.pkl calls os.mkdir.
    scripted = tmp_path / "scripted.pt"
    with zipfile.ZipFile(scripted, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        z.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("archive/code/__torch__.py", "")
    for path in (legacy, zipped, scripted):
        with pytest.raises(UnsafeCheckpointError, match="nothing was executed"):
            read_state_dict(path)
        assert not marker.exists(), path
    # control: an unrestricted unpickler does run the payload
    pickle.loads(legacy.read_bytes())
    assert marker.is_dir()


def test_absent_weights_name_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTICS_WEIGHTS", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        resolve_weights("sam_vit_b")
    message = str(info.value)
    assert "sam_vit_b_01ec64.pth" in message and str(tmp_path) in message and "dl.fbaipublicfiles.com" in message
    monkeypatch.delenv("SAMANTICS_WEIGHTS")
    with pytest.raises(FileNotFoundError, match=r"SAMANTICS_WEIGHTS is not set"):
        resolve_weights("dinov2_vitl14_reg")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_weights(str(tmp_path / "nope.pth"))
    with pytest.raises(KeyError, match="neither an existing file nor a known weight tag"):
        resolve_weights("sam_vit_x")


def test_tag_resolves_under_weights_dir_and_checks_variant(tmp_path, sam_file, monkeypatch):
    monkeypatch.setenv("SAMANTICS_WEIGHTS", str(tmp_path))
    official = tmp_path / WEIGHTS["sam_vit_b"].file_name
    official.write_bytes(sam_file.read_bytes())
    assert resolve_weights("sam_vit_b") == official
    assert resolve_weights(official.name) == official  # a bare file name is looked up there too
    load_encoder_weights(_tiny_sam(), "sam_vit_b")  # tag -> $SAMANTICS_WEIGHTS/sam_vit_b_01ec64.pth
    with pytest.raises(WeightsError, match="'sam'/'vit_l' checkpoint, but the backbone is SAMBackbone variant 'vit_b'"):
        load_encoder_weights(_tiny_sam(), "sam_vit_l")


# ----------------------------------------------------------------------------- full-size layouts


def _meta_state_dict(build) -> dict:
    with torch.device("meta"):
        return build().state_dict()


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_full_size_sam_layouts_load_strictly(variant):
    """The state dict of upstream's full-size builders (on the meta device) fits our backbones."""
    import segment_anything
    import segment_anything_hq

    for registry, cls in ((segment_anything.sam_model_registry, SAMBackbone), (segment_anything_hq.sam_model_registry, HQSAMBackbone)):
        official = _meta_state_dict(registry[variant])
        with torch.device("meta"):
            ours = cls(variant=variant)
        match_state_dict(ours, convert_state_dict(official, ours, family=cls.weight_family), source=variant, family=cls.weight_family, looked_like=guess_family(official))
        assert guess_family(official) == cls.weight_family


@pytest.mark.parametrize("variant,config", [("vit_b32", "ViT-B-32"), ("vit_b16", "ViT-B-16"), ("vit_l14", "ViT-L-14"), ("vit_l14_336", "ViT-L-14-336")])
def test_full_size_clip_layouts_load_strictly(variant, config):
    import open_clip

    official = _meta_state_dict(lambda: open_clip.CLIP(**open_clip.get_model_config(config), quick_gelu=True))
    with torch.device("meta"):
        ours = CLIPBackbone(variant=variant)
    match_state_dict(ours, convert_state_dict(official, ours, family="clip"), source=config, family="clip", looked_like="clip")


@pytest.mark.parametrize("variant", ["vits14", "vitl14", "vitb14_reg", "vitg14_reg"])  # MLP/SwiGLU x registers
def test_full_size_dinov2_layouts_load_strictly(variant):
    dims = {"vits14": (384, 12, 6), "vitb14": (768, 12, 12), "vitl14": (1024, 24, 16), "vitg14": (1536, 40, 24)}
    dim, depth, heads = dims[variant[:6]]
    official = _meta_state_dict(
        lambda: _RefDinoV2(dim=dim, depth=depth, heads=heads, grid=37, registers=variant.endswith("_reg"), swiglu=variant.startswith("vitg"))
    )
    with torch.device("meta"):
        ours = DINOv2Backbone(variant=variant)
    match_state_dict(ours, convert_state_dict(official, ours, family="dinov2"), source=variant, family="dinov2", looked_like="dinov2")
