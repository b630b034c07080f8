"""tools/benchmark.py training_free: the pipeline against No Time to Train's stage order (the default
baseline) and against the naive AMG + per-crop DINOv2 baseline (``--baseline amg``).

Tiny random models on shapes_val, 2x2 to 4x4 point grids: the whole file runs in seconds.
"""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import samantics_d2  # noqa: F401  (registers the shapes datasets and reference sets)
from samantics_d2.d2 import DatasetCatalog
from samantics_d2.data.mapper import DetectionMapper, segmentation_to_mask
from samantics_d2.modeling.semantic import MemoryBank, resample_masks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


TINY = str(ROOT / "configs" / "training_free" / "shapes_tiny_random.py")
# The settings the upstream generator and the padded square crops reproduce (the config keeps the
# No Time to Train recipe's stages: their point layout, resize, crops and mask weights).
BASELINE = ["model.proposer.point_layout=cell_centres", "model.proposer.backbone.fit=longest_side_pad",
            "model.memory_bank.crop=square_context", "model.memory_bank.mask_weights=area",
            "model.memory_bank.crop_interpolation=null"]


def _segmenter(tool, tmp_path, *, points_per_side=4, pred_iou_thresh=None, overrides=()):
    """The tiny random segmenter of the config the CLI benchmarks, built by the tool's own path."""
    cfg = tool.load_config(TINY, [
        f"model.proposer.points_per_side={points_per_side}", "model.proposer.points_per_batch=8",
        f"model.proposer.pred_iou_thresh={'null' if pred_iou_thresh is None else pred_iou_thresh}",
        f"model.reference_bank.cache_path={tmp_path / 'bank.safetensors'}", "train.device=cpu", *BASELINE, *overrides,
    ])
    return tool.build_segmenter(cfg)


@pytest.fixture(scope="module")
def image_input():
    return DetectionMapper(is_train=False, augmentations=[])(DatasetCatalog.get("shapes_val")[0])


def _table_rows(printed: str, baseline: str = "| naive") -> list[list[str]]:
    rows = [line for line in printed.splitlines() if line.startswith("| ours") or line.startswith(baseline)]
    assert len(rows) == 2, printed
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_cli_with_config_file_prints_both_rows_and_writes_its_section(tool, tmp_path, capsys):
    """--config-file + overrides, 2 images: both rows, the settings the config and overrides gave, the
    doc section named after the config, written once even when run twice."""
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    argv = [
        "training_free", "--config-file", TINY, "--images", "2", "--warmup", "0", "--runs", "1",
        "--output-dir", str(tmp_path / "out"), "--markdown", str(doc), "--baseline", "amg",
        "model.proposer.points_per_side=2", "model.proposer.pred_iou_thresh=null", "train.device=cpu",
        f"model.reference_bank.cache_path={tmp_path / 'bank.safetensors'}", *BASELINE,
    ]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    ours, naive = _table_rows(printed)
    assert float(ours[1]) > 0 and float(naive[1]) > 0  # images/s
    assert float(ours[3]) > 0 and float(naive[3]) > 0  # peak memory
    assert 0 <= float(ours[4]) <= 100 and 0 <= float(naive[5]) <= 100  # AP in percent
    assert naive[-1] == "1.00x"  # speed-ups are relative to the baseline
    assert float(ours[-1][:-1]) == pytest.approx(float(ours[1]) / float(naive[1]), rel=0.06, abs=0.06)
    for field in ("2x2 points", "pred_iou_thresh None", "2 image(s) of shapes_val", "references shapes_train_ref5_seed0 (shots 5)",
                  "seed 0", "SAMBackbone vit_b (tiny, 64 px", "DINOv2Backbone"):
        assert field in printed, field
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    section = "training-free-cpu-fp32-shapes_tiny_random-tiny-64px-pps2-semantic-tiny-56px-amg"
    assert text.count(f"<!-- {section}:begin -->") == 1 and text.count(f"<!-- {section}:end -->") == 1
    assert "Machine: " in text and f"`python tools/benchmark.py {' '.join(argv)}`" in text


