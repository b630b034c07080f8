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
    fill = tool.StageOrderMemoryBank(segmenter)
    theirs, theirs_valid = fill()
    assert int(theirs_valid.sum()) == 8 and torch.equal(theirs_valid, ours_valid[:, 0])  # 8 classes, 2 shots each
    # the rest of their postprocess_memory is computed too (its time is part of their build)
    stats, channels = fill.statistics, theirs.shape[1]
    assert len(stats["covariance"]) == len(stats["leave_one_out"]) == 8
    assert all(s.shape == (channels, channels) and torch.allclose(s, s.T, atol=1e-6) for s in stats["covariance"])
    assert len(stats["centres"]) == len(stats["pca"]) > 0 and all(c.shape == (4, channels) for c in stats["centres"])
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


def test_explicit_attention_is_their_dinov2_attention_and_is_restored(tool, tmp_path):
    """The baselines' DINOv2 computes softmax(q k^T) v step by step (DINOv2's Attention without
    xFormers), not PyTorch's fused kernel; same features to float rounding; the switch is undone."""
    from unittest import mock

    segmenter = _segmenter(tool, tmp_path)
    encoder = segmenter.semantic_encoder
    layers = [m for m in encoder.modules() if hasattr(m, "fused_attn")]
    assert layers and all(m.fused_attn for m in layers)
    x = torch.randn(1, 3, encoder.preprocess.input_size, encoder.preprocess.input_size)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad(), mock.patch("torch.nn.functional.scaled_dot_product_attention", wraps=sdpa) as fused:
        ours = encoder(x)[encoder.dense_feature]
        calls = fused.call_count
        with tool.explicit_attention(encoder) as switched:
            assert switched == len(layers) and not any(m.fused_attn for m in layers)
            theirs = encoder(x)[encoder.dense_feature]
        assert fused.call_count == calls > 0  # the explicit path never calls the fused kernel
    assert all(m.fused_attn for m in layers)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention='flash'"):
        tool.StageOrderMemoryBank(segmenter, attention="flash")()


def test_cli_memory_banks_only(tool, tmp_path, capsys):
    argv = ["training_free", "--config-file", TINY, "--images", "0", "--memory-bank-runs", "1",
            "--baseline-attention", "fused", "train.device=cpu",
            f"model.reference_bank.cache_path={tmp_path / 'bank.safetensors'}"]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Memory bank (40 references" in printed and "their encoder's attention: fused" in printed
    assert "| ours" not in printed  # no pipeline ran
    with pytest.raises(SystemExit, match="--images 0"):
        tool.main(["training_free", "--config-file", TINY, "--images", "0"])
