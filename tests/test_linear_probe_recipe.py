"""The authors' linear-probe recipe (linprob_img_encoders/train.py) on hand-made inputs: head init,
gradient clipping, ReduceLROnPlateau + early stopping on the val loss, 16-mixed off CUDA, the
preprocessing of the paper configs (against torchvision's transforms) and the configs' recipe."""
import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from samantics_d2.d2 import LazyConfig
from samantics_d2.evaluation import linear_probe as probe_module
from samantics_d2.evaluation import train_probe_grid
from samantics_d2.modeling.linear_probe import OUR_PROTOCOL, PAPER_PROTOCOL, PooledEncoder, ProbeTrainingConfig
from samantics_d2.modeling.linear_probe.probe import _init_linear
from samantics_d2.modeling.preprocess import fit_image, preprocess_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_RANK_PREDICTIONS = probe_module._rank_predictions


class Rows:
    """A hand-made feature source: ``features`` ``[N, D]`` and ``labels`` ``[N]`` under pooling ``"x"``."""

    def __init__(self, features, labels):
        self.features = torch.as_tensor(features, dtype=torch.float32)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.feature_dims = {"x": self.features.shape[1]}

    def batch(self, rows):
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        return {"x": self.features[index]}, torch.as_tensor(self.labels)[index]


def test_head_inits():
    state = torch.random.get_rng_state()
    layer = _init_linear(50, 7, seed=3, init="torch_default")
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    torch.manual_seed(3)
    reference = nn.Linear(50, 7)  # what the authors' LinearClassifierModule builds
    assert torch.equal(layer.weight, reference.weight) and torch.equal(layer.bias, reference.bias)
    bound = 1 / np.sqrt(50)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0
    ours = _init_linear(2000, 10, seed=3)
    assert torch.all(ours.bias == 0) and abs(float(ours.weight.detach().std()) - 0.01) < 5e-4
    with pytest.raises(ValueError, match="head_init"):
        ProbeTrainingConfig(head_init="xavier")


def one_sgd_step(clip):
    """One SGD step (lr 1, no momentum) on 4 rows of large features: the step is minus the (clipped) gradient."""
    rows = Rows(100 * torch.eye(4, 6), [0, 1, 2, 0])
    config = ProbeTrainingConfig(optimizer="sgd", momentum=0.0, learning_rates=(1.0,), epochs=1, batch_size=4,
                                 head_init="torch_default", grad_clip_norm=clip)
    before = _init_linear(6, 3, seed=0, init="torch_default")
    out = train_probe_grid(train=rows, val=rows, poolings=["x"], num_classes=3, config=config)
    head = out.heads["x_lr1"]
    step = torch.cat([(head.weight - before.weight).flatten(), (head.bias - before.bias).flatten()]).detach()
    return float(step.norm())


def test_gradient_norm_is_clipped_per_probe():
    raw = one_sgd_step(None)
    assert raw > 10  # the gradient is far above the clipping norm ...
    assert one_sgd_step(1.0) == pytest.approx(1.0, rel=1e-5)  # ... and clipping brings weight + bias to norm 1


def scripted_monitor(monkeypatch, losses):
    """Make the per-epoch monitored loss follow ``losses`` (the final evaluation stays real)."""
    real = REAL_RANK_PREDICTIONS
    calls = iter(losses)

    def fake(heads, probes, source, rows, *, batch_size, k):
        ranked, loss, labels = real(heads, probes, source, rows, batch_size=batch_size, k=k)
        if k == 1:  # the per-epoch monitor (the final evaluation asks for top-5)
            loss = {p["name"]: next(calls) for p in probes}
        return ranked, loss, labels

    monkeypatch.setattr(probe_module, "_rank_predictions", fake)


