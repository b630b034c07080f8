"""Engine contract: trainer + hooks + writers + checkpointer + schedules, resume, launch, setup.

Runs against the active backend (``samantics_d2.d2``); a tiny model trains for 20 iterations on
one fixed batch, so runs are deterministic and take milliseconds.
"""
import copy
import json
import logging
import math
import os

import pytest
import torch
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf
from torch import nn

from samantics_d2.d2 import (
    AMPTrainer,
    DetectionCheckpointer,
    EventStorage,
    LRMultiplier,
    SimpleTrainer,
    WarmupParamScheduler,
    comm,
    default_argument_parser,
    default_setup,
    default_writers,
    get_default_optimizer_params,
    get_event_storage,
    hooks,
    launch,
    setup_logger,
)
from samantics_d2.engine import build_trainer, wrap_ddp, write_run_files

MAX_ITER = 20
BASE_LR = 0.1
WARMUP_ITERS = 4
WARMUP_FACTOR = 0.1
MILESTONES = (10, 15)


class TinyRegressor(nn.Module):
    """[B, 4] -> [B] with a norm layer; returns two losses in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 1)

    def forward(self, batch):
        x, y = batch
        pred = self.head(self.norm(self.linear(x)).relu()).squeeze(-1)
        return {"loss_mse": ((pred - y) ** 2).mean(), "loss_l1": 0.1 * (pred - y).abs().mean()}


class FixedBatches:
    """An endless data loader repeating one batch (so a resumed run sees the same data)."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(16, 4, generator=g)
        self.batch = (x, x.sum(dim=1) * 0.5)

    def __iter__(self):
        while True:
            yield self.batch


def expected_lr(iteration: int) -> float:
    """Warm-up (linear from WARMUP_FACTOR) over WARMUP_ITERS, then x0.1 at each milestone."""
    if iteration < WARMUP_ITERS:
        alpha = iteration / WARMUP_ITERS
        return BASE_LR * (WARMUP_FACTOR * (1 - alpha) + alpha)
    return BASE_LR * 0.1 ** sum(iteration >= m for m in MILESTONES)


def lr_schedule():
    return WarmupParamScheduler(
        MultiStepParamScheduler(values=[1.0, 0.1, 0.01], milestones=list(MILESTONES), num_updates=MAX_ITER),
        warmup_factor=WARMUP_FACTOR,
        warmup_length=WARMUP_ITERS / MAX_ITER,
    )


def build(output_dir, *, writers=True, seed=0, extra_hooks=()):
    torch.manual_seed(seed)
    model = TinyRegressor()
    optimizer = torch.optim.SGD(
        get_default_optimizer_params(model, weight_decay_norm=0.0), lr=BASE_LR, momentum=0.9, weight_decay=1e-4
    )
    trainer = SimpleTrainer(model, FixedBatches(), optimizer)
    checkpointer = DetectionCheckpointer(model, str(output_dir), trainer=trainer)
    evaluations = []

    def evaluate():
        evaluations.append(trainer.iter)
        return {"bbox": {"AP": 10.0 + len(evaluations)}, "segm": {"AP": 5.0}}

    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=lr_schedule()),
            hooks.PeriodicCheckpointer(checkpointer, period=5),
            hooks.EvalHook(10, evaluate),
            hooks.PeriodicWriter(default_writers(str(output_dir), MAX_ITER), period=5) if writers else None,
            *extra_hooks,
        ]
    )
    return model, optimizer, trainer, checkpointer, evaluations


