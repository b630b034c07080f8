"""The linear-probe protocol (an evaluation of frozen encoders): train a grid of probes on frozen
features in one pass and report top-k on val (the meta-architecture and the feature sources live
in :mod:`samantics_d2.modeling.linear_probe`).

- :func:`train_probe_grid`: many probes (learning rate x pooling, each its own ``nn.Linear`` and
  parameter group) trained together, every probe on the same mini-batches, as DINOv2's linear
  evaluation does. The features come from a :class:`CachedFeatures` (the feature cache: one
  encoder pass for the whole grid and all epochs) or an :class:`EncoderFeatures` (the encoder
  re-run every epoch, for comparison). Both visit the rows in the same seeded order, so with the
  same rows they train the same numbers (see the tests). The best probe is chosen by top-1 on a
  seeded, class-stratified held-out part of train and reported on val.
- :func:`run_linear_probe`: cache train and val, train the grid, write the results JSON.

Since the probes share nothing, training them together gives each exactly what training it alone
would (Adam/SGD are per-parameter; the gradient of the summed losses w.r.t. one probe is its own).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..d2 import DatasetCatalog, MetadataCatalog, comm
from ..modeling.linear_probe.feature_cache import PooledEncoder, build_feature_cache
from ..modeling.linear_probe.probe import (
    OUR_PROTOCOL,
    CachedFeatures,
    FeatureSource,
    ProbeTrainingConfig,
    _epoch_order,
    _init_linear,
    holdout_split,
    mixed_precision_dtype,
)
from ..modeling.weights import module_fingerprint
from ..utils.io import atomic_path
from .classification import accuracy_from_topk, classification_metrics, write_classification_report

__all__ = ["HEAD_FILE", "RESULTS_FILE", "RESULTS_FORMAT", "ProbeGridOutput", "run_linear_probe", "train_probe_grid"]

logger = logging.getLogger(__name__)

RESULTS_FILE = "linear_probe_results.json"
HEAD_FILE = "linear_probe_head.pth"
RESULTS_FORMAT = "samantics_d2.linear_probe/1"


def _probe_name(pooling: str, lr: float) -> str:
    return f"{pooling}_lr{lr:g}"


@torch.no_grad()
def _rank_predictions(heads: Mapping[str, nn.Module], probes: Sequence[dict], source: FeatureSource, rows: np.ndarray,
                      *, batch_size: int, k: int) -> tuple[dict[str, np.ndarray], dict[str, float], np.ndarray]:
    """``({probe: [n, k] int64 best classes}, {probe: mean cross-entropy}, labels [n])`` over ``rows``."""
    ranked: dict[str, list[torch.Tensor]] = {p["name"]: [] for p in probes}
    loss_sums: dict[str, list[torch.Tensor]] = {p["name"]: [] for p in probes}  # kept on the device: no sync per batch
    labels = []
    for start in range(0, len(rows), batch_size):
        features, y = source.batch(rows[start : start + batch_size])
        labels.append(y)
        for p in probes:
            logits = heads[p["name"]](features[p["pooling"]])
            ranked[p["name"]].append(logits.topk(min(k, logits.shape[1]), dim=1).indices)
            loss_sums[p["name"]].append(F.cross_entropy(logits, y, reduction="sum").double())
    if not labels:
        return ({name: np.zeros((0, k), np.int64) for name in ranked}, {name: float("nan") for name in ranked},
                np.zeros(0, np.int64))
    labels_np = torch.cat(labels).cpu().numpy()
    losses = {name: float(torch.stack(v).sum()) / len(labels_np) for name, v in loss_sums.items()}
    return {name: torch.cat(v).cpu().numpy() for name, v in ranked.items()}, losses, labels_np


def _build_optimizer(config: ProbeTrainingConfig, params, lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _mixed_dtype(config: ProbeTrainingConfig, device: torch.device) -> Optional[torch.dtype]:
    dtype = mixed_precision_dtype(config.precision, device.type)
    if dtype == torch.bfloat16:
        logger.warning("precision='16-mixed' on %s: float16 AMP needs CUDA, so bfloat16 autocast is used (as Lightning "
                       "falls back to bf16-mixed).", device.type)
    return dtype


def _after_epoch(config: ProbeTrainingConfig, probes: Sequence[dict], active: list[int], heads: Mapping[str, nn.Module],
                 optimizers: Sequence[torch.optim.Optimizer], schedulers: Optional[Sequence[Any]],
                 source: FeatureSource, rows: np.ndarray, best: list[float], waits: list[int], epoch: int,
                 mixed: Optional[torch.dtype], device: torch.device) -> list[int]:
    """The monitored loss of each active probe -> plateau schedule step and early stopping (Lightning's
    order: EarlyStopping on the validation end, the epoch's scheduler step after it). Returns the
    probes that keep training."""
    watched = [probes[i] for i in active]
    for head in heads.values():
        head.eval()
    with torch.autocast(device.type, dtype=mixed, enabled=mixed is not None):
        _, losses, _ = _rank_predictions(heads, watched, source, rows, batch_size=config.eval_batch_size, k=1)
    for head in heads.values():
        head.train()
    keep = []
    for i in active:
        name, loss = probes[i]["name"], losses[probes[i]["name"]]
        stop = False
        if config.early_stopping_patience is not None:
            if loss < best[i]:
                best[i], waits[i] = loss, 0
            else:
                waits[i] += 1
            stop = waits[i] >= config.early_stopping_patience or not math.isfinite(loss)
        if config.schedule == "plateau":
            schedulers[i].step(loss)
        logger.info("Epoch %d: %s %s loss %.4f, lr %g%s.", epoch + 1, name, config.monitor, loss,
                    optimizers[i].param_groups[0]["lr"], ", early stop" if stop else "")
        if not stop:
            keep.append(i)
    return keep


@dataclass
class ProbeGridOutput:
    """What :func:`train_probe_grid` returns: the JSON-able ``results`` and the trained ``heads``."""

    results: dict[str, Any]
    heads: dict[str, nn.Linear]  # probe name -> its trained layer (eval mode)


def train_probe_grid(
    *,
    train: FeatureSource,
    val: FeatureSource,
    poolings: Sequence[str],
    num_classes: int,
    config: ProbeTrainingConfig = OUR_PROTOCOL,
    device: Union[str, torch.device] = "cpu",
    output_dir: Optional[str] = None,
    class_names: Optional[Sequence[str]] = None,
    run_info: Optional[Mapping[str, Any]] = None,
) -> ProbeGridOutput:
    """Train one probe per (pooling, learning rate) in one pass over ``train``; evaluate on ``val``.

    Args:
        train, val: feature sources (:class:`CachedFeatures` or :class:`EncoderFeatures`).
        poolings: the poolings to probe (each must be in both sources).
        num_classes: C, the size of each probe's output.
        config: optimisation, grid and selection (:data:`OUR_PROTOCOL` by default; :data:`PAPER_PROTOCOL`:
            the authors' recipe).
        output_dir: if given, ``linear_probe_results.json``, the chosen probe's weights
            (``linear_probe_head.pth``, loadable into :class:`LinearProbe`) and its validation
            confusion matrix / per-class accuracy are written there, atomically.
        class_names: for the per-class files (default ``"0".."C-1"``).
        run_info: JSON-able facts recorded in the results (encoder tag, datasets, cache provenance).

    Returns:
        ``results`` (as written to ``linear_probe_results.json``: per probe its final training loss
        and held-out / val top-k in percent, and ``chosen``: the probe with the best held-out top-1,
        or the only probe when there is no held-out part, with its val metrics) and the ``heads``.
    """
    if isinstance(config, Mapping):
        config = ProbeTrainingConfig(**config)
    device = torch.device(device)
    probes = [{"name": _probe_name(p, lr), "pooling": p, "lr": lr} for p in poolings for lr in config.learning_rates]
    if len(probes) > 1 and config.holdout_fraction <= 0:
        raise ValueError(
            f"{len(probes)} probes ({[p['name'] for p in probes]}) but holdout_fraction=0: there is no held-out part "
            "to choose among them without looking at val. Set holdout_fraction (e.g. 0.1) or train one probe."
        )
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}; a classifier needs at least 2 classes.")
    for name, source in (("train", train), ("val", val)):
        missing = [p for p in poolings if p not in source.feature_dims]
        if missing:
            raise KeyError(f"The {name} features have no pooling {missing}; they have {sorted(source.feature_dims)}.")
        if len(source.labels) and (source.labels.min() < 0 or source.labels.max() >= num_classes):
            raise ValueError(f"The {name} labels span [{source.labels.min()}, {source.labels.max()}], outside 0..{num_classes - 1}.")
    tic = time.perf_counter()
    train_rows, holdout_rows = holdout_split(train.labels, config.holdout_fraction, config.seed)
    if len(train_rows) == 0 or len(val.labels) == 0:
        raise ValueError(f"Nothing to train or evaluate on: {len(train_rows)} training rows, {len(val.labels)} val rows.")
    layers = nn.ModuleList([
        _init_linear(train.feature_dims[p["pooling"]], num_classes, config.seed, config.head_init) for p in probes
    ])
    layers.to(device)
    heads = {p["name"]: layer for p, layer in zip(probes, layers)}
    # One optimizer (and scheduler, scaler) per probe: Adam/SGD act per parameter, so this is what
    # training each probe alone gives, and the plateau schedule / early stopping can act per probe.
    optimizers = [_build_optimizer(config, heads[p["name"]].parameters(), p["lr"]) for p in probes]
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.schedule == "cosine":
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
                      for o in optimizers]
    elif config.schedule == "plateau":
        schedulers = [torch.optim.lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=config.plateau_factor,
                                                                 patience=config.plateau_patience) for o in optimizers]
    else:
        schedulers = None
    mixed = _mixed_dtype(config, device)
    scalers = [torch.amp.GradScaler("cuda") for _ in probes] if mixed == torch.float16 else None
    if config.monitor == "holdout" and config.watches_loss and len(holdout_rows) == 0:
        raise ValueError("monitor='holdout' but no training rows are held out; set holdout_fraction > 0.")
    monitor_source, monitor_rows = (val, np.arange(len(val.labels))) if config.monitor == "val" else (train, holdout_rows)
    logger.info("Training %d linear probes (%s) on %d rows (%d held out), %d epochs x %d steps.",
                len(probes), ", ".join(p["name"] for p in probes), len(train_rows), len(holdout_rows),
                config.epochs, steps_per_epoch)
    final_loss: dict[str, float] = {}
    epochs_trained = {p["name"]: 0 for p in probes}
    best_monitor = [math.inf] * len(probes)
    epochs_without_improvement = [0] * len(probes)
    active = list(range(len(probes)))  # probes still training (early stopping removes them)
    layers.train()
    for epoch in range(config.epochs):
        order = _epoch_order(train_rows, config.seed, epoch)
        loss_sums = torch.zeros(len(probes), device=device)
        for start in range(0, len(order), config.batch_size):
            features, labels = train.batch(order[start : start + config.batch_size])
            with torch.autocast(device.type, dtype=mixed, enabled=mixed is not None):
                losses = torch.stack([
                    F.cross_entropy(heads[probes[i]["name"]](features[probes[i]["pooling"]]), labels) for i in active
                ])
            for i in active:
                optimizers[i].zero_grad(set_to_none=True)
            if scalers is not None:
                torch.stack([scalers[i].scale(loss) for i, loss in zip(active, losses)]).sum().backward()
            else:
                losses.sum().backward()
            for i in active:
                if scalers is not None:
                    scalers[i].unscale_(optimizers[i])
                if config.grad_clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(heads[probes[i]["name"]].parameters(), config.grad_clip_norm)
                if scalers is not None:
                    scalers[i].step(optimizers[i])
                    scalers[i].update()
                else:
                    optimizers[i].step()
                if config.schedule == "cosine":
                    schedulers[i].step()
            loss_sums[active] += losses.detach().float() * len(labels)
        epoch_loss = (loss_sums / max(len(order), 1)).tolist()
        for i in active:
            final_loss[probes[i]["name"]] = float(epoch_loss[i])
            epochs_trained[probes[i]["name"]] = epoch + 1
        best = min(final_loss, key=final_loss.get)
        logger.info("Epoch %d/%d: mean training loss %s (lowest %s).", epoch + 1, config.epochs,
                    ", ".join(f"{probes[i]['name']}={epoch_loss[i]:.4f}" for i in active), best)
        if config.watches_loss:
            active = _after_epoch(config, probes, active, heads, optimizers, schedulers, monitor_source, monitor_rows,
                                  best_monitor, epochs_without_improvement, epoch, mixed, device)
            if not active:
                break
    layers.eval()

    k = max(config.topk)
    val_rows = np.arange(len(val.labels))
    with torch.autocast(device.type, dtype=mixed, enabled=mixed is not None):  # evaluated as trained (Lightning)
        val_ranked, val_loss, val_labels = _rank_predictions(heads, probes, val, val_rows,
                                                             batch_size=config.eval_batch_size, k=k)
        if len(holdout_rows):
            held_ranked, held_loss, held_labels = _rank_predictions(heads, probes, train, holdout_rows,
                                                                    batch_size=config.eval_batch_size, k=k)
    ks = config.topk
    records = []
    for p, optimizer in zip(probes, optimizers):
        record = dict(p, final_train_loss=final_loss[p["name"]], epochs_trained=epochs_trained[p["name"]],
                      final_lr=float(optimizer.param_groups[0]["lr"]))
        if len(holdout_rows):
            accuracy = accuracy_from_topk(held_ranked[p["name"]], held_labels, ks=ks)
            record["holdout"] = {**{f"top{k_}": v for k_, v in accuracy.items()}, "loss": held_loss[p["name"]]}
        accuracy = accuracy_from_topk(val_ranked[p["name"]], val_labels, ks=ks)
        record["val"] = {**{f"top{k_}": v for k_, v in accuracy.items()}, "loss": val_loss[p["name"]]}
        records.append(record)
    if len(holdout_rows):
        # Best held-out top-1; ties (frequent on easy data) go to the lower held-out loss, then grid order.
        chosen = min(records, key=lambda r: (-r["holdout"][f"top{ks[0]}"], r["holdout"]["loss"]))
        selected_by = f"held-out top-{ks[0]}, then held-out loss ({len(holdout_rows)} training rows)"
    else:
        chosen = records[0]
        selected_by = "single probe"
    val_metrics, confusion = classification_metrics(val_ranked[chosen["name"]], val_labels, num_classes, ks=ks)
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    results = {
        "format": RESULTS_FORMAT,
        **({"encoder": run_info["encoder_tag"]} if run_info and "encoder_tag" in run_info else {}),
        "run": dict(run_info or {}),
        "config": dataclasses.asdict(config),
        "precision_used": {torch.float16: "16-mixed", torch.bfloat16: "bf16-mixed", None: "32"}[mixed],
        "num_classes": num_classes,
        "rows": {"train": int(len(train_rows)), "holdout": int(len(holdout_rows)), "val": int(len(val_labels))},
        "probes": records,
        "chosen": {"name": chosen["name"], "pooling": chosen["pooling"], "lr": chosen["lr"], "selected_by": selected_by,
                   "val": val_metrics},
        "time_s": round(time.perf_counter() - tic, 3),
    }
    logger.info("Chosen probe %s (%s): val %s.", chosen["name"], selected_by,
                ", ".join(f"{k_}={v:.2f}" for k_, v in val_metrics.items()))
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        write_classification_report(output_dir, confusion, names, prefix="val_")
        head = heads[chosen["name"]]
        with atomic_path(os.path.join(output_dir, HEAD_FILE)) as tmp:
            torch.save({"model": {"head.weight": head.weight.detach().cpu(), "head.bias": head.bias.detach().cpu()},
                        "pooling": chosen["pooling"], "num_classes": num_classes}, tmp)
        with atomic_path(os.path.join(output_dir, RESULTS_FILE)) as tmp:
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1)
                f.write("\n")
    return ProbeGridOutput(results=results, heads=heads)


def run_linear_probe(
    *,
    encoder: nn.Module,
    encoder_tag: str,
    poolings: Sequence[str],
    train_dataset: str,
    val_dataset: str,
    cache_root: str,
    output_dir: str,
    normalization: str = "imagenet",
    config: Union[ProbeTrainingConfig, Mapping[str, Any]] = OUR_PROTOCOL,
    device: Union[str, torch.device] = "cpu",
    weights_hash: Optional[str] = None,
    shard_size: int = 4096,
    batch_size: int = 64,
    num_workers: int = 0,
    autocast_dtype: Optional[torch.dtype] = None,
    preload: bool = True,
    preprocess: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Cache the features of two registered datasets (all ranks), train the grid (main process).

    Returns the results on the main process, ``{}`` elsewhere. See :func:`build_feature_cache`
    and :func:`train_probe_grid` for the arguments; ``preprocess`` changes fields of the encoder's
    preprocessing (:class:`PooledEncoder`'s ``preprocess_changes``). With ``config.precision="16-mixed"``
    and no ``autocast_dtype``, the encoder runs under the probes' autocast (float16 on CUDA, bfloat16
    elsewhere, as Lightning's 16-mixed); the cache stores float16 features either way.
    """
    if isinstance(config, Mapping):
        config = ProbeTrainingConfig(**config)
    if autocast_dtype is None:
        autocast_dtype = _mixed_dtype(config, torch.device(device))
    pooled = PooledEncoder(encoder=encoder, poolings=poolings, normalization=normalization,
                           preprocess_changes=preprocess)
    if weights_hash is None:  # hash the weights once for both splits (a full pass over every parameter)
        weights_hash = module_fingerprint(encoder)
    caches = {}
    for split, name in (("train", train_dataset), ("val", val_dataset)):
        caches[split] = build_feature_cache(
            DatasetCatalog.get(name), encoder=pooled, encoder_tag=encoder_tag, dataset_name=name, cache_root=cache_root,
            weights_hash=weights_hash, shard_size=shard_size, batch_size=batch_size, num_workers=num_workers,
            device=device, autocast_dtype=autocast_dtype)
    if not comm.is_main_process():
        return {}
    classes = MetadataCatalog.get(train_dataset).get("classes")
    if classes is None:
        raise ValueError(f"Dataset {train_dataset!r} has no 'classes' metadata; register it as a classification dataset.")
    run_info = {
        "encoder_tag": encoder_tag,
        "train_dataset": train_dataset,
        "val_dataset": val_dataset,
        "caches": {split: c.cache_dir for split, c in caches.items()},
        "provenance": caches["train"].provenance,
        "skipped_images": {split: c.manifest["num_skipped"] for split, c in caches.items()},
    }
    output = train_probe_grid(
        train=CachedFeatures(caches["train"], poolings=poolings, device=device, preload=preload),
        val=CachedFeatures(caches["val"], poolings=poolings, device=device, preload=preload),
        poolings=poolings, num_classes=len(classes), config=config, device=device, output_dir=output_dir,
        class_names=classes, run_info=run_info)
    return output.results
