"""Official encoder weights: named tags, safe reading, one converter per family, strict loading.

A weight tag (``"sam_vit_b"``, ``"dinov2_vitl14_reg"``, ...) names an official checkpoint file as it
is published; :data:`WEIGHTS` (the tags of :mod:`samantics_d2.modeling.catalog`) gives its file
name, the page it is published at, its SHA-256 when known, and the architecture it belongs to. Nothing is ever downloaded: a tag resolves to
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

Converting: each family's :class:`~samantics_d2.modeling.catalog.CheckpointLayout` splits an
official state dict, in one pass (:func:`split_checkpoint`), into the image encoder's keys (ours:
``encoder.<upstream key>``, adjusted by the family's ``transform`` where renaming is not enough),
the prompt decoder's keys, and parts neither uses (text tower, video memory, ...), which are dropped
by name and logged. Every other difference fails: missing, unexpected and wrongly-shaped keys are
listed with the file and the family the file looked like.

Loading: :func:`load_official_weights` reads a checkpoint once and loads both the encoder and the
prompt decoder from that read. :func:`load_encoder_weights` keeps the decoder's part of the read
with the backbone, so that :func:`load_prompt_decoder_weights` of the same file for that backbone
(``build_prompt_decoder(backbone, weights=tag)``) does not read the file again.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import logging
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union
from weakref import WeakKeyDictionary

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.io import checkpoint_read_error, sha256_of
from .catalog import FAMILIES, WEIGHTS, FamilyView, WeightSpec, default_tag, get_family, get_weight_spec  # noqa: F401
from .catalog import resolve as _resolve

__all__ = [
    "WEIGHTS_ENV",
    "WEIGHTS",
    "CONVERTERS",
    "ChecksumError",
    "KeyMismatchError",
    "UnsafeCheckpointError",
    "WeightSpec",
    "WeightsError",
    "convert_prompt_decoder_state_dict",
    "convert_state_dict",
    "get_weight_spec",
    "guess_family",
    "load_encoder_weights",
    "load_official_weights",
    "load_prompt_decoder_weights",
    "match_state_dict",
    "module_fingerprint",
    "read_state_dict",
    "resolve_weights",
    "sha256_of",
    "split_checkpoint",
]

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "SAMANTICS_WEIGHTS"


class WeightsError(ValueError):
    """A weight file cannot be used; the message names the file and what to do."""


class ChecksumError(WeightsError):
    """The file's SHA-256 is not the published one."""


class UnsafeCheckpointError(WeightsError):
    """The file would execute code when loaded; it was refused, nothing was executed."""


class KeyMismatchError(WeightsError):
    """The converted state dict does not match the backbone's parameters and buffers."""


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
    """Which official layout ``state_dict`` looks like (None: none of the catalog's families)."""
    keys = state_dict.keys()
    for spec in sorted(FAMILIES.values(), key=lambda f: f.guess_order):
        if spec.signature(keys):
            return spec.name
    return None


# ----------------------------------------------------------------------------- converters


@dataclass
class Converted:
    """Output of a converter: keys for our module, and what was dropped or not understood."""

    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # parts of the official model the module does not use
    unknown: list[str] = field(default_factory=list)  # keys the converter does not know: reported as unexpected


@dataclass
class CheckpointParts:
    """An official state dict split by its family's layout (:func:`split_checkpoint`)."""

    encoder: dict[str, torch.Tensor] = field(default_factory=dict)  # upstream encoder keys, prefix removed
    decoder: dict[str, torch.Tensor] = field(default_factory=dict)  # our prompt-decoder keys
    encoder_keys: list[str] = field(default_factory=list)  # official keys of the encoder part
    decoder_keys: list[str] = field(default_factory=list)  # official keys of the decoder part
    other: list[str] = field(default_factory=list)  # parts neither uses
    unknown: list[str] = field(default_factory=list)


