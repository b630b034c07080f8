"""Feature cache: contents, reuse, resumption after a kill, corrupt shards, unreadable images, ranks.

A tiny random conv encoder on colour-coded images (a few dozen PNGs of 12-40 px), so every build
takes well under a second. ``TinyEncoder`` and ``write_color_dataset`` are also used by
``test_linear_probe.py``.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from samantics_d2.d2 import comm
from samantics_d2.data.io import read_image
from samantics_d2.modeling.linear_probe import PooledEncoder, build_feature_cache, feature_cache_dir
from samantics_d2.modeling.linear_probe import feature_cache as feature_cache_module
from samantics_d2.modeling.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)

# Class c is drawn around COLOURS[c]; the classes are far apart in colour, so linearly separable.
COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220], [230, 220, 40], [200, 40, 210], [40, 210, 210]])


class TinyEncoder(nn.Module):
    """Two random convolutions: ``dense`` [N, 16, S/8, S/8] and ``global`` [N, 12], seeded."""

    dense_feature = "dense"
    global_feature = "global"
    preprocess = PreprocessSpec("tiny_test", 32, IMAGENET_MEAN, IMAGENET_STD, 8, "resize_square")

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.proj = nn.Linear(16, 12)
        self.forward_calls = 0

    def forward(self, x):
        self.forward_calls += 1
        dense = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return {"dense": dense, "global": self.proj(dense.mean(dim=(2, 3)))}


def write_color_dataset(folder, *, images_per_class, num_classes=4, seed=0, class_folders=False):
    """Colour-coded PNGs of random size (12-40 px) with noise; returns dataset dicts (file_name, label).

    With ``class_folders`` the images go to ``folder/class<label>/`` (an image-folder dataset).
    """
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    dicts = []
    for i in range(images_per_class * num_classes):
        label = i % num_classes
        h, w = rng.integers(12, 41, size=2)
        image = COLOURS[label] + rng.normal(0, 25, size=(h, w, 3)) + rng.uniform(-30, 30)
        path = os.path.join(folder, f"class{label}" if class_folders else "", f"{i:04d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        dicts.append({"file_name": path, "image_id": i, "label": label})
    return dicts


def build(dataset, cache_root, **kwargs):
    encoder = kwargs.pop("encoder", None) or PooledEncoder(encoder=TinyEncoder(), poolings=["cls", "mean_patch"])
    options = dict(encoder=encoder, encoder_tag="tiny_test", dataset_name="colors", cache_root=str(cache_root),
                   shard_size=8, batch_size=3)
    options.update(kwargs)
    return build_feature_cache(dataset, **options)


def snapshot(directory):
    """{file name: bytes} of every file of a cache folder (hidden temporary files included)."""
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_color_dataset(str(tmp_path_factory.mktemp("images")), images_per_class=7)  # 28 images: 4 shards


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted build: (cache, snapshot of its files)."""
    cache = build(dataset, tmp_path_factory.mktemp("reference"))
    return cache, snapshot(cache.cache_dir)


