"""The one store of cached reference features: safetensors tensors + a JSON provenance sidecar.

A stored file ``<name>.safetensors`` holds named tensors (no pickles); its header holds, as JSON
under :data:`HEADER_KEY`, the format version, the class names, one record per row (annotation id,
file, rank...) and the **provenance**: what the features were computed from. The same metadata is
written beside it, readable, as ``<name>.json``. Both are written atomically
(:func:`~samantics_d2.utils.io.atomic_path`): an interrupted run leaves the old pair or the new one.

Provenance keys (:func:`reference_provenance` builds them; consumers add their own options):
``kind`` (``"memory_bank"``, ``"reference_tokens"``...), ``format_version``, ``code_version``,
``ordering`` (:data:`~samantics_d2.references.ordering.ORDERING`), ``reference_set`` (source,
class names, count, annotation ids, class ids, shot ranks, SHA-256 of the content), ``encoder``
(class, variant, size, weights fingerprint) and ``options`` (pooling / crop / preprocessing of the
consumer). :func:`load_or_build_features` reuses a file only when its provenance equals the
expected one exactly, so a resumed run never reuses features whose inputs changed.

Default location: ``cache_root()/references/<kind>/<name>-<provenance hash>.safetensors`` (one file
per distinct provenance, so switching encoders back and forth rebuilds nothing).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..d2 import comm
from ..utils.io import atomic_path, cache_root
from ..version import __version__
from .ordering import ORDERING, ReferenceInstance, json_normalised, references_digest

__all__ = [
    "HEADER_KEY",
    "STORE_FORMAT",
    "StoredFeatures",
    "default_store_path",
    "load_features",
    "load_or_build_features",
    "provenance_source",
    "reference_provenance",
    "save_features",
]

logger = logging.getLogger(__name__)

STORE_FORMAT = 1
HEADER_KEY = "samantics_d2.references"
_LEGACY_TOKENS_KEY = "samantics_d2.reference_tokens"  # files of tools/ref_sam_embeds.py before the store


@dataclass
class StoredFeatures:
    """What a store file holds.

    Attributes:
        tensors: named CPU tensors (row ``i`` of each belongs to ``records[i]`` where rows are references).
        provenance: what they were computed from (module docstring).
        class_names: names of the contiguous class ids (None when the consumer stores only their number).
        records: one JSON-able dict per reference row.
    """

    tensors: dict[str, torch.Tensor]
    provenance: dict[str, Any]
    class_names: Optional[list[str]] = None
    records: list[dict] = field(default_factory=list)


def _code_version() -> str:
    return f"samantics_d2-{__version__}/references-{STORE_FORMAT}"


def reference_provenance(
    *,
    kind: str,
    source: str,
    num_classes: int,
    class_names: Optional[Sequence[str]],
    items: Sequence[ReferenceInstance],
    encoder: dict[str, Any],
    options: dict[str, Any],
) -> dict[str, Any]:
    """The provenance of features of ``items`` (ordered by :func:`order_references`), JSON-normalised.

    Args:
        kind: what the features are (``"memory_bank"``, ``"reference_tokens"``).
        source: the reference set (registered name, json path, or a description).
        num_classes, class_names: the reference classes (their names None when the consumer has only ids).
        encoder: the encoder and its weights (``class``, ``variant``, ``size``, ``weights``...).
        options: the consumer's settings that change the features (crop, pooling, preprocessing...).
    """
    return json_normalised({
        "kind": kind,
        "format_version": STORE_FORMAT,
        "code_version": _code_version(),
        "ordering": ORDERING,
        "reference_set": {
            "source": source,
            "num_classes": num_classes,
            "class_names": list(class_names) if class_names is not None else None,
            "count": len(items),
            "annotation_ids": [r.annotation_id for r in items],
            "file_names": [r.file_name for r in items],
            "class_ids": [r.class_id for r in items],
            "shot_ranks": [r.shot_rank for r in items],
            "sha256": references_digest(items),
        },
        "encoder": encoder,
        "options": options,
    })


def provenance_source(provenance: dict[str, Any]) -> Optional[str]:
    """The reference set a provenance names (files written before the store: its top-level ``source``)."""
    reference_set = provenance.get("reference_set")
    if isinstance(reference_set, dict) and "source" in reference_set:
        return reference_set["source"]
    return provenance.get("source")


def _provenance_hash(provenance: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(provenance, sort_keys=True).encode("utf-8")).hexdigest()


def default_store_path(provenance: dict[str, Any], *, name: str) -> str:
    """``cache_root()/references/<kind>/<name>-<hash of provenance>.safetensors``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "references"
    kind = provenance.get("kind", "features")
    name = f"{safe[:80]}-{_provenance_hash(provenance)[:16]}.safetensors"
    return os.path.join(cache_root(), "references", kind, name)


