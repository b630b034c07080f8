"""tools/benchmark.py training_free: the pipeline against the naive AMG + per-crop DINOv2 baseline.

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


def _segmenter(tool, tmp_path, *, points_per_side=4, pred_iou_thresh=None):
    torch.manual_seed(0)
    return tool.build_training_free_segmenter(
        size="tiny",
        references="shapes_train_ref5_seed0",
        dataset_name="shapes_val",
        points_per_side=points_per_side,
        points_per_batch=8,
        pred_iou_thresh=pred_iou_thresh,
        shots=5,
        memory_bank_path=str(tmp_path / "bank.safetensors"),
    )


@pytest.fixture(scope="module")
def image_input():
    return DetectionMapper(is_train=False, augmentations=[])(DatasetCatalog.get("shapes_val")[0])


def test_cli_prints_both_rows_and_writes_its_section(tool, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    argv = [
        "training_free", "--images", "2", "--points-per-side", "2", "--pred-iou-thresh", "none", "--warmup", "0",
        "--runs", "1", "--output-dir", str(tmp_path / "out"), "--markdown", str(doc),
    ]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith("| ours") or line.startswith("| naive")]
    assert len(rows) == 2, printed
    ours, naive = ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)
    assert float(ours[1]) > 0 and float(naive[1]) > 0  # images/s
    assert naive[-1] == "1.0x"  # speed-ups are relative to the baseline
    assert float(ours[-1][:-1]) == pytest.approx(float(ours[1]) / float(naive[1]), rel=0.06, abs=0.06)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert text.count("<!-- training-free-cpu-fp32-tiny-64px-pps2-semantic-tiny-56px-random:begin -->") == 1
    assert rows[0] in text and rows[1] in text and "Machine: CPU" in text
    with pytest.raises(SystemExit):
        tool.main(["training_free", "--size", "tiny", "--pretrained"])
    with pytest.raises(SystemExit):  # official weights exist for full-size models only
        tool.main(["training_free", "--size", "full", "--semantic-size", "tiny", "--pretrained"])


def test_semantic_encoder_size_is_chosen_apart_from_sam(tool, tmp_path):
    torch.manual_seed(0)
    segmenter = tool.build_training_free_segmenter(
        size="tiny", semantic_size="full", semantic_tag="dinov2_vits14", semantic_input_size=112,
        references="shapes_train_ref5_seed0", dataset_name="shapes_val", points_per_side=2, points_per_batch=4,
        pred_iou_thresh=None, shots=1, memory_bank_path=str(tmp_path / "bank.safetensors"),
    )
    sam, semantic = segmenter.proposer.backbone, segmenter.semantic_encoder
    assert sam.preprocess.input_size == 64 and sam.encoder.patch_embed.proj.out_channels == 32  # tiny SAM
    assert semantic.preprocess.input_size == 112
    assert semantic.output_shape()[semantic.dense_feature].channels == 384  # full-size ViT-S/14


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
            features=features, weights=weights, masks=masks, prototypes=prototypes, prototype_valid=prototype_valid
        )
        pooled = torch.einsum("phw,chw->pc", weights, features) / weights.sum(dim=(1, 2)).clamp_min(1e-12)[:, None]
        got = tool.classify_pooled(
            segmenter.classifier, pooled=pooled, valid=weights.sum(dim=(1, 2)) > 0, masks=masks,
            prototypes=prototypes, prototype_valid=prototype_valid,
        )
    assert len(expected.indices) > 0
    assert torch.equal(got.indices, expected.indices) and torch.equal(got.classes, expected.classes)
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-5, atol=1e-6)