def test_cache_holds_pooled_fp16_features_labels_and_provenance(dataset, reference):
    cache, files = reference
    assert len(cache) == len(dataset) and cache.manifest["num_skipped"] == 0
    assert sorted(n for n in files if n.endswith(".done.json")) == [f"shard_{i:05d}.done.json" for i in range(4)]
    np.testing.assert_array_equal(cache.labels(), [d["label"] for d in dataset])
    np.testing.assert_array_equal(cache.positions(), np.arange(len(dataset)))
    # Features are what the encoder gives image by image, rounded to float16.
    encoder = PooledEncoder(encoder=TinyEncoder(), poolings=["cls", "mean_patch"])
    for i in (0, 13, 27):
        direct = encoder(encoder.prepare([read_image(dataset[i]["file_name"])]))
        for pooling, dim in (("cls", 12), ("mean_patch", 16)):
            stored = cache.features(pooling)
            assert stored.dtype == np.float16 and stored.shape == (len(dataset), dim)
            np.testing.assert_allclose(stored[i].astype(np.float32), direct[pooling][0].numpy(), rtol=2e-3, atol=1e-4)
            np.testing.assert_array_equal(cache.take(pooling, [27, i, 3]), stored[[27, i, 3]])
    prov = cache.provenance
    assert prov["encoder_tag"] == "tiny_test" and prov["dataset_name"] == "colors"
    assert prov["dataset_size"] == len(dataset) and prov["poolings"] == ["cls", "mean_patch"]
    assert prov["preprocess"]["input_size"] == 32 and prov["preprocess"]["normalization"] == "encoder"
    assert len(prov["weights_sha256"]) == 64 and prov["feature_dtype"] == "float16"
    assert cache.cache_dir == feature_cache_dir(os.path.dirname(os.path.dirname(cache.cache_dir)), prov)
    # A shard's files are plain .npy arrays that np.load can memory-map.
    assert isinstance(np.load(os.path.join(cache.cache_dir, "shard_00001.feat_cls.npy"), mmap_mode="r"), np.memmap)


def test_matching_cache_is_reused_without_any_forward(dataset, reference):
    cache, files = reference
    cache_root = os.path.dirname(os.path.dirname(cache.cache_dir))
    encoder = PooledEncoder(encoder=TinyEncoder(), poolings=["cls", "mean_patch"])
    again = build(dataset, cache_root, encoder=encoder)
    assert encoder.encoder.forward_calls == 0
    assert again.cache_dir == cache.cache_dir and snapshot(again.cache_dir) == files
    # Another provenance (ImageNet statistics instead of the encoder's, other weights) is another cache.
    other = PooledEncoder(encoder=TinyEncoder(), poolings=["cls", "mean_patch"], normalization="imagenet")
    assert other.spec.pixel_mean == IMAGENET_MEAN
    reseeded = PooledEncoder(encoder=TinyEncoder(seed=1), poolings=["cls", "mean_patch"])
    rebuilt = build(dataset, cache_root, encoder=reseeded)
    assert rebuilt.cache_dir != cache.cache_dir and reseeded.encoder.forward_calls > 0


class Killed(Exception):
    pass


def test_interrupted_build_resumes_to_identical_bytes(dataset, reference, tmp_path):
    _, files = reference

    def fail_after_two(shard):
        if shard == 1:
            raise Killed(shard)

    with pytest.raises(Killed):
        build(dataset, tmp_path, after_shard=fail_after_two)
    cache_dir = next(os.path.join(r, d) for r, ds, _ in os.walk(tmp_path) for d in ds if d.startswith("tiny_test-"))
    assert not os.path.exists(os.path.join(cache_dir, "manifest.json"))
    # Simulate a kill in the middle of shard 2: its features file is there (truncated), no marker.
    partial = os.path.join(cache_dir, "shard_00002.feat_cls.npy")
    with open(partial, "wb") as f:
        f.write(files["shard_00002.feat_cls.npy"][:50])
    with open(os.path.join(cache_dir, ".shard_00002.labels.npy.abc.tmp"), "wb") as f:
        f.write(b"half")
    encoder = PooledEncoder(encoder=TinyEncoder(), poolings=["cls", "mean_patch"])
    resumed = build(dataset, tmp_path, encoder=encoder)
    assert encoder.encoder.forward_calls == 3 + 2  # shards 2 and 3 only: 8 and 4 images in batches of 3
    assert snapshot(resumed.cache_dir) == files


