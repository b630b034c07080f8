"""CLIP text prototypes: class names -> one L2-normalised embedding per class (open-vocabulary).

A class name holds one or more **synonyms** (``"sofa/couch"``, ``"tv_or_television"``,
``"cat, kitty"``: :func:`split_synonyms`). Each synonym is put into every **prompt template**
(``"a photo of a {}."``...), every text goes through CLIP's text tower in batches of texts (never one
forward per class), each text embedding is L2-normalised, the embeddings of a class are averaged
over its templates and synonyms, and the average is L2-normalised again: the class's **text
prototype** (the prompt ensemble of CLIP's paper; OVSAM embeds its class names the same way).

The text tower (:class:`CLIPTextEncoder`) is open_clip's ``TextTransformer``, built with the
dimensions of the same CLIP model as the image tower (:class:`~samantics_d2.modeling.backbone.clip.CLIPBackbone`)
and loaded from the same official checkpoint (the keys the image tower's loader drops as "text tower"),
so image and text embeddings share one space.

:func:`load_or_build_text_prototypes` caches prototypes in the reference-feature store
(:mod:`samantics_d2.references.store`: safetensors + JSON provenance, atomic writes under
``cache_root()``), keyed by the text tower (class, variant, size, SHA-256 of its weights), the
vocabulary (class names and their synonyms) and the templates: a changed vocabulary, template list
or weight file never reuses a stale file. docs/open_vocabulary.md shows the use.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...references.store import StoredFeatures, default_store_path, load_or_build_features
from ...version import __version__
from ..backbone.clip import CLIP_EMBED_DIMS
from ..catalog import WEIGHTS, get_family, get_weight_spec
from ..weights import (
    Converted,
    WeightsError,
    guess_family,
    match_state_dict,
    module_fingerprint,
    read_state_dict,
    resolve_weights,
    split_checkpoint,
)

__all__ = [
    "CLIP_TEXT_VARIANTS",
    "CLIPTextEncoder",
    "OPENAI_IMAGENET_TEMPLATES",
    "SINGLE_TEMPLATE",
    "TextPrototypes",
    "build_clip_text_encoder",
    "compute_text_prototypes",
    "load_clip_text_weights",
    "load_or_build_text_prototypes",
    "split_synonyms",
    "text_prototypes_provenance",
    "zero_shot_logits",
]

logger = logging.getLogger(__name__)

TEXT_PROTOTYPES_FORMAT = 1

# The 80 prompt templates of CLIP's ImageNet zero-shot classifier, written by OpenAI in CLIP's
# notebook "Prompt_Engineering_for_ImageNet.ipynb" and kept by open_clip as
# ``open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES`` (there as lambdas; here as format strings,
# in the same order; tests/test_text_prototypes.py checks that both give the same texts).
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)  # CLIP's one-template baseline

# Text towers of open_clip's model configs ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336, RN50x16 and
# convnext_large_d_320 (open_clip/model_configs/*.json "text_cfg"): context 77, vocabulary 49408,
# heads = width // 64; the output size is the model's embed_dim, the image tower's ``output_dim``
# (backbone.clip.CLIP_EMBED_DIMS). ``quick_gelu``: the activation the weights were trained with
# (OpenAI's: QuickGELU; open_clip's LAION ConvNeXt: GELU).
CLIP_TEXT_VARIANTS: dict[str, dict[str, int]] = {
    "vit_b32": dict(width=512, layers=12, quick_gelu=True),
    "vit_b16": dict(width=512, layers=12, quick_gelu=True),
    "vit_l14": dict(width=768, layers=12, quick_gelu=True),
    "vit_l14_336": dict(width=768, layers=12, quick_gelu=True),
    "rn50x16": dict(width=768, layers=12, quick_gelu=True),
    "convnext_large_d_320": dict(width=768, layers=16, quick_gelu=False),
}
_CONTEXT_LENGTH = 77  # open_clip's SimpleTokenizer default and every OpenAI CLIP model's
_VOCAB_SIZE = 49408  # the BPE vocabulary of open_clip's SimpleTokenizer (bundled with open_clip)
_TINY_TEXT = dict(width=32, layers=2)  # with the catalog's tiny output_dim: the tiny image tower's space
# Entries of an official file that are not parameters (the causal mask, TorchScript constants).
_NOT_PARAMETERS = ("attn_mask", "input_resolution", "context_length", "vocab_size")

# Where one class name is cut into synonyms: "/", ",", ";", "|" and "_or_" (LVIS/Objects365 style).
_SYNONYM_SEPARATORS = re.compile(r"\s*(?:[/,;|]|_or_)\s*")


def split_synonyms(name: str) -> list[str]:
    """The synonyms of one class name, in order, without repeats.

    ``"sofa/couch"`` -> ``["sofa", "couch"]``; ``"tv_or_television"`` -> ``["tv", "television"]``;
    ``"traffic_light"`` -> ``["traffic light"]`` (LVIS-style underscores become spaces).

    Raises:
        ValueError: the name is empty or has an empty synonym (``"cat//dog"``, ``"cat,"``).
    """
    if not isinstance(name, str):
        raise TypeError(f"A class name must be a string; got {name!r} ({type(name).__name__}).")
    parts = [" ".join(part.replace("_", " ").split()) for part in _SYNONYM_SEPARATORS.split(name.strip())]
    if not name.strip() or any(not part for part in parts):
        raise ValueError(
            f"Class name {name!r} has an empty synonym; synonyms are separated by '/', ',', ';', '|' or '_or_' "
            "(e.g. 'sofa/couch'). Remove the extra separator."
        )
    return list(dict.fromkeys(parts))


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(templates, str) or not templates:
        raise ValueError(f"templates must be a non-empty list of strings with one '{{}}'; got {templates!r}.")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1 or t.replace("{}", "").count("{")]
    if bad:
        raise ValueError(f"Prompt templates need exactly one '{{}}' where the class name goes; got {bad[:3]}.")
    return tuple(templates)


class CLIPTextEncoder(nn.Module):
    """CLIP's text tower (open_clip ``TextTransformer``: causal transformer, argmax (EOT) pooling,
    projection), plus the model's learned ``logit_scale``.

    Args:
        variant: a :data:`CLIP_TEXT_VARIANTS` name, the same as the image tower's
            (:class:`~samantics_d2.modeling.backbone.clip.CLIPBackbone`).
        size: ``"full"`` or ``"tiny"`` (2 layers, width 32, output 32: the tiny image tower's space).
        quick_gelu: QuickGELU (OpenAI's weights) or GELU; default: the variant's (``CLIP_TEXT_VARIANTS``).
    """

    weight_family = "clip"

    def __init__(self, *, variant: str = "vit_b32", size: str = "full", quick_gelu: Optional[bool] = None) -> None:
        super().__init__()
        from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer

        if variant not in CLIP_TEXT_VARIANTS:
            raise ValueError(f"CLIPTextEncoder got variant={variant!r}; expected one of {tuple(CLIP_TEXT_VARIANTS)}.")
        if size not in ("full", "tiny"):
            raise ValueError(f"CLIPTextEncoder got size={size!r}; expected 'full' or 'tiny'.")
        self.variant, self.size = variant, size
        dims = dict(_TINY_TEXT) if size == "tiny" else dict(CLIP_TEXT_VARIANTS[variant])
        output_dim = get_family("clip").tiny["output_dim"] if size == "tiny" else CLIP_EMBED_DIMS[variant]
        quick_gelu = CLIP_TEXT_VARIANTS[variant]["quick_gelu"] if quick_gelu is None else quick_gelu
        self.encoder = TextTransformer(
            context_length=_CONTEXT_LENGTH,
            vocab_size=_VOCAB_SIZE,
            width=dims["width"],
            heads=max(2, dims["width"] // 64) if size == "tiny" else dims["width"] // 64,
            layers=dims["layers"],
            output_dim=output_dim,
            act_layer=QuickGELU if quick_gelu else nn.GELU,
            norm_layer=LayerNorm,
        )
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())  # CLIP's initial value; loaded from the file
        self.output_dim = output_dim
        self.context_length = _CONTEXT_LENGTH

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """``texts`` -> ``[N, 77]`` int64 token ids (open_clip's BPE tokenizer, truncated to the context)."""
        from open_clip.tokenizer import tokenize

        return tokenize(list(texts), context_length=self.context_length)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens: [N, 77]`` int64 -> ``[N, output_dim]`` text embeddings (not normalised)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"CLIPTextEncoder takes [N, {self.context_length}] token ids; got {tuple(tokens.shape)}.")
        return self.encoder(tokens)


def _text_part(state_dict: dict[str, torch.Tensor]) -> Converted:
    """The text tower's keys of an official CLIP state dict, as :class:`CLIPTextEncoder` keys: the
    keys the CLIP family's layout leaves to "other parts" (the image tower's loader drops them)."""
    parts = split_checkpoint(state_dict, "clip")
    converted = Converted(dropped=list(parts.encoder_keys), unknown=list(parts.unknown))
    for key in parts.other:
        if key in _NOT_PARAMETERS:
            converted.dropped.append(key)
        elif key == "logit_scale":
            converted.state_dict[key] = state_dict[key]
        else:
            converted.state_dict["encoder." + key] = state_dict[key]
    return converted


def load_clip_text_weights(
    encoder: CLIPTextEncoder, weights: Union[str, os.PathLike], *, sha256: Optional[str] = None
) -> CLIPTextEncoder:
    """Load the text tower of an official CLIP checkpoint (the file of the image tower) strictly.

    Args:
        encoder: the text tower to fill.
        weights: a CLIP weight tag (``"clip_vit_b32_openai"``), a path, or a file name under
            ``$SAMANTICS_WEIGHTS``.
        sha256: expected SHA-256; defaults to the tag's published checksum.

    Raises:
        FileNotFoundError, ChecksumError, UnsafeCheckpointError, WeightsError, KeyMismatchError
        (the missing / unexpected / wrongly-shaped keys listed with the file).
    """
    text = os.fspath(weights)
    if text in WEIGHTS and not os.path.isfile(text):
        spec = get_weight_spec(text)
        if spec.variant not in CLIP_TEXT_VARIANTS or spec.variant != encoder.variant:
            raise WeightsError(
                f"Weight tag {text!r} is a {spec.family!r}/{spec.variant!r} checkpoint, but the text tower is "
                f"CLIPTextEncoder variant {encoder.variant!r}. Pick the CLIP tag of the image tower's variant."
            )
        sha256 = spec.sha256 if sha256 is None else sha256
    path = resolve_weights(weights)
    state_dict = read_state_dict(path, sha256=sha256)
    converted = _text_part(state_dict)
    match_state_dict(encoder, converted, source=str(path), family="clip", looked_like=guess_family(state_dict))
    encoder.load_state_dict(converted.state_dict, strict=True)
    logger.info(
        "%s: loaded %d tensors into CLIPTextEncoder (dropped %d keys of the image tower and constants)",
        path,
        len(converted.state_dict),
        len(converted.dropped),
    )
    return encoder


def build_clip_text_encoder(
    tag: str, *, size: str = "full", weights: Optional[Union[str, os.PathLike]] = None, pretrained: bool = False
) -> CLIPTextEncoder:
    """The text tower of CLIP weight tag ``tag`` (``"clip_vit_b32_openai"``...), in eval mode.

    Args:
        tag: a CLIP weight tag of :mod:`~samantics_d2.modeling.catalog` (its variant sets the dims).
        size: ``"full"``, or ``"tiny"`` (random init, tests and demos).
        weights: a file (or tag) to load; ``pretrained=True`` loads ``tag``'s own file.
    """
    spec = get_weight_spec(tag)
    if spec.variant not in CLIP_TEXT_VARIANTS:
        raise ValueError(f"Weight tag {tag!r} is a {spec.family!r} encoder; a text tower needs a CLIP tag.")
    encoder = CLIPTextEncoder(variant=spec.variant, size=size)
    source = weights if weights is not None else (tag if pretrained else None)
    if source is not None:
        load_clip_text_weights(encoder, source)
    return encoder.eval()


@dataclass
class TextPrototypes:
    """Text prototypes of a vocabulary.

    Attributes:
        class_names: ``K`` class names as given.
        synonyms: the synonyms of each class (:func:`split_synonyms`).
        embeddings: ``[K, D]`` float32, L2-normalised: one prototype per class.
        synonym_embeddings: ``[S, D]`` float32, L2-normalised: one per synonym (template ensemble),
            ``S`` = the number of synonyms of all classes, class by class.
        synonym_class: ``[S]`` int64: the class of each synonym row.
        templates: the prompt templates used.
    """

    class_names: list[str]
    synonyms: list[list[str]]
    embeddings: torch.Tensor
    synonym_embeddings: torch.Tensor
    synonym_class: torch.Tensor
    templates: tuple[str, ...]

    def to_stored(self) -> StoredFeatures:
        tensors = {
            "embeddings": self.embeddings,
            "synonym_embeddings": self.synonym_embeddings,
            "synonym_class": self.synonym_class,
        }
        records = [{"synonyms": s} for s in self.synonyms]
        return StoredFeatures(tensors=tensors, provenance={}, class_names=list(self.class_names), records=records)

    @classmethod
    def from_stored(cls, stored: StoredFeatures, templates: Sequence[str]) -> "TextPrototypes":
        return cls(
            class_names=list(stored.class_names or []),
            synonyms=[list(r["synonyms"]) for r in stored.records],
            embeddings=stored.tensors["embeddings"],
            synonym_embeddings=stored.tensors["synonym_embeddings"],
            synonym_class=stored.tensors["synonym_class"],
            templates=tuple(templates),
        )


def _check_class_names(class_names: Sequence[str]) -> list[list[str]]:
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(f"class_names must be a non-empty list of class names; got {class_names!r}.")
    repeated = sorted({name for name in class_names if list(class_names).count(name) > 1})
    if repeated:
        raise ValueError(f"Class names {repeated} appear more than once in the vocabulary; name each class once.")
    return [split_synonyms(name) for name in class_names]


@torch.no_grad()
def compute_text_prototypes(
    encoder: CLIPTextEncoder,
    class_names: Sequence[str],
    *,
    templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
    batch_size: int = 512,
) -> TextPrototypes:
    """One L2-normalised text prototype per class (module docstring), computed now (no cache).

    Args:
        encoder: the text tower (its device and dtype are used; results come back as float32 on the CPU).
        class_names: ``K`` names, each holding one or more synonyms (:func:`split_synonyms`).
        templates: prompt templates with one ``{}`` (default: CLIP's 80 ImageNet templates).
        batch_size: texts per forward of the text tower (all classes' texts are cut into such batches).
    """
    templates = _check_templates(templates)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    synonyms = _check_class_names(class_names)
    flat = [s for syns in synonyms for s in syns]  # [S]
    texts = [t.format(s) for s in flat for t in templates]  # [S * T], synonym-major
    device = next(encoder.parameters()).device
    tokens = encoder.tokenize(texts)
    chunks = [encoder(tokens[i : i + batch_size].to(device)) for i in range(0, len(texts), batch_size)]
    text_embeds = F.normalize(torch.cat(chunks).float(), dim=-1)  # [S * T, D]
    per_synonym = text_embeds.view(len(flat), len(templates), -1).mean(dim=1)  # [S, D]
    synonym_class = torch.tensor([k for k, syns in enumerate(synonyms) for _ in syns], device=per_synonym.device)
    sums = torch.zeros(len(synonyms), per_synonym.shape[1], device=per_synonym.device)
    sums.index_add_(0, synonym_class, per_synonym)  # every synonym has the same number of templates
    return TextPrototypes(
        class_names=list(class_names),
        synonyms=synonyms,
        embeddings=F.normalize(sums, dim=-1).cpu(),
        synonym_embeddings=F.normalize(per_synonym, dim=-1).cpu(),
        synonym_class=synonym_class.cpu(),
        templates=templates,
    )


def text_prototypes_provenance(
    encoder: CLIPTextEncoder, class_names: Sequence[str], *, templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES
) -> dict[str, Any]:
    """What text prototypes of ``class_names`` depend on: the text tower (class, variant, size,
    SHA-256 of its weights), the vocabulary (names and synonyms), the templates and the tokenizer."""
    synonyms = _check_class_names(class_names)
    return {
        "kind": "text_prototypes",
        "format_version": TEXT_PROTOTYPES_FORMAT,
        "code_version": f"samantics_d2-{__version__}/text_prototypes-{TEXT_PROTOTYPES_FORMAT}",
        "encoder": {
            "class": type(encoder).__name__,
            "variant": encoder.variant,
            "size": encoder.size,
            "weights": module_fingerprint(encoder),
        },
        "vocabulary": {"class_names": list(class_names), "synonyms": synonyms},
        "options": {
            "templates": list(_check_templates(templates)),
            "tokenizer": "open_clip.tokenizer.tokenize",
            "context_length": encoder.context_length,
            "ensemble": "normalise, mean over templates and synonyms, normalise",
        },
    }


def load_or_build_text_prototypes(
    encoder: CLIPTextEncoder,
    class_names: Sequence[str],
    *,
    templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
    name: str = "vocabulary",
    path: Optional[Union[str, os.PathLike]] = None,
    batch_size: int = 512,
) -> TextPrototypes:
    """The text prototypes of ``class_names`` from the cache when computed before with exactly the
    same provenance (:func:`text_prototypes_provenance`), else computed and stored.

    Build-time use (configs, tools), not inside a model's forward.

    Args:
        name: a readable part of the cache file name (``"coco"``, ``"lvis_v1"``...).
        path: the cache file (``.safetensors``); default
            ``cache_root()/references/text_prototypes/<name>-<provenance hash>.safetensors``.
    """
    templates = _check_templates(templates)
    provenance = text_prototypes_provenance(encoder, class_names, templates=templates)
    path = path if path is not None else default_store_path(provenance, name=name)
    stored = load_or_build_features(
        path,
        provenance=provenance,
        build=lambda: compute_text_prototypes(encoder, class_names, templates=templates, batch_size=batch_size).to_stored(),
        what="text prototypes",
    )
    return TextPrototypes.from_stored(stored, templates)


def zero_shot_logits(image_embeds: torch.Tensor, prototypes: torch.Tensor, *, logit_scale: float) -> torch.Tensor:
    """CLIP's zero-shot logits: ``logit_scale * normalise(image_embeds) @ prototypes.T``.

    Args:
        image_embeds: ``[N, D]`` image (or mask) embeddings, not necessarily normalised.
        prototypes: ``[K, D]`` L2-normalised text prototypes.
        logit_scale: the multiplier (CLIP: ``logit_scale.exp()``, 100 for OpenAI's models).

    Returns:
        ``[N, K]`` logits.
    """
    if image_embeds.ndim != 2 or prototypes.ndim != 2 or image_embeds.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"zero_shot_logits takes [N, D] embeddings and [K, D] prototypes; got {tuple(image_embeds.shape)} "
            f"and {tuple(prototypes.shape)}."
        )
    return logit_scale * F.normalize(image_embeds, dim=-1) @ prototypes.to(image_embeds).T
