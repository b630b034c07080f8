"""Official encoder weights: named tags, safe reading, one converter per family, strict loading.

A weight tag (``"sam_vit_b"``, ``"dinov2_vitl14_reg"``, ...) names an official checkpoint file as it
is published; :data:`WEIGHTS` gives its file name, the page it is published at, its SHA-256 when
known, and the architecture it belongs to. Nothing is ever downloaded: a tag resolves to
``$SAMANTICS_WEIGHTS/<file name>``, and an absent file fails with the exact name to place there.

Reading (:func:`read_state_dict`) never executes code from the file:

- ``.safetensors``: :func:`safetensors.torch.load_file`;
- PyTorch pickles (``.pth``/``.pt``/``.bin``, zip or legacy format): ``torch.load(weights_only=True)``
  on the CPU; a pickle that would call anything but tensor rebuilding is refused;
- TorchScript archives (OpenAI's CLIP ``.pt``): ``torch.jit.load`` would compile and run the
  archive's TorchScript code (``__setstate__`` methods run at load). Instead the archive's
  ``data.pkl`` is read with a restricted unpickler that only rebuilds tensors and records module
  attributes (``__torch__.*`` classes become plain records); any other global is refused. The
  tensors found under module attributes form the state dict.

Converters (:data:`CONVERTERS`, one per family) map the official key layout onto our backbone's
keys (``encoder.<upstream key>``). Keys that belong to parts of the official model that an encoder
does not use (prompt encoder, mask decoder, text tower, ...) are dropped by name and logged; every
other difference fails: missing, unexpected and wrongly-shaped keys are listed with the file and
the family the file looked like.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.io import checkpoint_read_error, sha256_of

if TYPE_CHECKING:  # pragma: no cover
    from .backbone.base import EncoderBackbone

__all__ = [
    "WEIGHTS_ENV",
    "WEIGHTS",
    "CONVERTERS",
    "ChecksumError",
    "KeyMismatchError",
    "UnsafeCheckpointError",
    "WeightSpec",
    "WeightsError",
    "convert_state_dict",
    "get_weight_spec",
    "guess_family",
    "load_encoder_weights",
    "match_state_dict",
    "module_fingerprint",
    "read_state_dict",
    "resolve_weights",
    "sha256_of",
]

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "SAMANTICS_WEIGHTS"
FAMILIES = ("sam", "hq_sam", "sam2", "dinov2", "clip")
_FAMILY_NAMES = {
    "sam": "Segment Anything (segment_anything .pth: image_encoder/prompt_encoder/mask_decoder)",
    "hq_sam": "HQ-SAM (segment_anything_hq .pth: SAM keys + mask_decoder.hf_token ...)",
    "sam2": "SAM 2 / 2.1 (sam2 .pt: {'model': image_encoder.trunk/neck ...})",
    "dinov2": "DINOv2 (torch hub .pth: cls_token, pos_embed, blocks.N ..., mask_token)",
    "clip": "CLIP (OpenAI TorchScript .pt or open_clip .bin/.safetensors: visual.*, transformer.*)",
}


class WeightsError(ValueError):
    """A weight file cannot be used; the message names the file and what to do."""


class ChecksumError(WeightsError):
    """The file's SHA-256 is not the published one."""


class UnsafeCheckpointError(WeightsError):
    """The file would execute code when loaded; it was refused, nothing was executed."""


class KeyMismatchError(WeightsError):
    """The converted state dict does not match the backbone's parameters and buffers."""


@dataclass(frozen=True)
class WeightSpec:
    """One official checkpoint.

    Attributes:
        tag: our name for it.
        family: converter family, one of ``sam, hq_sam, sam2, dinov2, clip``.
        variant: architecture name in the family's backbone (``vit_b``, ``hiera_l``, ``vitg14_reg``...).
        file_name: the file name as published (what to place under ``$SAMANTICS_WEIGHTS``).
        url: where it is published (for the "absent" message; never fetched by this project).
        sha256: the SHA-256 of the published file, only where the publisher states it.
        input_size, patch_size: preprocessing overrides of the family defaults
            (see :mod:`samantics_d2.modeling.preprocess`).
    """

    tag: str
    family: str
    variant: str
    file_name: str
    url: str
    sha256: Optional[str] = None
    input_size: Optional[int] = None
    patch_size: Optional[int] = None


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
    return [
        WeightSpec(f"clip_{v}_openai", "clip", v, f, f"{base}{sha}/{f}", sha, size, patch) for v, f, sha, size, patch in rows
    ]


