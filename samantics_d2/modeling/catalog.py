"""The encoder catalog: one record per encoder family and one per weight tag, in one place.

Everything the project knows about an encoder family (as timm keeps one ``pretrained_cfg`` per
tag) is its :class:`FamilySpec`:

- ``backbone``: the :class:`~samantics_d2.modeling.backbone.EncoderBackbone` subclass;
- ``prompt_decoder``: the :class:`~samantics_d2.modeling.proposals.PromptDecoder` subclass built
  from the same checkpoint, or None (DINOv2, CLIP);
- ``preprocess``: the preprocessing defaults (input size, pixel mean/std, patch size, fitting);
- ``layout`` + ``transform``: the converter from the official checkpoint to our keys: which keys
  belong to the image encoder, which to the prompt decoder (and their names here), which to parts
  neither uses; ``transform`` adjusts the encoder's tensors where renaming is not enough;
- ``signature``: how an official state dict of the family is recognised (error messages);
- ``mask_tokens``: the mask tokens whose outputs describe a RefSAM reference (None: RefSAM's
  reference encoder does not take the family);
- ``tiny``: the architecture overrides of ``size="tiny"`` (depth 2, width 32: tests, CPU demos).

A weight tag (``"sam_vit_b"``, ``"dinov2_vitl14_reg"``...) is a :class:`WeightSpec`: its family,
the variant of the family's backbone, the published file name, URL and SHA-256 (where published)
and tag-level preprocessing overrides.

This module imports nothing from the rest of the package: classes and functions of other modules
are named by ``"module:attribute"`` strings and imported on first use (:func:`resolve`), so every
module may read the catalog and no import cycle can go through it. An extension (or a test) adds a
family with :func:`register` (classes may then be given directly) and removes it with
:func:`unregister`. ``docs/adding_an_encoder.md`` gives the recipe.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Callable, Collection, Optional, Sequence, Union

__all__ = [
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "WEIGHTS",
    "CheckpointLayout",
    "EncoderRecord",
    "FamilySpec",
    "FamilyView",
    "WeightSpec",
    "default_tag",
    "get_family",
    "get_weight_spec",
    "register",
    "registered",
    "resolve",
    "unregister",
]

# Pixel statistics on the 0-255 scale, RGB order.
IMAGENET_MEAN = (123.675, 116.28, 103.53)  # (0.485, 0.456, 0.406) * 255
IMAGENET_STD = (58.395, 57.12, 57.375)  # (0.229, 0.224, 0.225) * 255
OPENAI_CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
OPENAI_CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)

Ref = Union[str, Any]  # "package.module:attribute", or the object itself


def resolve(ref: Optional[Ref]) -> Any:
    """The object a catalog field names: ``"package.module:attribute"`` is imported; anything
    else (a class, a function, None) is returned as it is."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class CheckpointLayout:
    """Where the parts of an official checkpoint are, key by key.

    Attributes:
        encoder_prefix: prefix of the image encoder's keys in the official file (``""``: every key
            not claimed by the fields below); our backbone stores them as ``encoder.<rest>``.
        decoder_prefixes: official prefix -> our prefix, for the prompt decoder's keys.
        decoder_names: whole official keys that belong to the prompt decoder (same name here).
        other_prefixes, other_names: parts neither the encoder nor the decoder uses (text tower,
            video memory, ...): dropped by name and logged. Any other key is unexpected.
    """

    encoder_prefix: str
    decoder_prefixes: Mapping[str, str] = field(default_factory=dict)
    decoder_names: tuple[str, ...] = ()
    other_prefixes: tuple[str, ...] = ()
    other_names: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class FamilySpec:
    """One encoder family (see the module docstring for the fields)."""

    name: str
    description: str  # the official file's layout, named in key-mismatch messages
    backbone: Ref
    preprocess: Mapping[str, Any]  # PreprocessSpec fields but ``tag`` (family defaults)
    layout: CheckpointLayout
    signature: Callable[[Collection[str]], bool]
    transform: Optional[Ref] = None  # (encoder tensors by upstream key, backbone) -> the same, adjusted
    prompt_decoder: Optional[Ref] = None
    mask_tokens: Optional[int] = None
    tiny: Mapping[str, Any] = field(default_factory=dict)
    guess_order: int = 100  # signatures are tried in this order (more specific families first)

    def backbone_class(self) -> type:
        return resolve(self.backbone)

    def prompt_decoder_class(self) -> Optional[type]:
        return resolve(self.prompt_decoder)


