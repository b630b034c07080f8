"""The semantic classifier of the training-free pipeline: label class-agnostic masks by prototypes.

Per target image (the caller runs the semantic encoder once on the image and resamples the
proposal masks to its patch grid with :func:`~.mask_ops.resample_masks`):

1. mask-weighted mean feature of every proposal (:func:`~.mask_ops.mask_pooling`);
2. cosine similarity to every prototype, max over the prototypes of a class; label = best class,
   score = max(cosine, 0) ("No Time to Train");
3. per-class box NMS (boxes of the low-resolution binary masks);
4. semantic-aware soft merge: in score order per class, ``score * sqrt(1 - x)`` with ``x`` the
   largest overlap-over-own-area with a higher-scoring mask of the same class, weighted by the
   cosine similarity of the two pooled features (clamped to [0, 1]); one matrix, no loop;
5. top K by the merged score.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms

from .mask_ops import mask_overlap_over_area, mask_pooling, masks_to_boxes

__all__ = ["ClassifiedProposals", "MERGE_MODES", "PrototypeClassifier", "prototype_scores", "soft_merge_scores"]

logger = logging.getLogger(__name__)

MERGE_MODES = ("soft", "none")
# soft merge: an overlap x within this of 1 counts as 1 (full coverage by an identical-feature mask)
_ONE_TOLERANCE = 1e-6


class ClassifiedProposals(NamedTuple):
    """The kept proposals of one image, best first.

    Attributes:
        indices: ``[T]`` int64, indices into the proposals given to the classifier.
        scores: ``[T]`` float, the final scores (after the merge), descending.
        classes: ``[T]`` int64, contiguous class ids.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor


def prototype_scores(
    features: torch.Tensor, prototypes: torch.Tensor, prototype_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine similarity of features to class prototypes, best class per feature.

    Args:
        features: ``[P, D]`` pooled proposal features (any norm).
        prototypes: ``[K, M, D]``: ``M`` prototypes per class (any norm; normalised here).
        prototype_valid: ``[K, M]`` bool; invalid rows (padding, classes without references)
            never match.

    Returns:
        ``(cosine [P], classes [P] int64, matched [P] bool)``: the best cosine (max over the
        prototypes of a class, then over classes), its class, and whether any valid prototype
        exists (when not, cosine is ``-inf`` and the class meaningless).
    """
    if (
        prototypes.ndim != 3
        or prototype_valid.shape != prototypes.shape[:2]
        or features.shape[-1] != prototypes.shape[-1]
    ):
        raise ValueError(
            f"prototype_scores got features {tuple(features.shape)}, prototypes {tuple(prototypes.shape)} and "
            f"prototype_valid {tuple(prototype_valid.shape)}; expected [P, D], [K, M, D] and [K, M]."
        )
    f = F.normalize(features.float(), dim=-1)
    p = F.normalize(prototypes.to(f), dim=-1)
    cosine = torch.einsum("pd,kmd->pkm", f, p)
    cosine = cosine.masked_fill(~prototype_valid.to(cosine.device, torch.bool)[None], float("-inf"))
    per_class = cosine.amax(dim=2) if cosine.shape[2] else cosine.new_full(cosine.shape[:2], float("-inf"))
    if per_class.shape[1] == 0:
        empty = features.new_full((features.shape[0],), float("-inf"), dtype=torch.float32)
        return empty, torch.zeros_like(empty, dtype=torch.long), torch.zeros_like(empty, dtype=torch.bool)
    best, classes = per_class.max(dim=1)
    return best, classes, torch.isfinite(best)


def soft_merge_scores(
    scores: torch.Tensor, classes: torch.Tensor, masks: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """Decay the scores of masks covered by higher-scoring masks of the same class.

    ``new_i = score_i * sqrt(1 - x_i)``, ``x_i = max_j overlap(i, j) * clamp(cos(f_i, f_j), 0, 1)``
    over the masks ``j`` of the same class ranked before ``i`` (higher score; ties by index),
    ``overlap(i, j) = |m_i & m_j| / |m_i|``. Vectorised: one overlap matrix, masked to the
    earlier same-class pairs, max over rows.

    Args:
        scores: ``[T]`` float.
        classes: ``[T]`` int64.
        masks: ``[T, Hm, Wm]`` bool low-resolution masks.
        features: ``[T, D]`` pooled features.

    Returns:
        ``[T]`` merged scores.
    """
    T = scores.shape[0]
    if T == 0:
        return scores.clone()
    order = torch.argsort(scores, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(T, device=order.device)
    overlap = mask_overlap_over_area(masks)  # [T, T], row i: share of m_i covered by m_j
    f = F.normalize(features.float(), dim=-1)
    similarity = (f @ f.T).clamp(0.0, 1.0)
    earlier_same_class = (rank[None, :] < rank[:, None]) & (classes[:, None] == classes[None, :])
    x = (overlap * similarity * earlier_same_class).amax(dim=1)
    # the square root turns float rounding of a cosine of 1 (about 1e-7) into a factor of 3e-4
    one_minus_x = torch.where(x > 1.0 - _ONE_TOLERANCE, torch.zeros_like(x), 1.0 - x)
    return scores * one_minus_x.clamp_min(0.0).sqrt()


class PrototypeClassifier(nn.Module):
    """Label class-agnostic mask proposals by cosine similarity to class prototypes.

    Config-free and parameter-free; build it in a LazyConfig with ``LazyCall(PrototypeClassifier)(...)``.

    Args:
        score_floor: proposals scoring below it are dropped (scores are ``max(cosine, 0)``, so the
            default 0.0 keeps every proposal that matched a class).
        nms_thresh: box IoU threshold of the per-class NMS (1.0 turns it off).
        merge: ``"soft"`` (semantic-aware soft merge) or ``"none"``.
        topk: proposals kept per image.
        min_weight: proposals whose total weight on the patch grid (in patches) is not above it are
            dropped (0.0: only masks that cover nothing of the feature map).
    """

    def __init__(
        self,
        *,
        score_floor: float = 0.0,
        nms_thresh: float = 0.5,
        merge: str = "soft",
        topk: int = 100,
        min_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if merge not in MERGE_MODES:
            raise ValueError(f"PrototypeClassifier got merge={merge!r}; expected one of {MERGE_MODES}.")
        if not 0.0 <= nms_thresh <= 1.0:
            raise ValueError(f"PrototypeClassifier got nms_thresh={nms_thresh!r}; expected a value in [0, 1].")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"PrototypeClassifier got topk={topk!r}; expected an int >= 1.")
        if min_weight < 0:
            raise ValueError(f"PrototypeClassifier got min_weight={min_weight!r}; expected a value >= 0.")
        self.score_floor = float(score_floor)
        self.nms_thresh = float(nms_thresh)
        self.merge = merge
        self.topk = topk
        self.min_weight = float(min_weight)

    def extra_repr(self) -> str:
        return (
            f"score_floor={self.score_floor}, nms_thresh={self.nms_thresh}, merge={self.merge!r}, "
            f"topk={self.topk}, min_weight={self.min_weight}"
        )

    def forward(
        self,
        *,
        features: torch.Tensor,
        weights: torch.Tensor,
        masks: torch.Tensor,
        prototypes: torch.Tensor,
        prototype_valid: torch.Tensor,
    ) -> ClassifiedProposals:
        """Classify, suppress and merge the proposals of one image.

        Args:
            features: ``[C, h, w]`` dense features of the target image (one encoder forward).
            weights: ``[P, h, w]`` soft proposal masks on that grid (:func:`~.mask_ops.resample_masks`).
            masks: ``[P, Hm, Wm]`` bool low-resolution proposal masks (boxes and overlaps).
            prototypes: ``[K, M, D]`` class prototypes (``D == C``).
            prototype_valid: ``[K, M]`` bool.

        Returns:
            :class:`ClassifiedProposals` with at most ``topk`` entries, best first.
        """
        P = weights.shape[0]
        if features.ndim != 3 or weights.ndim != 3 or masks.ndim != 3 or masks.shape[0] != P:
            raise ValueError(
                f"PrototypeClassifier got features {tuple(features.shape)}, weights {tuple(weights.shape)}, masks "
                f"{tuple(masks.shape)}; expected [C, h, w], [P, h, w] and [P, Hm, Wm] with the same P."
            )
        pooled, has_weight = mask_pooling(features, weights)  # [P, C], [P]
        has_weight = has_weight & (weights.sum(dim=(1, 2)) > self.min_weight)
        cosine, classes, matched = prototype_scores(pooled, prototypes, prototype_valid)
        scores = cosine.clamp_min(0.0)
        keep = torch.nonzero(has_weight & matched & (scores >= self.score_floor)).squeeze(1)  # one sync per image
        scores, classes, pooled, masks = scores[keep], classes[keep], pooled[keep], masks[keep].bool()

        boxes = masks_to_boxes(masks)
        survivors = batched_nms(boxes, scores, classes, self.nms_thresh)  # sorted by decreasing score
        keep, scores, classes = keep[survivors], scores[survivors], classes[survivors]
        pooled, masks = pooled[survivors], masks[survivors]

        if self.merge == "soft":
            scores = soft_merge_scores(scores, classes, masks, pooled)
        order = torch.argsort(scores, descending=True, stable=True)[: self.topk]
        return ClassifiedProposals(indices=keep[order], scores=scores[order], classes=classes[order])