WEIGHTS: Mapping[str, WeightSpec] = MappingProxyType(
    {w.tag: w for w in _sam_tags() + _sam2_tags() + _dinov2_tags() + _clip_tags()}
)


def get_weight_spec(tag: str) -> WeightSpec:
    """The :class:`WeightSpec` of ``tag``; unknown tags fail with the list of known ones."""
    if tag not in WEIGHTS:
        raise KeyError(f"Unknown weight tag {tag!r}; known tags: {sorted(WEIGHTS)}.")
    return WEIGHTS[tag]


def default_tag(family: str, variant: str) -> Optional[str]:
    """The tag whose architecture is ``family``/``variant`` (SAM 2.1 preferred over SAM 2)."""
    matches = [w.tag for w in WEIGHTS.values() if w.family == family and w.variant == variant]
    return matches[-1] if matches else None  # table order: SAM 2.1 comes after SAM 2


# ----------------------------------------------------------------------------- resolving


def resolve_weights(weights: Union[str, os.PathLike]) -> Path:
    """A local file for ``weights``: an existing path, a tag, or a file name under ``$SAMANTICS_WEIGHTS``.

    Raises:
        FileNotFoundError: with the exact file name to place and where, for an absent file.
    """
    text = os.fspath(weights)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    root = os.environ.get(WEIGHTS_ENV)
    if text in WEIGHTS:
        spec = WEIGHTS[text]
        where = (
            f"in ${WEIGHTS_ENV} ({root})" if root else f"but ${WEIGHTS_ENV} is not set (set it to the folder holding weights)"
        )
        if root and (Path(root) / spec.file_name).is_file():
            return Path(root) / spec.file_name
        raise FileNotFoundError(
            f"Weights {text!r} are not available: expected the file {spec.file_name!r} {where}. Download "
            f"{spec.url} and place it at {Path(root or '$' + WEIGHTS_ENV) / spec.file_name}, or pass the file's path."
        )
    looks_like_file = path.suffix in (".pth", ".pt", ".bin", ".safetensors", ".pkl") or os.sep in text
    if looks_like_file and root and not path.is_absolute() and (Path(root) / text).is_file():
        return Path(root) / text
    if looks_like_file:
        raise FileNotFoundError(
            f"Weight file {text!r} does not exist"
            + (f" (nor under ${WEIGHTS_ENV}={root})" if root and not path.is_absolute() else "")
            + ". Check the path, or give a weight tag."
        )
    raise KeyError(f"{text!r} is neither an existing file nor a known weight tag; known tags: {sorted(WEIGHTS)}.")


# ----------------------------------------------------------------------------- reading


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stand-in for a ``__torch__.*`` class of a TorchScript archive: records its attributes."""

    def __init__(self, *args: Any) -> None:
        self.attributes: dict = {}

    def __setstate__(self, state: Any) -> None:
        self.attributes = dict(state) if isinstance(state, dict) else {}


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads a TorchScript ``data.pkl``: rebuilds tensors, records modules, refuses anything else."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: Path) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._archive, self._prefix, self._source = archive, prefix, source

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise UnsafeCheckpointError(
            f"{self._source}: the TorchScript archive's data.pkl refers to {module}.{name}, which is not a "
            "tensor or module record; refusing to load it (nothing was executed). Re-save the weights as a "
            "plain state dict or .safetensors."
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[1] in _STORAGE_DTYPES):
            raise UnsafeCheckpointError(f"{self._source}: unexpected persistent id {pid!r} in data.pkl.")
        _, storage_name, key, _location, numel = pid
        raw = self._archive.read(f"{self._prefix}/data/{key}")
        dtype = _STORAGE_DTYPES[storage_name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) != numel * itemsize:
            raise WeightsError(f"{self._source}: tensor record data/{key} has {len(raw)} bytes, expected {numel * itemsize}.")
        untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _torchscript_prefix(archive: zipfile.ZipFile) -> Optional[str]:
    """The archive's top folder if it is a TorchScript archive (it has code/ and constants.pkl)."""
    names = archive.namelist()
    for name in names:
        if name.endswith("/constants.pkl") and name.count("/") == 1:
            prefix = name.split("/")[0]
            if any(n.startswith(prefix + "/code/") for n in names) and f"{prefix}/data.pkl" in names:
                return prefix
    return None