def test_cli_rejects_bad_overrides_and_configs_the_baseline_cannot_match(tool, tmp_path):
    with pytest.raises(KeyError, match="train.device"):  # misspelt: fails before anything is built, naming the key
        tool.main(["training_free", "--config-file", TINY, "train.devise=cpu"])
    with pytest.raises(TypeError, match="model.proposer.points_per_side"):  # wrong type
        tool.main(["training_free", "--config-file", TINY, "model.proposer.points_per_side=many"])
    with pytest.raises(SystemExit, match="before them"):  # a tool option after the overrides
        tool.main(["training_free", "--config-file", TINY, "train.device=cpu", "--images", "2"])
    # the demo config keeps SAM's box NMS at 0.7: the generator's NMS runs on all 3 masks of a point
    with pytest.raises(SystemExit, match="model.proposer.box_nms_thresh=null"):
        tool.main(["training_free", "--config-file", str(ROOT / "configs" / "training_free" / "shapes_tiny.py"),
                   "train.device=cpu", "model.proposer.points_per_side=2", *BASELINE])
    # the recipe's own stages (its point layout, ...) are named with the value to give
    with pytest.raises(SystemExit, match="model.proposer.point_layout=cell_centres"):
        tool.main(["training_free", "--config-file", TINY, "--baseline", "amg", "train.device=cpu",
                   "model.proposer.points_per_side=2"])
    # the stage-order baseline names the recipe's values it reproduces
    with pytest.raises(SystemExit, match="model.classifier.nms_rank='predicted_iou'"):
        tool.main(["training_free", "--config-file", TINY, "train.device=cpu", "model.classifier.nms_rank=score"])
    with pytest.raises(SystemExit, match="TrainingFreeSegmenter"):
        tool.main(["training_free", "--config-file", str(ROOT / "configs" / "linear_probe" / "tiny_shapes.py")])


def test_overrides_size_the_semantic_encoder_apart_from_sam(tool, tmp_path):
    """The old --semantic-size full --semantic-tag dinov2_vits14: a tiny SAM with a full-size DINOv2."""
    segmenter = _segmenter(tool, tmp_path, points_per_side=2, overrides=[
        "model.semantic_encoder.size=full", "model.semantic_encoder.tag=dinov2_vits14", "model.semantic_encoder.input_size=112"])
    sam, semantic = segmenter.proposer.backbone, segmenter.semantic_encoder
    assert sam.preprocess.input_size == 64 and sam.encoder.patch_embed.proj.out_channels == 32  # tiny SAM
    assert semantic.preprocess.input_size == 112
    assert semantic.output_shape()[semantic.dense_feature].channels == 384  # full-size ViT-S/14
    assert not segmenter.training and segmenter.semantic_encoder.size == "full"


def test_same_proposals_as_the_upstream_generator(tool, tmp_path, image_input):
    """Identical settings -> the same proposals: the same grid points, the same predicted IoUs.

    SamAutomaticMaskGenerator returns all 3 masks of every point (3 x 16 here, nothing filtered);
    the baseline keeps the best per point, as the pipeline's proposer does."""
    segmenter = _segmenter(tool, tmp_path)
    baseline = tool.NaiveBaseline(segmenter)
    image = image_input["image"].permute(1, 2, 0).numpy()
    with torch.no_grad():
        ours = segmenter.proposer(image_input["image"])
        raw = baseline.generator.generate(image)
        records = baseline.propose(image)
    assert len(raw) == 3 * 4 * 4
    assert len(ours) == len(records) > 0
    theirs = {tuple(float(v) for v in r["point_coords"][0]): r["predicted_iou"] for r in records}
    for point, iou in zip(ours.points.tolist(), ours.iou_pred.tolist()):
        assert tuple(point) in theirs
        assert iou == pytest.approx(theirs[tuple(point)], abs=2e-3)  # resizing differs slightly (PIL vs torch)

    # a threshold between two well separated IoUs keeps the same proposals on both sides
    ious = torch.sort(ours.iou_pred).values
    gap = int(torch.argmax(ious[1:] - ious[:-1]))
    threshold = float(ious[gap] + ious[gap + 1]) / 2
    segmenter.proposer.proposals.pred_iou_thresh = threshold
    baseline = tool.NaiveBaseline(segmenter)
    with torch.no_grad():
        kept_ours, kept_theirs = segmenter.proposer(image_input["image"]), baseline.propose(image)
    assert len(kept_ours) == len(kept_theirs) == int((ious > threshold).sum())


