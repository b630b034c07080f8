"""Messages that point the right way: corrupt checkpoints, override types, malformed JSON, checkpoints of
another model, missing weights. Each names the file or value, what was expected and what to do."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from samantics_d2.checkpoint import load_init_checkpoint
from samantics_d2.config import check_override_keys, check_weights_available
from samantics_d2.d2 import LazyConfig
from samantics_d2.lite.checkpoint import DetectionCheckpointer as LiteCheckpointer
from samantics_d2.data import load_reference_json
from samantics_d2.modeling.weights import KeyMismatchError, UnsafeCheckpointError, WeightsError, read_state_dict
from samantics_d2.utils.io import read_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Net(nn.Module):
    """A frozen ``encoder`` and a trainable ``head``, like the project's meta-architectures."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).requires_grad_(False)
        self.head = nn.Linear(8, 3)


class _Payload:
    """Stands for any Python object a pickle may refer to."""


@pytest.fixture
def good_checkpoint(tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": _Net().state_dict(), "iteration": 10}, path)
    return path


def _damaged(tmp_path, good_checkpoint):
    data = good_checkpoint.read_bytes()
    random_bytes = tmp_path / "random.pth"
    random_bytes.write_bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0),
                                           dtype=torch.uint8).numpy().tobytes())
    half = tmp_path / "half.pth"
    half.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    return [random_bytes, half, empty]


# ----------------------------------------------------------------------------- corrupt checkpoints


def test_corrupt_or_truncated_checkpoint_says_so(tmp_path, good_checkpoint):
    for path in _damaged(tmp_path, good_checkpoint):
        size = f"{path.stat().st_size} bytes"
        loaders = [lambda: read_state_dict(path), lambda: load_init_checkpoint(_Net(), path, training=False),
                   lambda: LiteCheckpointer(_Net()).load(str(path))]
        for load in loaders:
            with pytest.raises((WeightsError, RuntimeError)) as info:
                load()
            message = str(info.value)
            assert not isinstance(info.value, UnsafeCheckpointError)
            assert str(path) in message and ("truncated or corrupt" in message or "is empty (0 bytes)" in message)
            assert size in message and "expected a file written by torch.save" in message
            assert "weights_only=False" not in message and "refers to code" not in message


def test_only_a_pickle_referring_to_code_gets_the_weights_only_message(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refers to code .*nothing was executed.*_Payload"):
        read_state_dict(path)
    with pytest.raises(RuntimeError, match=r"refers to code .*_Payload") as info:
        LiteCheckpointer(_Net()).load(str(path))
    assert "truncated" not in str(info.value)


# ----------------------------------------------------------------------------- override types


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_iter=abc", "train.max_iter expects an integer (the config holds {max_iter}), got 'abc'"),
        ("train.max_iter=1e3", "train.max_iter expects an integer"),
        ("optimizer.lr=fast", "optimizer.lr expects a number"),
        ("train.amp.enabled=1", "train.amp.enabled expects a boolean"),
        ("train.output_dir=7", "train.output_dir expects a string"),
        ("model.proposer.points_per_side=[4]", "model.proposer.points_per_side expects an integer"),
        ("model.proposer.pred_iou_thresh=None", "model.proposer.pred_iou_thresh=null for None"),
    ],
)
def test_override_of_the_wrong_type_is_rejected(override, expected):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/quick/tiny_sam_shapes.py"))
    with pytest.raises(TypeError, match=re.escape(expected.format(max_iter=cfg.train.max_iter))):
        check_override_keys(cfg, [override])


def test_override_of_the_right_type_is_accepted():
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/quick/tiny_sam_shapes.py"))
    check_override_keys(cfg, ["train.max_iter=10", "optimizer.lr=1", "train.amp.enabled=true",
                              "train.output_dir='7'", "train.init_checkpoint=a.pth", "train.seed=null",
                              "model.proposer.pred_iou_thresh=null"])


def test_train_net_rejects_a_wrong_type_before_anything_runs(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", "configs/quick/tiny_sam_shapes.py", "train.max_iter=abc",
         f"train.output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, SAMANTICS_CACHE=str(tmp_path / "cache")),
    )
    assert proc.returncode != 0
    assert "train.max_iter expects an integer" in proc.stderr and "'abc'" in proc.stderr
    assert not out.exists()  # nothing ran


# ----------------------------------------------------------------------------- malformed JSON


