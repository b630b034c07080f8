"""Command line, run set-up, DDP wrapping and default writers, as ``detectron2.engine.defaults``."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Mapping, Optional

import torch
from iopath.common.file_io import g_pathmgr
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import comm
from ..checkpoint import atomic_write
from ..env import collect_env_info, seed_all_rng
from ..events import CommonMetricPrinter, EventWriter, JSONWriter, TensorboardXWriter
from ..logger import setup_logger

__all__ = ["create_ddp_model", "default_argument_parser", "default_setup", "default_writers"]

logger = logging.getLogger(__name__)

_MISSING = object()


def default_argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line of Detectron2's training scripts.

    ``--config-file``, ``--resume``, ``--eval-only``, ``--num-gpus`` (per machine),
    ``--num-machines``, ``--machine-rank``, ``--dist-url``, then ``key=value`` config overrides.
    """
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train_net.py"
    parser = argparse.ArgumentParser(
        epilog=epilog
        or f"""Examples:
  one machine, 8 GPUs:
    $ {prog} --num-gpus 8 --config-file cfg.py
  override config values:
    $ {prog} --config-file cfg.py train.max_iter=1000 optimizer.lr=0.001
  two machines:
    (machine 0)$ {prog} --machine-rank 0 --num-machines 2 --dist-url tcp://<machine 0>:<port> [...]
    (machine 1)$ {prog} --machine-rank 1 --num-machines 2 --dist-url tcp://<machine 0>:<port> [...]
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to the config file")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume from the last checkpoint in the output directory (weights, optimizer, iteration, "
        "LR schedule) if there is one; otherwise load train.init_checkpoint",
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate only, no training")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes (GPUs) per machine")
    parser.add_argument("--num-machines", type=int, default=1, help="number of machines")
    parser.add_argument("--machine-rank", type=int, default=0, help="rank of this machine (unique per machine)")
    # A port derived from the user id, so that users sharing a machine do not collide; it is
    # only used when more than one process is launched.
    port = 2**15 + 2**14 + hash(os.getuid() if sys.platform != "win32" else 1) % 2**14
    parser.add_argument(
        "--dist-url",
        default=f"tcp://127.0.0.1:{port}",
        help="rendezvous URL of the process group ('auto': a free local port, one machine only); see "
        "https://pytorch.org/docs/stable/distributed.html",
    )
    parser.add_argument(
        "opts",
        help='config overrides at the end of the command, as "path.key=value"',
        default=None,
        nargs=argparse.REMAINDER,
    )
    return parser


def _config_value(cfg: Any, keys: tuple[str, ...], default: Any) -> Any:
    """The first of the dotted ``keys`` present in ``cfg`` (a LazyConfig DictConfig, a dict or a
    yacs-style CfgNode with attribute access), else ``default``."""
    for dotted in keys:
        node = cfg
        for part in dotted.split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif not isinstance(node, Mapping) and hasattr(node, part):
                node = getattr(node, part)
            else:
                node = _MISSING
                break
        if node is not _MISSING:
            return node
    return default


def _save_config(cfg: Any, path: str) -> None:
    from ..config import LazyConfig  # imported here: config imports are not needed by the trainer

    if isinstance(cfg, DictConfig):
        LazyConfig.save(cfg, path)
    elif callable(getattr(cfg, "dump", None)):  # a yacs CfgNode
        text = cfg.dump()
        atomic_write(path, lambda f: f.write(text.encode()))
    elif isinstance(cfg, Mapping):
        LazyConfig.save(OmegaConf.create(dict(cfg)), path)
    else:
        raise TypeError(f"default_setup cannot save a config of type {type(cfg).__name__}; expected a LazyConfig DictConfig.")


def default_setup(cfg: Any, args: argparse.Namespace) -> None:
    """Make the run reproducible from its output directory and set up logging and seeds.

    - creates the output directory (``cfg.train.output_dir``, or ``cfg.OUTPUT_DIR`` for a
      yacs-style config) on the main process;
    - logs loggers ``detectron2`` and ``fvcore`` to ``<output>/log.txt`` (rank r > 0:
      ``log.txt.rank<r>``, no console);
    - logs rank and world size, the environment, the command line and the config file;
    - writes ``config.yaml`` (the resolved config) to the output directory (as Detectron2, no other file);
    - seeds python/numpy/torch with ``train.seed + rank`` when ``train.seed >= 0``, else with a
      random seed that is logged;
    - sets ``torch.backends.cudnn.benchmark`` from ``train.cudnn_benchmark`` when training.
    """
    output_dir = _config_value(cfg, ("train.output_dir", "OUTPUT_DIR"), None)
    rank = comm.get_rank()
    if output_dir and comm.is_main_process():
        g_pathmgr.mkdirs(output_dir)
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    d2_logger = setup_logger(output_dir, distributed_rank=rank, name="detectron2")

    env_info = collect_env_info()
    d2_logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    d2_logger.info("Environment info:\n%s", env_info)
    d2_logger.info("Command line arguments: %s", args)
    config_file = getattr(args, "config_file", "")
    if config_file:
        with g_pathmgr.open(config_file, "r") as f:
            d2_logger.info("Contents of args.config_file=%s:\n%s", config_file, f.read())

    if output_dir and comm.is_main_process():
        config_path = os.path.join(output_dir, "config.yaml")
        _save_config(cfg, config_path)
        d2_logger.info("Full config saved to %s", config_path)

    seed = int(_config_value(cfg, ("train.seed", "SEED"), -1))
    used_seed = seed_all_rng(seed + rank if seed >= 0 else None)
    d2_logger.info("Random seed of rank %d: %d", rank, used_seed)
    if not getattr(args, "eval_only", False):
        torch.backends.cudnn.benchmark = bool(_config_value(cfg, ("train.cudnn_benchmark", "CUDNN_BENCHMARK"), False))


def default_writers(output_dir: str, max_iter: Optional[int] = None) -> list[EventWriter]:
    """Console printer, ``<output_dir>/metrics.json`` and TensorBoard event files in ``output_dir``."""
    g_pathmgr.mkdirs(output_dir)
    return [
        CommonMetricPrinter(max_iter),
        JSONWriter(os.path.join(output_dir, "metrics.json")),
        TensorboardXWriter(output_dir),
    ]


def create_ddp_model(model: nn.Module, *, fp16_compression: bool = False, **kwargs: Any) -> nn.Module:
    """``model`` itself in a single process; otherwise ``DistributedDataParallel(model, **kwargs)``.

    As in Detectron2, ``device_ids`` defaults to ``[local rank]``, which DDP accepts only for a
    model on that GPU: pass ``device_ids=None`` for a CPU model (``samantics_d2.engine.wrap_ddp``
    does). ``fp16_compression`` halves the gradient all-reduce traffic (fp16 communication hook).
    """
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs:
        kwargs["device_ids"] = [comm.get_local_rank()]
    ddp = DistributedDataParallel(model, **kwargs)
    if fp16_compression:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(state=None, hook=default_hooks.fp16_compress_hook)
    return ddp
