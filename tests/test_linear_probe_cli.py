"""The linear probe run as a user runs it: train_net.py trains the cached grid, --eval-only reproduces it."""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/linear_probe/tiny_shapes.py"


def run(args, cache):
    env = dict(os.environ, SAMANTICS_CACHE=str(cache), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "train_net.py", "--config-file", CONFIG, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_train_then_eval_only_agree(tmp_path):
    out = tmp_path / "probe"
    run([f"train.output_dir={out}"], tmp_path / "cache")
    results = json.loads((out / "linear_probe_results.json").read_text())
    chosen = results["chosen"]["val"]["top1"]
    assert chosen > 60.0, results["chosen"]  # 8 colour-coded classes: far above chance (12.5)
    assert (out / "linear_probe_head.pth").exists()
    # A second training run reuses the feature cache: nothing is extracted again.
    again = run([f"train.output_dir={tmp_path / 'probe2'}"], tmp_path / "cache")
    assert re.search(r"Feature cache .*: \d+ shards, rank 0/1 owns \d+, 0 to compute", again), again[-3000:]
    text = run(["--eval-only", f"train.output_dir={out}"], tmp_path / "cache")
    line = [l for l in text.splitlines() if re.search(r"copypaste: [0-9.]+,[0-9.]+,[0-9.]+$", l)][-1]
    top1 = float(line.split("copypaste: ")[1].split(",")[0])
    assert abs(top1 - chosen) < 1e-3, (top1, chosen)
