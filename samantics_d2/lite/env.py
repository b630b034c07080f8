"""Environment report and seeding, as ``detectron2.utils.collect_env`` / ``detectron2.utils.env``."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import random
import sys
from datetime import datetime
from typing import Optional

import numpy as np
import torch
from tabulate import tabulate

__all__ = ["collect_env_info", "seed_all_rng"]

logger = logging.getLogger(__name__)

# Distribution names whose versions a run report should carry.
_PACKAGES = (
    "samantics-d2",
    "torch",
    "torchvision",
    "numpy",
    "fvcore",
    "iopath",
    "omegaconf",
    "hydra-core",
    "pycocotools",
    "faster-coco-eval",
    "lvis",
    "timm",
    "pillow",
    "opencv-python-headless",
)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect_env_info() -> str:
    """A table (one ``name  value`` row per line) describing Python, packages and devices."""
    rows: list[tuple[str, str]] = [
        ("sys.platform", sys.platform),
        ("platform", platform.platform()),
        ("Python", sys.version.replace("\n", " ")),
        ("executable", sys.executable),
        ("detectron2", "importable" if importlib.util.find_spec("detectron2") else "not importable (lite backend)"),
    ]
    rows += [(name, _version(name)) for name in _PACKAGES]
    rows.append(("PyTorch built with CUDA", str(torch.version.cuda)))
    cuda = torch.cuda.is_available()
    rows.append(("CUDA available", str(cuda)))
    if cuda:
        rows.append(("cuDNN", str(torch.backends.cudnn.version())))
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            rows.append(
                (f"GPU {index}", f"{props.name} (capability {props.major}.{props.minor}, "
                                 f"{props.total_memory / 2**30:.1f} GiB)")
            )
        rows.append(("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")))
    rows.append(("torch threads", str(torch.get_num_threads())))
    rows.append(("CPU count", str(os.cpu_count())))
    return tabulate(rows)


def seed_all_rng(seed: Optional[int] = None) -> int:
    """Seed python's ``random``, NumPy and torch; ``None`` draws a fresh seed and logs it.

    Returns the seed used, so that a run can be repeated.
    """
    if seed is None:
        seed = (os.getpid() + int(datetime.now().strftime("%S%f")) + int.from_bytes(os.urandom(2), "big")) % 2**31
        logger.info("Using a generated random seed %d", seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    return seed
