#!/usr/bin/env python
"""Train or evaluate a model described by a LazyConfig file (Detectron2's lazyconfig script shape).

    python train_net.py --config-file configs/quick/tiny_segmenter_shapes.py
    python train_net.py --config-file configs/quick/tiny_segmenter_shapes.py --eval-only \
        train.init_checkpoint=output/quick_tiny_segmenter/model_final.pth
    python train_net.py --config-file ... --num-gpus 2 train.max_iter=100   # 2 processes (gloo on CPU)

The config provides ``model``, ``optimizer``, ``lr_multiplier``, ``dataloader.{train,test,evaluator}``
and ``train`` (see configs/common/train.py). A config with a ``job`` node trains by running that job
instead of the iteration loop (the cached linear-probe grid). Configs without ``dataloader.train``
or without an optimizer (training-free pipelines) can only be run with ``--eval-only``.
Every Detectron2 name comes from the seam ``samantics_d2.d2`` (Detectron2 or its lite subset).
"""
from __future__ import annotations

import json
import logging

from omegaconf import OmegaConf

import samantics_d2  # noqa: F401  (registers datasets and components)
from samantics_d2.checkpoint import load_init_checkpoint
from samantics_d2.config import check_override_keys, check_weights_available, load_config
from samantics_d2.d2 import (
    DetectionCheckpointer,
    LazyConfig,
    comm,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    inference_on_dataset,
    instantiate,
    launch,
    log_backend,
    print_csv_format,
    setup_logger,
)
from samantics_d2.engine import build_trainer, wrap_ddp, write_run_files
from samantics_d2.references import prepare_references

logger = logging.getLogger("samantics_d2.train_net")


def do_test(cfg, model):
    """Run ``dataloader.test`` through the model and ``dataloader.evaluator``; returns the results."""
    if "evaluator" not in cfg.dataloader:
        logger.warning("The config has no dataloader.evaluator: nothing to evaluate.")
        return {}
    prepare_references(model)  # reference features with the loaded weights, before the first image
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process() and results:
        print_csv_format(results)
    return results


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = wrap_ddp(model, **cfg.train.ddp)
    trainer = build_trainer(model, train_loader, optimizer, amp=cfg.train.amp.enabled)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
            if comm.is_main_process()
            else None,
        ]
    )
    if args.resume and checkpointer.has_checkpoint():
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=True)
    elif cfg.train.init_checkpoint:  # checked: a checkpoint of another model is an error, not a warning
        load_init_checkpoint(model, cfg.train.init_checkpoint, training=True)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    result = run(args)
    # Every rank leaves together: a rank that tore down while rank 0 was still evaluating was seen
    # aborting ("terminate called without an active exception", SIGABRT) in 2 full test runs.
    comm.synchronize()
    return result


def run(args):
    cfg = load_config(args.config_file, args.opts)  # a misspelt key fails here, before anything runs
    check_weights_available(cfg, args.config_file)  # every missing weight file at once, before any work
    default_setup(cfg, args)
    write_run_files(cfg.train.output_dir, args)  # Detectron2's default_setup only logs them
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="samantics_d2")
    log_backend()

    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = wrap_ddp(model)
        if cfg.train.init_checkpoint:
            load_init_checkpoint(model, cfg.train.init_checkpoint, training=False)
        else:
            logger.warning("train.init_checkpoint is empty: evaluating the model as built by the config.")
        return do_test(cfg, model)
    if "job" in cfg:
        # A training job that is not an iteration loop (the cached linear-probe grid): run it.
        results = instantiate(cfg.job)
        if comm.is_main_process():
            logger.info("Job results:\n%s", json.dumps(results, indent=1, default=str))
        return results
    missing = [key for key in ("optimizer", "lr_multiplier", "dataloader.train") if OmegaConf.select(cfg, key) is None]
    if missing:
        raise ValueError(f"{args.config_file} describes no training (missing {missing}): run it with --eval-only.")
    do_train(args, cfg)


def invoke_main() -> None:
    parser = default_argument_parser()
    args = parser.parse_args()
    if not args.config_file:
        parser.error("--config-file is required, e.g. --config-file configs/quick/tiny_segmenter_shapes.py")
    # Validate the overrides in the parent process too, so a typo fails before workers are spawned.
    check_override_keys(LazyConfig.load(args.config_file), args.opts)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