def test_killed_process_resumes_to_identical_bytes(dataset, reference, tmp_path):
    """A real process killed with os._exit after two shards, then a resumed build in this process."""
    _, files = reference
    listing = tmp_path / "dataset.json"
    listing.write_text(json.dumps(dataset))
    script = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {TESTS_DIR!r})
        from test_feature_cache import build
        dataset = json.load(open({str(listing)!r}))
        build(dataset, {str(tmp_path / "cache")!r}, after_shard=lambda s: os._exit(17) if s == 1 else None)
    """)
    env = dict(os.environ, SAMANTICS_D2_BACKEND="lite")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-3000:]
    cache_dir = next(os.path.join(r, d) for r, ds, _ in os.walk(tmp_path / "cache") for d in ds if d.startswith("tiny_test-"))
    done = sorted(n for n in os.listdir(cache_dir) if n.endswith(".done.json"))
    assert done == ["shard_00000.done.json", "shard_00001.done.json"]
    encoder = PooledEncoder(encoder=TinyEncoder(), poolings=["cls", "mean_patch"])
    resumed = build(dataset, tmp_path / "cache", encoder=encoder)
    assert encoder.encoder.forward_calls == 3 + 2
    assert snapshot(resumed.cache_dir) == files


def test_corrupt_shard_is_detected_and_recomputed(dataset, reference, tmp_path, caplog):
    _, files = reference
    cache = build(dataset, tmp_path)
    target = os.path.join(cache.cache_dir, "shard_00001.feat_mean_patch.npy")
    data = bytearray(open(target, "rb").read())
    data[-5] ^= 0xFF  # same size, one byte flipped: only the checksum can tell
    open(target, "wb").write(bytes(data))
    encoder = PooledEncoder(encoder=TinyEncoder(), poolings=["cls", "mean_patch"])
    with caplog.at_level("WARNING"):
        again = build(dataset, tmp_path, encoder=encoder)
    assert "shard_00001.feat_mean_patch.npy fails its SHA-256 check" in caplog.text
    assert encoder.encoder.forward_calls == 3  # shard 1 only
    assert snapshot(again.cache_dir) == files
    # A truncated file is caught by its size even with verify="size".
    open(target, "wb").write(bytes(data[:-10]))
    encoder = PooledEncoder(encoder=TinyEncoder(), poolings=["cls", "mean_patch"])
    again = build(dataset, tmp_path, encoder=encoder, verify="size")
    assert encoder.encoder.forward_calls == 3 and snapshot(again.cache_dir) == files


def test_unreadable_images_are_reported_skipped_and_counted(dataset, tmp_path, caplog):
    broken = [dict(d) for d in dataset]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    broken[5]["file_name"] = str(tmp_path / "bad.png")
    broken[17]["file_name"] = str(tmp_path / "missing.png")
    with caplog.at_level("WARNING"):
        cache = build(broken, tmp_path / "cache")
    assert str(tmp_path / "bad.png") in caplog.text and str(tmp_path / "missing.png") in caplog.text
    assert cache.manifest["num_skipped"] == 2 and len(cache) == len(dataset) - 2
    assert [s["file_name"] for s in cache.skipped] == [str(tmp_path / "bad.png"), str(tmp_path / "missing.png")]
    assert [s["index"] for s in cache.skipped] == [5, 17]
    kept = [i for i in range(len(dataset)) if i not in (5, 17)]
    np.testing.assert_array_equal(cache.positions(), kept)
    np.testing.assert_array_equal(cache.labels(), [dataset[i]["label"] for i in kept])


def test_ranks_build_their_own_shards_into_the_same_cache(dataset, reference, tmp_path, monkeypatch):
    """Two ranks simulated one after the other: rank 1 computes shards 1 and 3, rank 0 shards 0 and 2."""
    _, files = reference
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "synchronize", lambda: None)
    written = {}
    for rank in (1, 0):
        monkeypatch.setattr(comm, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(comm, "is_main_process", lambda rank=rank: rank == 0)
        if rank == 1:
            with pytest.raises(FileNotFoundError, match="not a complete feature cache"):
                build(dataset, tmp_path, after_shard=lambda s, rank=rank: written.setdefault(rank, []).append(s))
        else:
            cache = build(dataset, tmp_path, after_shard=lambda s, rank=rank: written.setdefault(rank, []).append(s))
    assert written == {1: [1, 3], 0: [0, 2]}
    assert snapshot(cache.cache_dir) == files
    assert feature_cache_module.comm is comm  # the module reads ranks through the seam