@dataclass(frozen=True)
class WeightSpec:
    """One official checkpoint.

    Attributes:
        tag: our name for it.
        family: its :class:`FamilySpec` name (``sam, hq_sam, sam2, dinov2, clip``).
        variant: architecture name in the family's backbone (``vit_b``, ``hiera_l``, ``vitg14_reg``...).
        file_name: the file name as published (what to place under ``$SAMANTICS_WEIGHTS``).
        url: where it is published (for the "absent" message; never fetched by this project).
        sha256: the SHA-256 of the published file, only where the publisher states it.
        input_size, patch_size: preprocessing overrides of the family defaults.
    """

    tag: str
    family: str
    variant: str
    file_name: str
    url: str
    sha256: Optional[str] = None
    input_size: Optional[int] = None
    patch_size: Optional[int] = None

    @property
    def family_spec(self) -> FamilySpec:
        return get_family(self.family)


EncoderRecord = WeightSpec  # the per-tag record under its catalog name

_FAMILIES: dict[str, FamilySpec] = {}
_TAGS: dict[str, WeightSpec] = {}
#: family name -> :class:`FamilySpec` (a live read-only view: registrations show up).
FAMILIES: Mapping[str, FamilySpec] = MappingProxyType(_FAMILIES)
#: weight tag -> :class:`WeightSpec` (a live read-only view).
WEIGHTS: Mapping[str, WeightSpec] = MappingProxyType(_TAGS)


def register(family: Optional[FamilySpec] = None, tags: Sequence[WeightSpec] = ()) -> None:
    """Add a family and/or weight tags to the catalog; names already taken are refused."""
    if family is not None:
        if family.name in _FAMILIES:
            raise ValueError(f"Encoder family {family.name!r} is already in the catalog.")
    for spec in tags:
        if spec.tag in _TAGS:
            raise ValueError(f"Weight tag {spec.tag!r} is already in the catalog ({_TAGS[spec.tag].family}).")
        known = spec.family in _FAMILIES or (family is not None and spec.family == family.name)
        if not known:
            raise ValueError(f"Weight tag {spec.tag!r} names family {spec.family!r}, which is not in the catalog.")
    if family is not None:
        _FAMILIES[family.name] = family
    for spec in tags:
        _TAGS[spec.tag] = spec


def unregister(family: str) -> None:
    """Remove a family and all its weight tags."""
    for tag in [t for t, spec in _TAGS.items() if spec.family == family]:
        del _TAGS[tag]
    _FAMILIES.pop(family, None)


@contextlib.contextmanager
def registered(family: FamilySpec, tags: Sequence[WeightSpec] = ()) -> Iterator[FamilySpec]:
    """``with registered(family, tags):`` the family is in the catalog inside the block only."""
    register(family, tags)
    try:
        yield family
    finally:
        unregister(family.name)


def get_family(name: str) -> FamilySpec:
    """The :class:`FamilySpec` called ``name``; unknown names fail with the list of known ones."""
    if name not in _FAMILIES:
        raise KeyError(f"Unknown encoder family {name!r}; known families: {sorted(_FAMILIES)}.")
    return _FAMILIES[name]


def get_weight_spec(tag: str) -> WeightSpec:
    """The :class:`WeightSpec` of ``tag``; unknown tags fail with the list of known ones."""
    if tag not in _TAGS:
        raise KeyError(f"Unknown weight tag {tag!r}; known tags: {sorted(_TAGS)}.")
    return _TAGS[tag]


def default_tag(family: str, variant: str) -> Optional[str]:
    """The tag whose architecture is ``family``/``variant`` (SAM 2.1 preferred over SAM 2)."""
    matches = [w.tag for w in _TAGS.values() if w.family == family and w.variant == variant]
    return matches[-1] if matches else None  # table order: SAM 2.1 comes after SAM 2


