"""Encoder backbones: build through LazyConfig and the registry, outputs match output_shape(),
architecture tables agree with the upstream packages' own definitions, input validation."""
from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
import pytest
import torch

from samantics_d2.d2 import BACKBONE_REGISTRY, LazyConfig, instantiate
from samantics_d2.modeling.backbone import (
    BACKBONE_CLASSES,
    CLIPBackbone,
    DINOv2Backbone,
    EncoderBackbone,
    SAM2Backbone,
    SAMBackbone,
    build_encoder,
)
from samantics_d2.modeling.backbone.clip import CLIP_VARIANTS
from samantics_d2.modeling.backbone.sam import SAM_VARIANTS
from samantics_d2.modeling.backbone.sam2 import HIERA_VARIANTS
from samantics_d2.modeling.weights import WEIGHTS

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "common" / "backbones.py")


@pytest.fixture(scope="module")
def cfg():
    return LazyConfig.load(CONFIG)


def _check_outputs(backbone: EncoderBackbone, outputs: dict, n: int, size: int) -> None:
    """Every output is declared in output_shape() with its channels and stride, and nothing else."""
    shapes = backbone.output_shape()
    assert list(outputs) == list(shapes)
    assert backbone.dense_feature in outputs and backbone.global_feature in outputs
    for name, tensor in outputs.items():
        spec = shapes[name]
        if spec.stride is None:  # a global embedding
            assert tuple(tensor.shape) == (n, spec.channels), name
        else:
            assert tuple(tensor.shape) == (n, spec.channels, size // spec.stride, size // spec.stride), name
        if tensor.device.type != "meta":
            assert torch.isfinite(tensor).all(), name
    assert outputs[backbone.dense_feature].ndim == 4 and outputs[backbone.global_feature].ndim == 2


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (37, 53), dtype=np.uint8), rng.integers(0, 256, (90, 40, 4), dtype=np.uint8)]


def test_tiny_configs_build_and_match_output_shape(cfg):
    tiny = [name for name in cfg if name.endswith("_tiny")]
    assert len(tiny) >= 5
    built = set()
    for name in tiny:
        backbone = instantiate(cfg[name]).eval()
        built.add(type(backbone))
        x = backbone.prepare(_images())
        size = backbone.preprocess.input_size
        assert tuple(x.shape) == (2, 3, size, size)
        with torch.no_grad():
            _check_outputs(backbone, backbone(x), 2, size)
    assert built == set(BACKBONE_CLASSES.values())  # every backbone class has a tiny config


