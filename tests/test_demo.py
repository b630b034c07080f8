"""tools/demo.py: the recall gate, the checkpoint stamp (reuse only when it passed under the same config),
failures exit non-zero. The three steps are faked (no training): only the demo's own logic runs."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def demo(monkeypatch, tmp_path):
    """tools/demo.py with its root at ``tmp_path`` and ``run_step`` replaced by a recorder.

    ``demo.recall`` sets the recall the fake training writes; ``demo.calls`` lists the step titles run.
    """
    spec = importlib.util.spec_from_file_location("demo_tool", ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", str(tmp_path))
    real_load = module.load_sam_config
    monkeypatch.setattr(module, "load_sam_config",
                        lambda config_file, overrides: real_load(str(ROOT / config_file), overrides))
    module.recall = 95.0
    module.calls = []

    def fake_step(title, args, expected, threads=None):
        module.calls.append(title)
        if title.startswith("1/3"):
            out = next(a.split("=", 1)[1] for a in args if a.startswith("train.output_dir="))
            os.makedirs(out, exist_ok=True)
            Path(out, module.CHECKPOINT).write_bytes(os.urandom(64))
            with open(os.path.join(out, "metrics.json"), "a") as f:
                f.write(json.dumps({"iteration": 799, "total_loss": 0.3}) + "\n")
                f.write(json.dumps({"iteration": 799, module.RECALL_KEY: module.recall}) + "\n")
            return ""
        if title.startswith("2/3"):
            table = "copypaste: Task: {}\ncopypaste: AP,AP50\ncopypaste: {:.4f},50.0000\n"
            return table.format("bbox", 19.6) + table.format("segm", 33.4)
        out = args[args.index("--output") + 1]
        os.makedirs(os.path.join(out, "overlays"), exist_ok=True)
        Path(out, "overlays", "a.png").write_bytes(b"")
        return ""

    monkeypatch.setattr(module, "run_step", fake_step)
    return module


def _sam_dir(tmp_path):
    return tmp_path / "out" / "tiny_sam"


def test_passing_checkpoint_is_stamped_and_reused_only_under_the_same_config(demo, tmp_path, capsys):
    assert demo.main(["--output", "out"]) == 0
    assert [c[:3] for c in demo.calls] == ["1/3", "2/3", "3/3"]
    stamp = json.loads((_sam_dir(tmp_path) / demo.STAMP_FILE).read_text())
    assert stamp["status"] == "passed" and stamp["recall@0.5"] == 95.0
    assert len(stamp["config_sha256"]) == 64
    summary = capsys.readouterr().out.split("=== Summary")[-1]
    assert "95.0 %" in summary and "box AP 19.6, mask AP 33.4" in summary and "1 overlays" in summary
    assert "TINY models on SYNTHETIC data" in summary

    demo.calls.clear()  # same config: no training
    assert demo.main(["--output", "out"]) == 0
    assert [c[:3] for c in demo.calls] == ["2/3", "3/3"]

    demo.calls.clear()  # another seed is another config: the old checkpoint is moved aside, not reused
    assert demo.main(["--output", "out", "--seed", "3"]) == 0
    assert [c[:3] for c in demo.calls] == ["1/3", "2/3", "3/3"]
    assert (tmp_path / "out" / "tiny_sam.stale" / demo.STAMP_FILE).is_file()
    new_stamp = json.loads((_sam_dir(tmp_path) / demo.STAMP_FILE).read_text())
    assert new_stamp["config_sha256"] != stamp["config_sha256"]


def test_changed_or_unstamped_checkpoint_is_not_reused(demo, tmp_path):
    assert demo.main(["--output", "out"]) == 0
    (_sam_dir(tmp_path) / demo.CHECKPOINT).write_bytes(b"another checkpoint")
    demo.calls.clear()
    assert demo.main(["--output", "out"]) == 0
    assert demo.calls[0].startswith("1/3")

    (_sam_dir(tmp_path) / demo.STAMP_FILE).unlink()  # e.g. a checkpoint left by an older demo
    demo.calls.clear()
    assert demo.main(["--output", "out"]) == 0
    assert demo.calls[0].startswith("1/3")


def test_low_recall_removes_the_checkpoint_and_exits_non_zero(demo, tmp_path, capsys):
    demo.recall = 0.0
    assert demo.main(["--output", "out"]) == 1
    assert [c[:3] for c in demo.calls] == ["1/3"]  # nothing runs on a failed tiny SAM
    err = capsys.readouterr().err
    assert "0.0 %" in err and "plateau" in err and "(seed 0)" in err and "--seed 1`" in err  # the config's seed is 0
    assert not _sam_dir(tmp_path).exists()
    rejected = tmp_path / "out" / "tiny_sam.rejected"
    assert (rejected / demo.CHECKPOINT).is_file()
    assert json.loads((rejected / demo.STAMP_FILE).read_text())["status"] == "training"  # never "passed"

    demo.recall = 97.0  # the next run trains again instead of using the rejected checkpoint
    demo.calls.clear()
    assert demo.main(["--output", "out"]) == 0
    assert demo.calls[0].startswith("1/3")


def test_low_recall_advice_names_another_seed_than_the_one_that_failed(demo, capsys):
    demo.recall = 50.0
    assert demo.main(["--output", "out", "--seed", "1"]) == 1
    err = capsys.readouterr().err
    assert "(seed 1)" in err and "--seed 2`" in err and "--seed 1`" not in err


def test_interrupted_training_of_the_same_config_is_resumed(demo, tmp_path):
    fingerprint = demo.config_fingerprint(demo.load_sam_config(demo.SAM_CONFIG, [f"train.output_dir={_sam_dir(tmp_path)}"]))
    demo.write_stamp(str(_sam_dir(tmp_path)), {"config_sha256": fingerprint, "status": "training"})
    (_sam_dir(tmp_path) / "model_0000399.pth").write_bytes(b"x")
    assert demo.main(["--output", "out"]) == 0
    assert (_sam_dir(tmp_path) / "model_0000399.pth").is_file()  # kept for train_net --resume
    assert not (tmp_path / "out" / "tiny_sam.stale").exists()


def test_failed_step_exits_non_zero_without_summary(demo, monkeypatch, capsys):
    def failing(title, args, expected, threads=None):
        raise demo.DemoError(f"step '{title}' failed with exit status 1; its output is above.")

    monkeypatch.setattr(demo, "run_step", failing)
    assert demo.main(["--output", "out"]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and "exit status 1" in captured.err
    assert "Summary" not in captured.out and "Done" not in captured.out


def test_run_step_reports_a_failing_command(demo):
    spec = importlib.util.spec_from_file_location("demo_tool_real", ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "hello" in module.run_step("echo", ["-c", "print('hello')"], "instant")
    with pytest.raises(module.DemoError, match="exit status 3"):
        module.run_step("fail", ["-c", "import sys; sys.exit(3)"], "instant")


def test_copypaste_results_parse_the_ap_tables(demo):
    text = ("[x] copypaste: Task: bbox\n[x] copypaste: AP,AP50,AP-red circle\n[x] copypaste: 19.6000,40.0000\n"
            "[x] copypaste: Task: segm\n[x] copypaste: AP,AP50\n[x] copypaste: 33.4000,60.0000\n")
    assert demo.copypaste_results(text) == {"bbox": {"AP": 19.6, "AP50": 40.0}, "segm": {"AP": 33.4, "AP50": 60.0}}