class FamilyView(Mapping):
    """family name -> one resolved field of its :class:`FamilySpec` (families where it is not
    None), live: ``FamilyView("backbone")`` is ``{"sam": SAMBackbone, ...}``."""

    def __init__(self, attribute: str, convert: Optional[Callable[[FamilySpec], Any]] = None) -> None:
        self._attribute = attribute
        self._convert = convert

    def _names(self) -> list[str]:
        return [name for name, spec in _FAMILIES.items() if getattr(spec, self._attribute) is not None]

    def __getitem__(self, name: str) -> Any:
        spec = _FAMILIES.get(name)
        if spec is None or getattr(spec, self._attribute) is None:
            raise KeyError(name)
        return self._convert(spec) if self._convert is not None else resolve(getattr(spec, self._attribute))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"FamilyView({self._attribute!r}: {self._names()})"


# ----------------------------------------------------------------------------- the families

def _center_crop(mean: tuple, std: tuple, patch_size: int, crop_pct: float) -> dict[str, Any]:
    """Resize the shorter side to 224 / crop_pct (bicubic), centre crop 224 (timm / torchvision eval)."""
    return dict(
        input_size=224,
        pixel_mean=mean,
        pixel_std=std,
        patch_size=patch_size,
        fit="resize_center_crop",
        interpolation="bicubic",
        crop_pct=crop_pct,
    )


_SAM_PREPROCESS = dict(  # segment_anything ResizeLongestSide + Sam.preprocess (pad after normalising)
    input_size=1024, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD, patch_size=16, fit="longest_side_pad"
)
# Same structure (windowed + global blocks, relative positions, neck), tiny dims.
_SAM_TINY = dict(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), img_size=64, window_size=2, out_chans=32)
_SAM_LAYOUT = CheckpointLayout(
    encoder_prefix="image_encoder.",
    decoder_prefixes={"prompt_encoder.": "prompt_encoder.", "mask_decoder.": "mask_decoder."},
)


def _sam_keys(keys: Collection[str]) -> bool:
    return "image_encoder.patch_embed.proj.weight" in keys