def test_plateau_schedule_and_early_stopping_follow_the_val_loss(monkeypatch):
    """Val loss 1.0, 0.9 (best), then 0.95 forever. ReduceLROnPlateau(patience 5) halves the rate once
    more than 5 epochs went without improvement (after epoch 8); EarlyStopping(patience 7) stops when
    7 epochs in a row did not improve (after epoch 9)."""
    rng = np.random.default_rng(0)
    rows = Rows(rng.normal(size=(24, 5)), rng.integers(0, 3, size=24))
    config = dataclasses.replace(PAPER_PROTOCOL, epochs=15, batch_size=8, precision="32")
    scripted_monitor(monkeypatch, [1.0, 0.9] + [0.95] * 20)
    out = train_probe_grid(train=rows, val=rows, poolings=["x"], num_classes=3, config=config)
    record = out.results["probes"][0]
    assert record["epochs_trained"] == 9 and record["final_lr"] == pytest.approx(5e-4)
    # Stopped means frozen: the same as 9 epochs without early stopping (same schedule).
    scripted_monitor(monkeypatch, [1.0, 0.9] + [0.95] * 20)
    nine = train_probe_grid(train=rows, val=rows, poolings=["x"], num_classes=3,
                            config=dataclasses.replace(config, epochs=9, early_stopping_patience=None))
    assert torch.equal(out.heads["x_lr0.001"].weight, nine.heads["x_lr0.001"].weight)
    # A loss that keeps improving: no reduction, no stop.
    scripted_monitor(monkeypatch, [1.0 - 0.01 * i for i in range(20)])
    steady = train_probe_grid(train=rows, val=rows, poolings=["x"], num_classes=3, config=config)
    assert steady.results["probes"][0]["epochs_trained"] == 15 and steady.results["probes"][0]["final_lr"] == 1e-3


def test_16_mixed_off_cuda_is_bfloat16_autocast():
    """As Lightning on CPU (16-mixed -> bf16-mixed): bfloat16 logits, float32 weights, no scaler."""
    rng = np.random.default_rng(1)
    rows = Rows(rng.normal(size=(16, 4)), rng.integers(0, 2, size=16))
    runs = {p: train_probe_grid(train=rows, val=rows, poolings=["x"], num_classes=2,
                                config=dataclasses.replace(PAPER_PROTOCOL, epochs=2, batch_size=4, precision=p))
            for p in ("16-mixed", "32")}
    assert runs["16-mixed"].results["precision_used"] == "bf16-mixed" and runs["32"].results["precision_used"] == "32"
    mixed, full = runs["16-mixed"].heads["x_lr0.001"].weight, runs["32"].heads["x_lr0.001"].weight
    assert mixed.dtype == torch.float32 and not torch.equal(mixed, full)  # bfloat16 matmuls changed the steps ...
    assert torch.allclose(mixed, full, atol=1e-3)  # ... by little


def test_our_protocol_is_the_default_and_the_paper_protocol_the_authors_values():
    assert ProbeTrainingConfig() == OUR_PROTOCOL
    assert (OUR_PROTOCOL.head_init, OUR_PROTOCOL.grad_clip_norm, OUR_PROTOCOL.schedule) == ("normal", None, "constant")
    p = PAPER_PROTOCOL
    assert (p.learning_rates, p.optimizer, p.epochs, p.batch_size, p.head_init, p.grad_clip_norm) == (
        (1e-3,), "adam", 10, 128, "torch_default", 1.0)
    assert (p.schedule, p.plateau_factor, p.plateau_patience, p.early_stopping_patience, p.monitor, p.precision) == (
        "plateau", 0.5, 5, 7, "val", "16-mixed")


# The authors' transforms per paper config: (encoder tag, fit, input size, interpolation, crop_pct).
PAPER_CONFIGS = {
    "sam_vit_b": ("sam_vit_b", "resize_square", 1024, "bilinear", 1.0),
    "sam2_1_hiera_t": ("sam2.1_hiera_t", "resize_square", 1024, "bilinear", 1.0),
    "dinov2_vits14": ("dinov2_vits14", "resize_center_crop", 224, "bilinear", 1.0),
    "clip_vit_b32": ("clip_vit_b32_openai", "resize_center_crop", 224, "bilinear", 1.0),
}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configs_resolve_to_the_authors_preprocessing_and_recipe(name):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "linear_probe", f"{name}.py"))
    tag, fit, size, interpolation, crop_pct = PAPER_CONFIGS[name]
    assert cfg.encoder.tag == tag and cfg.job.normalization == "imagenet"
    spec = preprocess_spec(tag).replace(**dict(cfg.job.preprocess))
    assert (spec.fit, spec.input_size, spec.interpolation, spec.crop_pct) == (fit, size, interpolation, crop_pct)
    assert ProbeTrainingConfig(**dict(cfg.job.config)) == PAPER_PROTOCOL
    assert dict(cfg.model.preprocess) == dict(cfg.job.preprocess)  # --eval-only sees what the cache saw