def split_checkpoint(state_dict: Mapping[str, torch.Tensor], family: str) -> CheckpointParts:
    """Split an official state dict of ``family`` into encoder, prompt-decoder and other keys, in one pass."""
    layout = get_family(family).layout
    parts = CheckpointParts()
    for key, value in state_dict.items():
        decoder_prefix = next((p for p in layout.decoder_prefixes if key.startswith(p)), None)
        if key in layout.decoder_names:
            parts.decoder[key] = value
            parts.decoder_keys.append(key)
        elif decoder_prefix is not None:
            parts.decoder[layout.decoder_prefixes[decoder_prefix] + key[len(decoder_prefix) :]] = value
            parts.decoder_keys.append(key)
        elif key.startswith(layout.other_prefixes) or key in layout.other_names:
            parts.other.append(key)
        elif key.startswith(layout.encoder_prefix):
            parts.encoder[key[len(layout.encoder_prefix) :]] = value
            parts.encoder_keys.append(key)
        else:
            parts.unknown.append(key)
    return parts


def _encoder_part(parts: CheckpointParts, model: nn.Module, family: str) -> Converted:
    transform = _resolve(get_family(family).transform)
    tensors = transform(dict(parts.encoder), model) if transform is not None else parts.encoder
    return Converted(
        {"encoder." + key: value for key, value in tensors.items()},
        dropped=parts.decoder_keys + parts.other,
        unknown=list(parts.unknown),
    )


def _decoder_part(parts: CheckpointParts, family: str) -> Converted:
    return Converted(dict(parts.decoder), dropped=parts.encoder_keys + parts.other, unknown=list(parts.unknown))


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, *, family: str) -> Converted:
    """Official state dict of ``family`` -> the image encoder's keys (``encoder.*``) of ``model``."""
    if family not in FAMILIES:
        raise KeyError(f"No converter for family {family!r}; known: {sorted(FAMILIES)}.")
    return _encoder_part(split_checkpoint(state_dict, family), model, family)


def _check_decoder_family(family: str) -> None:
    if family not in FAMILIES or FAMILIES[family].prompt_decoder is None:
        known = sorted(name for name, spec in FAMILIES.items() if spec.prompt_decoder is not None)
        raise KeyError(f"No prompt-decoder converter for family {family!r}; known: {known}.")


def convert_prompt_decoder_state_dict(state_dict: Mapping[str, torch.Tensor], *, family: str) -> Converted:
    """Official checkpoint keys -> our prompt decoder's keys (``prompt_encoder.*``, ``mask_decoder.*``,
    ``no_mem_embed``); image-encoder and video parts are dropped by name, the rest is unknown."""
    _check_decoder_family(family)
    return _decoder_part(split_checkpoint(state_dict, family), family)


Converter = Callable[[Mapping[str, torch.Tensor], nn.Module], Converted]
#: family -> its encoder converter ``(official state dict, backbone) -> Converted`` (live view of the catalog).
CONVERTERS: Mapping[str, Converter] = FamilyView("layout", lambda spec: functools.partial(convert_state_dict, family=spec.name))


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