_SAM_FAMILY = FamilySpec(
    name="sam",
    description="Segment Anything (segment_anything .pth: image_encoder/prompt_encoder/mask_decoder)",
    backbone="samantics_d2.modeling.backbone.sam:SAMBackbone",
    prompt_decoder="samantics_d2.modeling.proposals.prompt_decoder:SAMPromptDecoder",
    preprocess=_SAM_PREPROCESS,
    layout=_SAM_LAYOUT,
    signature=_sam_keys,
    mask_tokens=4,  # 1 single-mask + 3 multimask tokens
    tiny=_SAM_TINY,
    guess_order=20,
)
register(_SAM_FAMILY)
# HQ-SAM: SAM's file layout, preprocessing and tiny sizes, plus the HQ token and its decoder.
register(replace(
    _SAM_FAMILY,
    name="hq_sam",
    description="HQ-SAM (segment_anything_hq .pth: SAM keys + mask_decoder.hf_token ...)",
    backbone="samantics_d2.modeling.backbone.sam:HQSAMBackbone",
    prompt_decoder="samantics_d2.modeling.proposals.prompt_decoder:HQSAMPromptDecoder",
    signature=lambda keys: _sam_keys(keys) and any(k.startswith("mask_decoder.hf_") for k in keys),
    mask_tokens=5,  # SAM's 4 + the HQ token
    guess_order=10,
))
register(
    FamilySpec(
        name="sam2",
        description="SAM 2 / 2.1 (sam2 .pt: {'model': image_encoder.trunk/neck ...})",
        backbone="samantics_d2.modeling.backbone.sam2:SAM2Backbone",
        prompt_decoder="samantics_d2.modeling.proposals.prompt_decoder:SAM2PromptDecoder",
        # sam2.utils.transforms.SAM2Transforms: Resize((1024, 1024)) + ImageNet Normalize.
        preprocess=dict(
            input_size=1024, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD, patch_size=16, fit="resize_square"
        ),
        # sam2.modeling.sam2_base.SAM2Base: image encoder, SAM heads (+ no_mem_embed), video parts.
        layout=CheckpointLayout(
            encoder_prefix="image_encoder.",
            decoder_prefixes={"sam_prompt_encoder.": "prompt_encoder.", "sam_mask_decoder.": "mask_decoder."},
            decoder_names=("no_mem_embed",),
            other_prefixes=(
                "memory_attention.",
                "memory_encoder.",
                "obj_ptr_proj.",
                "obj_ptr_tpos_proj.",
                "mask_downsample.",
            ),
            other_names=("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial"),
        ),
        signature=lambda keys: any(k.startswith("image_encoder.trunk.") for k in keys),
        # Four short stages, one global-attention block inside stage 3 (as upstream: never a stage's
        # first, query-pooling block), small windows, 32-channel FPN.
        tiny=dict(
            trunk=dict(
                embed_dim=16,
                num_heads=1,
                stages=(1, 1, 2, 1),
                global_att_blocks=(3,),
                window_pos_embed_bkg_spatial_size=(4, 4),
                window_spec=(4, 2, 2, 1),
            ),
            neck=dict(d_model=32, img_size=128),
        ),
        guess_order=0,
    )
)
register(
    FamilySpec(
        name="dinov2",
        description="DINOv2 (torch hub .pth: cls_token, pos_embed, blocks.N ..., mask_token)",
        backbone="samantics_d2.modeling.backbone.dinov2:DINOv2Backbone",
        # DINOv2 linear-eval transform: Resize(256, bicubic) + CenterCrop(224), ImageNet statistics.
        preprocess=_center_crop(IMAGENET_MEAN, IMAGENET_STD, patch_size=14, crop_pct=0.875),
        # mask_token is used only by DINOv2's masked training
        layout=CheckpointLayout(encoder_prefix="", other_names=("mask_token",)),
        transform="samantics_d2.modeling.weights:adapt_dinov2_keys",
        signature=lambda keys: "cls_token" in keys and any(k.startswith("blocks.") for k in keys),
        tiny=dict(embed_dim=32, depth=2, num_heads=2, img_size=56),
        guess_order=40,
    )
)
# CLIP files (OpenAI TorchScript .pt, open_clip .bin/.safetensors): the image tower under visual.*, the
# text tower (loaded by text_prototypes.load_clip_text_weights from the same file) dropped here.
# open_clip / OpenAI CLIP (every CLIP family, ViT and convolutional): Resize(S, bicubic) +
# CenterCrop(S) with OpenAI statistics (open_clip's preprocessing), stride 32; S per tag.
_CLIP_PREPROCESS = _center_crop(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, patch_size=32, crop_pct=1.0)
_CLIP_LAYOUT = CheckpointLayout(
    encoder_prefix="visual.",
    other_prefixes=("transformer.", "token_embedding.", "ln_final."),
    other_names=(
        "positional_embedding",
        "text_projection",
        "logit_scale",
        "logit_bias",
        "attn_mask",
        # OpenAI TorchScript archives also carry these as tensors (dropped by open_clip too)
        "input_resolution",
        "context_length",
        "vocab_size",
    ),
)


def _register_clip_family(name: str, description: str, backbone: str, *, signature, tiny: dict, guess_order: int) -> None:
    """Every CLIP family: the same file layout and preprocessing; ``backbone``: a class of backbone/clip.py."""
    register(FamilySpec(name=name, description=description, backbone=f"samantics_d2.modeling.backbone.clip:{backbone}",
                        preprocess=_CLIP_PREPROCESS, layout=_CLIP_LAYOUT, signature=signature, tiny=tiny,
                        guess_order=guess_order))