def test_malformed_json_names_the_file_and_line(tmp_path):
    bad = tmp_path / "refs.json"
    bad.write_text('{"images": [],\n "annotations": [],\n "categories": [{"id": 1, "name": "a"},]\n}')
    for read in (lambda: read_json(bad, what="a COCO json"), lambda: load_reference_json(str(bad), str(tmp_path))):
        with pytest.raises(ValueError, match=rf"{bad}: not a JSON file \(line 3, column \d+"):
            read()
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match=rf"{empty}: not a JSON file \(the file is empty\)"):
        load_reference_json(str(empty), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(tmp_path / "missing.json")


def test_malformed_annotation_json_names_the_file(tmp_path):
    from samantics_d2.data.reference_sets import load_coco_dict

    bad = tmp_path / "instances.json"
    bad.write_text('{"images": [\n')
    with pytest.raises(ValueError, match=rf"{bad}: not a JSON file \(line 2"):
        load_coco_dict(bad)


# ----------------------------------------------------------------------------- checkpoint of another model


def test_checkpoint_of_another_model_is_an_error(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"model": nn.Conv2d(3, 4, 3).state_dict()}, other)
    for training in (False, True):
        with pytest.raises(KeyMismatchError, match=r"matches none of the 9 parameters and buffers of _Net") as info:
            load_init_checkpoint(_Net(), other, training=training)
        message = str(info.value)
        assert str(other) in message and "weight" in message and "encoder.0" in message and "head" in message


def test_partial_checkpoint_rules(tmp_path, caplog):
    trained = _Net()
    with torch.no_grad():
        trained.head.weight.fill_(0.5)
        trained.encoder[0].weight.fill_(0.25)
    head_only = tmp_path / "head.pth"
    torch.save({"model": {k: v for k, v in trained.state_dict().items() if k.startswith("head.")}}, head_only)
    # The frozen encoder may be left out (the config builds it): loads, and the missing keys are listed.
    model = _Net()
    encoder_before = model.encoder[0].weight.clone()
    with caplog.at_level(logging.WARNING, logger="samantics_d2.checkpoint"):
        loaded = load_init_checkpoint(model, head_only, training=False)
    assert sorted(loaded) == ["head.bias", "head.weight"]
    assert torch.equal(model.head.weight, trained.head.weight) and torch.equal(model.encoder[0].weight, encoder_before)
    assert "Not in the file, kept as built (7): encoder.0.* (2), encoder.1.* (5)" in caplog.text

    # A trainable part left out: an error when evaluating (a random head would be evaluated) ...
    encoder_only = tmp_path / "encoder.pth"
    extra = {"encoder_extra.weight": torch.zeros(1)}
    torch.save({"model": {**{k: v for k, v in trained.state_dict().items() if k.startswith("encoder.")}, **extra}},
               encoder_only)
    with pytest.raises(KeyMismatchError) as info:
        load_init_checkpoint(_Net(), encoder_only, training=False)
    message = str(info.value)
    assert "2 trainable parameters would be evaluated at their random initialisation: head.bias, head.weight" in message
    assert "In the file but not in the model, ignored (1): encoder_extra.weight" in message
    # ... and allowed when training (fine-tuning from a backbone), listed.
    caplog.clear()
    model = _Net()
    with caplog.at_level(logging.WARNING, logger="samantics_d2.checkpoint"):
        load_init_checkpoint(model, encoder_only, training=True)
    assert torch.equal(model.encoder[0].weight, trained.encoder[0].weight)
    assert "Not in the file, kept as built (2): head.bias, head.weight" in caplog.text


def test_train_net_eval_only_refuses_a_checkpoint_of_another_model(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"model": nn.Conv2d(3, 4, 3).state_dict()}, other)
    proc = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", "configs/quick/tiny_sam_shapes.py", "--eval-only",
         f"train.init_checkpoint={other}", f"train.output_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, SAMANTICS_CACHE=str(tmp_path / "c")),
    )
    assert proc.returncode != 0
    assert "KeyMismatchError" in proc.stderr and f"{other} (2 tensors) matches none" in proc.stderr


# ----------------------------------------------------------------------------- missing weights


def test_missing_weights_are_listed_all_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTICS_WEIGHTS", str(tmp_path))
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/common/training_free.py"))
    with pytest.raises(FileNotFoundError) as info:
        check_weights_available(cfg, "training_free.py")
    message = str(info.value)
    assert "training_free.py needs 2 weight file(s)" in message
    assert "sam2.1_hiera_large.pt" in message and "dinov2_vitl14_pretrain.pth" in message
    assert f"$SAMANTICS_WEIGHTS is {tmp_path}" in message and "make demo" in message and "shapes_tiny.py" in message
    (tmp_path / "dinov2_vitl14_pretrain.pth").write_bytes(b"")  # present (read later, when the model is built)
    with pytest.raises(FileNotFoundError, match=r"needs 1 weight file\(s\)") as info:
        check_weights_available(cfg, "training_free.py")
    assert "dinov2_vitl14_pretrain.pth" not in str(info.value)
    check_weights_available(LazyConfig.load(os.path.join(ROOT, "configs/training_free/shapes_tiny.py")))  # none needed
    with pytest.raises(FileNotFoundError, match=r"(?s)needs 1 weight file\(s\).*ViT-B-32.pt"):
        check_weights_available(LazyConfig.load(os.path.join(ROOT, "configs/linear_probe/clip_vit_b32.py")))