def _sidecar(path: Path) -> Path:
    if path.suffix == ".json":
        raise ValueError(
            f"Reference features path {str(path)!r} ends in .json; use a .safetensors name (the .json beside it "
            "holds the provenance)."
        )
    return path.with_suffix(".json")


def save_features(path: Union[str, os.PathLike], stored: StoredFeatures) -> None:
    """Write ``path`` (safetensors, the metadata as JSON in its header) and its ``.json`` sidecar, each atomically."""
    path = Path(path)
    sidecar = _sidecar(path)
    metadata = {
        "format": STORE_FORMAT,
        "provenance": stored.provenance,
        "class_names": stored.class_names,
        "records": stored.records,
    }
    data = safetensors_bytes(
        {name: t.detach().cpu().contiguous() for name, t in stored.tensors.items()},
        metadata={HEADER_KEY: json.dumps(metadata, sort_keys=True)},
    )
    with atomic_path(str(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    with atomic_path(str(sidecar)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(metadata, indent=1, sort_keys=True) + "\n")


def load_features(path: Union[str, os.PathLike]) -> StoredFeatures:
    """Read a file written by :func:`save_features` (tensors on the CPU).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a store file (or was cut short); the message says so.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No reference features at {str(path)!r}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if HEADER_KEY in header:
            metadata = json.loads(header[HEADER_KEY])
            if metadata.get("format") != STORE_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}, expected {STORE_FORMAT}")
            class_names = metadata["class_names"]
            return StoredFeatures(
                tensors=tensors,
                provenance=dict(metadata["provenance"]),
                class_names=list(class_names) if class_names is not None else None,
                records=list(metadata["records"]),
            )
        metadata = json.loads(header[_LEGACY_TOKENS_KEY])  # compatibility: token files written before the store
        if metadata.get("format") != 1:
            raise ValueError(f"format {metadata.get('format')!r}, expected 1")
        return StoredFeatures(
            tensors=tensors,
            provenance={"kind": "reference_tokens", **dict(metadata["provenance"])},
            class_names=list(metadata["class_names"]),
            records=list(metadata["references"]),
        )
    except (SafetensorError, KeyError, TypeError, ValueError) as e:  # not our file, or cut short
        raise ValueError(
            f"{str(path)!r} is not a reference-features file of samantics_d2.references ({type(e).__name__}: {e}). "
            "Delete it to compute the features again."
        ) from e


def _load_matching(path: Path, expected: dict[str, Any], what: str) -> Optional[StoredFeatures]:
    """The stored features at ``path`` when their provenance equals ``expected``; else None (logged)."""
    if not path.exists():
        logger.info("No %s at %s yet: computing it.", what, path)
        return None
    try:
        stored = load_features(path)
    except ValueError as e:
        logger.warning("Recomputing %s %s: %s", what, path, e)
        return None
    if stored.provenance == expected:
        logger.info("Loaded %s %s (%d references).", what, path, len(stored.records))
        return stored
    keys = set(expected) | set(stored.provenance)
    changed = sorted(k for k in keys if expected.get(k) != stored.provenance.get(k))
    logger.info("Recomputing %s %s: changed %s.", what, path, ", ".join(changed))
    return None


def load_or_build_features(
    path: Union[str, os.PathLike],
    *,
    provenance: dict[str, Any],
    build: Callable[[], StoredFeatures],
    what: str = "reference features",
) -> StoredFeatures:
    """The features stored at ``path`` when their provenance equals ``provenance``; otherwise
    ``build()`` them (logging what changed) and store them there.

    In a distributed run the main process loads or builds first; the others then load its file.
    """
    path = Path(path)
    expected = json_normalised(provenance)
    stored: Optional[StoredFeatures] = None
    if comm.is_main_process():
        stored = _load_matching(path, expected, what)
        if stored is None:
            stored = build()
            stored.provenance = expected
            save_features(path, stored)
    comm.synchronize()
    if stored is None:
        stored = _load_matching(path, expected, what)
        if stored is None:
            raise RuntimeError(f"{path}: the main process stored no {what} with the expected provenance.")
    return stored