def adapt_dinov2_keys(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """DINOv2 hub tensors -> timm ``VisionTransformer`` keys (the family's catalog ``transform``).

    - ``pos_embed`` is resampled to the backbone's grid with DINOv2's own interpolation, so the
      backbone at its ``img_size`` reproduces the hub model at that size exactly;
    - register models: ``register_tokens`` -> ``reg_token``; timm adds no position to prefix tokens,
      so the class position is folded into ``cls_token``;
    - ViT-g's fused SwiGLU ``mlp.w12``/``mlp.w3`` -> timm's packed ``mlp.fc1``/``mlp.fc2``.
    (``mask_token``, used only by DINOv2's masked training, is dropped by the family's layout.)
    """
    sd = tensors
    registers = "register_tokens" in sd
    if "pos_embed" in sd and "cls_token" in sd:
        pos = sd.pop("pos_embed")
        grid = tuple(model.encoder.patch_embed.grid_size)
        patch_pos = resample_dinov2_pos_embed(
            pos[:, 1:], grid, offset=0.0 if registers else 0.1, antialias=registers
        )
        if registers:
            sd["reg_token"] = sd.pop("register_tokens")
            sd["cls_token"] = sd["cls_token"] + pos[:, :1]
            sd["pos_embed"] = patch_pos
        else:
            sd["pos_embed"] = torch.cat([pos[:, :1], patch_pos], dim=1)
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", key)
        key = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", key)
        out[key] = value
    return out


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
    seen = FAMILIES[looked_like].description if looked_like in FAMILIES else "none of the known layouts"
    parts = [
        f"{source} does not fit {type(model).__name__} (expects family {family!r}: {get_family(family).description}); "
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


# ----------------------------------------------------------------------------- loading


@dataclass
class _Read:
    """One read of an official checkpoint, split by its family's layout."""

    path: Path
    stat: tuple[int, int]  # (size, mtime_ns): the same file when the part is reused
    sha256: Optional[str]  # the checksum verified at the read, if any
    family: str
    parts: CheckpointParts
    looked_like: Optional[str]


# backbone -> the prompt-decoder part of the checkpoint it was loaded from (consumed by the decoder's load)
_DECODER_PARTS: "WeakKeyDictionary[nn.Module, _Read]" = WeakKeyDictionary()


def _file_stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _check_tag(
    weights: Union[str, os.PathLike], module: nn.Module, role: str, family: str, sha256: Optional[str]
) -> Optional[str]:
    """For a weight tag: refuse a checkpoint of another family/variant than ``module``'s (the
    ``"encoder"`` or the ``"decoder"``) before any file lookup, and default ``sha256`` to the
    published checksum."""
    text = os.fspath(weights)
    if text not in WEIGHTS or Path(text).is_file():
        return sha256
    spec = WEIGHTS[text]
    variant = getattr(module, "variant", None)
    if spec.family != family or (variant is not None and spec.variant != variant):
        name = type(module).__name__
        if role == "decoder":
            what = f"the decoder is {name} for variant {variant!r} (family {family!r}). Load the same checkpoint as "
            hint = "the backbone's, or build the decoder for that backbone (build_prompt_decoder)."
        else:
            shown = "?" if variant is None else variant
            what = f"the backbone is {name} variant {shown!r} (family {family!r}). "
            hint = "Pick the matching tag or backbone variant."
        raise WeightsError(f"Weight tag {text!r} is a {spec.family!r}/{spec.variant!r} checkpoint, but {what}{hint}")
    return sha256 if sha256 is not None else spec.sha256


def _load_part(module: nn.Module, converted: Converted, read: _Read) -> None:
    """Strict load of one converted part, with the mismatch message of :func:`match_state_dict`."""
    match_state_dict(module, converted, source=str(read.path), family=read.family, looked_like=read.looked_like)
    module.load_state_dict(converted.state_dict, strict=True)


def load_official_weights(
    weights: Union[str, os.PathLike],
    *,
    encoder: Optional[nn.Module] = None,
    decoder: Optional[nn.Module] = None,
    sha256: Optional[str] = None,
    read_with: Optional[nn.Module] = None,
) -> None:
    """Load an official checkpoint into an image encoder and/or its prompt decoder, strictly, from
    ONE read of the file.

    Args:
        weights: a weight tag, a path, or a file name under ``$SAMANTICS_WEIGHTS``.
        encoder: an :class:`~samantics_d2.modeling.backbone.EncoderBackbone`; its ``weight_family``
            selects the family's layout and converter.
        decoder: a :class:`~samantics_d2.modeling.proposals.PromptDecoder` of the same family.
        sha256: expected SHA-256; defaults to the tag's published checksum when ``weights`` is a tag.
        read_with: a backbone loaded from the same file by :func:`load_encoder_weights`: the
            decoder's part of that read is used instead of reading the file again.

    Raises:
        FileNotFoundError, ChecksumError, UnsafeCheckpointError, KeyMismatchError (missing,
        unexpected and wrongly-shaped keys listed, with the file and the family it looks like),
        WeightsError.
    """
    modules = [m for m in (encoder, decoder) if m is not None]
    if not modules:
        raise ValueError("load_official_weights needs an encoder, a decoder or both.")
    family = modules[0].weight_family
    if any(m.weight_family != family for m in modules):
        raise WeightsError(
            f"load_official_weights got {type(encoder).__name__} (family {encoder.weight_family!r}) and "
            f"{type(decoder).__name__} (family {decoder.weight_family!r}); one checkpoint holds one family."
        )
    if decoder is not None:
        _check_decoder_family(family)
    for module, role in ((encoder, "encoder"), (decoder, "decoder")):
        if module is not None:
            sha256 = _check_tag(weights, module, role, family, sha256)
    path = resolve_weights(weights)
    read = _DECODER_PARTS.get(read_with) if (read_with is not None and encoder is None) else None
    reusable = (
        read is not None
        and read.family == family
        and read.path.resolve() == path.resolve()
        and read.stat == _file_stat(path)
        and (sha256 is None or (read.sha256 or "").lower() == sha256.lower())
    )
    if reusable:
        del _DECODER_PARTS[read_with]
        logger.info("%s: the prompt decoder's part was read with %s; not reading the file again", path, type(read_with).__name__)
    else:
        state_dict = read_state_dict(path, sha256=sha256)
        read = _Read(path, _file_stat(path), sha256, family, split_checkpoint(state_dict, family), guess_family(state_dict))
        del state_dict
    if encoder is not None:
        converted = _encoder_part(read.parts, encoder, family)
        _load_part(encoder, converted, read)
        if converted.dropped:
            logger.info(
                "%s: loaded %d tensors into %s; dropped %d keys of parts an encoder does not use (%s)",
                path,
                len(converted.state_dict),
                type(encoder).__name__,
                len(converted.dropped),
                _listing(sorted({k.split(".")[0] for k in converted.dropped}), limit=20),
            )
        else:
            logger.info("%s: loaded %d tensors into %s", path, len(converted.state_dict), type(encoder).__name__)
        if decoder is None and read.parts.decoder:
            read.parts.encoder = {}  # the decoder's part only is kept, until the decoder takes it
            _DECODER_PARTS[encoder] = read
    if decoder is not None:
        converted = _decoder_part(read.parts, family)
        _load_part(decoder, converted, read)
        logger.info(
            "%s: loaded %d tensors into %s (dropped %d keys of the image encoder and other parts)",
            path,
            len(converted.state_dict),
            type(decoder).__name__,
            len(converted.dropped),
        )


def load_encoder_weights(
    model: nn.Module,
    weights: Union[str, os.PathLike],
    *,
    sha256: Optional[str] = None,
) -> nn.Module:
    """Load official weights into an encoder backbone, strictly, and return it.

    Usable from LazyConfig: ``L(load_encoder_weights)(model=L(SAMBackbone)(variant="vit_b"),
    weights="sam_vit_b")``. The prompt decoder's part of the file (SAM families) stays with the
    backbone until ``load_prompt_decoder_weights(decoder, weights, read_with=model)`` takes it.

    Args:
        model: an :class:`~samantics_d2.modeling.backbone.EncoderBackbone`; its ``weight_family``
            selects the converter.
        weights: a weight tag, a path, or a file name under ``$SAMANTICS_WEIGHTS``.
        sha256: expected SHA-256; defaults to the tag's published checksum when ``weights`` is a tag.

    Raises:
        FileNotFoundError, ChecksumError, UnsafeCheckpointError, KeyMismatchError, WeightsError.
    """
    load_official_weights(weights, encoder=model, sha256=sha256)
    return model


def load_prompt_decoder_weights(
    decoder: nn.Module,
    weights: Union[str, os.PathLike],
    *,
    sha256: Optional[str] = None,
    read_with: Optional[nn.Module] = None,
) -> nn.Module:
    """Load the prompt-encoder / mask-decoder part of an official checkpoint, strictly.

    Args:
        decoder: a :class:`~samantics_d2.modeling.proposals.PromptDecoder`; its ``weight_family``
            selects the key mapping.
        weights: a weight tag (``"sam_vit_b"``, ``"sam2.1_hiera_l"``...), a path, or a file name
            under ``$SAMANTICS_WEIGHTS``; the same file as the backbone's.
        sha256: expected SHA-256; defaults to the tag's published checksum when ``weights`` is a tag.
        read_with: the backbone loaded from the same file (its read is reused, see
            :func:`load_official_weights`).

    Raises:
        FileNotFoundError, ChecksumError, UnsafeCheckpointError, KeyMismatchError, WeightsError.
    """
    load_official_weights(weights, decoder=decoder, sha256=sha256, read_with=read_with)
    return decoder


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order): identifies
    its weights, whether they came from a file or from a seeded random initialisation."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