_register_clip_family(
    "clip", "CLIP (OpenAI TorchScript .pt or open_clip .bin/.safetensors: visual.*, transformer.*)", "CLIPBackbone",
    signature=lambda keys: "visual.conv1.weight" in keys or "visual.class_embedding" in keys,
    tiny=dict(width=32, layers=2, output_dim=32), guess_order=30,
)
# Convolutional CLIPs (mask pooling of their dense map, then CLIP's own head: issue 14).
_register_clip_family(
    "clip_convnext",
    "open_clip ConvNeXt CLIP (.bin/.safetensors: visual.trunk.* (timm), visual.head.*, text tower)", "CLIPConvNeXtBackbone",
    signature=lambda keys: "visual.trunk.stem.0.weight" in keys and "visual.head.mlp.fc1.weight" in keys,
    tiny=dict(depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), output_dim=32, image_size=64), guess_order=25,
)
_register_clip_family(
    "clip_resnet",
    "OpenAI ResNet CLIP (TorchScript .pt or open_clip .bin: visual.conv1-3, visual.layerN, visual.attnpool.*, text tower)",
    "CLIPResNetBackbone",
    # before "clip" (30): a ResNet CLIP file also has visual.conv1.weight
    signature=lambda keys: "visual.attnpool.c_proj.weight" in keys,
    tiny=dict(layers=(1, 1, 1, 1), width=8, output_dim=32, image_size=64), guess_order=25,
)

# ----------------------------------------------------------------------------- the weight tags


def _sam_tags() -> list[WeightSpec]:
    base = "https://dl.fbaipublicfiles.com/segment_anything/"
    files = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_h": "sam_vit_h_4b8939.pth"}
    specs = [WeightSpec(f"sam_{v}", "sam", v, f, base + f) for v, f in files.items()]
    hq = "https://huggingface.co/lkeab/hq-sam/resolve/main/"
    specs += [WeightSpec(f"hq_sam_{v}", "hq_sam", v, f"sam_hq_{v}.pth", hq + f"sam_hq_{v}.pth") for v in files]
    return specs


def _sam2_tags() -> list[WeightSpec]:
    sizes = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
    specs = []
    for version, folder in (("sam2", "072824"), ("sam2.1", "092824")):
        for short, long in sizes.items():
            file_name = f"{version}_hiera_{long}.pt"
            url = f"https://dl.fbaipublicfiles.com/segment_anything_2/{folder}/{file_name}"
            specs.append(WeightSpec(f"{version}_hiera_{short}", "sam2", f"hiera_{short}", file_name, url))
    return specs


def _dinov2_tags() -> list[WeightSpec]:
    specs = []
    for arch in ("vits14", "vitb14", "vitl14", "vitg14"):
        for reg, suffix in (("", ""), ("_reg", "_reg4")):
            file_name = f"dinov2_{arch}{suffix}_pretrain.pth"
            url = f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/{file_name}"
            specs.append(WeightSpec(f"dinov2_{arch}{reg}", "dinov2", f"{arch}{reg}", file_name, url))
    return specs


def _clip_tags() -> list[WeightSpec]:
    # OpenAI publishes the SHA-256 as the second-to-last URL component (also checked by
    # open_clip.pretrained.download_pretrained_from_url).
    base = "https://openaipublic.azureedge.net/clip/models/"
    rows = [
        ("vit_b32", "ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", 224, 32),
        ("vit_b16", "ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", 224, 16),
        ("vit_l14", "ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", 224, 14),
        ("vit_l14_336", "ViT-L-14-336px.pt", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", 336, 14),
    ]
    specs = [
        WeightSpec(f"clip_{v}_openai", "clip", v, f, f"{base}{sha}/{f}", sha, size, patch) for v, f, sha, size, patch in rows
    ]
    rn50x16_sha = "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa"
    specs.append(
        WeightSpec("clip_rn50x16_openai", "clip_resnet", "rn50x16", "RN50x16.pt", f"{base}{rn50x16_sha}/RN50x16.pt",
                   rn50x16_sha, 384, 32)
    )
    # open_clip's pretrained tag convnext_large_d_320 / laion2b_s29b_b131k_ft_soup (Hugging Face hub; no
    # published SHA-256). Every open_clip hub repository names its file open_clip_pytorch_model.bin:
    # placed under $SAMANTICS_WEIGHTS with the repository's name so that files of two models cannot collide.
    hub = "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
    specs.append(
        WeightSpec("clip_convnext_large_d_320_laion2b", "clip_convnext", "convnext_large_d_320",
                   "CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup.bin",
                   f"https://huggingface.co/{hub}/resolve/main/open_clip_pytorch_model.bin", None, 320, 32)
    )
    return specs


register(tags=_sam_tags() + _sam2_tags() + _dinov2_tags() + _clip_tags())