def _read_torchscript(path: Path, archive: zipfile.ZipFile, prefix: str) -> dict[str, torch.Tensor]:
    root = _TorchScriptUnpickler(archive.read(f"{prefix}/data.pkl"), archive, prefix, path).load()
    state: dict[str, torch.Tensor] = {}

    def walk(obj: Any, name: str) -> None:
        if isinstance(obj, torch.Tensor):
            state[name] = obj
        elif isinstance(obj, _ScriptObject):
            for key, value in obj.attributes.items():
                walk(value, f"{name}.{key}" if name else key)

    walk(root, "")
    return state


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping) and not obj:
        return "an empty dict"
    if isinstance(obj, Mapping):
        bad = [(k, v) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
        key, value = bad[0]
        return f"a dict with {len(obj)} entries, e.g. {key!r} -> {type(value).__name__}"
    return f"a {type(obj).__name__}"


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def read_state_dict(path: Union[str, os.PathLike], *, sha256: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Read a checkpoint as ``{key: Tensor}`` on the CPU without executing code from it.

    Args:
        path: a ``.safetensors`` file, a PyTorch pickle (zip or legacy) or a TorchScript archive.
        sha256: if given, the file's SHA-256 must equal it.

    Returns:
        The state dict; ``{"model": ...}`` (SAM 2) and ``{"state_dict": ...}`` (training
        checkpoints) wrappers are unwrapped.

    Raises:
        ChecksumError, UnsafeCheckpointError, WeightsError (unreadable, truncated, not a state dict).
    """
    path = Path(path)
    if sha256 is not None:
        actual = sha256_of(path)
        if actual.lower() != sha256.lower():
            raise ChecksumError(
                f"{path}: SHA-256 is {actual}, expected {sha256}. The file is corrupt, incomplete or a different "
                "release; download it again from the official page."
            )
    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                obj: Any = load_file(str(path), device="cpu")
            except SafetensorError as e:
                raise WeightsError(
                    f"{path}: cannot be read as safetensors ({e}). The file is truncated or corrupt; download it again."
                ) from e
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                prefix = _torchscript_prefix(archive)
                if prefix is not None:
                    obj = _read_torchscript(path, archive, prefix)
                else:
                    obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        message, refers_to_code = checkpoint_read_error(path, e)
        if refers_to_code:
            raise UnsafeCheckpointError(
                f"{message} Only load files from a source you trust, re-saved as a plain state dict or .safetensors."
            ) from e
        raise WeightsError(message) from e
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and not _is_state_dict(obj) and _is_state_dict(obj.get(wrapper)):
            logger.info("%s: using the state dict under key %r", path, wrapper)
            obj = obj[wrapper]
            break
    if not _is_state_dict(obj):
        raise WeightsError(
            f"{path}: expected a state dict (a dict of parameter name -> Tensor), got {_describe(obj)}. "
            "Pass the official weight file, or a file saved with torch.save(model.state_dict())."
        )
    return dict(obj)


def guess_family(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Which official layout ``state_dict`` looks like (None: none of ours)."""
    keys = state_dict.keys()
    if any(k.startswith("image_encoder.trunk.") for k in keys):
        return "sam2"
    if "image_encoder.patch_embed.proj.weight" in keys:
        return "hq_sam" if any(k.startswith("mask_decoder.hf_") for k in keys) else "sam"
    if "visual.conv1.weight" in keys or "visual.class_embedding" in keys:
        return "clip"
    if "cls_token" in keys and any(k.startswith("blocks.") for k in keys):
        return "dinov2"
    return None


# ----------------------------------------------------------------------------- converters


@dataclass
class Converted:
    """Output of a converter: keys for our backbone, and what was dropped or not understood."""

    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # parts of the official model an encoder does not use
    unknown: list[str] = field(default_factory=list)  # keys the converter does not know: reported as unexpected


def _split(
    state_dict: Mapping[str, torch.Tensor],
    *,
    keep: str,
    drop_prefixes: tuple[str, ...] = (),
    drop_names: tuple[str, ...] = (),
) -> Converted:
    """Keys under ``keep`` become ``encoder.<rest>``; listed other parts are dropped; the rest is unknown."""
    out = Converted()
    for key, value in state_dict.items():
        if key.startswith(keep):
            out.state_dict["encoder." + key[len(keep) :]] = value
        elif key.startswith(drop_prefixes) or key in drop_names:
            out.dropped.append(key)
        else:
            out.unknown.append(key)
    return out


def convert_sam(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Converted:
    """segment_anything ``Sam`` (and HQ-SAM) state dict -> the image encoder."""
    return _split(state_dict, keep="image_encoder.", drop_prefixes=("prompt_encoder.", "mask_decoder."))


# Components of sam2.modeling.sam2_base.SAM2Base outside its image encoder.
_SAM2_OTHER_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "sam_prompt_encoder.",
    "sam_mask_decoder.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "mask_downsample.",
)
_SAM2_OTHER_NAMES = ("maskmem_tpos_enc", "no_mem_embed", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")


def convert_sam2(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Converted:
    """sam2 ``SAM2Base`` state dict (inside ``{"model": ...}``) -> the image encoder (trunk + FPN neck)."""
    return _split(state_dict, keep="image_encoder.", drop_prefixes=_SAM2_OTHER_PREFIXES, drop_names=_SAM2_OTHER_NAMES)


_CLIP_TEXT_PREFIXES = ("transformer.", "token_embedding.", "ln_final.")
_CLIP_TEXT_NAMES = (
    "positional_embedding",
    "text_projection",
    "logit_scale",
    "logit_bias",
    "attn_mask",
    # OpenAI TorchScript archives also carry these as tensors (dropped by open_clip too)
    "input_resolution",
    "context_length",
    "vocab_size",
)


def convert_clip(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Converted:
    """OpenAI / open_clip ``CLIP`` state dict -> the vision tower (``visual.*``)."""
    return _split(state_dict, keep="visual.", drop_prefixes=_CLIP_TEXT_PREFIXES, drop_names=_CLIP_TEXT_NAMES)


def resample_dinov2_pos_embed(
    patch_pos_embed: torch.Tensor, grid: tuple[int, int], *, offset: float, antialias: bool
) -> torch.Tensor:
    """DINOv2's own position-embedding interpolation (``DinoVisionTransformer.interpolate_pos_encoding``).

    Args:
        patch_pos_embed: ``[1, M*M, C]`` (class position removed).
        grid: target ``(rows, cols)``.
        offset: 0.1 for the original models (scale factor ``(n + 0.1) / M``), 0 for the register
            models (explicit output size).
        antialias: False for the original models, True for the register models.

    Returns:
        ``[1, rows*cols, C]``, unchanged when the grid is already ``M x M``.
    """
    n = patch_pos_embed.shape[1]
    m = int(math.isqrt(n))
    if m * m != n:
        raise WeightsError(f"DINOv2 pos_embed has {n} patch positions, not a square grid.")
    if tuple(grid) == (m, m):
        return patch_pos_embed
    dim = patch_pos_embed.shape[-1]
    grid_in = patch_pos_embed.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        kwargs: dict = {"scale_factor": ((grid[0] + offset) / m, (grid[1] + offset) / m)}
    else:
        kwargs = {"size": tuple(grid)}
    out = F.interpolate(grid_in, mode="bicubic", antialias=antialias, **kwargs)
    if tuple(out.shape[-2:]) != tuple(grid):
        raise WeightsError(f"DINOv2 pos_embed resampling gave a {tuple(out.shape[-2:])} grid, expected {tuple(grid)}.")
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim).to(patch_pos_embed.dtype)


def convert_dinov2(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Converted:
    """DINOv2 hub state dict -> timm ``VisionTransformer`` keys (under ``encoder.``).

    - ``mask_token`` (used only by DINOv2's masked training) is dropped;
    - ``pos_embed`` is resampled to the backbone's grid with DINOv2's own interpolation, so the
      backbone at its ``img_size`` reproduces the hub model at that size exactly;
    - register models: ``register_tokens`` -> ``reg_token``; timm adds no position to prefix tokens,
      so the class position is folded into ``cls_token``;
    - ViT-g's fused SwiGLU ``mlp.w12``/``mlp.w3`` -> timm's packed ``mlp.fc1``/``mlp.fc2``.
    """
    out = Converted()
    sd = dict(state_dict)
    if "mask_token" in sd:
        del sd["mask_token"]
        out.dropped.append("mask_token")
    encoder = model.encoder
    registers = "register_tokens" in sd
    if "pos_embed" in sd and "cls_token" in sd:
        pos = sd.pop("pos_embed")
        grid = tuple(encoder.patch_embed.grid_size)
        patch_pos = resample_dinov2_pos_embed(
            pos[:, 1:], grid, offset=0.0 if registers else 0.1, antialias=registers
        )
        if registers:
            sd["reg_token"] = sd.pop("register_tokens")
            sd["cls_token"] = sd["cls_token"] + pos[:, :1]
            sd["pos_embed"] = patch_pos
        else:
            sd["pos_embed"] = torch.cat([pos[:, :1], patch_pos], dim=1)
    for key, value in sd.items():
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", key)
        out.state_dict["encoder." + key] = value
    return out


Converter = Callable[[Mapping[str, torch.Tensor], nn.Module], Converted]
CONVERTERS: Mapping[str, Converter] = MappingProxyType(
    {"sam": convert_sam, "hq_sam": convert_sam, "sam2": convert_sam2, "dinov2": convert_dinov2, "clip": convert_clip}
)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, *, family: str
) -> Converted:
    """Apply the converter of ``family`` (see :data:`CONVERTERS`)."""
    if family not in CONVERTERS:
        raise KeyError(f"No converter for family {family!r}; known: {sorted(CONVERTERS)}.")
    return CONVERTERS[family](state_dict, model)


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def match_state_dict(
    model: nn.Module,
    converted: Converted,
    *,
    source: str,
    family: str,
    looked_like: Optional[str],
) -> None:
    """Raise :class:`KeyMismatchError` unless ``converted`` fits ``model`` key for key and shape."""
    expected = model.state_dict()
    given = converted.state_dict
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(converted.unknown + [k for k in given if k not in expected])
    wrong_shape = sorted(
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in given
        if k in expected and tuple(given[k].shape) != tuple(expected[k].shape)
    )
    if not (missing or unexpected or wrong_shape):
        return
    seen = _FAMILY_NAMES.get(looked_like, "none of the known layouts") if looked_like else "none of the known layouts"
    parts = [
        f"{source} does not fit {type(model).__name__} (expects family {family!r}: {_FAMILY_NAMES[family]}); "
        f"the file looks like {seen}."
    ]
    if missing:
        parts.append(f"Missing keys ({len(missing)}): {_listing(missing)}.")
    if unexpected:
        parts.append(f"Unexpected keys ({len(unexpected)}): {_listing(unexpected)}.")
    if wrong_shape:
        parts.append(f"Wrong shapes ({len(wrong_shape)}, file vs model): {_listing(wrong_shape)}.")
    if looked_like is not None and looked_like != family:
        parts.append(f"These are {looked_like!r} weights: load them into the {looked_like!r} backbone.")
    else:
        parts.append("Check that the weights and the backbone variant match (e.g. sam_vit_l weights need variant='vit_l').")
    raise KeyMismatchError(" ".join(parts))


def load_encoder_weights(
    model: "EncoderBackbone",
    weights: Union[str, os.PathLike],
    *,
    sha256: Optional[str] = None,
) -> "EncoderBackbone":
    """Load official weights into an encoder backbone, strictly, and return it.

    Usable from LazyConfig: ``L(load_encoder_weights)(model=L(SAMBackbone)(variant="vit_b"),
    weights="sam_vit_b")``.

    Args:
        model: an :class:`~samantics_d2.modeling.backbone.EncoderBackbone`; its ``weight_family``
            selects the converter.
        weights: a weight tag, a path, or a file name under ``$SAMANTICS_WEIGHTS``.
        sha256: expected SHA-256; defaults to the tag's published checksum when ``weights`` is a tag.

    Raises:
        FileNotFoundError, ChecksumError, UnsafeCheckpointError, KeyMismatchError, WeightsError.
    """
    family = model.weight_family
    text = os.fspath(weights)
    if text in WEIGHTS and not Path(text).is_file():
        spec = WEIGHTS[text]
        if spec.family != family or spec.variant != getattr(model, "variant", spec.variant):
            raise WeightsError(
                f"Weight tag {text!r} is a {spec.family!r}/{spec.variant!r} checkpoint, but the backbone is "
                f"{type(model).__name__} variant {getattr(model, 'variant', '?')!r} (family {family!r}). "
                "Pick the matching tag or backbone variant."
            )
        if sha256 is None:
            sha256 = spec.sha256
    path = resolve_weights(weights)
    state_dict = read_state_dict(path, sha256=sha256)
    looked_like = guess_family(state_dict)
    converted = convert_state_dict(state_dict, model, family=family)
    match_state_dict(model, converted, source=str(path), family=family, looked_like=looked_like)
    model.load_state_dict(converted.state_dict, strict=True)
    if converted.dropped:
        logger.info(
            "%s: loaded %d tensors into %s; dropped %d keys of parts an encoder does not use (%s)",
            path,
            len(converted.state_dict),
            type(model).__name__,
            len(converted.dropped),
            _listing(sorted({k.split(".")[0] for k in converted.dropped}), limit=20),
        )
    else:
        logger.info("%s: loaded %d tensors into %s", path, len(converted.state_dict), type(model).__name__)
    return model


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order): identifies
    its weights, whether they came from a file or from a seeded random initialisation."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
