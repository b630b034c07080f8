"""Atomic file writes, file checksums, reading user JSON and diagnosing unreadable checkpoints, the cache folder."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import uuid
import zipfile
from contextlib import contextmanager
from typing import Any, Iterator, Union

__all__ = ["CACHE_ENV", "atomic_path", "cache_root", "checkpoint_read_error", "read_json", "sha256_of"]

CACHE_ENV = "SAMANTICS_CACHE"



def sha256_of(path: Union[str, os.PathLike], *, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    An interrupted writer leaves either the old file or the new one, never half a file; the
    temporary file is removed when the block raises.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A unique name the writer creates itself, so the file gets the usual permissions (umask).
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def cache_root() -> str:
    """``$SAMANTICS_CACHE`` (unset or empty: ``~/.cache/samantics_d2``), read at each call: generated
    datasets, reference sets, feature caches, memory banks. The one place that resolves it."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "samantics_d2"))


def read_json(path: Union[str, os.PathLike], *, what: str = "a JSON file") -> Any:
    """The parsed content of the JSON file ``path`` (a file given by the user: references, annotations...).

    Raises:
        FileNotFoundError: ``path`` does not exist (naming it and ``what`` was expected there).
        ValueError: the file is not UTF-8 JSON; the message names the file, the line and column of
            the first error, and ``what`` was expected.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; expected {what} there. Check the path.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        size = os.path.getsize(path)
        where = "the file is empty" if size == 0 else f"line {e.lineno}, column {e.colno}: {e.msg}"
        raise ValueError(
            f"{path}: not a JSON file ({where}); expected {what}. Fix or regenerate the file "
            f"(`python -m json.tool {path}` shows the first error)."
        ) from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); expected {what} (JSON, UTF-8).") from e


_ZIP_MAGIC = b"PK\x03\x04"
_EXPECTED_CHECKPOINT = (
    "expected a file written by torch.save (a zip archive, or a legacy pickle starting with byte 0x80) "
    "or a .safetensors file"
)


def _reason(error: BaseException) -> str:
    """The informative part of a loading error (torch's weights-only errors wrap it in advice that
    does not apply to a damaged file)."""
    for line in str(error).splitlines():
        line = line.split("WeightsUnpickler error:")[-1].strip()
        if line and not any(s in line for s in ("weights_only", "Check the documentation", "Please file an issue")):
            return f"{type(error).__name__}: {line[:200]}"
    return type(error).__name__


def _pickle_globals(path: str) -> list[str]:
    """The classes and functions a plain (non-zip) pickle file names, read without executing it;
    empty for anything that is not one complete pickle."""
    if zipfile.is_zipfile(path):
        return []
    names: list[str] = []
    strings: list[str] = []
    with open(path, "rb") as f:
        head = f.read(64 << 20)  # in memory: a damaged length field must not make a read allocate it
    if head[:1] != b"\x80":
        return []
    try:
        for opcode, arg, _ in pickletools.genops(io.BytesIO(head)):
            if opcode.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except ValueError:  # truncated or not a pickle: genops stops on the first bad byte
        return []
    return names


def checkpoint_read_error(path: Union[str, os.PathLike], error: BaseException) -> tuple[str, bool]:
    """Why ``torch.load(path, weights_only=True)`` failed with ``error``, in words for the user.

    Returns:
        ``(message, refers_to_code)``. ``refers_to_code`` is True only when the file is a readable
        pickle that names Python classes or functions (weights-only loading refuses those);
        otherwise the file is empty, truncated or corrupt, and the message says so with its size
        and what a checkpoint file looks like.
    """
    path = os.fspath(path)
    text = str(error)
    names = _pickle_globals(path) if isinstance(error, pickle.UnpicklingError) else []
    if names or (isinstance(error, pickle.UnpicklingError) and any(
        marker in text for marker in ("Unsupported global", "GLOBAL ", "unrecognized function", "Unsupported class")
    )):
        detail = next((line for line in text.splitlines() if "GLOBAL" in line), "")
        detail = detail.split("WeightsUnpickler error:")[-1].split(" was not")[0].strip()
        detail = detail or f"it names {', '.join(names[:3])}"
        return (
            f"{path} holds Python objects, not only tensors: it refers to code that weights_only loading refuses "
            f"(nothing was executed; {detail}).",
            True,
        )
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"{path} cannot be read ({e}).", False
    if size == 0:
        state = "is empty (0 bytes)"
    elif head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        state = (
            f"is truncated or corrupt ({size} bytes): it starts like a torch.save zip archive but its end "
            "(the zip central directory) is missing, as when a copy or download stopped early"
        )
    elif head[:1] != b"\x80" and not head.startswith(_ZIP_MAGIC):
        state = f"is truncated or corrupt, or not a checkpoint at all ({size} bytes, starting with {head!r})"
    else:
        state = f"is truncated or corrupt ({size} bytes; reading it failed: {_reason(error)})"
    return f"{path} {state}; {_EXPECTED_CHECKPOINT}. Copy or download it again.", False