def test_authors_resizing_against_torchvision_on_pil_images():
    """The resolved fits against the authors' input: torchvision's Resize((1024, 1024)) and Resize(224)
    + CenterCrop(224) on a PIL image (bilinear). Squashing is identical; resize + crop within one grey
    level on under 1 % of the pixels (Pillow's and torch's antialiased kernels round differently)."""
    transforms = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    array = np.random.default_rng(0).integers(0, 256, size=(300, 451, 3), dtype=np.uint8)
    pil = Image.fromarray(array)

    def theirs(transform):
        return torch.from_numpy(np.array(transform(pil))).permute(2, 0, 1).int()

    squash = preprocess_spec("sam_vit_b", fit="resize_square", interpolation="bilinear")
    assert torch.equal(fit_image(array, squash)[0].int(), theirs(transforms.Resize((1024, 1024))))
    crop = preprocess_spec("dinov2_vits14", fit="resize_center_crop", interpolation="bilinear", crop_pct=1.0)
    expected = theirs(transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224)]))
    difference = (fit_image(array, crop)[0].int() - expected).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01
    ours = preprocess_spec("dinov2_vits14")  # 256 bicubic + crop 224: a different input
    assert (fit_image(array, ours)[0].int() - expected).abs().float().mean() > 5


def test_pooled_encoder_takes_preprocess_changes():
    class Encoder(nn.Module):
        dense_feature = "dense"
        global_feature = None
        preprocess = preprocess_spec("sam_vit_b")

        def forward(self, x):
            return {"dense": x}

    pooled = PooledEncoder(encoder=Encoder(), poolings=["neck_mean"], normalization="imagenet",
                           preprocess_changes={"fit": "resize_square", "interpolation": "bilinear"})
    assert (pooled.spec.fit, pooled.spec.interpolation) == ("resize_square", "bilinear")
    assert pooled.describe()["fit"] == "resize_square"  # part of the cache provenance
    with pytest.raises(ValueError, match="unknown fields"):
        PooledEncoder(encoder=Encoder(), poolings=["neck_mean"], preprocess_changes={"resize": 1})


def test_linear_probe_meta_architecture_evaluates_under_the_training_autocast():
    """--eval-only of a 16-mixed probe runs encoder and head under the same autocast as training
    (bfloat16 on CPU): float32 logits close to, not equal to, the float32 model's."""
    from test_feature_cache import TinyEncoder

    from samantics_d2.modeling.linear_probe import LinearProbe

    images = [{"image": torch.from_numpy(np.random.default_rng(i).integers(0, 256, (3, 40, 50), dtype=np.uint8))}
              for i in range(3)]
    models = {p: LinearProbe(backbone=TinyEncoder(), pooling="cls", num_classes=3, precision=p, head_init="torch_default",
                             preprocess={"interpolation": "bicubic"}).eval() for p in ("32", "16-mixed")}
    assert models["32"].encoder.spec.interpolation == "bicubic"
    logits = {p: torch.stack([o["logits"] for o in m(images)]) for p, m in models.items()}
    assert logits["16-mixed"].dtype == torch.float32 and not torch.equal(logits["16-mixed"], logits["32"])
    assert torch.allclose(logits["16-mixed"], logits["32"], atol=0.05)
    with pytest.raises(ValueError, match="precision"):
        LinearProbe(backbone=TinyEncoder(), pooling="cls", num_classes=3, precision="16")
