"""Linear probes: accuracy on separable data, grid == probes trained alone, cache == encoder in the
loop, top-k against a direct computation, the LinearProbe meta-architecture, the report tool.

Colour-coded images (4 classes) through the tiny random conv encoder of test_feature_cache.py.
"""
import csv
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from samantics_d2.d2 import META_ARCH_REGISTRY, DatasetCatalog, MetadataCatalog, comm, inference_on_dataset
from samantics_d2.data.classification import ClassificationMapper, register_image_folder
from samantics_d2.evaluation import ClassificationEvaluator, accuracy_from_topk, topk_predictions
from samantics_d2.evaluation import classification as classification_module
from samantics_d2.modeling.linear_probe import (
    CachedFeatures,
    EncoderFeatures,
    LinearProbe,
    PooledEncoder,
    ProbeTrainingConfig,
    build_feature_cache,
    holdout_split,
)
from samantics_d2.evaluation import linear_probe as probe_module
from samantics_d2.evaluation import run_linear_probe, train_probe_grid
from test_feature_cache import TinyEncoder, write_color_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOLINGS = ["cls", "mean_patch"]
NUM_CLASSES = 4
GRID = ProbeTrainingConfig(learning_rates=(1e-3, 3e-2), epochs=12, batch_size=8, holdout_fraction=0.25, seed=3)


def direct_topk_accuracy(logits, labels, k):
    """Percent of rows whose true class has fewer than k strictly larger logits (no ties in float data)."""
    true = logits[np.arange(len(labels)), labels]
    return 100.0 * float(np.mean((logits > true[:, None]).sum(axis=1) < k))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    train = write_color_dataset(str(root / "train"), images_per_class=12, num_classes=NUM_CLASSES, seed=1)
    val = write_color_dataset(str(root / "val"), images_per_class=6, num_classes=NUM_CLASSES, seed=2)
    encoder = PooledEncoder(encoder=TinyEncoder(), poolings=POOLINGS)
    caches = {
        split: build_feature_cache(dicts, encoder=encoder, encoder_tag="tiny_test", dataset_name=split,
                                   cache_root=str(root / "cache"), shard_size=16, batch_size=8)
        for split, dicts in (("train", train), ("val", val))
    }
    output = train_probe_grid(
        train=CachedFeatures(caches["train"], poolings=POOLINGS), val=CachedFeatures(caches["val"], poolings=POOLINGS),
        poolings=POOLINGS, num_classes=NUM_CLASSES, config=GRID, output_dir=str(root / "run"),
        class_names=["red", "green", "blue", "yellow"], run_info={"encoder_tag": "tiny_test"})
    return {"root": root, "train": train, "val": val, "caches": caches, "output": output}


def test_probe_reaches_expected_accuracy_and_writes_results(data):
    results = data["output"].results
    assert [p["name"] for p in results["probes"]] == ["cls_lr0.001", "cls_lr0.03", "mean_patch_lr0.001", "mean_patch_lr0.03"]
    assert results["rows"] == {"train": 36, "holdout": 12, "val": 24}
    chosen = results["chosen"]
    best = sorted(results["probes"], key=lambda p: (-p["holdout"]["top1"], p["holdout"]["loss"]))[0]
    assert chosen["name"] == best["name"] and chosen["selected_by"].startswith("held-out top-1")
    # The colour classes are linearly separable in the tiny encoder's features.
    assert chosen["val"]["top1"] == 100.0 and chosen["val"]["top5"] == 100.0
    losses = {p["name"]: p["final_train_loss"] for p in results["probes"]}
    assert max(losses.values()) < np.log(NUM_CLASSES)  # every probe learnt something (chance: ln 4)
    assert losses["cls_lr0.03"] < 0.8 and losses["mean_patch_lr0.03"] < 0.8
    run = data["root"] / "run"
    on_disk = json.loads((run / "linear_probe_results.json").read_text())
    assert on_disk["chosen"] == json.loads(json.dumps(chosen)) and on_disk["encoder"] == "tiny_test"
    confusion = np.load(run / "val_confusion_matrix.npy")
    assert confusion.shape == (4, 4) and confusion.sum() == 24 and np.trace(confusion) == 24
    with open(run / "val_per_class_accuracy.csv") as f:
        per_class = list(csv.DictReader(f))
    assert [r["class"] for r in per_class] == ["red", "green", "blue", "yellow"]
    assert all(int(r["support"]) == 6 and float(r["accuracy"]) == 100.0 for r in per_class)
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]