def test_baseline_crop_features_are_the_memory_bank_features(tool, tmp_path):
    """The baseline pools a mask crop exactly as the memory bank pools a reference instance, so a
    reference's own mask gets its bank feature (and, against the bank's shots, its own class)."""
    segmenter = _segmenter(tool, tmp_path)
    baseline = tool.NaiveBaseline(segmenter)
    record = DatasetCatalog.get("shapes_train_ref5_seed0")[0]
    encoder = segmenter.semantic_encoder
    bank = MemoryBank.build(
        references=[record], backbone=encoder, config=segmenter.memory_bank_config, weights_id="test", num_classes=8
    )
    from samantics_d2.data.io import read_image

    image = read_image(record["file_name"], format="RGB")
    annotations = sorted(record["annotations"], key=lambda a: a["category_id"])  # the bank's order
    masks = [segmentation_to_mask(a["segmentation"], record["height"], record["width"]) for a in annotations]
    with torch.no_grad():
        pooled, valid = baseline.crop_features(image, masks, [a["bbox"] for a in annotations])
    assert valid.all() and pooled.shape == bank.features.shape
    torch.testing.assert_close(pooled, bank.features, rtol=1e-4, atol=1e-5)
    kept = tool.classify_pooled(
        segmenter.classifier, pooled=pooled, valid=valid, masks=torch.from_numpy(np.stack(masks)).bool(),
        prototypes=bank.features[:, None].clone(), prototype_valid=torch.ones(len(bank), 1, dtype=torch.bool),
        iou_pred=torch.ones(len(bank)),  # ground-truth masks: one rank for all
    )
    # prototypes = the shots themselves: every mask matches its own shot (cosine 1), NMS drops none
    # (the shapes do not overlap) and the soft merge leaves disjoint masks alone
    assert sorted(kept.indices.tolist()) == list(range(len(bank)))
    assert torch.equal(kept.classes, kept.indices)
    torch.testing.assert_close(kept.scores, torch.ones(len(bank)), rtol=0, atol=1e-5)


def test_baseline_scoring_equals_the_pipeline_classifier(tool, tmp_path, image_input):
    """Given the pipeline's pooled features, the baseline's scoring path returns the pipeline's
    kept proposals, classes and scores exactly: the two differ only in how features are computed."""
    segmenter = _segmenter(tool, tmp_path)
    with torch.no_grad():
        prototypes, prototype_valid = segmenter.prepare_prototypes()
        proposals = segmenter.proposer(image_input["image"])
        encoder = segmenter.semantic_encoder
        x, fits = encoder.prepare_with_fits([image_input["image"]])
        features = encoder(x)[encoder.dense_feature][0]
        weights = resample_masks(
            proposals.mask_logits.float(), src_fit=proposals.fit, dst_fit=fits[0],
            grid_size=tuple(features.shape[-2:]), patch_size=encoder.preprocess.patch_size,
        )
        masks = proposals.mask_logits > 0
        expected = segmenter.classifier(
            features=features, weights=weights, masks=masks, prototypes=prototypes, prototype_valid=prototype_valid,
            iou_pred=proposals.iou_pred,
        )
        pooled = torch.einsum("phw,chw->pc", weights, features) / weights.sum(dim=(1, 2)).clamp_min(1e-12)[:, None]
        got = tool.classify_pooled(
            segmenter.classifier, pooled=pooled, valid=weights.sum(dim=(1, 2)) > 0, masks=masks,
            prototypes=prototypes, prototype_valid=prototype_valid, iou_pred=proposals.iou_pred,
        )
    assert len(expected.indices) > 0
    assert torch.equal(got.indices, expected.indices) and torch.equal(got.classes, expected.classes)
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- their stage order (issue 13)


def _recipe_segmenter(tool, tmp_path, *overrides):
    """The tiny random segmenter with the config's No Time to Train stages (no baseline overrides)."""
    cfg = tool.load_config(TINY, [
        "model.proposer.points_per_side=6", "model.proposer.points_per_batch=16", "model.proposer.pred_iou_thresh=null",
        f"model.reference_bank.cache_path={tmp_path / 'bank.safetensors'}", "train.device=cpu", *overrides,
    ])
    return tool.build_segmenter(cfg)


