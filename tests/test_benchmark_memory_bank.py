"""tools/benchmark.py training_free: the memory bank built in No Time to Train's stage order gives our
prototypes; the CLI reports both build times; --image-size feeds resized images with outputs at the
original size (tiny random models on shapes)."""
import pytest
import torch
from test_benchmark_training_free import TINY, tool  # noqa: F401  (the tool fixture: tools/benchmark.py as a module)

from samantics_d2.d2 import DatasetCatalog
from samantics_d2.data.mapper import DetectionMapper


def _segmenter(tool, tmp_path, *overrides):
    cfg = tool.load_config(TINY, ["model.proposer.points_per_side=2", "model.proposer.pred_iou_thresh=null",
                                  "model.reference_bank.references=shapes_train_ref3_seed1", "model.reference_bank.shots=2",
                                  f"model.reference_bank.cache_path={tmp_path / 'bank.safetensors'}", "train.device=cpu",
                                  *overrides])
    return tool.build_segmenter(cfg)


@pytest.mark.parametrize("crop", ["square_clipped", "square_context"])
def test_their_memory_fill_gives_our_prototypes(tool, tmp_path, crop):
    segmenter = _segmenter(tool, tmp_path, f"model.memory_bank.crop={crop}")
    ours, ours_valid = segmenter.prepared_prototypes()
    theirs, theirs_valid = tool.StageOrderMemoryBank(segmenter)()
    assert int(theirs_valid.sum()) == 8 and torch.equal(theirs_valid, ours_valid[:, 0])  # 8 classes, 2 shots each
    torch.testing.assert_close(theirs, ours[:, 0], rtol=0, atol=1e-5)
    row = tool.measure_memory_banks(segmenter, runs=1)
    assert row["references"] == 24 and row["same_classes"] and row["max_prototype_diff"] < 1e-5
    assert row["ours_s"] > 0 and row["theirs_s"] > 0


def test_resized_inputs_keep_the_original_size(tool, tmp_path):
    segmenter = _segmenter(tool, tmp_path)
    (x,) = [DetectionMapper(is_train=False, augmentations=[])(d) for d in DatasetCatalog.get("shapes_val")[:1]]
    (big,) = tool.resize_inputs([x], 256)
    assert big["image"].shape == (3, 256, 256) and big["image"].dtype == torch.uint8
    assert (big["height"], big["width"]) == (x["height"], x["width"])
    with torch.no_grad():
        (output,) = segmenter([big])
    assert output["instances"].image_size == (x["height"], x["width"])


def test_cli_reports_the_memory_bank_builds(tool, tmp_path, capsys):
    argv = ["training_free", "--config-file", TINY, "--images", "1", "--warmup", "0", "--runs", "1",
            "--image-size", "192", "--memory-bank-runs", "1", "--output-dir", str(tmp_path / "out"),
            "model.proposer.points_per_side=2", "model.proposer.pred_iou_thresh=null", "train.device=cpu",
            f"model.reference_bank.cache_path={tmp_path / 'bank.safetensors'}"]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "resized to 192 x 192 px" in printed and "Memory bank (40 references" in printed
    assert "same classes with prototypes: True" in printed
