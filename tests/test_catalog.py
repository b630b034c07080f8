"""The encoder catalog: every family-dispatching place reads it, and a new family is one backbone
class plus one catalog entry (docs/adding_an_encoder.md).

The test family ``toy`` is defined here: a small :class:`EncoderBackbone` subclass and one
:class:`FamilySpec` with one weight tag, registered for the test only. It builds by tag through the
normal builders (``build_encoder``, LazyConfig, the linear probe) and loads an official-format
checkpoint (``trunk.*`` keys plus a classifier ``head.*``) through its converter.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import ShapeSpec, instantiate
from samantics_d2.modeling import catalog
from samantics_d2.modeling.backbone import BACKBONE_CLASSES, EncoderBackbone, build_encoder
from samantics_d2.modeling.catalog import IMAGENET_MEAN, IMAGENET_STD, CheckpointLayout, FamilySpec, WeightSpec
from samantics_d2.modeling.linear_probe import LinearProbe
from samantics_d2.modeling.preprocess import PREPROCESS, preprocess_spec
from samantics_d2.modeling.proposals import PROMPT_DECODER_CLASSES, build_prompt_decoder
from samantics_d2.modeling.weights import (
    CONVERTERS,
    WEIGHTS,
    KeyMismatchError,
    convert_state_dict,
    guess_family,
    load_encoder_weights,
)

# ----------------------------------------------------------------------------- the new family


class ToyBackbone(EncoderBackbone):
    """Patchify (8 px) + LayerNorm: a dense grid and its mean."""

    weight_family = "toy"
    variants = ("toy_s", "toy_m")

    def _build(self, img_size):
        width = {"toy_s": 48, "toy_m": 64}[self.variant] if self.size == "full" else self.family_spec.tiny["width"]
        self.patch_size = 8
        spec = self._preprocess  # the tag's preprocessing, when built by tag
        self.img_size = img_size or (spec.input_size if spec is not None else self.family_spec.preprocess["input_size"])
        self.encoder = nn.ModuleDict({"proj": nn.Conv2d(3, width, 8, 8), "norm": nn.LayerNorm(width)})
        shapes = {"grid": ShapeSpec(channels=width, stride=8), "mean": ShapeSpec(channels=width)}
        self._set_outputs(shapes, dense_feature="grid", global_feature="mean", input_size=self.img_size)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(x)
        grid = self.encoder["norm"](self.encoder["proj"](x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        outputs = {"grid": grid, "mean": grid.mean(dim=(2, 3))}
        return {name: outputs[name] for name in self._out_features}


def _toy_keys(tensors: dict, model: nn.Module) -> dict:
    """The official trunk names its layers ``patchify`` and ``ln``; ours ``proj`` and ``norm``."""
    renames = {"patchify.": "proj.", "ln.": "norm."}
    out = {}
    for key, value in tensors.items():
        prefix = next((p for p in renames if key.startswith(p)), "")
        out[renames.get(prefix, "") + key[len(prefix) :]] = value
    return out


TOY = FamilySpec(
    name="toy",
    description="Toy (toy .pth: trunk.patchify/ln, head.fc)",
    backbone=ToyBackbone,
    preprocess=dict(input_size=32, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD, patch_size=8, fit="resize_square"),
    layout=CheckpointLayout(encoder_prefix="trunk.", other_prefixes=("head.",)),
    transform=_toy_keys,
    signature=lambda keys: "trunk.patchify.weight" in keys,
    tiny=dict(width=16),
)
TOY_TAGS = [
    WeightSpec("toy_s8", "toy", "toy_s", "toy_s8.pth", "https://example.invalid/toy_s8.pth"),
    WeightSpec("toy_m8_64px", "toy", "toy_m", "toy_m8.pth", "https://example.invalid/toy_m8.pth", input_size=64),
]


@pytest.fixture
def toy():
    with catalog.registered(TOY, TOY_TAGS):
        yield TOY
    assert "toy" not in catalog.FAMILIES and "toy_s8" not in WEIGHTS  # cleaned up


def _official_toy(width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "trunk.patchify.weight": (width, 3, 8, 8),
        "trunk.patchify.bias": (width,),
        "trunk.ln.weight": (width,),
        "trunk.ln.bias": (width,),
        "head.fc.weight": (10, width),  # the classifier: a part the encoder does not use
        "head.fc.bias": (10,),
    }
    return {key: torch.randn(shape, generator=g) for key, shape in shapes.items()}


# ----------------------------------------------------------------------------- tests


def test_every_family_dispatch_reads_the_catalog():
    families = set(catalog.FAMILIES)
    assert families == {"sam", "hq_sam", "sam2", "dinov2", "clip", "clip_convnext", "clip_resnet"}
    assert set(BACKBONE_CLASSES) == families and set(CONVERTERS) == families
    assert set(PROMPT_DECODER_CLASSES) == {"sam", "hq_sam", "sam2"}
    assert set(PREPROCESS) == set(WEIGHTS) == set(catalog.WEIGHTS)
    for name, spec in catalog.FAMILIES.items():
        assert BACKBONE_CLASSES[name].weight_family == name
        decoder = spec.prompt_decoder_class()
        assert decoder is None or decoder.weight_family == name
    assert {name: spec.mask_tokens for name, spec in catalog.FAMILIES.items() if spec.mask_tokens} == {"sam": 4, "hq_sam": 5}


def test_a_new_family_builds_by_tag(toy):
    assert BACKBONE_CLASSES["toy"] is ToyBackbone and "toy" in CONVERTERS and "toy" not in PROMPT_DECODER_CLASSES
    assert PREPROCESS["toy_s8"].input_size == 32 and PREPROCESS["toy_m8_64px"].input_size == 64  # tag override
    backbone = build_encoder("toy_s8", size="tiny")
    assert isinstance(backbone, ToyBackbone) and backbone.variant == "toy_s" and backbone.preprocess == preprocess_spec("toy_s8")
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    out = backbone(backbone.prepare([image, image]))
    assert out["grid"].shape == (2, 16, 4, 4) and out["mean"].shape == (2, 16)
    assert {k: v.channels for k, v in backbone.output_shape().items()} == {"grid": 16, "mean": 16}
    # the tag's input size and variant reach the backbone, through LazyConfig too
    lazy = instantiate(L(build_encoder)(tag="toy_m8_64px", out_features=["grid"]))
    assert lazy.variant == "toy_m" and lazy.img_size == 64 and list(lazy.output_shape()) == ["grid"]
    # the linear probe over the new encoder
    probe = LinearProbe(backbone=backbone, pooling="cls", num_classes=3).eval()
    result = probe([{"image": torch.from_numpy(image).permute(2, 0, 1)}])
    assert result[0]["logits"].shape == (3,)
    # a family without a prompt decoder is refused by name
    with pytest.raises(ValueError, match=r"family 'toy'"):
        build_prompt_decoder(backbone)


def test_a_new_family_loads_official_weights_through_its_converter(toy, tmp_path, monkeypatch, caplog):
    official = _official_toy(width=48)
    monkeypatch.setenv("SAMANTICS_WEIGHTS", str(tmp_path))
    torch.save(official, tmp_path / "toy_s8.pth")
    assert guess_family(official) == "toy"
    with caplog.at_level(logging.INFO, logger="samantics_d2.modeling.weights"):
        backbone = build_encoder("toy_s8", pretrained=True)
    assert "dropped 2 keys of parts an encoder does not use (head)" in caplog.text
    state = backbone.state_dict()
    assert torch.equal(state["encoder.proj.weight"], official["trunk.patchify.weight"])
    assert torch.equal(state["encoder.norm.bias"], official["trunk.ln.bias"])
    converted = convert_state_dict(official, backbone, family="toy")
    assert sorted(converted.state_dict) == sorted(state) and converted.dropped == ["head.fc.weight", "head.fc.bias"]
    # strict loading names the family's layout
    wrong = ToyBackbone(variant="toy_m")  # 64 channels
    with pytest.raises(KeyMismatchError, match=r"expects family 'toy': Toy \(toy .pth: trunk.patchify/ln, head.fc\)"):
        load_encoder_weights(wrong, tmp_path / "toy_s8.pth")


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already in the catalog"):
        catalog.register(catalog.FAMILIES["sam"])
    with pytest.raises(ValueError, match="names family 'nope'"):
        catalog.register(tags=[WeightSpec("x", "nope", "v", "x.pth", "u")])
    with pytest.raises(KeyError, match="known families"):
        catalog.get_family("nope")