def test_holdout_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(3), [10, 20, 4])
    train, held = holdout_split(labels, 0.25, seed=0)
    assert np.bincount(labels[held]).tolist() == [2, 5, 1]  # round(0.25 * n) per class
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(34))
    assert np.array_equal(held, holdout_split(labels, 0.25, seed=0)[1])
    assert not np.array_equal(held, holdout_split(labels, 0.25, seed=1)[1])


def test_grid_probe_equals_the_probe_trained_alone(data):
    """Every probe of the grid gets exactly what training it alone would give."""
    caches = data["caches"]
    for pooling, lr in (("mean_patch", 3e-2), ("cls", 1e-3)):
        alone = train_probe_grid(
            train=CachedFeatures(caches["train"], poolings=[pooling]), val=CachedFeatures(caches["val"], poolings=[pooling]),
            poolings=[pooling], num_classes=NUM_CLASSES,
            config=dataclasses.replace(GRID, learning_rates=(lr,)))
        name = f"{pooling}_lr{lr:g}"
        grid_head, alone_head = data["output"].heads[name], alone.heads[name]
        assert torch.equal(grid_head.weight, alone_head.weight) and torch.equal(grid_head.bias, alone_head.bias)
        grid_record = next(p for p in data["output"].results["probes"] if p["name"] == name)
        assert alone.results["probes"][0] == grid_record


def test_cache_and_encoder_in_the_loop_give_the_same_numbers(data):
    """Same seed, same rows, same order: the encoder re-run every epoch trains the same probe.

    The cache stores features rounded to float16; the encoder-in-the-loop path rounds its features
    the same way (round_to=float16). The features then match exactly, so do the losses, the
    weights and the accuracies.
    """
    config = ProbeTrainingConfig(learning_rates=(3e-2,), epochs=3, batch_size=8, seed=5)
    caches = data["caches"]
    cached = train_probe_grid(train=CachedFeatures(caches["train"], poolings=["cls"]),
                              val=CachedFeatures(caches["val"], poolings=["cls"]),
                              poolings=["cls"], num_classes=NUM_CLASSES, config=config)
    encoder = PooledEncoder(encoder=TinyEncoder(), poolings=["cls"], round_to=torch.float16)
    in_loop_train = EncoderFeatures(data["train"], encoder=encoder)
    in_loop = train_probe_grid(train=in_loop_train, val=EncoderFeatures(data["val"], encoder=encoder),
                               poolings=["cls"], num_classes=NUM_CLASSES, config=config)
    # The encoder really ran every epoch: 5 batches of 8 rows per epoch (+ 1 probe forward at start).
    assert encoder.encoder.forward_calls >= config.epochs * 6
    rows = np.arange(10)
    assert torch.equal(CachedFeatures(caches["train"], poolings=["cls"]).batch(rows)[0]["cls"],
                       in_loop_train.batch(rows)[0]["cls"])
    head_c, head_l = cached.heads["cls_lr0.03"], in_loop.heads["cls_lr0.03"]
    assert torch.equal(head_c.weight, head_l.weight) and torch.equal(head_c.bias, head_l.bias)
    assert cached.results["probes"] == in_loop.results["probes"]
    assert cached.results["chosen"]["val"] == in_loop.results["chosen"]["val"]


def test_reported_topk_agree_with_a_direct_computation(data):
    results, heads = data["output"].results, data["output"].heads
    val = data["caches"]["val"]
    labels = val.labels()
    for record in results["probes"]:
        features = torch.from_numpy(val.features(record["pooling"]).astype(np.float32))
        logits = heads[record["name"]](features).detach().numpy()
        for k in (1, 5):
            assert record["val"][f"top{k}"] == pytest.approx(direct_topk_accuracy(logits, labels, k))