def test_stage_order_baseline_makes_the_pipelines_detections(tool, tmp_path):
    """Their forward_test order over the same modules: the same detections, scores to float rounding."""
    segmenter = _recipe_segmenter(tool, tmp_path)
    baseline = tool.StageOrderBaseline(segmenter)
    inputs = [DetectionMapper(is_train=False, augmentations=[])(d) for d in DatasetCatalog.get("shapes_val")[:3]]
    with torch.no_grad():
        ours, theirs = segmenter(inputs), baseline(inputs)
    assert sum(len(o["instances"]) for o in ours) > 0
    agreement = tool.detection_agreement(ours, theirs)
    assert agreement["agree"] == 1.0 and agreement["max_score_diff"] < 1e-5
    for a, b in zip(ours, theirs):
        assert torch.equal(a["instances"].pred_classes, b["instances"].pred_classes)
        torch.testing.assert_close(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)


def test_stage_order_baseline_runs_the_upstream_decoder_per_chunk(tool, tmp_path, image_input):
    """Step 1 is the upstream mask-decoder call on every chunk of prompts (the image copied per prompt)."""
    from unittest import mock

    from samantics_d2.modeling.proposals import prompt_decoder

    segmenter = _recipe_segmenter(tool, tmp_path)
    baseline = tool.StageOrderBaseline(segmenter)
    decoder = segmenter.proposer.proposals.decoder
    with torch.no_grad(), mock.patch.object(decoder, "_decode_chunk", wraps=decoder._decode_chunk) as upstream, \
            mock.patch.object(prompt_decoder, "decode_shared_image") as shared:
        logits, iou, _ = baseline.propose(image_input["image"])
    assert upstream.call_count == 3 and shared.call_count == 0  # 36 prompts in chunks of 16
    with torch.no_grad():
        ours = segmenter.proposer(image_input["image"])
    assert len(ours) == len(logits) > 0
    torch.testing.assert_close(torch.sort(iou).values, torch.sort(ours.iou_pred.float()).values, rtol=1e-5, atol=1e-5)


def test_cli_stage_order_baseline_reports_the_agreement(tool, tmp_path, capsys):
    argv = [
        "training_free", "--config-file", TINY, "--images", "2", "--warmup", "0", "--runs", "1",
        "--output-dir", str(tmp_path / "out"), "model.proposer.points_per_side=4", "model.proposer.pred_iou_thresh=null",
        "train.device=cpu", f"model.reference_bank.cache_path={tmp_path / 'bank.safetensors'}",
    ]
    assert tool.main(argv) == 0
    ours, theirs = _table_rows(capsys.readouterr().out, baseline="| their stage order")
    assert float(ours[1]) > 0 and float(theirs[1]) > 0 and float(ours[3]) > 0 and float(theirs[3]) > 0
    assert ours[7] == theirs[7] == "100.0 %" and theirs[-1] == "1.00x"


def test_detection_agreement_by_hand(tool):
    from samantics_d2.d2 import Instances

    def instances(masks, classes, scores):
        result = Instances((4, 4))
        result.pred_masks, result.pred_classes, result.scores = masks, torch.tensor(classes), torch.tensor(scores)
        return {"instances": result}

    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2], masks[1, 2:], masks[2, :, :1] = True, True, True
    shifted = masks.clone()
    shifted[2] = False
    shifted[2, :, 3:] = True  # a different mask
    ours = instances(masks, [0, 1, 2], [0.9, 0.8, 0.7])
    same = tool.detection_agreement([ours], [instances(masks.clone(), [0, 1, 2], [0.9, 0.75, 0.7])])
    assert same["agree"] == 1.0 and same["max_score_diff"] == pytest.approx(0.05)
    other = tool.detection_agreement([ours], [instances(shifted, [0, 2, 2], [0.9, 0.8, 0.7])])  # class and mask differ
    assert other["agree"] == pytest.approx(1 / 3)
    assert tool.detection_agreement([ours], [instances(masks[:0], [], [])])["agree"] == 0.0
    # an empty mask (a proposal that vanished at the image size) agrees with an empty mask of its class
    emptied = masks.clone()
    emptied[1] = False
    agree = tool.detection_agreement([instances(emptied, [0, 1, 2], [0.9, 0.8, 0.7])],
                                     [instances(emptied.clone(), [0, 1, 2], [0.9, 0.8, 0.7])])
    assert agree["agree"] == 1.0
    other_class = tool.detection_agreement([instances(emptied, [0, 1, 2], [0.9, 0.8, 0.7])],
                                           [instances(emptied.clone(), [0, 0, 2], [0.9, 0.8, 0.7])])
    assert other_class["agree"] == pytest.approx(2 / 3)
