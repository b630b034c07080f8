"""SAM's own mask embeddings as a semantic source: memory banks of K-means centres, cosine labels.

The seed "SAM based Classification using Clustering" labels SAM's masks with SAM's OWN embeddings:
prompt SAM with the ground-truth boxes of a detection dataset, collect the embedding of every
mask per class, K-means them into a memory bank of class centres, and label a new mask by its
cosine similarity to the centres. Here, for SAM, HQ-SAM and SAM 2:

- :class:`SamMaskEmbedder`: one image encoder forward, all prompts of the image in ONE batched
  mask-decoder call (``PromptDecoder.decode_embeddings(..., return_mask_tokens=True)``), and per
  mask up to three embeddings (:data:`SOURCES`): ``"mask_token"`` (the two-way transformer's
  output of the mask token that made the mask), ``"image_pooled"`` (SAM's image embedding
  averaged under the mask) and, with a semantic encoder (DINOv2), ``"semantic_pooled"`` (its dense
  features averaged under the same mask, as the training-free pipeline pools them).
- :func:`instance_embeddings`: those embeddings for every instance of a dataset, prompted with its
  ground-truth box (``box/*`` rows: wholes, and parts labelled with the class of their whole
  through ``part_of``), and the three multimask outputs of one click inside each whole
  (``click/*`` rows; :func:`mine_whole_part` marks which is the whole and which are parts), and
  optionally background masks (grid clicks whose masks overlap no instance: ``background/*``); what
  is computed is one :class:`InstanceEmbeddingConfig`. With ``cache`` they are kept in the
  references store: a stored file is reused only when its provenance (instances and their content,
  part links, encoder weights fingerprint, every field of the config) is exactly the expected one.
- :func:`sam_memory_bank`: a :class:`~.memory_bank.MemoryBank` of one source's box rows, so the
  per-class centres are :meth:`MemoryBank.prototypes` (``aggregation="kmeans"``: seeded, the same
  centres for the same seed); :func:`classify_embeddings`: cosine to the centres with an unknown
  decision (a cosine threshold, or a background bank that wins).
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...utils.clicks import click_points
from ...references.ordering import ReferenceInstance, order_references
from ...references.store import StoredFeatures, default_store_path, load_or_build_features, reference_provenance
from ..proposals.point_grid import PointGridProposals, point_grid
from ..weights import module_fingerprint
from .classifier import ClassifiedProposals, PrototypeClassifier, prototype_scores
from .mask_ops import mask_grid_weights, mask_iou_matrix, mask_pooling, masks_to_boxes, masks_to_original
from .memory_bank import MemoryBank

__all__ = [
    "PROMPTS",
    "ROLES",
    "SAM_EMBEDDINGS_FORMAT",
    "SOURCES",
    "InstanceEmbeddingConfig",
    "MiningConfig",
    "SamMaskEmbedder",
    "bank_detections",
    "classify_embeddings",
    "instance_embeddings",
    "mine_whole_part",
    "sam_memory_bank",
    "top1_accuracy",
]

logger = logging.getLogger(__name__)

#: 2: the provenance's options are the fields of :class:`InstanceEmbeddingConfig` (``classes``, no
#: longer ``label_space``), so stores of format 1 are rebuilt, not misread
SAM_EMBEDDINGS_FORMAT = 2
SOURCES = ("mask_token", "image_pooled", "semantic_pooled")
#: how instances are prompted (:func:`instance_embeddings`)
PROMPTS = ("box", "click")
#: roles of the click rows (:func:`mine_whole_part`)
ROLES = {"none": 0, "whole": 1, "part": 2}


class SamMaskEmbedder(nn.Module):
    """SAM masks and their embeddings for the prompts of one image (math only, no files).

    Args:
        backbone: the SAM / HQ-SAM / SAM 2 image encoder.
        proposals: the :class:`PointGridProposals` over it (its decoder and ``points_per_batch``
            are used; ``SamProposer.proposals`` of the training-free pipeline).
        semantic_encoder: an encoder with a ``dense_feature`` (DINOv2) for ``"semantic_pooled"``;
            None: that source is not computed.
    """

    def __init__(
        self, *, backbone: nn.Module, proposals: PointGridProposals, semantic_encoder: Optional[nn.Module] = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.proposals = proposals
        self.semantic_encoder = semantic_encoder

    @classmethod
    def from_proposer(cls, *, proposer: nn.Module, semantic_encoder: Optional[nn.Module] = None) -> "SamMaskEmbedder":
        """The embedder over a ``SamProposer``'s encoder and proposals (``build_sam_proposer``)."""
        return cls(backbone=proposer.backbone, proposals=proposer.proposals, semantic_encoder=semantic_encoder)

    @property
    def sources(self) -> tuple[str, ...]:
        """The embeddings :meth:`forward` returns."""
        return SOURCES if self.semantic_encoder is not None else SOURCES[:2]

    @torch.no_grad()
    def forward(
        self,
        image: Union[np.ndarray, torch.Tensor],
        *,
        boxes: Optional[torch.Tensor] = None,
        points: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """Masks and embeddings of ONE image's prompts: ``boxes`` (single-mask output, ``M = 1``) or
        single ``points`` (SAM's multimask output, ``M = 3``; HQ-SAM: 1).

        Args:
            image: uint8 RGB ``[H, W, 3]`` array or ``[3, H, W]`` tensor.
            boxes: ``[N, 4]`` XYXY original-image boxes; points: ``[N, 2]`` (x, y) original-image pixels.

        Returns:
            ``{"masks": [N, M, H, W] bool, "iou_pred": [N, M], source: [N, M, D] float32}`` for
            each of :attr:`sources`, on the CPU.
        """
        if (boxes is None) == (points is None):
            raise ValueError("SamMaskEmbedder takes either boxes [N, 4] or points [N, 2] (one click per prompt).")
        x, fits = self.backbone.prepare_with_fits([image])
        fit = fits[0]
        decoder = self.proposals.decoder
        prepared = decoder.prepare_image({name: value[0] for name, value in self.backbone(x).items()})
        if boxes is not None:
            prompts = {"boxes": fit.boxes_to_input(boxes.float().to(decoder.device))}
        else:
            points = points.float().to(decoder.device)
            prompts = {"points": fit.points_to_input(points)[:, None], "point_labels": torch.ones(len(points), 1)}
        sparse, dense = decoder.embed_prompts(**prompts)
        logits, iou, tokens = decoder.decode_embeddings(
            prepared, sparse, dense, multimask_output=points is not None,
            points_per_batch=self.proposals.points_per_batch, return_mask_tokens=True,
        )
        n, m = logits.shape[:2]
        flat = logits.flatten(0, 1).float()
        out = {
            "masks": (fit.mask_to_original(flat) > 0).view(n, m, *fit.original_size).cpu(),
            "iou_pred": iou.float().cpu(),
            "mask_token": tokens.float().cpu(),
            "image_pooled": PointGridProposals._image_pooled(prepared["embedding"][0], flat).view(n, m, -1).cpu(),
        }
        if self.semantic_encoder is not None:
            xs, semantic_fits = self.semantic_encoder.prepare_with_fits([image])
            dense_features = self.semantic_encoder(xs)[self.semantic_encoder.dense_feature][0].float()
            weights = mask_grid_weights(
                flat, src_fit=fit, dst_fit=semantic_fits[0], grid_size=tuple(dense_features.shape[-2:]),
                patch_size=self.semantic_encoder.patch_size,
            )
            out["semantic_pooled"] = mask_pooling(dense_features, weights)[0].view(n, m, -1).cpu()
        return out


@dataclass(frozen=True)
class MiningConfig:
    """How whole/part pairs are read from the multimask outputs of a click inside an instance.

    Attributes:
        whole_iou: the output with the highest IoU with the instance is its whole if that IoU is at least this.
        part_inside: a part has at least this share of its area inside the instance ...
        part_max_area: ... at most this share of the instance's area, and is not the whole.
        min_area: masks smaller than this (original pixels) are neither.
        background_points_per_side: grid clicks per image side for background masks (0: none).
        background_max_iou: a grid click's best mask is background when its IoU with every instance is below this.
    """

    whole_iou: float = 0.5
    part_inside: float = 0.8
    part_max_area: float = 0.6
    min_area: int = 4
    background_points_per_side: int = 0
    background_max_iou: float = 0.1


@dataclass(frozen=True)
class InstanceEmbeddingConfig:
    """What :func:`instance_embeddings` computes; every field is part of the stored provenance.

    Attributes:
        classes: the label space (None: the dataset's ``thing_classes``); instances of other classes
            (and the part classes themselves) are labelled by their whole's class or left out.
        prompt: how the instance rows (``box/*``) are prompted: ``"box"`` (the ground-truth box, single
            mask output: the seed's) or ``"click"`` (a click at the instance's deepest pixel, of SAM's
            multimask outputs the one with the highest IoU with the instance: for SAMs trained with
            clicks only, as the tiny SAM of configs/quick/tiny_sam_shapes.py).
        clicks: also the three multimask outputs of a click at the deepest pixel of every whole (``click/*``).
        mining: how whole/part roles and background masks are read (:class:`MiningConfig`).
    """

    classes: Optional[tuple[str, ...]] = None
    prompt: str = "box"
    clicks: bool = True
    mining: MiningConfig = field(default_factory=MiningConfig)

    def __post_init__(self) -> None:
        if self.prompt not in PROMPTS:
            raise ValueError(f"InstanceEmbeddingConfig got prompt={self.prompt!r}; expected one of {PROMPTS}.")
        if not isinstance(self.clicks, bool):
            raise ValueError(f"InstanceEmbeddingConfig got clicks={self.clicks!r}; expected True or False.")
        if not isinstance(self.mining, MiningConfig):
            raise ValueError(
                f"InstanceEmbeddingConfig got mining={self.mining!r}; expected a MiningConfig (MiningConfig(**fields))."
            )
        if self.classes is not None:
            if isinstance(self.classes, str) or not all(isinstance(name, str) for name in self.classes):
                raise ValueError(f"InstanceEmbeddingConfig got classes={self.classes!r}; expected None or class names.")
            object.__setattr__(self, "classes", tuple(self.classes))  # frozen, hashable

    def label_space(self, thing_classes: Sequence[str]) -> list[str]:
        """The class names of the labels: :attr:`classes`, or ``thing_classes`` when None."""
        return list(self.classes if self.classes is not None else thing_classes)


def mine_whole_part(masks: torch.Tensor, instance: torch.Tensor, config: MiningConfig) -> torch.Tensor:
    """Roles of the ``M`` multimask outputs of a click inside an instance (:data:`ROLES`).

    Args:
        masks: ``[M, H, W]`` bool; instance: ``[H, W]`` bool (its ground-truth mask).

    Returns:
        ``[M]`` int64: 1 for the whole (highest IoU with the instance, at least ``whole_iou``), 2 for
        parts (mostly inside the instance, smaller than ``part_max_area`` of it, not the whole), 0 else.
    """
    flat = masks.flatten(1).float()
    gt = instance.flatten().float()
    area, gt_area = flat.sum(1), gt.sum()
    inter = flat @ gt
    iou = inter / (area + gt_area - inter).clamp_min(1)
    roles = torch.zeros(masks.shape[0], dtype=torch.long)
    big = area >= config.min_area
    best = int(torch.where(big, iou, torch.full_like(iou, -1.0)).argmax())
    if big[best] and iou[best] >= config.whole_iou:
        roles[best] = ROLES["whole"]
    part = big & (inter >= config.part_inside * area) & (area <= config.part_max_area * gt_area)
    roles[part & (roles == 0)] = ROLES["part"]
    return roles


def _label_space(items: Sequence[ReferenceInstance], thing_classes: Sequence[str], classes: Sequence[str]) -> dict:
    """annotation id -> class index in ``classes`` (parts: their whole's), and the part flags."""
    index = {name: i for i, name in enumerate(classes)}
    by_id = {r.annotation.get("id"): r for r in items if r.annotation.get("id") is not None}
    labels, is_part = {}, {}
    for r in items:
        parent = r.annotation.get("part_of")
        if parent is not None:
            if parent not in by_id:
                raise ValueError(f"annotation {r.annotation_id!r} is part_of {parent!r}, which is no annotation of the dataset.")
            name = thing_classes[by_id[parent].class_id]
        else:
            name = thing_classes[r.class_id]
        if name in index:
            labels[r.annotation_id], is_part[r.annotation_id] = index[name], parent is not None
    return {"labels": labels, "is_part": is_part}


def instance_embeddings(
    dataset: Sequence[dict],
    *,
    embedder: SamMaskEmbedder,
    thing_classes: Sequence[str],
    config: InstanceEmbeddingConfig = InstanceEmbeddingConfig(),
    cache: Union[None, bool, str, os.PathLike] = None,
    source: str = "<dataset dicts>",
    weights_id: Optional[str] = None,
) -> StoredFeatures:
    """Embeddings of every instance of ``dataset`` (one encoder forward per image; see the module doc),
    computed, or with ``cache`` read from the references store when nothing changed.

    Args:
        dataset: Detectron2 dataset dicts (contiguous ``category_id`` into ``thing_classes``; parts
            carry ``part_of`` = their whole's annotation ``id``).
        config: label space, prompt, clicks and mining (:class:`InstanceEmbeddingConfig`).
        cache: None or False: compute them; True: the references store's file
            ``cache_root()/references/sam_instance_embeddings/<source>-<provenance hash>.safetensors``;
            a path: that file. A stored file is used only when its provenance equals the expected one
            (instances and their content, part links, encoders and their weights, ``config``);
            otherwise they are computed and stored there.
        source: the dataset's name (provenance, and the default file name); with ``cache`` only.
        weights_id: identity of the weights (default: :func:`module_fingerprint` of the embedder); with
            ``cache`` only.

    Returns:
        :class:`StoredFeatures` with tensors ``box/<source> [R, D]``, ``box/class_ids``, ``box/is_part``,
        ``box/iou_gt`` (IoU of the box mask with the instance), with ``config.clicks``
        ``click/<source> [W * M, D]``, ``click/class_ids``, ``click/role``, ``click/whole_row`` (the
        ``box`` row of the clicked whole), and ``background/<source>`` when
        ``config.mining.background_points_per_side``; ``records``: one per box row; ``provenance``
        (with ``cache``; empty without).
    """
    items = order_references(dataset, len(thing_classes), class_names=thing_classes)
    build = lambda: _embed_instances(items, embedder=embedder, thing_classes=thing_classes, config=config)  # noqa: E731
    if cache is None or cache is False:
        return build()
    if cache is not True and (not isinstance(cache, (str, os.PathLike)) or not str(cache)):
        raise ValueError(f"instance_embeddings got cache={cache!r}; expected None/False, True or a file path.")
    provenance = _provenance(items, embedder=embedder, thing_classes=thing_classes, config=config, source=source,
                             weights_id=weights_id)
    path = default_store_path(provenance, name=source) if cache is True else cache
    return load_or_build_features(path, provenance=provenance, build=build, what="SAM instance embeddings")


def _embed_instances(
    items: Sequence[ReferenceInstance], *, embedder: SamMaskEmbedder, thing_classes: Sequence[str],
    config: InstanceEmbeddingConfig,
) -> StoredFeatures:
    """The computation of :func:`instance_embeddings` (``items``: the dataset's :func:`order_references`)."""
    classes, mining = config.label_space(thing_classes), config.mining
    space = _label_space(items, thing_classes, classes)
    by_image: "OrderedDict[str, list[ReferenceInstance]]" = OrderedDict()
    for r in sorted(items, key=lambda r: r.index):
        by_image.setdefault(r.file_name, []).append(r)
    rows: dict[str, list] = {}
    records: list[dict] = []
    was_training = embedder.training
    embedder.eval()
    try:
        for file_name, instances in by_image.items():
            kept = [r for r in instances if r.annotation_id in space["labels"]]
            if not kept:
                continue
            image = kept[0].read_image()
            gt = torch.from_numpy(np.stack([r.mask() for r in instances])).bool()  # every instance: background test
            gt_kept = gt[[instances.index(r) for r in kept]]
            first_row = len(records)
            records.extend({"annotation_id": r.annotation_id, "file_name": file_name} for r in kept)
            clicked = None  # every instance's multimask outputs of a click at its deepest pixel
            if config.prompt == "box":
                out = embedder(image, boxes=torch.tensor([r.box_xyxy() for r in kept], dtype=torch.float32))
                chosen = torch.zeros(len(kept), dtype=torch.long)
            else:
                out = clicked = embedder(image, points=click_points(gt_kept) + 0.5)  # pixel centres
                chosen = _best_output(out["masks"], gt_kept)
            take = torch.arange(len(kept))
            _append(rows, "box", {source: out[source][take, chosen] for source in embedder.sources}, {
                "class_ids": torch.tensor([space["labels"][r.annotation_id] for r in kept]),
                "is_part": torch.tensor([space["is_part"][r.annotation_id] for r in kept]),
                "iou_gt": mask_iou_matrix(out["masks"][take, chosen], gt_kept).diagonal(),
            })
            wholes = [i for i, r in enumerate(kept) if not space["is_part"][r.annotation_id]]
            if config.clicks and wholes:
                if clicked is None:
                    out = embedder(image, points=click_points(gt_kept[wholes]) + 0.5)
                else:
                    out = {name: value[wholes] for name, value in clicked.items()}
                m = out["masks"].shape[1]
                roles = torch.stack([mine_whole_part(out["masks"][j], gt_kept[w], mining) for j, w in enumerate(wholes)])
                class_ids = torch.tensor([space["labels"][kept[w].annotation_id] for w in wholes])
                _append(rows, "click", {source: out[source].flatten(0, 1) for source in embedder.sources}, {
                    "class_ids": class_ids[:, None].expand(-1, m).reshape(-1),
                    "role": roles.reshape(-1),
                    "whole_row": (torch.tensor(wholes) + first_row)[:, None].expand(-1, m).reshape(-1),
                })
            if mining.background_points_per_side:
                grid = point_grid(mining.background_points_per_side, tuple(image.shape[:2]))
                out = embedder(image, points=grid)
                best = out["iou_pred"].argmax(dim=1)
                take = torch.arange(len(grid))
                masks = out["masks"][take, best]
                overlap = mask_iou_matrix(masks, gt).amax(dim=1) if len(gt) else torch.zeros(len(grid))
                keep = (overlap < mining.background_max_iou) & (masks.flatten(1).sum(1) >= mining.min_area)
                _append(rows, "background", {source: out[source][take, best][keep] for source in embedder.sources}, {})
    finally:
        embedder.train(was_training)
    tensors = {name: torch.cat(parts) for name, parts in rows.items()}
    logger.info(
        "SAM embeddings of %d instance(s) (%d part(s)) in %d image(s)%s.", len(records),
        int(tensors["box/is_part"].sum()) if records else 0, len(by_image),
        f", {int((tensors['click/role'] == 1).sum())} mined whole(s) and {int((tensors['click/role'] == 2).sum())} "
        "part(s) from clicks" if "click/role" in tensors else "",
    )
    return StoredFeatures(tensors=tensors, provenance={}, class_names=classes, records=records)


def _append(rows: dict, prefix: str, *tables: dict) -> None:
    """Add the tensors of ``tables`` to the lists ``rows["<prefix>/<name>"]``."""
    for table in tables:
        for name, value in table.items():
            rows.setdefault(f"{prefix}/{name}", []).append(value)


def _best_output(masks: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
    """``[N]``: which of the ``M`` outputs ``masks [N, M, H, W]`` has the highest IoU with ``instances [N, H, W]``."""
    flat, gt = masks.flatten(2).float(), instances.flatten(1).float()[:, None]
    inter = (flat * gt).sum(-1)
    return (inter / (flat.sum(-1) + gt.sum(-1) - inter).clamp_min(1)).argmax(dim=1)


def _module_description(module: Optional[nn.Module]) -> Optional[dict[str, Any]]:
    if module is None:
        return None
    preprocess = getattr(module, "preprocess", None)
    return {"class": type(module).__name__, "variant": getattr(module, "variant", None),
            "size": getattr(module, "size", None), "preprocess": asdict(preprocess) if preprocess is not None else None}


def _provenance(items: Sequence[ReferenceInstance], *, embedder: SamMaskEmbedder, thing_classes: Sequence[str],
                config: InstanceEmbeddingConfig, source: str, weights_id: Optional[str]) -> dict[str, Any]:
    """The provenance of :func:`instance_embeddings` of ``items``: every field of ``config`` (``asdict``,
    the label space resolved), the encoders and their weights, the instances and their part links."""
    encoder = {
        "sam": _module_description(embedder.backbone), "decoder": type(embedder.proposals.decoder).__name__,
        "decoder_options": embedder.proposals.decoder.extra_repr(),
        "semantic": _module_description(embedder.semantic_encoder),
        "weights": weights_id or module_fingerprint(embedder),
    }
    options = {
        "format_version": SAM_EMBEDDINGS_FORMAT, "sources": list(embedder.sources), "box_multimask_output": False,
        "click_rule": "deepest pixel (utils.clicks.click_points) + 0.5",
        **asdict(config), "classes": config.label_space(thing_classes),
        "part_of": [[r.annotation_id, r.annotation.get("part_of")] for r in items if r.annotation.get("part_of") is not None],
    }
    return reference_provenance(kind="sam_instance_embeddings", source=source, num_classes=len(thing_classes),
                                class_names=list(thing_classes), items=items, encoder=encoder, options=options)


def sam_memory_bank(stored: StoredFeatures, source: str, *, parts: bool = False) -> MemoryBank:
    """A :class:`MemoryBank` of the box-prompted instances of ``stored`` (wholes; with ``parts`` also parts)
    in one source, so that ``bank.prototypes(aggregation="kmeans", num_centres=k, seed=s)`` gives the
    seeded per-class K-means centres."""
    key = f"box/{source}"
    if key not in stored.tensors:
        raise KeyError(f"the stored SAM embeddings have no source {source!r}; they have {sorted(stored.tensors)}.")
    rows = torch.ones_like(stored.tensors["box/is_part"]) if parts else ~stored.tensors["box/is_part"]
    rows = torch.nonzero(rows).squeeze(1)
    class_ids = stored.tensors["box/class_ids"][rows]
    order = torch.sort(class_ids, stable=True).indices
    rows = rows[order]
    return MemoryBank(
        features=stored.tensors[key][rows], class_ids=class_ids[order], valid=torch.ones(len(rows), dtype=torch.bool),
        num_classes=len(stored.class_names), annotation_ids=[stored.records[i]["annotation_id"] for i in rows.tolist()],
        provenance={**stored.provenance, "source": source},
    )


def classify_embeddings(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    prototype_valid: torch.Tensor,
    *,
    unknown_threshold: Optional[float] = None,
    background: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label embeddings by cosine to class centres, with an unknown decision.

    Args:
        features: ``[N, D]``; prototypes: ``[K, M, D]``; prototype_valid: ``[K, M]`` bool.
        unknown_threshold: a best cosine below it gives "unknown" (None: no threshold).
        background: ``[B, D]`` background centres: a mask closer to one of them than to every class
            centre is "unknown" (None: no background bank).

    Returns:
        ``(classes [N] int64, -1 for unknown; cosine [N] to the chosen class)``.
    """
    cosine, classes, matched = prototype_scores(features, prototypes, prototype_valid)
    unknown = ~matched
    if unknown_threshold is not None:
        unknown |= cosine < unknown_threshold
    if background is not None and background.shape[0]:
        to_background = (F.normalize(features.float(), dim=-1) @ F.normalize(background.float(), dim=-1).T).amax(dim=1)
        unknown |= to_background > cosine
    return torch.where(unknown, torch.full_like(classes, -1), classes), cosine


@torch.no_grad()
def bank_detections(
    embedder: SamMaskEmbedder,
    image: np.ndarray,
    *,
    banks: dict[str, tuple[torch.Tensor, torch.Tensor]],
    classifier: PrototypeClassifier,
) -> dict[str, ClassifiedProposals]:
    """The training-free pipeline with each embedding source's bank: point-grid proposals of ``image``
    (one SAM forward and one batched decoder call, the embeddings with them), labelled and merged by
    ``classifier`` (cosine to the source's centres, per-class NMS, soft merge, top K).

    ``"semantic_pooled"`` runs the pipeline's own dense path (the semantic encoder once, masks pooled
    on its patch grid); a SAM source gives the classifier its per-proposal embeddings in the pooled
    form (a ``[C, 1, P]`` map and one-hot weights: pooling returns each proposal's embedding).

    Args:
        embedder: its ``proposals`` built with ``mask_embeddings`` holding the SAM sources used.
        banks: source -> ``(centres [K, M, D], valid [K, M])``.

    Returns:
        source -> :class:`ClassifiedProposals` with masks and boxes on the original grid.
    """
    x, fits = embedder.backbone.prepare_with_fits([image])
    proposals = embedder.proposals({name: value[0] for name, value in embedder.backbone(x).items()}, fits[0])
    field = {"mask_token": "mask_tokens", "image_pooled": "image_pooled"}
    out = {}
    for source, (centres, valid) in banks.items():
        if source == "semantic_pooled":
            xs, semantic_fits = embedder.semantic_encoder.prepare_with_fits([image])
            dense = embedder.semantic_encoder(xs)[embedder.semantic_encoder.dense_feature][0].float()
            out[source] = classifier(
                features=dense, mask_logits=proposals.mask_logits.float(), iou_pred=proposals.iou_pred,
                mask_fit=proposals.fit, feature_fit=semantic_fits[0], patch_size=embedder.semantic_encoder.patch_size,
                prototypes=centres, prototype_valid=valid,
            )
            continue
        embeddings = getattr(proposals, field[source])
        if embeddings is None:
            raise ValueError(f"bank_detections: the embedder's proposals were built without {source!r} in mask_embeddings.")
        count = len(proposals)
        kept = classifier(
            features=embeddings.float().T[:, None, :], weights=torch.eye(count, device=embeddings.device)[:, None, :],
            masks=proposals.mask_logits > 0, iou_pred=proposals.iou_pred, prototypes=centres, prototype_valid=valid,
        )
        final = masks_to_original(proposals.mask_logits[kept.indices].float(), proposals.fit, antialias=True)
        out[source] = kept._replace(masks=final, boxes=masks_to_boxes(final, convention=classifier.box_convention))
    return out


def top1_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Share (in %) of ``predicted == labels`` (unknown counts as wrong); NaN without rows."""
    return float((predicted == labels).float().mean() * 100) if len(labels) else float("nan")