def test_evaluator_topk_per_class_and_confusion_against_direct_computation(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    num_classes, n = 10, 60
    logits = rng.normal(size=(n, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=n)
    logits[np.arange(n)[:30], labels[:30]] += 1.5  # some signal, so top-1/top-5 are neither 0 nor 100
    names = [f"c{i}" for i in range(num_classes)]
    ranked = topk_predictions(logits, 5)
    assert accuracy_from_topk(ranked, labels, ks=(1, 5)) == {
        1: pytest.approx(direct_topk_accuracy(logits, labels, 1)), 5: pytest.approx(direct_topk_accuracy(logits, labels, 5))}

    def evaluator_over(rows, output_dir=None):
        evaluator = ClassificationEvaluator(class_names=names, output_dir=output_dir)
        for start in range(0, len(rows), 7):
            chunk = rows[start : start + 7]
            evaluator.process([{"label": int(labels[i])} for i in chunk],
                              [{"logits": torch.from_numpy(logits[i])} for i in chunk])
        return evaluator

    # Two ranks: each holds half of the rows; the main process gathers both parts with comm.gather.
    rank1 = evaluator_over(np.arange(1, n, 2))
    rank0 = evaluator_over(np.arange(0, n, 2), output_dir=str(tmp_path))
    monkeypatch.setattr(comm, "gather", lambda data, dst=0: [data, (rank1._topk, rank1._labels)])
    result = rank0.evaluate()["classification"]
    assert result["top1"] == pytest.approx(direct_topk_accuracy(logits, labels, 1))
    assert result["top5"] == pytest.approx(direct_topk_accuracy(logits, labels, 5))
    assert 0 < result["top1"] < result["top5"] < 100
    order = np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])
    pred = logits.argmax(axis=1)
    direct_confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i in order:
        direct_confusion[labels[i], pred[i]] += 1
    np.testing.assert_array_equal(np.load(tmp_path / "confusion_matrix.npy"), direct_confusion)
    with open(tmp_path / "confusion_matrix.csv") as f:
        table = list(csv.reader(f))
    assert table[0][1:] == names and [int(v) for v in table[3][1:]] == direct_confusion[2].tolist()
    for c in range(num_classes):
        mask = labels == c
        expected = 100.0 * np.mean(pred[mask] == c) if mask.any() else float("nan")
        assert result[f"acc-c{c}"] == pytest.approx(expected, nan_ok=True)
    assert classification_module.comm is comm
    # Other ranks return {}.
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    monkeypatch.setattr(comm, "gather", lambda data, dst=0: [])
    assert evaluator_over(np.arange(5)).evaluate() == {}


def test_linear_probe_meta_architecture(data):
    with pytest.raises(ValueError, match="valid poolings: cls, embed, mean_patch, neck_mean"):
        LinearProbe(backbone=TinyEncoder(), pooling="gem", num_classes=NUM_CLASSES)
    model = META_ARCH_REGISTRY.get("LinearProbe")(backbone=TinyEncoder(), pooling="mean_patch", num_classes=NUM_CLASSES,
                                                  round_features_to=torch.float16)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    mapper = ClassificationMapper()
    batch = [mapper(d) for d in data["train"][:6]]
    model.train()
    assert not model.encoder.encoder.training  # the frozen encoder stays in eval mode
    losses = model(batch)
    assert set(losses) == {"loss_cls"} and losses["loss_cls"].requires_grad
    losses["loss_cls"].backward()
    assert model.head.weight.grad is not None and model.encoder.encoder.conv1.weight.grad is None

    # The head trained on the cache, loaded into the model: same predictions through inference_on_dataset.
    checkpoint = torch.load(data["root"] / "run" / "linear_probe_head.pth", weights_only=True)
    model = LinearProbe(backbone=TinyEncoder(), pooling=checkpoint["pooling"], num_classes=NUM_CLASSES,
                        round_features_to=torch.float16)
    model.load_state_dict(checkpoint["model"], strict=False)
    val = [mapper(d) for d in data["val"]]
    loader = [val[i : i + 5] for i in range(0, len(val), 5)]
    outputs = model.eval()(loader[0])
    assert outputs[0]["logits"].shape == (NUM_CLASSES,) and outputs[0]["pred_class"].dtype == torch.int64
    results = inference_on_dataset(model, loader, ClassificationEvaluator(num_classes=NUM_CLASSES))
    chosen = data["output"].results["chosen"]["val"]
    assert results["classification"]["top1"] == pytest.approx(chosen["top1"])
    assert results["classification"]["top5"] == pytest.approx(chosen["top5"])


