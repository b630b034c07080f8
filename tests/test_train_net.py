"""train_net.py run as a user runs it: train, checkpoints, metrics.json, --resume, --eval-only, 2 processes.

The tiny quick config trains in seconds; each run is a subprocess, as a user would start it.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/quick/tiny_segmenter_shapes.py"


def run(args, cache, check=True, timeout=300):
    env = dict(os.environ, SAMANTICS_CACHE=str(cache), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", CONFIG, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train_net.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def ap_table(text, task):
    """The AP numbers print_csv_format logs for ``task`` (copypaste lines)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if f"Task: {task}" in line:
            return [float(v) if v != "nan" else float("nan") for v in lines[i + 2].split("copypaste: ")[1].split(",")]
    raise AssertionError(f"no {task} table in output:\n{text[-3000:]}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("out") / "run"
    proc = run([f"train.output_dir={out}"], cache)  # the demo's own settings (200 iterations)
    return cache, out, proc.stdout + proc.stderr


def test_train_writes_checkpoints_metrics_and_config(trained):
    cache, out, log = trained
    for name in ("model_0000099.pth", "model_final.pth", "last_checkpoint", "metrics.json", "config.yaml", "log.txt"):
        assert (out / name).exists(), f"{name} missing; files: {os.listdir(out)}"
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    iters = [r["iteration"] for r in records if "total_loss" in r]
    assert iters and iters[-1] == 199
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert losses[-1] < losses[0], f"loss did not decrease: {losses}"
    assert any("bbox/AP" in r for r in records), "EvalHook results not in metrics.json"
    assert (out / "inference" / "coco_instances_results.json").exists()
    assert "samantics_d2 backend" in log


def test_eval_only_prints_bbox_and_segm_tables(trained):
    cache, out, _ = trained
    proc = run(["--eval-only", f"train.init_checkpoint={out}/model_final.pth", f"train.output_dir={out}/eval"], cache)
    text = proc.stdout + proc.stderr
    bbox, segm = ap_table(text, "bbox"), ap_table(text, "segm")
    assert len(bbox) >= 6 and len(segm) >= 6
    assert 0.0 <= bbox[0] <= 100.0 and 0.0 <= segm[0] <= 100.0
    assert re.search(r"Per-category (bbox|segm) AP", text)


def test_resume_continues_iteration_counter(trained, tmp_path):
    cache, out, _ = trained
    # Resume from the iteration-100 checkpoint in a copy of the run directory.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "model_0000099.pth").write_bytes((out / "model_0000099.pth").read_bytes())
    (resumed / "last_checkpoint").write_text("model_0000099.pth")
    run(["--resume", f"train.output_dir={resumed}", "train.max_iter=110", "train.eval_period=1000",
         "train.checkpointer.period=1000"], cache)
    records = [json.loads(line) for line in (resumed / "metrics.json").read_text().splitlines()]
    iters = [r["iteration"] for r in records if "total_loss" in r]
    assert iters[0] >= 100 and iters[-1] == 109, iters


def test_misspelt_override_fails_before_running(tmp_path):
    proc = run([f"train.output_dir={tmp_path}/x", "train.max_itr=5"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "train.max_itr" in proc.stderr and "train.max_iter" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_two_processes_match_one_process(trained):
    cache, out, _ = trained
    args = ["--eval-only", f"train.init_checkpoint={out}/model_final.pth"]
    one = run(args + [f"train.output_dir={out}/eval1"], cache)
    two = run(["--num-gpus", "2", *args, f"train.output_dir={out}/eval2"], cache)
    for task in ("bbox", "segm"):
        np.testing.assert_array_equal(ap_table(one.stdout + one.stderr, task), ap_table(two.stdout + two.stderr, task))


def test_ddp_training_runs(trained, tmp_path):
    cache, _, _ = trained
    out = tmp_path / "ddp"
    run(["--num-gpus", "2", f"train.output_dir={out}", "train.max_iter=6", "train.eval_period=1000",
         "train.checkpointer.period=1000", "lr_multiplier.scheduler.milestones=[5,6]"], cache)
    assert (out / "model_final.pth").exists()
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [r["iteration"] for r in records if "total_loss" in r][-1] == 5
