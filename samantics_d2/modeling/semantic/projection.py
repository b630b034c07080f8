"""A learned projection of frozen SAM (or DINOv2) mask embeddings that brings a class's whole and part
embeddings together (issue 16, item 3), and the job that trains and measures it.

The seed's observation: SAM's embeddings of a whole object and of its parts lie far apart, so a
memory bank of whole-object centres labels parts badly. :class:`SemanticProjection` is an MLP
trained on cached embeddings (SAM stays frozen) with

- a **cosine** term pulling each embedding to the nearest centre of its class (the memory bank's
  K-means centres, projected by the same MLP; optionally learned jointly, the seed's next step)
  and each mined part to its whole (``1 - cos``), and
- a **margin** term pushing it away from every other class: ``relu(margin - cos_own + cos_other)``
  with ``cos_other`` the best centre of another class.

Whole/part pairs are mined from SAM's three multimask outputs of one click inside each training
instance (:func:`~.sam_embeddings.mine_whole_part`); ground-truth parts are used only to measure.
:func:`run_sam_clustering` (a ``train_net.py`` job) builds the cached embeddings of the train and
val splits, the bank, trains one projection per source and reports top-1 on whole and part masks
of val, before and after the projection.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from fvcore.common.registry import Registry

from ...d2 import Boxes, Instances
from ...utils.image import read_image
from ...utils.io import atomic_path
from .classifier import PrototypeClassifier
from .sam_embeddings import (
    ROLES,
    InstanceEmbeddingConfig,
    MiningConfig,
    SamMaskEmbedder,
    bank_detections,
    classify_embeddings,
    instance_embeddings,
    sam_memory_bank,
    top1_accuracy,
)

__all__ = [
    "SEMANTIC_PROJECTION_REGISTRY",
    "ProjectionTrainingConfig",
    "SemanticProjection",
    "build_semantic_projection",
    "projection_loss",
    "run_sam_clustering",
    "train_projection",
    "training_rows",
]

logger = logging.getLogger(__name__)

SEMANTIC_PROJECTION_REGISTRY = Registry("SEMANTIC_PROJECTION")
SEMANTIC_PROJECTION_REGISTRY.__doc__ = """Heads that map frozen mask embeddings into a semantic space
(``build_semantic_projection(name, **options)``)."""


@SEMANTIC_PROJECTION_REGISTRY.register()
class SemanticProjection(nn.Module):
    """An MLP from mask embeddings to an L2-normalised semantic space, with the class centres it compares to.

    Args:
        in_dim: ``D``, the embedding width (SAM's mask token: the decoder width, 256).
        out_dim: width of the projected space.
        hidden_dim: width of the hidden layers.
        num_layers: linear layers (GELU between them).
        centres: ``[K, M, D]`` class centres in the embedding space (the memory bank's K-means
            centres), projected by the MLP at every call; valid: ``[K, M]`` bool.
        learn_centres: the centres are parameters trained with the MLP (else a fixed buffer).
        input_mean, input_std: ``[D]`` statistics the inputs (and centres) are standardised with
            before the MLP (:func:`train_projection` sets those of its training rows; default 0 and 1).
            SAM's mask tokens vary little around a large common part (they leave a LayerNorm): without
            it the MLP collapses them to one point.
    """

    def __init__(
        self,
        *,
        in_dim: int,
        out_dim: int = 128,
        hidden_dim: int = 256,
        num_layers: int = 2,
        centres: torch.Tensor,
        valid: torch.Tensor,
        learn_centres: bool = False,
        input_mean: Optional[torch.Tensor] = None,
        input_std: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        if num_layers < 1 or centres.ndim != 3 or centres.shape[-1] != in_dim or valid.shape != centres.shape[:2]:
            raise ValueError(
                f"SemanticProjection got num_layers={num_layers}, centres {tuple(centres.shape)} and valid "
                f"{tuple(valid.shape)} for in_dim={in_dim}; expected num_layers >= 1, [K, M, {in_dim}] and [K, M]."
            )
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.learn_centres = bool(learn_centres)
        if self.learn_centres:
            self.centres = nn.Parameter(centres.detach().float().clone())
        else:
            self.register_buffer("centres", centres.detach().float().clone())
        self.register_buffer("valid", valid.bool().clone())
        self.register_buffer("input_mean", torch.zeros(in_dim) if input_mean is None else input_mean.float().clone())
        self.register_buffer("input_std", torch.ones(in_dim) if input_std is None else input_std.float().clone())

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` -> ``[N, out_dim]`` unit vectors."""
        return F.normalize(self.mlp((embeddings.float() - self.input_mean) / self.input_std), dim=-1)

    def projected_centres(self) -> torch.Tensor:
        """``[K, M, out_dim]`` unit vectors (rows of invalid centres are meaningless)."""
        k, m, d = self.centres.shape
        return self(self.centres.reshape(k * m, d)).view(k, m, -1)

    def classify(self, embeddings: torch.Tensor, **unknown: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`~.sam_embeddings.classify_embeddings` in the projected space."""
        return classify_embeddings(self(embeddings), self.projected_centres(), self.valid, **unknown)


def build_semantic_projection(name: str = "SemanticProjection", **options: Any) -> nn.Module:
    """The registered projection ``name`` built with ``options``."""
    return SEMANTIC_PROJECTION_REGISTRY.get(name)(**options)


def projection_loss(
    projected: torch.Tensor,
    labels: torch.Tensor,
    centres: torch.Tensor,
    valid: torch.Tensor,
    *,
    pairs: Optional[torch.Tensor] = None,
    margin: float = 0.2,
    margin_weight: float = 1.0,
    cosine_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Margin + cosine objective.

    Args:
        projected: ``[N, E]`` unit vectors; labels: ``[N]`` class ids.
        centres: ``[K, M, E]`` unit vectors; valid: ``[K, M]`` bool (every class needs one).
        pairs: ``[P, 2]`` row indices of embeddings of one instance (whole and part) pulled together.

    Returns:
        ``{"loss_margin", "loss_cosine"}``: ``margin_weight * mean relu(margin - cos_own + cos_other)``
        and ``cosine_weight * (mean (1 - cos_own) + mean over pairs (1 - cos))``, where ``cos_own`` is
        the best centre of the row's class and ``cos_other`` the best centre of any other class.
    """
    cosine = torch.einsum("ne,kme->nkm", projected, centres).masked_fill(~valid[None], -2.0).amax(dim=2)  # [N, K]
    own = cosine.gather(1, labels[:, None])[:, 0]
    other = cosine.scatter(1, labels[:, None], -2.0).amax(dim=1)
    loss_cosine = (1.0 - own).mean()
    if pairs is not None and pairs.numel():
        loss_cosine = loss_cosine + (1.0 - (projected[pairs[:, 0]] * projected[pairs[:, 1]]).sum(-1)).mean()
    return {
        "loss_margin": margin_weight * F.relu(margin - own + other).mean(),
        "loss_cosine": cosine_weight * loss_cosine,
    }


@dataclass(frozen=True)
class ProjectionTrainingConfig:
    """How :func:`train_projection` trains (full batch: the cached rows fit in memory).

    Attributes:
        out_dim, hidden_dim, num_layers: the MLP (:class:`SemanticProjection`).
        learn_centres: train the bank centres with it.
        steps, lr, weight_decay: AdamW, full batch, cosine decay to 0.
        margin, margin_weight, cosine_weight: :func:`projection_loss`.
        seed: the MLP's initialisation.
        cpu_threads: torch's intra-op threads while training on the CPU (the steps are small: one
            thread avoids the threads' overhead, badly so on a loaded machine: 1.6 s vs 48 s for the
            150 steps of tests/test_projection.py with 2 threads at load 14); None: unchanged.
    """

    out_dim: int = 128
    hidden_dim: int = 256
    num_layers: int = 2
    learn_centres: bool = False
    steps: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-4
    margin: float = 0.2
    margin_weight: float = 1.0
    cosine_weight: float = 1.0
    seed: int = 0
    cpu_threads: Optional[int] = 1


def training_rows(stored, source: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows a projection trains on: box-prompted wholes and the mined click wholes and parts
    (ground-truth parts are left out), and the pairs (click whole or part, box row of its instance).

    Returns:
        ``(embeddings [N, D], labels [N], pairs [P, 2])``.
    """
    t = stored.tensors
    wholes = torch.nonzero(~t["box/is_part"]).squeeze(1)
    features = [t[f"box/{source}"][wholes]]
    labels = [t["box/class_ids"][wholes]]
    pairs = torch.zeros(0, 2, dtype=torch.long)
    if f"click/{source}" in t:
        mined = torch.nonzero(t["click/role"] != ROLES["none"]).squeeze(1)
        box_position = torch.full((len(t["box/class_ids"]),), -1, dtype=torch.long)
        box_position[wholes] = torch.arange(len(wholes))
        rows = torch.arange(len(mined)) + len(wholes)
        pairs = torch.stack([rows, box_position[t["click/whole_row"][mined]]], dim=1)
        features.append(t[f"click/{source}"][mined])
        labels.append(t["click/class_ids"][mined])
    return torch.cat(features).float(), torch.cat(labels).long(), pairs


def train_projection(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    centres: torch.Tensor,
    valid: torch.Tensor,
    pairs: Optional[torch.Tensor] = None,
    config: ProjectionTrainingConfig = ProjectionTrainingConfig(),
) -> tuple[SemanticProjection, list[dict[str, float]]]:
    """Train a :class:`SemanticProjection` on cached embeddings (seeded; CPU seconds for thousands of rows).

    Returns:
        the projection (eval mode) and the losses every 50 steps (and at the last one).
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    try:
        model = build_semantic_projection(
            in_dim=embeddings.shape[1], out_dim=config.out_dim, hidden_dim=config.hidden_dim,
            num_layers=config.num_layers, centres=centres, valid=valid, learn_centres=config.learn_centres,
            input_mean=embeddings.mean(dim=0), input_std=embeddings.std(dim=0).clamp_min(1e-6),
        )
    finally:
        torch.random.set_rng_state(generator_state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    model.train()
    threads = torch.get_num_threads()
    if config.cpu_threads is not None and embeddings.device.type == "cpu":
        torch.set_num_threads(config.cpu_threads)
    try:
        history = _optimise(model, optimizer, schedule, embeddings, labels, pairs, config)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        history[-1]["collapsed"] = _collapsed(model(embeddings))
    if history[-1]["collapsed"]:
        logger.warning(
            "SemanticProjection collapsed: its training rows project to (nearly) one point (loss %s). Try a larger "
            "margin, a smaller cosine_weight or learn_centres=True.", history[-1],
        )
    return model, history


def _collapsed(projected: torch.Tensor) -> bool:
    """Whether unit vectors ``[N, E]`` all lie within cosine 0.99 of their mean direction."""
    return bool((projected @ F.normalize(projected.mean(dim=0), dim=0)).min() > 0.99) if len(projected) > 1 else False


def _optimise(model, optimizer, schedule, embeddings, labels, pairs, config) -> list[dict[str, float]]:
    history = []
    for step in range(config.steps):
        losses = projection_loss(
            model(embeddings), labels, model.projected_centres(), model.valid, pairs=pairs, margin=config.margin,
            margin_weight=config.margin_weight, cosine_weight=config.cosine_weight,
        )
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == config.steps - 1:
            history.append({"step": step, **{k: float(v.detach()) for k, v in losses.items()}})
    return history


def _whole_part_top1(classify, stored, source: str) -> dict[str, float]:
    """Top-1 (%) on the box-prompted ground-truth wholes and parts of ``stored`` and the gap."""
    t = stored.tensors
    with torch.no_grad():
        predicted, _ = classify(t[f"box/{source}"].float())
    is_part = t["box/is_part"]
    whole = top1_accuracy(predicted[~is_part], t["box/class_ids"][~is_part])
    part = top1_accuracy(predicted[is_part], t["box/class_ids"][is_part])
    return {"whole": whole, "part": part, "gap": whole - part}


def run_sam_clustering(
    *,
    embedder: SamMaskEmbedder,
    train_dataset: Sequence[dict],
    val_dataset: Sequence[dict],
    thing_classes: Sequence[str],
    classes: Sequence[str],
    train_name: str,
    val_name: str,
    output_dir: str,
    sam_checkpoint: Optional[str] = None,
    sources: Sequence[str] = ("mask_token", "image_pooled", "semantic_pooled"),
    num_centres: int = 4,
    seed: int = 0,
    mining: Optional[dict] = None,
    training: Optional[dict] = None,
    cache_dir: Optional[str] = None,
    prompt: str = "box",
    tsne_figure: Optional[str] = None,
    device: str = "cpu",
    evaluator: Optional[Any] = None,
    classifier: Optional[PrototypeClassifier] = None,
) -> dict[str, Any]:
    """The measurements of issue 16 on a dataset with parts: top-1 on whole and part masks, training-free
    (K-means bank, cosine) and projected, for each embedding source; a ``train_net.py`` job.

    Args:
        embedder: SAM encoder + decoder (and DINOv2) (:meth:`SamMaskEmbedder.from_proposer`).
        train_dataset, val_dataset: dataset dicts (``part_of`` links for parts); thing_classes: their classes.
        classes: the label space of the bank (the whole classes).
        train_name, val_name: the datasets' names (cache file names and provenance).
        output_dir: ``results.json`` and ``projection_<source>.pth`` go there.
        sam_checkpoint: a checkpoint holding ``proposer.backbone.*`` and ``proposer.proposals.*`` (the
            tiny SAM of configs/quick/tiny_sam_shapes.py), loaded into the embedder's SAM; None: as built.
        sources: embeddings compared (:data:`~.sam_embeddings.SOURCES`).
        num_centres, seed: K-means centres per class and their seed.
        mining, training: :class:`MiningConfig` and :class:`ProjectionTrainingConfig` fields.
        cache_dir: where the embeddings are stored (default: the references store's folder).
        prompt: how instances are prompted (``"box"``: GT boxes; ``"click"``: see
            :func:`~.sam_embeddings.instance_embeddings`).
        tsne_figure: a ``.png`` path: t-SNE of the val wholes and parts before/after the projection
            of the first source.
        device: where the encoders run (the projections train on the CPU).
        evaluator: a Detectron2 evaluator of the val dataset (``COCOEvaluator``): with it, box/mask AP
            of the training-free pipeline (point-grid proposals, ``classifier``) with each source's
            bank (:func:`~.sam_embeddings.bank_detections`); the embedder's proposals need
            ``mask_embeddings`` for the SAM sources.
        classifier: the pipeline's stages (default :class:`PrototypeClassifier` ()).
    """
    start = time.perf_counter()
    if sam_checkpoint:
        from ...checkpoint import load_init_checkpoint

        holder = nn.Module()  # the checkpoint's layout: proposer.backbone.*, proposer.proposals.*
        holder.proposer = nn.Module()
        holder.proposer.backbone, holder.proposer.proposals = embedder.backbone, embedder.proposals
        load_init_checkpoint(holder, sam_checkpoint, training=False)
    embedder.to(device)
    missing = [s for s in sources if s not in embedder.sources]
    if missing:
        raise ValueError(f"run_sam_clustering: sources {missing} need a semantic_encoder (have {embedder.sources}).")
    mining_config = MiningConfig(**(mining or {}))
    train_config = ProjectionTrainingConfig(**(training or {}))
    stored = {}
    for split, dataset, name in (("train", train_dataset, train_name), ("val", val_dataset, val_name)):
        config = InstanceEmbeddingConfig(classes=classes, prompt=prompt, clicks=split == "train", mining=mining_config)
        cache = os.path.join(cache_dir, f"{name}.safetensors") if cache_dir else True
        stored[split] = instance_embeddings(dataset, embedder=embedder, thing_classes=thing_classes, config=config,
                                            cache=cache, source=name)
    results: dict[str, Any] = {"classes": list(classes), "num_centres": num_centres, "seed": seed, "prompt": prompt,
                               "training": asdict(train_config), "mining": asdict(mining_config), "sources": {}}
    t = stored["train"].tensors
    results["mined"] = {"wholes": int((t["click/role"] == ROLES["whole"]).sum()),
                        "parts": int((t["click/role"] == ROLES["part"]).sum()), "clicks": int(len(torch.unique(t["click/whole_row"])))}
    v = stored["val"].tensors
    results["val_mask_iou"] = {  # how well the prompted masks cover the val instances (mean IoU)
        "whole": float(v["box/iou_gt"][~v["box/is_part"]].mean()), "part": float(v["box/iou_gt"][v["box/is_part"]].mean()),
    }
    os.makedirs(output_dir, exist_ok=True)
    projections = {}
    for source in sources:
        bank = sam_memory_bank(stored["train"], source)
        centres, valid = bank.prototypes(aggregation="kmeans", num_centres=num_centres, seed=seed)
        training_free = _whole_part_top1(lambda x: classify_embeddings(x, centres, valid), stored["val"], source)
        tic = time.perf_counter()
        embeddings, labels, pairs = training_rows(stored["train"], source)
        projection, history = train_projection(embeddings, labels, centres=centres, valid=valid, pairs=pairs,
                                               config=train_config)
        seconds = time.perf_counter() - tic
        projected = _whole_part_top1(projection.classify, stored["val"], source)
        projections[source] = projection
        results["sources"][source] = {"training_free": training_free, "projected": projected,
                                      "train_rows": len(labels), "train_pairs": len(pairs),
                                      "train_seconds": round(seconds, 2), "loss": history[-1]}
        with atomic_path(os.path.join(output_dir, f"projection_{source}.pth")) as tmp:
            torch.save(projection.state_dict(), tmp)
        logger.info("%s: training-free %s, projected %s (%.1f s of training).", source, training_free, projected, seconds)
    if evaluator is not None:
        banks = {s: sam_memory_bank(stored["train"], s).prototypes(aggregation="kmeans", num_centres=num_centres, seed=seed)
                 for s in sources}
        results["detection"] = _detection_ap(embedder, val_dataset, banks, classifier or PrototypeClassifier(),
                                             evaluator, thing_classes=thing_classes, classes=classes)
    results["seconds"] = round(time.perf_counter() - start, 1)
    with atomic_path(os.path.join(output_dir, "results.json")) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(results, indent=1) + "\n")
    if tsne_figure:
        _tsne_figure(tsne_figure, stored["val"], sources[0], projections[sources[0]], classes)
    return results


def _detection_ap(embedder, dataset, banks, classifier, evaluator, *, thing_classes, classes) -> dict[str, Any]:
    """Box/mask AP of :func:`bank_detections` per source, over the ``classes`` (mean of their per-class APs)."""
    to_thing = torch.tensor([list(thing_classes).index(name) for name in classes])
    detections: dict[str, list] = {source: [] for source in banks}
    embedder.eval()
    for d in dataset:
        image = read_image(d["file_name"])
        for source, kept in bank_detections(embedder, image, banks=banks, classifier=classifier).items():
            instances = Instances(tuple(image.shape[:2]))
            instances.pred_masks, instances.pred_boxes = kept.masks.cpu(), Boxes(kept.boxes.cpu())
            instances.scores, instances.pred_classes = kept.scores.cpu(), to_thing[kept.classes.cpu()]
            detections[source].append(instances)
    out = {}
    for source, per_image in detections.items():
        evaluator.reset()
        for d, instances in zip(dataset, per_image):
            evaluator.process([d], [{"instances": instances}])
        metrics = evaluator.evaluate() or {}
        out[source] = {
            task: {"AP_classes": float(np.nanmean([values.get(f"AP-{name}", float("nan")) for name in classes])),
                   "AP50_all_categories": values.get("AP50"), "AP_all_categories": values.get("AP")}
            for task, values in metrics.items()
        }
        logger.info("%s: box/mask AP over %d classes %s.", source, len(classes), out[source])
    return out


def _tsne_figure(path: str, stored, source: str, projection: SemanticProjection, classes: Sequence[str]) -> None:
    """Two t-SNE panels of the val wholes (dots) and parts (crosses), coloured by class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    t = stored.tensors
    raw = F.normalize(t[f"box/{source}"].float(), dim=-1)
    with torch.no_grad():
        panels = {"before (SAM embedding)": raw, "after (projection)": projection(t[f"box/{source}"].float())}
    labels, is_part = t["box/class_ids"].numpy(), t["box/is_part"].numpy()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    cmap = plt.get_cmap("tab10")
    for ax, (title, x) in zip(axes, panels.items()):
        points = TSNE(n_components=2, perplexity=max(1.0, min(30.0, (len(x) - 1) / 3)), init="pca", random_state=0,
                      metric="cosine").fit_transform(x.numpy())
        for c, name in enumerate(classes):
            for part, marker in ((False, "o"), (True, "x")):
                sel = (labels == c) & (is_part == part)
                ax.scatter(points[sel, 0], points[sel, 1], s=22, marker=marker, color=cmap(c % 10),
                           label=f"{name} ({'part' if part else 'whole'})")
        ax.set_title(f"{title}: {source}")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