@pytest.mark.parametrize("cls", sorted(set(BACKBONE_CLASSES.values()), key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_registry_builds_every_variant_tiny(cls):
    registered = BACKBONE_REGISTRY.get(cls.__name__)
    assert registered is cls
    for variant in cls.variants:
        backbone = registered(variant=variant, size="tiny").eval()
        size = backbone.preprocess.input_size
        with torch.no_grad():
            _check_outputs(backbone, backbone(torch.randn(1, 3, size, size)), 1, size)
        assert backbone.variant == variant and backbone.padding_constraints["size_divisibility"] == backbone.size_divisibility


def test_full_size_configs_build_on_meta(cfg):
    """Full-size entries (random weights, meta device: no memory, no init cost); a few run forward."""
    forward = {"sam_vit_b", "hq_sam_vit_h", "dinov2_vits14_reg", "clip_vit_b16_openai", "clip_vit_l14_336_openai"}
    full = [name for name in cfg if not name.endswith("_tiny")]
    assert len(full) == len(WEIGHTS)  # one entry per weight tag
    for name in full:
        node = cfg[name]
        assert node.tag in WEIGHTS and node.pretrained is True
        if WEIGHTS[node.tag].family == "sam2":
            continue  # Hiera cannot be built on the meta device (it calls .item()); see below
        node.pretrained = False
        with torch.device("meta"):
            backbone = instantiate(node)
        assert backbone.preprocess == backbone.preprocess.replace()  # a valid spec
        assert backbone.preprocess.tag == node.tag
        if name in forward:
            size = backbone.preprocess.input_size
            _check_outputs(backbone, backbone(torch.empty(1, 3, size, size, device="meta")), 1, size)


def test_full_size_sam2_config_builds():
    node = LazyConfig.load(CONFIG).sam2_1_hiera_t
    node.pretrained = False
    node.out_features = ["p2", "p3", "p4", "pooled"]  # all levels, for the shape check
    backbone = instantiate(node).eval()
    assert backbone.preprocess.tag == "sam2.1_hiera_t" and backbone.preprocess.input_size == 1024
    with torch.no_grad():  # 1024 is native; any multiple of 32 works and keeps this test quick
        _check_outputs(backbone, backbone(torch.randn(1, 3, 128, 128)), 1, 128)


# ----------------------------------------------------------------------------- upstream definitions


def _recorded_builder_kwargs(module, variant):
    """The keyword arguments upstream's build_sam_<variant>() passes to _build_sam."""
    recorded = {}
    original = module._build_sam
    module._build_sam = lambda **kw: recorded.update(kw)
    try:
        module.sam_model_registry[variant]()
    finally:
        module._build_sam = original
    return recorded


@pytest.mark.parametrize("package", ["segment_anything.build_sam", "segment_anything_hq.build_sam"])
def test_sam_variants_match_upstream_builders(package):
    import importlib

    module = importlib.import_module(package)
    for variant, arch in SAM_VARIANTS.items():
        kw = _recorded_builder_kwargs(module, variant)
        assert kw["encoder_embed_dim"] == arch["embed_dim"]
        assert kw["encoder_depth"] == arch["depth"]
        assert kw["encoder_num_heads"] == arch["num_heads"]
        assert list(kw["encoder_global_attn_indexes"]) == list(arch["global_attn_indexes"])


def test_hiera_variants_match_sam2_configs():
    import inspect

    import sam2
    from omegaconf import OmegaConf
    from sam2.modeling.backbones.hieradet import Hiera

    defaults = {k: p.default for k, p in inspect.signature(Hiera.__init__).parameters.items() if p.default is not inspect.Parameter.empty}
    short = {"t": "hiera_t", "s": "hiera_s", "b+": "hiera_b+", "l": "hiera_l"}
    root = pathlib.Path(sam2.__file__).parent / "configs"
    configs = sorted(root.glob("sam2/sam2_hiera_*.yaml")) + sorted(root.glob("sam2.1/sam2.1_hiera_*.yaml"))
    assert len(configs) == 8
    for path in configs:
        encoder = OmegaConf.load(path).model.image_encoder
        variant = short[path.stem.split("_hiera_")[1]]
        trunk = {k: v for k, v in OmegaConf.to_container(encoder.trunk).items() if k != "_target_"}
        ours = HIERA_VARIANTS[variant]
        for key in set(trunk) | set(ours):
            expected = trunk.get(key, defaults.get(key))
            assert list(np.atleast_1d(ours.get(key, defaults.get(key)))) == list(np.atleast_1d(expected)), (path.name, key)
        neck = encoder.neck
        assert encoder.scalp == 1 and neck.d_model == 256 and neck.fpn_interp_model == "nearest"
        assert list(neck.fpn_top_down_levels) == [2, 3] and neck.position_encoding.num_pos_feats == 256


def test_clip_variants_match_open_clip_configs():
    import open_clip

    names = {"vit_b32": "ViT-B-32", "vit_b16": "ViT-B-16", "vit_l14": "ViT-L-14", "vit_l14_336": "ViT-L-14-336"}
    for variant, name in names.items():
        config = open_clip.get_model_config(name)
        vision = config["vision_cfg"]
        arch = CLIP_VARIANTS[variant]
        assert (arch["image_size"], arch["patch_size"], arch["width"], arch["layers"]) == (
            vision["image_size"], vision["patch_size"], vision["width"], vision["layers"]
        )
        assert arch["output_dim"] == config["embed_dim"]
        tag = f"clip_{variant}_openai"
        assert WEIGHTS[tag].input_size == vision["image_size"] and WEIGHTS[tag].patch_size == vision["patch_size"]


def test_every_tag_builds_tiny_with_its_family():
    for tag, spec in WEIGHTS.items():
        backbone = build_encoder(tag, size="tiny")
        assert isinstance(backbone, BACKBONE_CLASSES[spec.family]) and backbone.variant == spec.variant
        assert backbone.weight_family == spec.family
    for tag in ("sam_vit_b", "clip_vit_b16_openai", "dinov2_vits14", "sam2.1_hiera_t"):  # another input size
        backbone = build_encoder(tag, size="tiny", input_size=224)  # a multiple of 14, 16 and 32
        assert backbone.preprocess.input_size == 224
        with torch.no_grad():
            _check_outputs(backbone, backbone(torch.randn(1, 3, 224, 224)), 1, 224)


def test_build_encoder_pretrained_fails_before_building(monkeypatch, tmp_path):
    monkeypatch.setenv("SAMANTICS_WEIGHTS", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth"):
        build_encoder("sam_vit_h", pretrained=True)  # building ViT-H would take seconds
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ValueError, match="only size='full' has weights"):
        build_encoder("sam_vit_b", size="tiny", pretrained=True)


# ----------------------------------------------------------------------------- behaviour


def test_sam_global_attention_blocks_on_request():
    backbone = SAMBackbone(variant="vit_b", size="tiny")
    assert backbone.global_attn_features == ["block1"]
    assert SAM_VARIANTS["vit_b"]["global_attn_indexes"] == (2, 5, 8, 11)  # RefSAM's four levels
    picked = SAMBackbone(variant="vit_b", size="tiny", out_features=backbone.global_attn_features + ["neck"])
    picked.load_state_dict(backbone.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = picked(x)
        full = SAMBackbone(variant="vit_b", size="tiny", out_features=["neck", "block0"])
        full.load_state_dict(backbone.state_dict())
        neck = full(x)["neck"]
    assert list(out) == ["block1", "neck"] and out["block1"].shape == (1, 32, 4, 4)
    assert torch.allclose(out["neck"], neck)
    with pytest.raises(ValueError, match=r"unknown \['block7'\]"):
        SAMBackbone(variant="vit_b", size="tiny", out_features=["block7"])


def test_input_validation_messages():
    sam = SAMBackbone(variant="vit_b", size="tiny")
    with pytest.raises(ValueError, match="needs 64x64 inputs"):
        sam(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"expects normalised images \[N, 3, H, W\] float"):
        sam(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    dino = DINOv2Backbone(variant="vits14", size="tiny")
    with pytest.raises(ValueError, match="divisible by 14"):
        dino(torch.randn(1, 3, 57, 56))
    out = dino(torch.randn(1, 3, 70, 42))  # other sizes: the position embedding is resampled
    assert out["patch_tokens"].shape == (1, 32, 5, 3)
    with pytest.raises(ValueError, match="variant='vit_x'"):
        SAMBackbone(variant="vit_x")
    with pytest.raises(ValueError, match="size='small'"):
        CLIPBackbone(variant="vit_b32", size="small")


def test_padding_constraints_follow_the_trunks():
    assert SAMBackbone(variant="vit_b", size="tiny").padding_constraints == {"size_divisibility": 16, "square_size": 64}
    assert CLIPBackbone(variant="vit_l14", size="tiny").padding_constraints == {"size_divisibility": 14, "square_size": 56}
    assert DINOv2Backbone(variant="vits14", size="tiny").padding_constraints == {"size_divisibility": 14}
    assert SAM2Backbone(variant="hiera_t", size="tiny").padding_constraints == {"size_divisibility": 32}


def test_prepare_follows_parameter_dtype():
    backbone = DINOv2Backbone(variant="vits14", size="tiny").to(torch.bfloat16)
    x = backbone.prepare(_images())
    assert x.dtype == torch.bfloat16 and x.shape == (2, 3, 56, 56)
    with torch.no_grad():
        assert backbone(x)["cls_token"].dtype == torch.bfloat16


def test_benchmark_encoders_tool(tmp_path):
    """tools/benchmark.py encoders: FLOPs equal a hand count, the table lands in its doc section."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = tool  # dataclasses look their module up there
    spec.loader.exec_module(tool)
    entry = tool.EncoderEntry.parse("clip_vit_b32_openai/tiny")
    row = tool.measure(
        entry, device=torch.device("cpu"), dtype=torch.float32, batch_size=2, channels_last=False,
        compile_model=False, warmup=0, runs=1,
    )
    # tiny CLIP B/32: 64 px -> 4 patches + CLS = 5 tokens, width 32, 2 layers, 32-d projection
    tokens, width, layers = 5, 32, 2
    macs = width * 3 * 32 * 32 * 4 + layers * (12 * width * width * tokens + 2 * tokens * tokens * width) + width * 32
    assert row["gflops"] == pytest.approx(2 * macs / 1e9, rel=1e-6)
    assert row["images_per_s"] > 0 and row["peak_mib"] > 0 and row["input"] == 64
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    for _ in range(2):  # the second run replaces the section instead of appending another
        assert tool.main(["encoders", "--encoders", "dinov2_vits14/tiny", "--warmup", "0", "--runs", "1", "--markdown", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.count("<!-- encoders-cpu-fp32:begin -->") == 1
    assert "| dinov2_vits14/tiny | 56 | tiny variant" in text and "Machine: CPU" in text
    with pytest.raises(SystemExit):
        tool.main(["encoders", "--encoders", "not_a_tag"])