def snapshot(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def assert_same_optimizer_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][key][name])), (key, name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One full run; snapshots of the model and optimizer after iteration 9 and at the end."""
    out = tmp_path_factory.mktemp("run")
    snapshots = {}
    record = hooks.CallbackHook(
        after_step=lambda t: snapshots.__setitem__(t.iter, snapshot(t.model, t.optimizer)) if t.iter == 9 else None
    )
    model, optimizer, trainer, checkpointer, evaluations = build(out, extra_hooks=[record])
    trainer.train(0, MAX_ITER)
    return out, trainer, snapshots[9], snapshot(model, optimizer), evaluations


def test_training_writes_metrics_checkpoints_and_follows_the_schedule(trained):
    out, trainer, _, _, evaluations = trained
    assert trainer.iter == MAX_ITER

    # LR: one value per iteration, as the warm-up + multi-step schedule says.
    lrs = trainer.storage.history("lr").values()
    assert [itr for _, itr in lrs] == list(range(MAX_ITER))
    for lr, itr in lrs:
        assert lr == pytest.approx(expected_lr(itr), rel=1e-6), itr

    # Loss decreases on the fixed batch.
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == MAX_ITER and losses[-1] < 0.5 * losses[0]

    # Evaluation after iteration 9 (period 10) and after training, recorded as flat scalars.
    assert evaluations == [9, MAX_ITER]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    loss_iters = [r["iteration"] for r in records if "total_loss" in r]
    assert loss_iters == [4, 9, 14, 19]
    for r in records:
        if "total_loss" in r:
            assert {"loss_mse", "loss_l1", "lr", "data_time"} <= r.keys()
            assert r["lr"] == pytest.approx(expected_lr(r["iteration"]), rel=1e-6)
    ap = {r["iteration"]: r["bbox/AP"] for r in records if "bbox/AP" in r}
    assert ap == {9: 11.0, MAX_ITER: 12.0}
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))

    # Checkpoints every 5 iterations and at the end, nothing half-written left behind.
    names = set(os.listdir(out))
    assert {f"model_{i:07d}.pth" for i in (4, 9, 14, 19)} | {"model_final.pth", "last_checkpoint"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"


def test_resume_restores_iteration_weights_optimizer_and_lr(trained, tmp_path):
    out, _, (weights_9, optim_9), (final_weights, _), _ = trained
    (tmp_path / "model_0000009.pth").write_bytes((out / "model_0000009.pth").read_bytes())
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")

    model, optimizer, trainer, checkpointer, evaluations = build(tmp_path, writers=False, seed=123)
    assert not torch.equal(model.linear.weight, weights_9["linear.weight"])  # different init
    checkpointer.resume_or_load("", resume=True)
    assert checkpointer.has_checkpoint() and trainer.iter == 9
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights_9[name]), name
    assert_same_optimizer_state(optimizer.state_dict(), optim_9)

    trainer.train(trainer.iter + 1, MAX_ITER)
    lrs = trainer.storage.history("lr").values()
    assert [itr for _, itr in lrs] == list(range(10, MAX_ITER))
    for lr, itr in lrs:
        assert lr == pytest.approx(expected_lr(itr), rel=1e-6), itr
    # Same data, same state: the resumed run ends where the uninterrupted one did.
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, final_weights[name], rtol=1e-5, atol=1e-6)
    assert evaluations == [MAX_ITER]


def test_load_without_resume_takes_weights_only(trained):
    out, _, _, (final_weights, _), _ = trained
    model = TinyRegressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = SimpleTrainer(model, FixedBatches(), optimizer)
    extra = DetectionCheckpointer(model, "", trainer=trainer).resume_or_load(str(out / "model_final.pth"), resume=False)
    assert trainer.iter == 0 and extra["iteration"] == MAX_ITER - 1
    assert torch.equal(model.head.weight, final_weights["head.weight"])
    assert optimizer.param_groups[0]["lr"] == 1.0 and not optimizer.state_dict()["state"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope.pth")
    with pytest.raises(AssertionError, match="nope.pth"):  # Detectron2 (fvcore) asserts
        DetectionCheckpointer(TinyRegressor()).load(missing)


def test_nan_loss_raises_before_the_optimizer_step():
    class NaNModel(TinyRegressor):
        def forward(self, batch):
            losses = super().forward(batch)
            losses["loss_mse"] = losses["loss_mse"] * float("nan")
            return losses

    model = NaNModel()
    before = copy.deepcopy(model.state_dict())
    trainer = SimpleTrainer(model, FixedBatches(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(FloatingPointError, match="iteration=3"):
        trainer.train(3, 10)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("amp", [True, False])
def test_trainer_for_the_device_runs_on_cpu(amp):
    # train.amp.enabled on CPU: the forward in bfloat16 autocast (Detectron2's AMPTrainer needs CUDA).
    seen = []

    class Recording(TinyRegressor):
        def forward(self, batch):
            seen.append(self.linear(batch[0]).dtype)
            return super().forward(batch)

    model = Recording()
    before = model.linear.weight.detach().clone()
    trainer = build_trainer(model, FixedBatches(), torch.optim.SGD(model.parameters(), lr=0.1), amp=amp)
    trainer.train(0, 2)
    assert seen == [torch.bfloat16 if amp else torch.float32] * 2
    assert model.linear.weight.dtype == torch.float32 and not torch.equal(model.linear.weight, before)
    assert model.linear.weight.grad.dtype == torch.float32
    assert math.isfinite(trainer.storage.history("total_loss").latest())
    assert "optimizer" in trainer.state_dict()
    if amp and not torch.cuda.is_available():  # what build_trainer avoids: AMPTrainer needs CUDA (Detectron2)
        with pytest.raises(AssertionError, match="CUDA"):
            AMPTrainer(model, FixedBatches(), torch.optim.SGD(model.parameters(), lr=0.1)).train(0, 1)


def test_event_storage_histories_and_smoothing():
    with pytest.raises(AssertionError, match="EventStorage"):  # as Detectron2
        get_event_storage()
    values = [5.0, 1.0, 3.0, 100.0]
    with EventStorage(start_iter=7) as storage:
        assert get_event_storage() is storage
        for v in values:
            storage.put_scalar("loss", v)
            storage.put_scalar("lr", v / 10, smoothing_hint=False)
            storage.step()
        storage.put_scalars(a=1, b=torch.tensor(2.0))
    assert storage.iter == 11
    assert [itr for _, itr in storage.history("loss").values()] == [7, 8, 9, 10]
    assert storage.history("loss").median(3) == sorted(values[-3:])[1]
    assert storage.latest()["loss"] == (100.0, 10)
    smoothed = storage.latest_with_smoothing_hint(window_size=3)
    assert smoothed["loss"] == (sorted(values[-3:])[1], 10)
    assert smoothed["lr"] == (10.0, 10)  # not smoothed: the latest value
    assert storage.latest()["b"] == (2.0, 11)
    assert set(storage.histories()) == {"loss", "lr", "a", "b"}
    with pytest.raises(KeyError, match="nothing"):
        storage.history("nothing")
    with EventStorage() as other, pytest.raises(AssertionError, match="(?i)smoothing.hint"):  # as Detectron2
        other.put_scalar("lr", 0.1, smoothing_hint=False)
        other.put_scalar("lr", 1.0, smoothing_hint=True)


def test_lr_multiplier_follows_its_multiplier():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=BASE_LR)
    scheduler = LRMultiplier(optimizer, lr_schedule(), MAX_ITER)
    seen = []
    for _ in range(MAX_ITER):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([expected_lr(i) for i in range(MAX_ITER)], rel=1e-6)
    with pytest.raises(ValueError, match="ParamScheduler"):
        LRMultiplier(optimizer, lambda where: 1.0, MAX_ITER)


def test_default_optimizer_params_groups_norm_bias_frozen_and_shared():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.ln = nn.LayerNorm(4)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)
            self.fc = nn.Linear(4, 4, bias=False)
            self.tied = nn.Linear(4, 4, bias=False)
            self.tied.weight = self.fc.weight

    net = Net()
    groups = get_default_optimizer_params(net, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0, bias_lr_factor=2.0)
    where = {id(p): g for g in groups for p in g["params"]}
    all_params = [p for g in groups for p in g["params"]]
    trainable = {id(p) for p in net.parameters() if p.requires_grad}  # net.parameters() skips the tied duplicate
    assert len(all_params) == len(where) == len(trainable) and set(where) == trainable
    assert id(net.frozen.weight) not in where
    for norm in (net.bn, net.ln):
        assert where[id(norm.weight)]["weight_decay"] == 0.0 and where[id(norm.weight)]["lr"] == 0.1
        assert where[id(norm.bias)]["lr"] == pytest.approx(0.2)
    assert where[id(net.conv.weight)] == where[id(net.fc.weight)]
    assert where[id(net.conv.weight)]["weight_decay"] == 1e-4 and where[id(net.conv.weight)]["lr"] == 0.1
    assert where[id(net.conv.bias)]["lr"] == pytest.approx(0.2) and where[id(net.conv.bias)]["weight_decay"] == 1e-4
    assert where[id(net.bn.weight)] is where[id(net.ln.weight)]  # identical hyper-parameters share a group
    torch.optim.SGD(groups, lr=0.5)  # a valid optimizer input


def test_argument_parser_reads_detectron2_flags_and_overrides():
    parser = default_argument_parser()
    args = parser.parse_args(
        ["--config-file", "cfg.py", "--num-gpus", "2", "--resume", "train.max_iter=5", "optimizer.lr=0.1"]
    )
    assert args.config_file == "cfg.py" and args.num_gpus == 2 and args.resume and not args.eval_only
    assert args.num_machines == 1 and args.machine_rank == 0
    assert args.dist_url.startswith("tcp://127.0.0.1:")
    assert args.opts == ["train.max_iter=5", "optimizer.lr=0.1"]
    assert default_argument_parser().parse_args(["--eval-only"]).opts == []


def _gather_worker(out_dir: str) -> None:
    gathered = comm.all_gather(comm.get_rank() * 10)
    record = {
        "rank": comm.get_rank(),
        "world_size": comm.get_world_size(),
        "local_rank": comm.get_local_rank(),
        "local_size": comm.get_local_size(),
        "gathered": gathered,
        "model_is_ddp": type(wrap_ddp(nn.Linear(2, 2))).__name__,  # on CPU: DDP without device_ids
        "frozen_is_ddp": type(wrap_ddp(nn.Linear(2, 2).requires_grad_(False))).__name__,  # nothing to train
    }
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(record, f)


def test_launch_two_cpu_processes_gather(tmp_path):
    launch(_gather_worker, 2, dist_url="auto", args=(str(tmp_path),))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, record in enumerate(records):
        assert record == {
            "rank": rank,
            "world_size": 2,
            "local_rank": rank,
            "local_size": 2,
            "gathered": [0, 10],
            "model_is_ddp": "DistributedDataParallel",
            "frozen_is_ddp": "Linear",
        }


def test_launch_single_process_calls_directly(tmp_path):
    launch(_gather_worker, 1, args=(str(tmp_path),))
    record = json.loads((tmp_path / "rank0.json").read_text())
    assert record["world_size"] == 1 and record["gathered"] == [0] and record["model_is_ddp"] == "Linear"


@pytest.fixture
def restore_logging_and_seed_state(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", os.environ.get("PYTHONHASHSEED", "0"))
    names = ("detectron2", "fvcore", "samantics_d2")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level) for n in names}
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = benchmark
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.setLevel(level)


def test_default_setup_makes_the_run_reproducible(tmp_path, restore_logging_and_seed_state):
    config_file = tmp_path / "cfg.py"
    config_file.write_text("train = dict(seed=3)\n# a config file\n")
    out = tmp_path / "out"
    cfg = OmegaConf.create({"train": {"output_dir": str(out), "seed": 3, "max_iter": 7}})
    args = default_argument_parser().parse_args(["--config-file", str(config_file), "train.max_iter=7"])
    default_setup(cfg, args)
    drawn = torch.rand(3)
    torch.manual_seed(3)  # seed + rank 0
    assert torch.equal(drawn, torch.rand(3))

    assert OmegaConf.load(out / "config.yaml").train.max_iter == 7
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("log.txt")) == ["config.yaml"]  # as Detectron2
    write_run_files(str(out), args)  # train_net.py writes these itself, in both backends
    assert "torch" in (out / "env.txt").read_text().lower()
    assert "train.max_iter=7" in (out / "command.txt").read_text()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    setup_logger(str(out), name="samantics_d2")  # as train_net.py does: default_setup sets up detectron2 and fvcore
    logging.getLogger("samantics_d2.test").info("a line from the project logger")
    for handler in logging.getLogger("samantics_d2").handlers:
        handler.flush()
    log = (out / "log.txt").read_text()
    assert "Environment info" in log and "# a config file" in log and "a line from the project logger" in log
