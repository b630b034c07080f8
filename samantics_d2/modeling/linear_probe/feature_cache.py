"""Frozen-encoder features of a whole dataset, computed once and stored as float16 shards.

Layout of one cache (``<cache_root>/<dataset_name>/<encoder_tag>-<provenance hash>/``)::

    manifest.json                     provenance, row count, feature sizes, skipped images, shards
    shard_00000.feat_<pooling>.npy    float16 [n, D] per pooling
    shard_00000.labels.npy            int64 [n]
    shard_00000.index.npy             int64 [n]: position of each row in the dataset
    shard_00000.done.json             marker: byte size + SHA-256 of each file above, skipped images

Shard ``s`` holds dataset positions ``[s * shard_size, (s + 1) * shard_size)`` minus unreadable
images; rank ``r`` of ``W`` computes the shards ``s`` with ``s % W == r``. Each file is written
atomically and the marker last, so a shard without a valid marker (partial, truncated, corrupt:
size or checksum mismatch) is recomputed while valid shards are kept: an interrupted run resumes
where it stopped, and a run on a complete cache computes nothing. Images within a shard go through
the encoder in fixed batches, so the bytes of a shard do not depend on when or where it was made
(same machine and software). The provenance (encoder tag, weights hash, preprocessing, pooling
names, dataset name, size and fingerprint, dtype, shard size) names the cache folder, so a change
in any of them gives a new cache instead of silently reusing an old one.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.utils.data as torchdata

from ...d2 import comm
from ...utils.io import atomic_path, sha256_of
from ...utils.image import read_image
from ..weights import module_fingerprint
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, prepare_batch

__all__ = [
    "CACHE_FORMAT_VERSION",
    "NORMALIZATIONS",
    "POOLINGS",
    "FeatureCache",
    "PooledEncoder",
    "build_feature_cache",
    "dataset_fingerprint",
    "feature_cache_dir",
    "module_fingerprint",
    "pool_features",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# name -> what it reads. Two pairs compute the same thing on different encoders; the names are kept
# apart because the paper reports them under these names (and they are recorded in the provenance).
POOLINGS: Mapping[str, str] = {
    "cls": "the encoder's global token (global_feature; DINOv2's CLS token)",
    "embed": "the encoder's projected image embedding (embed_feature if it has one, else global_feature; CLIP)",
    "mean_patch": "mean over the positions of the dense feature map (dense_feature)",
    "neck_mean": "mean over the positions of SAM's neck map (dense_feature)",
}
NORMALIZATIONS = ("encoder", "imagenet")


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}; valid poolings: {', '.join(POOLINGS)}.")


def _pooling_key(encoder: nn.Module, pooling: str) -> str:
    """The name of the encoder output a pooling reads (validated against the encoder's attributes)."""
    _check_pooling(pooling)
    if pooling in ("mean_patch", "neck_mean"):
        attribute = "dense_feature"
    else:
        attribute = "embed_feature" if pooling == "embed" and getattr(encoder, "embed_feature", None) else "global_feature"
    key = getattr(encoder, attribute, None)
    if not key:
        raise ValueError(
            f"Pooling {pooling!r} needs the encoder's {attribute!r} attribute, which {type(encoder).__name__} "
            f"does not set. Use an encoder with that output or another pooling ({', '.join(POOLINGS)})."
        )
    return key


def pool_features(features: Mapping[str, torch.Tensor], key: str, pooling: str) -> torch.Tensor:
    """One pooled vector per image.

    Args:
        features: the encoder's outputs; ``features[key]`` is ``[N, C, h, w]`` (dense, averaged over
            ``h, w``) for ``mean_patch``/``neck_mean`` and ``[N, D]`` for ``cls``/``embed``.
        key: the entry to read (see :class:`PooledEncoder`).
        pooling: one of :data:`POOLINGS`.

    Returns:
        ``[N, D]`` float.
    """
    _check_pooling(pooling)
    if key not in features:
        raise KeyError(f"Pooling {pooling!r} reads encoder output {key!r}, but the encoder returned {sorted(features)}.")
    x = features[key]
    if pooling in ("mean_patch", "neck_mean"):
        if x.ndim != 4:
            raise ValueError(f"Pooling {pooling!r} expects a dense map [N, C, h, w] in {key!r}, got {tuple(x.shape)}.")
        return x.float().mean(dim=(2, 3))
    if x.ndim != 2:
        raise ValueError(f"Pooling {pooling!r} expects a vector [N, D] in {key!r}, got {tuple(x.shape)}.")
    return x.float()


class PooledEncoder(nn.Module):
    """A frozen encoder with its deterministic preprocessing and a set of named poolings.

    The encoder is any module mapping ``x: [N, 3, S, S]`` (normalised float) to a dict of tensors,
    with ``dense_feature`` / ``global_feature`` (optionally ``embed_feature``) attributes naming the
    entries the poolings read (the ``EncoderBackbone`` interface), and ``preprocess``: a
    ``PreprocessSpec`` (or pass ``preprocess``). ``normalization="imagenet"`` replaces the encoder's
    pixel mean/std by ImageNet's (the paper's protocol); ``"encoder"`` keeps the encoder's own.
    ``preprocess_changes`` replaces fields of that spec (e.g. ``{"fit": "resize_square",
    "interpolation": "bilinear"}``: the authors' squashing of SAM inputs); they are part of the cache
    provenance (:meth:`describe`). The encoder's parameters are frozen and it always stays in eval mode.
    ``round_to=torch.float16`` rounds the pooled features as the feature cache stores them.
    """

    def __init__(
        self,
        *,
        encoder: nn.Module,
        poolings: Sequence[str],
        preprocess: Optional[PreprocessSpec] = None,
        normalization: str = "encoder",
        round_to: Optional[torch.dtype] = None,
        preprocess_changes: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        if not poolings:
            raise ValueError(f"PooledEncoder needs at least one pooling; valid poolings: {', '.join(POOLINGS)}.")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={normalization!r}; expected one of {NORMALIZATIONS}.")
        spec = preprocess if preprocess is not None else getattr(encoder, "preprocess", None)
        if not isinstance(spec, PreprocessSpec):
            raise TypeError(
                f"{type(encoder).__name__} has no PreprocessSpec 'preprocess' attribute and none was passed "
                f"(got {spec!r}); pass preprocess=preprocess_spec(<weight tag>)."
            )
        if preprocess_changes:
            fields = {f.name for f in dataclasses.fields(PreprocessSpec)} - {"tag"}
            unknown = sorted(set(preprocess_changes) - fields)
            if unknown:
                raise ValueError(f"preprocess_changes has unknown fields {unknown}; PreprocessSpec fields: {sorted(fields)}.")
            spec = spec.replace(**dict(preprocess_changes))
        if normalization == "imagenet":
            spec = spec.replace(pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD)
        self.encoder = encoder.eval().requires_grad_(False)
        self.poolings = tuple(dict.fromkeys(poolings))
        self.keys = {p: _pooling_key(encoder, p) for p in self.poolings}
        self.spec = spec
        self.normalization = normalization
        self.round_to = round_to

    def train(self, mode: bool = True) -> "PooledEncoder":
        super().train(mode)
        self.encoder.eval()  # frozen: batch-norm statistics and dropout never change
        return self

    def prepare(self, images: Sequence[Union[np.ndarray, torch.Tensor]]) -> torch.Tensor:
        """Fit and normalise images (uint8 RGB ``[H, W, 3]`` arrays or ``[3, H, W]`` tensors) -> ``[N, 3, S, S]``."""
        return prepare_batch(images, self.spec)[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x: [N, 3, S, S]`` -> ``{pooling: [N, D] float32}``."""
        param = next(self.encoder.parameters(), None)
        if param is not None and param.is_floating_point() and x.dtype != param.dtype:
            x = x.to(param.dtype)  # e.g. an encoder kept in bfloat16
        features = self.encoder(x)
        out = {}
        for pooling in self.poolings:
            pooled = pool_features(features, self.keys[pooling], pooling)
            out[pooling] = pooled.to(self.round_to).float() if self.round_to is not None else pooled
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-able description of the preprocessing (part of the cache provenance)."""
        return {**dataclasses.asdict(self.spec), "normalization": self.normalization}


def dataset_fingerprint(dataset: Sequence[dict]) -> str:
    """SHA-256 of the ``file_name`` and ``label`` of every dataset dict, in order."""
    digest = hashlib.sha256()
    for d in dataset:
        digest.update(f"{d['file_name']}\t{int(d['label'])}\n".encode())
    return digest.hexdigest()


def _provenance(
    *, encoder: PooledEncoder, encoder_tag: str, weights_hash: str, dataset: Sequence[dict], dataset_name: str,
    shard_size: int, autocast_dtype: Optional[torch.dtype],
) -> dict[str, Any]:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "encoder_tag": encoder_tag,
        "weights_sha256": weights_hash,
        "preprocess": encoder.describe(),
        "poolings": list(encoder.poolings),
        "dataset_name": dataset_name,
        "dataset_size": len(dataset),
        "dataset_sha256": dataset_fingerprint(dataset),
        "feature_dtype": "float16",
        "compute_dtype": str(autocast_dtype).replace("torch.", "") if autocast_dtype is not None else "float32",
        "shard_size": shard_size,
    }


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def feature_cache_dir(cache_root: str, provenance: Mapping[str, Any]) -> str:
    """``<cache_root>/<dataset_name>/<encoder_tag>-<first 16 hex of SHA-256(provenance)>``."""
    key = hashlib.sha256(_json_bytes(dict(provenance))).hexdigest()[:16]
    safe = lambda s: "".join(c if c.isalnum() or c in "-_.+" else "_" for c in str(s))  # noqa: E731
    return os.path.join(cache_root, safe(provenance["dataset_name"]), f"{safe(provenance['encoder_tag'])}-{key}")


def _shard_prefix(shard: int) -> str:
    return f"shard_{shard:05d}"


def _shard_files(shard: int, poolings: Sequence[str]) -> list[str]:
    prefix = _shard_prefix(shard)
    return [f"{prefix}.feat_{p}.npy" for p in poolings] + [f"{prefix}.labels.npy", f"{prefix}.index.npy"]


def _valid_marker(cache_dir: str, shard: int, start: int, stop: int, poolings: Sequence[str], verify: str) -> Optional[dict]:
    """The shard's marker if the shard is complete and intact, else None (the reason is logged)."""
    marker_path = os.path.join(cache_dir, f"{_shard_prefix(shard)}.done.json")
    if not os.path.exists(marker_path):
        return None
    try:
        with open(marker_path, "rb") as f:
            marker = json.loads(f.read())
    except (OSError, ValueError) as e:
        logger.warning("Shard %d of %s: unreadable marker (%s); recomputing it.", shard, cache_dir, e)
        return None
    expected = _shard_files(shard, poolings)
    if (marker.get("start"), marker.get("stop")) != (start, stop) or sorted(marker.get("files", {})) != sorted(expected):
        logger.warning("Shard %d of %s: marker does not describe this shard layout; recomputing it.", shard, cache_dir)
        return None
    for name, info in marker["files"].items():
        path = os.path.join(cache_dir, name)
        size = os.path.getsize(path) if os.path.exists(path) else -1
        if size != info["bytes"]:
            logger.warning("Shard %d of %s: %s has %d bytes, the marker says %d; recomputing the shard.",
                           shard, cache_dir, name, size, info["bytes"])
            return None
        if verify == "checksum" and sha256_of(path) != info["sha256"]:
            logger.warning("Shard %d of %s: %s fails its SHA-256 check (corrupt); recomputing the shard.",
                           shard, cache_dir, name)
            return None
    return marker


class _ShardImages(torchdata.Dataset):
    """Reads and prepares one image per item; an unreadable image gives its error instead."""

    def __init__(self, dataset: Sequence[dict], positions: Sequence[int], prepare: Callable, reader: Callable):
        self.dataset, self.positions, self.prepare, self.reader = dataset, list(positions), prepare, reader

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[int, Optional[torch.Tensor], Optional[str]]:
        position = self.positions[i]
        file_name = self.dataset[position]["file_name"]
        try:
            image = self.reader(file_name)
        except (OSError, ValueError) as e:  # corrupt or missing image: reported and skipped, not fatal
            return position, None, f"{type(e).__name__}: {e}"
        return position, self.prepare([image])[0], None


def _as_list(batch: list) -> list:
    return batch


def _compute_shard(
    encoder: PooledEncoder, dataset: Sequence[dict], start: int, stop: int, *, batch_size: int, num_workers: int,
    device: torch.device, autocast_dtype: Optional[torch.dtype], reader: Callable,
) -> tuple[dict[str, np.ndarray], np.ndarray, list[dict]]:
    """Pooled float16 features ``{pooling: [n, D]}``, positions ``[n]`` and the skipped images of one shard."""
    images = _ShardImages(dataset, range(start, stop), encoder.prepare, reader)
    loader = torchdata.DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                  collate_fn=_as_list)
    chunks: dict[str, list[np.ndarray]] = {p: [] for p in encoder.poolings}
    positions: list[int] = []
    skipped: list[dict] = []
    for batch in loader:
        good = [(pos, x) for pos, x, err in batch if err is None]
        for pos, _, err in batch:
            if err is not None:
                file_name = dataset[pos]["file_name"]
                logger.warning("Skipping unreadable image %s (dataset position %d): %s", file_name, pos, err)
                skipped.append({"index": pos, "file_name": file_name, "error": err})
        if not good:
            continue
        x = torch.stack([t for _, t in good]).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pooled = encoder(x)
        for p in encoder.poolings:
            chunks[p].append(pooled[p].to(torch.float16).cpu().numpy())
        positions.extend(pos for pos, _ in good)
    features = {p: np.concatenate(c) if c else None for p, c in chunks.items()}
    return features, np.asarray(positions, dtype=np.int64), skipped


def _save_npy(path: str, array: np.ndarray) -> dict[str, Any]:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
    return {"bytes": os.path.getsize(path), "sha256": sha256_of(path)}


def _write_shard(cache_dir: str, shard: int, start: int, stop: int, features: Mapping[str, Optional[np.ndarray]],
                 positions: np.ndarray, labels: np.ndarray, skipped: list[dict], feature_dims: Mapping[str, int]) -> dict:
    prefix = _shard_prefix(shard)
    files = {}
    for p, array in features.items():
        if array is None:  # every image of the shard was unreadable
            array = np.zeros((0, feature_dims.get(p, 0)), dtype=np.float16)
        files[f"{prefix}.feat_{p}.npy"] = _save_npy(os.path.join(cache_dir, f"{prefix}.feat_{p}.npy"), array)
    files[f"{prefix}.labels.npy"] = _save_npy(os.path.join(cache_dir, f"{prefix}.labels.npy"), labels.astype(np.int64))
    files[f"{prefix}.index.npy"] = _save_npy(os.path.join(cache_dir, f"{prefix}.index.npy"), positions)
    marker = {"shard": shard, "start": start, "stop": stop, "count": int(len(positions)), "files": files,
              "feature_dims": {p: int(a.shape[1]) for p, a in features.items() if a is not None}, "skipped": skipped}
    with atomic_path(os.path.join(cache_dir, f"{prefix}.done.json")) as tmp:  # the marker goes last
        with open(tmp, "wb") as f:
            f.write(_json_bytes(marker))
    return marker


def build_feature_cache(
    dataset: Sequence[dict],
    *,
    encoder: PooledEncoder,
    encoder_tag: str,
    dataset_name: str,
    cache_root: str,
    weights_hash: Optional[str] = None,
    shard_size: int = 4096,
    batch_size: int = 64,
    num_workers: int = 0,
    device: Union[str, torch.device] = "cpu",
    autocast_dtype: Optional[torch.dtype] = None,
    verify: str = "checksum",
    image_reader: Callable[[str], np.ndarray] = read_image,
    after_shard: Optional[Callable[[int], None]] = None,
) -> "FeatureCache":
    """Compute (or resume, or reuse) the feature cache of ``dataset`` under ``encoder``.

    Every rank calls this; rank ``r`` computes its shards, rank 0 then writes the manifest.

    Args:
        dataset: dataset dicts with ``file_name`` and ``label``.
        encoder: the frozen encoder, its preprocessing and the poolings to store.
        encoder_tag: the weight tag (e.g. ``"dinov2_vits14"``), recorded in the provenance.
        dataset_name: recorded in the provenance and used in the cache path.
        cache_root: folder holding all caches.
        weights_hash: identifies the weights (e.g. the checkpoint's SHA-256); default
            :func:`module_fingerprint` of the encoder.
        shard_size: dataset positions per shard (the unit of resumption and of work per rank).
        batch_size: images per encoder forward, always within one shard.
        num_workers: data-loader processes that read and prepare images.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the encoder under autocast (recorded).
        verify: ``"checksum"`` (size and SHA-256 of every existing shard file) or ``"size"``.
        image_reader: ``file_name -> [H, W, 3] uint8`` (raising OSError/ValueError when unreadable).
        after_shard: called with the shard id after each shard this rank writes (progress hooks, tests).

    Returns:
        the complete :class:`FeatureCache`.
    """
    if verify not in ("checksum", "size"):
        raise ValueError(f"verify={verify!r}; expected 'checksum' or 'size'.")
    if len(dataset) == 0:
        raise ValueError(f"Dataset {dataset_name!r} is empty: nothing to cache.")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size ({shard_size}) and batch_size ({batch_size}) must be >= 1.")
    device = torch.device(device)
    encoder.to(device)
    if weights_hash is None:
        weights_hash = module_fingerprint(encoder.encoder)
    provenance = _provenance(encoder=encoder, encoder_tag=encoder_tag, weights_hash=weights_hash, dataset=dataset,
                             dataset_name=dataset_name, shard_size=shard_size, autocast_dtype=autocast_dtype)
    cache_dir = feature_cache_dir(cache_root, provenance)
    os.makedirs(cache_dir, exist_ok=True)
    provenance_path = os.path.join(cache_dir, "provenance.json")
    if comm.is_main_process() and not os.path.exists(provenance_path):
        with atomic_path(provenance_path) as tmp:
            with open(tmp, "wb") as f:
                f.write(_json_bytes(provenance))

    rank, world_size = comm.get_rank(), comm.get_world_size()
    num_shards = (len(dataset) + shard_size - 1) // shard_size
    bounds = [(s * shard_size, min(len(dataset), (s + 1) * shard_size)) for s in range(num_shards)]
    mine = [s for s in range(num_shards) if s % world_size == rank]
    todo = [s for s in mine if _valid_marker(cache_dir, s, *bounds[s], encoder.poolings, verify) is None]
    logger.info("Feature cache %s: %d shards, rank %d/%d owns %d, %d to compute.",
                cache_dir, num_shards, rank, world_size, len(mine), len(todo))
    feature_dims: dict[str, int] = {}
    for s in todo:
        start, stop = bounds[s]
        for stale in glob.glob(os.path.join(cache_dir, f".{_shard_prefix(s)}.*.tmp")):
            os.remove(stale)  # left by a process killed while writing this shard
        tic = time.perf_counter()
        features, positions, skipped = _compute_shard(
            encoder, dataset, start, stop, batch_size=batch_size, num_workers=num_workers, device=device,
            autocast_dtype=autocast_dtype, reader=image_reader)
        feature_dims.update({p: a.shape[1] for p, a in features.items() if a is not None})
        labels = np.asarray([int(dataset[i]["label"]) for i in positions], dtype=np.int64)
        _write_shard(cache_dir, s, start, stop, features, positions, labels, skipped, feature_dims)
        elapsed = time.perf_counter() - tic
        logger.info("Shard %d/%d of %s: %d images in %.1f s (%.1f img/s), %d skipped.", s + 1, num_shards,
                    dataset_name, stop - start, elapsed, (stop - start) / max(elapsed, 1e-9), len(skipped))
        if after_shard is not None:
            after_shard(s)

    comm.synchronize()
    if comm.is_main_process():
        _write_manifest(cache_dir, provenance, bounds, encoder.poolings)
    comm.synchronize()
    return FeatureCache(cache_dir)


def _write_manifest(cache_dir: str, provenance: dict, bounds: Sequence[tuple[int, int]], poolings: Sequence[str]) -> None:
    markers = []
    missing = []
    for s, (start, stop) in enumerate(bounds):
        marker = _valid_marker(cache_dir, s, start, stop, poolings, verify="size")
        (markers if marker is not None else missing).append(marker if marker is not None else s)
    if missing:
        raise RuntimeError(
            f"Feature cache {cache_dir}: shards {missing[:10]} are missing or invalid after extraction (another "
            "rank failed?). Run the extraction again: complete shards are kept."
        )
    dims: dict[str, int] = {}
    for m in markers:
        dims.update(m["feature_dims"])
    skipped = [item for m in markers for item in m["skipped"]]
    manifest = {
        "provenance": provenance,
        "num_rows": sum(m["count"] for m in markers),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "feature_dims": {p: dims.get(p) for p in poolings},
        "shards": [{k: m[k] for k in ("shard", "start", "stop", "count", "files")} for m in markers],
    }
    data = _json_bytes(manifest)
    path = os.path.join(cache_dir, MANIFEST)
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    if skipped:
        logger.warning("Feature cache %s: %d unreadable images skipped (listed in %s), first: %s",
                       cache_dir, len(skipped), path, [s["file_name"] for s in skipped[:5]])


class FeatureCache:
    """Read access to a complete feature cache (memory-mapped shards)."""

    def __init__(self, cache_dir: str):
        path = os.path.join(cache_dir, MANIFEST)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path!r} does not exist: {cache_dir!r} is not a complete feature cache. Build it with "
                "build_feature_cache (an interrupted build resumes where it stopped)."
            )
        with open(path, "rb") as f:
            self.manifest: dict[str, Any] = json.loads(f.read())
        self.cache_dir = cache_dir
        self.provenance: dict[str, Any] = self.manifest["provenance"]
        self.poolings: list[str] = list(self.provenance["poolings"])
        self.feature_dims: dict[str, int] = dict(self.manifest["feature_dims"])
        self.num_rows: int = int(self.manifest["num_rows"])
        self.skipped: list[dict] = self.manifest["skipped"]
        counts = [s["count"] for s in self.manifest["shards"]]
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._mmaps: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_rows

    def _shard_array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._mmaps:
            self._mmaps[key] = np.load(os.path.join(self.cache_dir, f"{_shard_prefix(shard)}.{name}.npy"), mmap_mode="r")
        return self._mmaps[key]

    def _concat(self, name: str) -> np.ndarray:
        return np.concatenate([self._shard_array(s["shard"], name) for s in self.manifest["shards"]])

    def labels(self) -> np.ndarray:
        """``[num_rows]`` int64 labels, in row order."""
        return self._concat("labels")

    def positions(self) -> np.ndarray:
        """``[num_rows]`` int64 position of each row in the dataset."""
        return self._concat("index")

    def features(self, pooling: str) -> np.ndarray:
        """``[num_rows, D]`` float16, read into memory."""
        self._check(pooling)
        return self._concat(f"feat_{pooling}")

    def take(self, pooling: str, rows: np.ndarray) -> np.ndarray:
        """``[len(rows), D]`` float16: the given rows, gathered from the memory-mapped shards."""
        self._check(pooling)
        rows = np.asarray(rows, dtype=np.int64)
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.feature_dims[pooling]), dtype=np.float16)
        for i in np.unique(shard_of):
            sel = shard_of == i
            shard = self.manifest["shards"][i]["shard"]
            out[sel] = self._shard_array(shard, f"feat_{pooling}")[rows[sel] - self._offsets[i]]
        return out

    def _check(self, pooling: str) -> None:
        if pooling not in self.poolings:
            raise KeyError(f"Feature cache {self.cache_dir} has poolings {self.poolings}, not {pooling!r}.")
