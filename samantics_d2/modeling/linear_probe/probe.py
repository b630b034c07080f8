"""Linear probes on frozen encoders: the meta-architecture, the probes' training settings and the
feature sources.

- :class:`LinearProbe` (``META_ARCH_REGISTRY``): frozen encoder -> pooling -> ``nn.Linear``; for
  ``train_net.py`` with the encoder in the loop. Training returns ``{"loss_cls"}``, inference
  ``[{"logits": [C], "pred_class"}]`` (evaluate with ``ClassificationEvaluator``).
- :class:`CachedFeatures` (the feature cache) and :class:`EncoderFeatures` (the encoder in the
  loop): what :func:`samantics_d2.evaluation.linear_probe.train_probe_grid` trains on; both visit
  rows in the same seeded order (:func:`_epoch_order`).
- :class:`ProbeTrainingConfig`: optimisation, grid and selection (:data:`PAPER_PROTOCOL`,
  :data:`GRID_PROTOCOL`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...d2 import META_ARCH_REGISTRY, configurable
from ...utils.checks import raise_if_problems
from ...utils.image import read_image
from ...yacs_config import check_yacs_config, dataset_classes, node_kwargs
from ..backbone import build_encoder
from .feature_cache import FeatureCache, PooledEncoder

__all__ = [
    "mixed_precision_dtype",
    "GRID_PROTOCOL",
    "HEAD_INITS",
    "OUR_PROTOCOL",
    "PAPER_PROTOCOL",
    "CachedFeatures",
    "EncoderFeatures",
    "LinearProbe",
    "ProbeTrainingConfig",
    "holdout_split",
]

logger = logging.getLogger(__name__)



HEAD_INITS: dict[str, str] = {
    "normal": "weights ~ N(0, 0.01^2), zero bias (DINOv2's linear evaluation; our default)",
    "torch_default": "nn.Linear's own initialisation: weights and bias ~ U(-1/sqrt(D), 1/sqrt(D)) (the authors' train.py)",
}
SCHEDULES = ("constant", "cosine", "plateau")
PRECISIONS = ("32", "16-mixed")


@dataclass(frozen=True)
class ProbeTrainingConfig:
    """How the probes are trained.

    Attributes:
        learning_rates: one probe per learning rate (and per pooling).
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
        weight_decay: L2 penalty of the optimizer.
        epochs, batch_size: passes over the training rows, rows per step (the last batch may be smaller).
        schedule: ``"constant"``, ``"cosine"`` (per step, to 0 at the end) or ``"plateau"``
            (``torch.optim.lr_scheduler.ReduceLROnPlateau`` on the ``monitor`` loss after every epoch:
            the learning rate times ``plateau_factor`` once the loss has not improved for more than
            ``plateau_patience`` epochs).
        holdout_fraction: share of each class's training rows held out to choose the best probe
            (0: no held-out part; only allowed with a single probe).
        seed: seeds the held-out split, the probe initialisation and the order of the rows.
        eval_batch_size: rows per step when computing accuracies.
        topk: accuracies reported.
        head_init: one of :data:`HEAD_INITS` (seeded by ``seed`` either way).
        grad_clip_norm: clip each probe's gradient (weight and bias together) to this L2 norm
            (``torch.nn.utils.clip_grad_norm_``, as Lightning's ``gradient_clip_val``); None: no clipping.
        early_stopping_patience: stop a probe once its ``monitor`` loss has not decreased for this
            many epochs in a row, or is not finite (Lightning's ``EarlyStopping``, min_delta 0); None: never.
        monitor: the rows whose mean cross-entropy drives ``"plateau"`` and early stopping:
            ``"val"`` (the authors': ImageNet val, also the reported split) or ``"holdout"``.
        precision: ``"32"`` or ``"16-mixed"``, as Lightning resolves ``precision="16-mixed"``: on CUDA
            float16 autocast + a gradient scaler per probe; elsewhere bfloat16 autocast without scaling
            (Lightning's bf16-mixed fallback on CPU). The results' ``precision_used`` says which.
    """

    learning_rates: tuple[float, ...] = (1e-3,)
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 128
    schedule: str = "constant"
    holdout_fraction: float = 0.0
    seed: int = 0
    eval_batch_size: int = 4096
    topk: tuple[int, ...] = (1, 5)
    head_init: str = "normal"
    grad_clip_norm: Optional[float] = None
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    early_stopping_patience: Optional[int] = None
    monitor: str = "val"
    precision: str = "32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "learning_rates", tuple(float(lr) for lr in self.learning_rates))
        object.__setattr__(self, "topk", tuple(int(k) for k in self.topk))
        problems = []
        if not self.learning_rates or min(self.learning_rates) <= 0:
            problems.append(f"learning_rates={self.learning_rates} must be non-empty and positive")
        if self.optimizer not in ("adam", "sgd"):
            problems.append(f"optimizer={self.optimizer!r} must be 'adam' or 'sgd'")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            problems.append(f"epochs={self.epochs}, batch_size={self.batch_size}, eval_batch_size="
                            f"{self.eval_batch_size} must be >= 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            problems.append(f"holdout_fraction={self.holdout_fraction} must be in [0, 1)")
        if self.head_init not in HEAD_INITS:
            problems.append(f"head_init={self.head_init!r} must be one of {sorted(HEAD_INITS)}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            problems.append(f"grad_clip_norm={self.grad_clip_norm!r} must be > 0 or None")
        if not 0.0 < self.plateau_factor < 1.0 or self.plateau_patience < 0:
            problems.append(f"plateau_factor={self.plateau_factor} must be in (0, 1) and plateau_patience="
                            f"{self.plateau_patience} >= 0")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            problems.append(f"early_stopping_patience={self.early_stopping_patience!r} must be >= 1 or None")
        if self.monitor not in ("val", "holdout"):
            problems.append(f"monitor={self.monitor!r} must be 'val' or 'holdout'")
        elif self.monitor == "holdout" and self.holdout_fraction <= 0 and self.watches_loss:
            problems.append("monitor='holdout' needs holdout_fraction > 0")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} must be one of {PRECISIONS}")
        raise_if_problems("Invalid ProbeTrainingConfig", problems)

    @property
    def watches_loss(self) -> bool:
        """Whether training reads the ``monitor`` loss after every epoch (plateau schedule or early stopping)."""
        return self.schedule == "plateau" or self.early_stopping_patience is not None


def mixed_precision_dtype(precision: str, device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of a precision setting, as Lightning resolves it: None for ``"32"``; for
    ``"16-mixed"`` float16 on CUDA and bfloat16 elsewhere (Lightning warns that float16 AMP is not
    supported on CPU and uses bf16-mixed)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; expected one of {PRECISIONS}.")
    if precision == "32":
        return None
    return torch.float16 if device_type == "cuda" else torch.bfloat16


# Ours (the default): N(0, 0.01^2) head, constant learning rate, no clipping, float32 probes.
OUR_PROTOCOL = ProbeTrainingConfig()
# "There is no SAMantics!" as linprob_img_encoders/train.py trains it: Linear(d, classes) with PyTorch's
# init, Adam 1e-3, 10 epochs, batch 128, gradients clipped to norm 1.0, ReduceLROnPlateau (0.5, patience 5)
# and early stopping (patience 7) on the val loss, 16-mixed precision (bf16 on CPU), trained on all of train
# (pair it with normalization="imagenet" and the authors' resizing, configs/linear_probe/*).
PAPER_PROTOCOL = ProbeTrainingConfig(
    head_init="torch_default", grad_clip_norm=1.0, schedule="plateau", plateau_factor=0.5, plateau_patience=5,
    early_stopping_patience=7, monitor="val", precision="16-mixed",
)
# A DINOv2-style sweep: five learning rates chosen on 10% of train.
GRID_PROTOCOL = ProbeTrainingConfig(learning_rates=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2), holdout_fraction=0.1)


def _init_linear(in_features: int, num_classes: int, seed: int, init: str = "normal") -> nn.Linear:
    """``nn.Linear(in_features, num_classes)`` initialised by ``init`` (:data:`HEAD_INITS`) from ``seed``.

    ``"torch_default"`` draws exactly what ``torch.manual_seed(seed); nn.Linear(...)`` draws, without
    touching the global random state.
    """
    if init not in HEAD_INITS:
        raise ValueError(f"Unknown head init {init!r}; expected one of {sorted(HEAD_INITS)}.")
    if init == "torch_default":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only (nn.Linear draws on it)
            return nn.Linear(in_features, num_classes)
    layer = nn.Linear(in_features, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(num_classes, in_features, generator=generator) * 0.01)
        layer.bias.zero_()
    return layer


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (train, held-out), ``round(fraction * n_c)`` held out per class ``c``.

    Deterministic in ``seed``; both arrays are sorted.
    """
    labels = np.asarray(labels)
    if fraction <= 0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        held.append(rng.permutation(rows)[: int(round(fraction * len(rows)))])
    held_rows = np.sort(np.concatenate(held)).astype(np.int64)
    return np.setdiff1d(np.arange(len(labels)), held_rows), held_rows


def _epoch_order(rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(rows)


class FeatureSource(Protocol):
    """Rows of pooled features: ``labels`` ``[N]``, ``feature_dims`` ``{pooling: D}``, ``batch(rows)``."""

    labels: np.ndarray
    feature_dims: dict[str, int]

    def batch(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]: ...


class CachedFeatures:
    """Rows of a :class:`FeatureCache`; with ``preload`` all features sit on ``device`` as float16.

    ``batch(rows)`` -> ``({pooling: [n, D] float32}, labels [n] int64)`` on ``device``.
    """

    def __init__(self, cache: Union[FeatureCache, str], *, poolings: Sequence[str], device: Union[str, torch.device] = "cpu",
                 preload: bool = True):
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        self.device = torch.device(device)
        self.poolings = list(poolings)
        for p in self.poolings:
            self.cache._check(p)
        self.labels = self.cache.labels()
        self.feature_dims = {p: int(self.cache.feature_dims[p]) for p in self.poolings}
        self._labels = torch.from_numpy(self.labels).to(self.device)
        self._features = ({p: torch.from_numpy(self.cache.features(p)).to(self.device) for p in self.poolings}
                          if preload else None)

    def batch(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
        if self._features is not None:
            features = {p: t.index_select(0, index).float() for p, t in self._features.items()}
        else:
            features = {p: torch.from_numpy(self.cache.take(p, rows)).to(self.device).float() for p in self.poolings}
        return features, self._labels.index_select(0, index)


class EncoderFeatures:
    """Rows computed on demand by the frozen encoder (the encoder-in-the-loop path).

    Row ``i`` is ``dataset[i]``. Images that cannot be read are logged by file name and dropped from
    the batch. With ``encoder.round_to=torch.float16`` the features are rounded as the cache stores them.
    """

    def __init__(self, dataset: Sequence[dict], *, encoder: PooledEncoder, device: Union[str, torch.device] = "cpu",
                 image_reader: Callable[[str], np.ndarray] = read_image, autocast_dtype: Optional[torch.dtype] = None):
        self.dataset, self.encoder, self.reader = dataset, encoder, image_reader
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.labels = np.asarray([int(d["label"]) for d in dataset], dtype=np.int64)
        self.skipped: set[str] = set()  # file names of unreadable images
        probe_features, _ = self.batch(np.zeros(1, dtype=np.int64))
        self.feature_dims = {p: int(t.shape[1]) for p, t in probe_features.items()}

    def batch(self, rows: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        images, labels = [], []
        for r in rows:
            file_name = self.dataset[int(r)]["file_name"]
            try:
                images.append(self.reader(file_name))
            except (OSError, ValueError) as e:
                logger.warning("Skipping unreadable image %s: %s", file_name, e)
                self.skipped.add(file_name)
                continue
            labels.append(int(self.labels[int(r)]))
        if not images:
            raise RuntimeError(f"None of the {len(rows)} images of a batch could be read (first row {int(rows[0])}).")
        x = self.encoder.prepare(images).to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            features = self.encoder(x)
        return {p: t.float() for p, t in features.items()}, torch.tensor(labels, dtype=torch.int64, device=self.device)


@META_ARCH_REGISTRY.register()
class LinearProbe(nn.Module):
    """A linear classifier on pooled features of a frozen encoder.

    Input: a list of dataset dicts with ``image`` (uint8 ``[3, H, W]`` RGB, any size: it is fitted by
    the encoder's preprocessing) and, in training, ``label`` (int). Training returns
    ``{"loss_cls": scalar}``; inference returns ``[{"logits": [C], "pred_class": int64 scalar}]``.
    Only ``head`` has trainable parameters; the encoder stays frozen and in eval mode.

    Args:
        backbone: the encoder (``EncoderBackbone`` interface, see :class:`PooledEncoder`).
        pooling: one of ``cls``, ``embed``, ``mean_patch``, ``neck_mean``.
        num_classes: C.
        normalization: ``"encoder"`` or ``"imagenet"`` pixel statistics.
        in_features: the pooled feature size; default from ``backbone.output_shape()`` (or one
            forward pass on a blank image when the output is not listed there).
        round_features_to: e.g. ``torch.float16`` to see features exactly as the feature cache stores them.
        init_seed: seed of the head's initialisation.
        head_init: one of :data:`HEAD_INITS` (``"normal"``: N(0, 0.01^2); ``"torch_default"``: the authors').
        preprocess: changes to the encoder's preprocessing (:class:`PreprocessSpec` fields, e.g. the
            authors' ``{"fit": "resize_square", "interpolation": "bilinear"}`` for SAM); None: the encoder's own.
        precision: ``"32"`` or ``"16-mixed"``: encoder and head under the autocast the probe was trained
            with (:func:`mixed_precision_dtype`: float16 on CUDA, bfloat16 elsewhere).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        pooling: str,
        num_classes: int,
        normalization: str = "encoder",
        in_features: Optional[int] = None,
        round_features_to: Optional[torch.dtype] = None,
        init_seed: int = 0,
        head_init: str = "normal",
        preprocess: Optional[Mapping[str, Any]] = None,
        precision: str = "32",
    ):
        super().__init__()
        mixed_precision_dtype(precision, "cpu")  # validates the name
        self.precision = precision
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes}; a classifier needs at least 2 classes.")
        self.encoder = PooledEncoder(encoder=backbone, poolings=[pooling], normalization=normalization,
                                     round_to=round_features_to, preprocess_changes=preprocess)
        self.pooling = pooling
        if in_features is None:
            in_features = self._feature_size()
        self.head = _init_linear(in_features, num_classes, init_seed, head_init)

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Yacs path (:mod:`samantics_d2.yacs_config`): the encoder of ``MODEL.SAMANTICS.BACKBONE``,
        ``.LINEAR_PROBE`` and the ``classes`` of ``DATASETS.TRAIN[0]`` (else ``TEST[0]``). The trained
        head comes from ``MODEL.WEIGHTS`` (``linear_probe_head.pth`` of a training run)."""
        check_yacs_config(cfg, cls.__name__)
        classes = dataset_classes(cfg, key="classes", splits=["TRAIN", "TEST"])
        if classes is None:
            raise ValueError("LinearProbe takes its classes from DATASETS.TRAIN[0] (or TEST[0]); both are empty.")
        return {
            "backbone": build_encoder(**node_kwargs(cfg.MODEL.SAMANTICS.BACKBONE)),
            "num_classes": len(classes),
            **node_kwargs(cfg.MODEL.SAMANTICS.LINEAR_PROBE),
        }

    def _feature_size(self) -> int:
        key = self.encoder.keys[self.pooling]
        shapes = self.encoder.encoder.output_shape() if hasattr(self.encoder.encoder, "output_shape") else {}
        if key in shapes and shapes[key].channels:
            return int(shapes[key].channels)
        size = self.encoder.spec.input_size
        logger.info("LinearProbe: %r is not in the encoder's output_shape(); measuring it with one forward pass.", key)
        param = next(self.encoder.encoder.parameters(), None)
        x = torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu")
        return int(self.encoder(x)[self.pooling].shape[1])

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, batched_inputs: list[dict]):
        x = self.encoder.prepare([d["image"] for d in batched_inputs]).to(self.device)
        dtype = mixed_precision_dtype(self.precision, x.device.type)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.head(self.encoder(x)[self.pooling]).float()
        if self.training:
            labels = torch.tensor([int(d["label"]) for d in batched_inputs], dtype=torch.int64, device=self.device)
            return {"loss_cls": F.cross_entropy(logits, labels)}
        pred = logits.argmax(dim=1)
        return [{"logits": logits[i], "pred_class": pred[i]} for i in range(len(batched_inputs))]
