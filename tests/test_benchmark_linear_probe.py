"""tools/benchmark.py linear_probe: the cached probe grid of a linear-probe config against one encoder
pass and against re-running the encoder every epoch (tiny random DINOv2 on shapes crops)."""
import pytest
from test_benchmark_training_free import ROOT, tool  # noqa: F401  (the tool fixture: tools/benchmark.py as a module)

CONFIG = str(ROOT / "configs" / "linear_probe" / "tiny_shapes.py")


def test_cli_with_config_file_reports_the_config_grid(tool, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    argv = ["linear_probe", "--config-file", CONFIG, "--max-images", "16", "--runs", "1", "--output-dir", str(tmp_path),
            "--markdown", str(doc), "train.device=cpu", "job.config.epochs=1", "job.poolings=[cls,mean_patch]"]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    # the config's grid (2 learning rates) x the overridden poolings (2) = 4 probes, 2 epochs
    assert "Settings: encoder dinov2_vits14 (tiny), poolings ['cls', 'mean_patch'], learning rates [0.001, 0.01], 1 epochs, batch 32" in printed
    assert "16 train / 16 val images (shapes_train_cls, shapes_val_cls)" in printed
    rows = [line.strip("|").split("|") for line in printed.splitlines() if line.startswith("| ") and "wall time" not in line]
    assert [r[0].strip() for r in rows] == [
        "one encoder pass over train + val", "cached: extract once + 4 probes x 1 epochs", "encoder in the loop: 1 probe x 1 epochs"]
    seconds = [float(r[1]) for r in rows]
    assert all(s > 0 for s in seconds) and rows[0][2].strip() == "1.00"
    ratio = rows[1][2].strip()  # the cached grid in encoder passes, as the target line says it
    assert float(ratio) > 0 and f"({ratio}x)" in printed
    assert "Target (cached grid of 4 probes < 1.2x one encoder pass)" in printed
    text = doc.read_text()
    assert text.count("<!-- linear-probe-cpu-dinov2_vits14-tiny:begin -->") == 1
    assert f"`python tools/benchmark.py {' '.join(argv)}`" in text


def test_cli_rejects_a_config_without_a_linear_probe_job(tool):
    with pytest.raises(SystemExit, match="linear-probe config"):
        tool.main(["linear_probe", "--config-file", str(ROOT / "configs" / "training_free" / "shapes_tiny_random.py")])
    with pytest.raises(KeyError, match="job.poolings"):  # misspelt override, before anything runs
        tool.main(["linear_probe", "--config-file", CONFIG, "job.pooling=[cls]"])