def test_run_linear_probe_end_to_end_on_registered_datasets(tmp_path):
    """The entry point: cache two registered image-folder datasets, train the grid, write the results."""
    for split, seed in (("train", 1), ("val", 2)):
        write_color_dataset(str(tmp_path / split), images_per_class=8, num_classes=NUM_CLASSES, seed=seed,
                            class_folders=True)
        register_image_folder(f"test_colors_{split}", str(tmp_path / split))
    try:
        options = dict(poolings=POOLINGS, train_dataset="test_colors_train", val_dataset="test_colors_val",
                       encoder_tag="tiny_test", cache_root=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"),
                       config=dict(learning_rates=[3e-2], epochs=10, batch_size=8, holdout_fraction=0.25), shard_size=16)
        encoder = TinyEncoder()
        results = run_linear_probe(encoder=encoder, **options)
        assert results["chosen"]["val"]["top1"] == 100.0
        assert results["run"]["provenance"]["preprocess"]["normalization"] == "imagenet"
        assert results["run"]["skipped_images"] == {"train": 0, "val": 0}
        saved = json.loads((tmp_path / "run" / "linear_probe_results.json").read_text())
        assert saved["chosen"] == json.loads(json.dumps(results["chosen"]))
        assert os.path.exists(tmp_path / "run" / "val_confusion_matrix.csv")
        # A second run reuses both caches: the encoder does not run again.
        encoder = TinyEncoder()
        again = run_linear_probe(encoder=encoder, **options)
        assert encoder.forward_calls == 0 and again["chosen"] == results["chosen"]
    finally:
        for split in ("train", "val"):
            DatasetCatalog.remove(f"test_colors_{split}")
            MetadataCatalog.remove(f"test_colors_{split}")


def test_config_and_input_validation(data):
    with pytest.raises(ValueError, match="optimizer='lbfgs'"):
        ProbeTrainingConfig(optimizer="lbfgs")
    caches = data["caches"]
    with pytest.raises(ValueError, match="holdout_fraction=0"):
        train_probe_grid(train=CachedFeatures(caches["train"], poolings=["cls"]),
                         val=CachedFeatures(caches["val"], poolings=["cls"]), poolings=["cls"],
                         num_classes=NUM_CLASSES, config=ProbeTrainingConfig(learning_rates=(1e-3, 1e-2)))
    with pytest.raises(KeyError, match="not 'embed'"):
        CachedFeatures(caches["train"], poolings=["embed"])


def test_report_tool_writes_the_paper_table(data, tmp_path):
    """Runs gathered from two folders, in the paper's order, as Markdown, CSV and PNG."""
    assert (probe_module.RESULTS_FILE, probe_module.RESULTS_FORMAT) == ("linear_probe_results.json",
                                                                        "samantics_d2.linear_probe/1")
    template = json.loads((data["root"] / "run" / "linear_probe_results.json").read_text())
    runs = {"a/dino": ("dinov2_vits14", 80.123, 95.5), "a/sam": ("sam_vit_b", 12.0, 26.004),
            "b/clip": ("clip_vit_b32_openai", 70.5, 90.25), "b/tiny": ("tiny_test", 100.0, 100.0)}
    for folder, (tag, top1, top5) in runs.items():
        result = dict(template, encoder=tag, chosen=dict(template["chosen"], val={"top1": top1, "top5": top5}))
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / "linear_probe_results.json").write_text(json.dumps(result))
    proc = subprocess.run(
        [sys.executable, "tools/probe_report.py", str(tmp_path / "a"), str(tmp_path / "b"),
         "--output-dir", str(tmp_path / "report"), "--compare-paper"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    markdown = (tmp_path / "report" / "probe_report.md").read_text()
    assert proc.stdout == markdown
    assert markdown.splitlines() == [
        "| Encoder | Top-1 (%) | Top-5 (%) | Paper top-1 (%) | Paper top-5 (%) |",
        "|:---|---:|---:|---:|---:|",
        "| SAM ViT-B | 12.00 | 26.00 | 11.06 | 25.37 |",
        "| CLIP ViT-B/32 | 70.50 | 90.25 | 73.92 | 92.89 |",
        "| DINOv2 ViT-S/14 | 80.12 | 95.50 | 77.43 | 93.78 |",
        "| tiny_test | 100.00 | 100.00 | - | - |",
    ]
    with open(tmp_path / "report" / "probe_report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["encoder"], float(r["top1"]), float(r["top5"])) for r in rows] == [
        ("sam_vit_b", 12.0, 26.004), ("clip_vit_b32_openai", 70.5, 90.25), ("dinov2_vits14", 80.123, 95.5),
        ("tiny_test", 100.0, 100.0)]
    assert (tmp_path / "report" / "probe_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
