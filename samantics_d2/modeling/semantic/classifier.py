"""The semantic classifier of the training-free pipeline: label class-agnostic masks by prototypes.

Per target image (the caller runs the semantic encoder once on the image), in the stage order of
"No Time to Train" (no-time-to-train ``Sam2MatchingBaselineNoAMG.forward_test``):

1. mask-weighted mean feature of every proposal (:func:`~.mask_ops.mask_pooling`): the authors'
   mean over the mask pixels of the features upsampled to the mask grid
   (:func:`~.mask_ops.mask_grid_weights`), or sigmoid masks on the patch grid
   (:func:`~.mask_ops.resample_masks`);
2. cosine similarity to every prototype, max over the prototypes of a class; label = best class,
   score = max(cosine, 0);
3. per-class box NMS (boxes of the low-resolution binary masks), ranked by SAM's predicted IoU
   (the authors') or by the score; the first ``8 * K`` survivors kept; scores ``<= 0`` dropped;
4. semantic-aware soft merge: per class, ``score * sqrt(1 - x)`` with ``x`` the largest
   overlap-over-own-area with an earlier mask of the same class (NMS order), weighted by the
   cosine similarity of the two pooled features (clamped to [0, 1]); one matrix per class;
5. top K by the merged score.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import batched_nms

from ..preprocess import ImageFit
from .mask_ops import (
    BOX_CONVENTIONS,
    mask_grid_weights,
    mask_overlap_over_area,
    mask_pooling,
    masks_to_boxes,
    masks_to_original,
    resample_masks,
)

__all__ = [
    "ClassifiedProposals",
    "MERGE_MODES",
    "MERGE_ORDERS",
    "MERGE_RESOLUTIONS",
    "NMS_RANKS",
    "POOLINGS",
    "PrototypeClassifier",
    "prototype_scores",
    "soft_merge_scores",
]

MERGE_MODES = ("soft", "none")
NMS_RANKS = ("predicted_iou", "score")
MERGE_ORDERS = ("nms", "score")
POOLINGS = ("mask_grid", "patch_grid")
MERGE_RESOLUTIONS = ("original", "mask_grid")
# soft merge: an overlap x within this of 1 counts as 1 (full coverage by an identical-feature mask)
_ONE_TOLERANCE = 1e-6


class ClassifiedProposals(NamedTuple):
    """The kept proposals of one image, best first.

    Attributes:
        indices: ``[T]`` int64, indices into the proposals given to the classifier.
        scores: ``[T]`` float, the final scores (after the merge), descending.
        classes: ``[T]`` int64, contiguous class ids.
        masks: ``[T, H, W]`` bool final masks on the original image grid, when the classifier was
            given mask logits (None when it was given pooled weights).
        boxes: ``[T, 4]`` float XYXY boxes of ``masks`` in original pixels, in the classifier's
            ``box_convention`` (None with ``masks``).
    """

    indices: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    masks: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None


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
    scores: torch.Tensor,
    classes: torch.Tensor,
    masks: torch.Tensor,
    features: torch.Tensor,
    *,
    in_given_order: bool = False,
) -> torch.Tensor:
    """Decay the scores of masks covered by earlier masks of the same class.

    ``new_i = score_i * sqrt(1 - x_i)``, ``x_i = max_j overlap(i, j) * clamp(cos(f_i, f_j), 0, 1)``
    over the masks ``j`` of the same class ranked before ``i``, ``overlap(i, j) = |m_i & m_j| /
    |m_i|`` (0 for an empty ``m_i``). One overlap matrix per class present (masks of other classes
    never interact), masked to the earlier pairs, max over rows.

    Args:
        scores: ``[T]`` float.
        classes: ``[T]`` int64.
        masks: ``[T, Hm, Wm]`` bool masks (any resolution).
        features: ``[T, D]`` pooled features.
        in_given_order: "earlier" is the given order (index ``j < i``; "No Time to Train" merges
            its NMS survivors in their NMS order); False: a higher score (ties by index).

    Returns:
        ``[T]`` merged scores.
    """
    T = scores.shape[0]
    if T == 0:
        return scores.clone()
    if in_given_order:
        rank = torch.arange(T, device=scores.device)
    else:
        order = torch.argsort(scores, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(T, device=order.device)
    f = F.normalize(features.float(), dim=-1)
    x = scores.new_zeros(T, dtype=torch.float32)
    for c in torch.unique(classes).tolist():  # one sync; the classes present, not the masks
        members = torch.nonzero(classes == c).squeeze(1)
        overlap = mask_overlap_over_area(masks[members])  # row i: share of m_i covered by m_j
        similarity = (f[members] @ f[members].T).clamp(0.0, 1.0)
        earlier = rank[members][None, :] < rank[members][:, None]
        x[members] = (overlap * similarity * earlier).amax(dim=1)
    # the square root turns float rounding of a cosine of 1 (about 1e-7) into a factor of 3e-4
    one_minus_x = torch.where(x > 1.0 - _ONE_TOLERANCE, torch.zeros_like(x), 1.0 - x)
    return scores * one_minus_x.clamp_min(0.0).sqrt()


class PrototypeClassifier(nn.Module):
    """Label class-agnostic mask proposals by cosine similarity to class prototypes.

    Config-free and parameter-free; build it in a LazyConfig with ``LazyCall(PrototypeClassifier)(...)``.
    The stages, in the order of "No Time to Train" (``Sam2MatchingBaselineNoAMG.forward_test``):
    pool -> cosine to the prototypes, score ``max(cos, 0)`` -> per-class box NMS -> keep the first
    ``nms_cap_factor * topk`` survivors -> drop scores ``<= score_floor`` -> soft merge -> top K.

    Args:
        score_floor: proposals scoring ``<= score_floor`` are dropped, after the NMS and its cap
            (scores are ``max(cosine, 0)``; the default 0.0 drops those that match no class,
            as the authors' ``scores_out > 0``).
        nms_thresh: box IoU threshold of the per-class NMS (1.0 turns it off).
        merge: ``"soft"`` (semantic-aware soft merge) or ``"none"``.
        topk: proposals kept per image.
        min_weight: proposals whose total weight on the patch grid (in patches) is not above it are
            dropped before the NMS (0.0: only masks that cover nothing of the feature map).
        nms_rank: what the NMS ranks by: ``"predicted_iou"`` (SAM's predicted IoU, the authors';
            the caller must pass ``iou_pred``) or ``"score"`` (the semantic score).
        merge_order: which masks count as "earlier" in the soft merge: ``"nms"`` (the NMS
            survivors' order, the authors') or ``"score"`` (a higher semantic score). The two are
            the same with ``nms_rank="score"``.
        box_convention: boxes of the NMS and of the returned masks: ``"inclusive"`` (the authors'
            ``batched_mask_to_box``) or ``"exclusive"`` (Detectron2's ``BitMasks``).
        nms_cap_factor: keep at most ``nms_cap_factor * topk`` NMS survivors (the authors' 8,
            800 for K = 100); None: all.
        pooling: with mask logits as input, how masks pool the dense features: ``"mask_grid"``
            (features upsampled bilinearly to the mask grid, mean over the pixels with logit > 0:
            the authors', computed on the patch grid by :func:`~.mask_ops.mask_grid_weights`) or
            ``"patch_grid"`` (sigmoid masks averaged over sub-samples of each patch,
            :func:`~.mask_ops.resample_masks`).
        merge_resolution: with mask logits as input, the masks whose overlaps the soft merge
            measures: ``"original"`` (the survivors' final masks on the original image grid, the
            authors') or ``"mask_grid"`` (the low-resolution masks; cheaper).
    """

    def __init__(
        self,
        *,
        score_floor: float = 0.0,
        nms_thresh: float = 0.5,
        merge: str = "soft",
        topk: int = 100,
        min_weight: float = 0.0,
        nms_rank: str = "score",
        merge_order: str = "nms",
        box_convention: str = "inclusive",
        nms_cap_factor: Optional[int] = 8,
        pooling: str = "mask_grid",
        merge_resolution: str = "original",
    ) -> None:
        super().__init__()
        choices = {
            "merge": (merge, MERGE_MODES), "nms_rank": (nms_rank, NMS_RANKS), "merge_order": (merge_order, MERGE_ORDERS),
            "box_convention": (box_convention, BOX_CONVENTIONS), "pooling": (pooling, POOLINGS),
            "merge_resolution": (merge_resolution, MERGE_RESOLUTIONS),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"PrototypeClassifier got {name}={value!r}; expected one of {allowed}.")
        if not 0.0 <= nms_thresh <= 1.0:
            raise ValueError(f"PrototypeClassifier got nms_thresh={nms_thresh!r}; expected a value in [0, 1].")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"PrototypeClassifier got topk={topk!r}; expected an int >= 1.")
        if min_weight < 0:
            raise ValueError(f"PrototypeClassifier got min_weight={min_weight!r}; expected a value >= 0.")
        if nms_cap_factor is not None and (isinstance(nms_cap_factor, bool) or not isinstance(nms_cap_factor, int)
                                           or nms_cap_factor < 1):
            raise ValueError(f"PrototypeClassifier got nms_cap_factor={nms_cap_factor!r}; expected an int >= 1 or None.")
        self.score_floor = float(score_floor)
        self.nms_thresh = float(nms_thresh)
        self.merge = merge
        self.topk = topk
        self.min_weight = float(min_weight)
        self.nms_rank = nms_rank
        self.merge_order = merge_order
        self.box_convention = box_convention
        self.nms_cap_factor = nms_cap_factor
        self.pooling = pooling
        self.merge_resolution = merge_resolution

    def extra_repr(self) -> str:
        return (
            f"score_floor={self.score_floor}, nms_thresh={self.nms_thresh}, merge={self.merge!r}, "
            f"topk={self.topk}, min_weight={self.min_weight}, nms_rank={self.nms_rank!r}, "
            f"merge_order={self.merge_order!r}, box_convention={self.box_convention!r}, "
            f"nms_cap_factor={self.nms_cap_factor}, pooling={self.pooling!r}, merge_resolution={self.merge_resolution!r}"
        )

    def mask_weights(
        self, mask_logits: torch.Tensor, *, mask_fit: ImageFit, feature_fit: ImageFit, grid_size: tuple[int, int],
        patch_size: int,
    ) -> torch.Tensor:
        """``[P, h, w]`` pooling weights of ``mask_logits [P, Hm, Wm]`` on the ``grid_size`` patch grid, by ``pooling``."""
        pool = mask_grid_weights if self.pooling == "mask_grid" else resample_masks
        return pool(mask_logits.float(), src_fit=mask_fit, dst_fit=feature_fit, grid_size=grid_size, patch_size=patch_size)

    def forward(
        self,
        *,
        features: torch.Tensor,
        prototypes: torch.Tensor,
        prototype_valid: torch.Tensor,
        weights: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
        iou_pred: Optional[torch.Tensor] = None,
        mask_logits: Optional[torch.Tensor] = None,
        mask_fit: Optional[ImageFit] = None,
        feature_fit: Optional[ImageFit] = None,
        patch_size: Optional[int] = None,
    ) -> ClassifiedProposals:
        """Classify, suppress and merge the proposals of one image.

        Give either pooled inputs (``weights`` and ``masks``: pooling and the merge's masks are
        the caller's) or the proposals' logits (``mask_logits``, ``mask_fit``, ``feature_fit``,
        ``patch_size``: pooling by ``pooling``, the merge at ``merge_resolution``, and the final
        masks and boxes returned).

        Args:
            features: ``[C, h, w]`` dense features of the target image (one encoder forward).
            prototypes: ``[K, M, D]`` class prototypes (``D == C``).
            prototype_valid: ``[K, M]`` bool.
            weights: ``[P, h, w]`` soft proposal masks on the feature grid.
            masks: ``[P, Hm, Wm]`` bool low-resolution proposal masks (boxes and overlaps).
            iou_pred: ``[P]`` SAM's predicted IoU (needed by ``nms_rank="predicted_iou"``).
            mask_logits: ``[P, Hm, Wm]`` low-resolution logits covering ``mask_fit``'s input square.
            mask_fit: the fit of the original image into the mask encoder's (SAM's) input.
            feature_fit: the fit of the original image into the feature encoder's input.
            patch_size: the feature encoder's patch size in input pixels.

        Returns:
            :class:`ClassifiedProposals` with at most ``topk`` entries, best first.
        """
        from_logits = mask_logits is not None
        if from_logits:
            if weights is not None or masks is not None or None in (mask_fit, feature_fit, patch_size):
                raise ValueError(
                    "PrototypeClassifier got mask_logits: pass mask_fit, feature_fit and patch_size with them, and "
                    "no weights or masks (those are the pooled-input form)."
                )
            if mask_logits.ndim != 3 or features.ndim != 3:
                raise ValueError(
                    f"PrototypeClassifier got features {tuple(features.shape)} and mask_logits "
                    f"{tuple(mask_logits.shape)}; expected [C, h, w] and [P, Hm, Wm]."
                )
            weights = self.mask_weights(
                mask_logits, mask_fit=mask_fit, feature_fit=feature_fit, grid_size=tuple(features.shape[-2:]),
                patch_size=patch_size,
            )
            masks = mask_logits > 0
        elif weights is None or masks is None:
            raise ValueError(
                "PrototypeClassifier needs the proposals: pass weights and masks (pooled form), or mask_logits with "
                "mask_fit, feature_fit and patch_size."
            )
        P = weights.shape[0]
        if features.ndim != 3 or weights.ndim != 3 or masks.ndim != 3 or masks.shape[0] != P:
            raise ValueError(
                f"PrototypeClassifier got features {tuple(features.shape)}, weights {tuple(weights.shape)}, masks "
                f"{tuple(masks.shape)}; expected [C, h, w], [P, h, w] and [P, Hm, Wm] with the same P."
            )
        if self.nms_rank == "predicted_iou" and (iou_pred is None or iou_pred.shape != (P,)):
            raise ValueError(
                f"PrototypeClassifier(nms_rank='predicted_iou') needs iou_pred of shape [{P}] (SAM's predicted IoU of "
                f"every proposal); got {None if iou_pred is None else tuple(iou_pred.shape)}. Pass the proposals' "
                "iou_pred, or rank the NMS by the semantic score with nms_rank='score'."
            )
        pooled, has_weight = mask_pooling(features, weights)  # [P, C], [P]
        has_weight = has_weight & (weights.sum(dim=(1, 2)) > self.min_weight)
        cosine, classes, matched = prototype_scores(pooled, prototypes, prototype_valid)
        scores = cosine.clamp_min(0.0)
        # the authors label by topk over the clamped cosines: a mask with no positive cosine ties at
        # 0 everywhere and gets class 0 (it still takes part in class 0's NMS, then scores 0 and goes)
        classes = torch.where(scores > 0, classes, torch.zeros_like(classes))
        rank_by = (iou_pred if self.nms_rank == "predicted_iou" else scores).float()

        candidates = torch.nonzero(has_weight & matched).squeeze(1)  # one sync per image
        boxes = masks_to_boxes(masks[candidates], convention=self.box_convention)
        survivors = candidates[batched_nms(boxes, rank_by[candidates], classes[candidates], self.nms_thresh)]
        # the NMS order, ties by index (torchvision's sort is not stable)
        survivors = survivors.sort().values
        survivors = survivors[torch.argsort(rank_by[survivors], descending=True, stable=True)]
        if self.nms_cap_factor is not None:
            survivors = survivors[: self.nms_cap_factor * self.topk]
        survivors = survivors[scores[survivors] > self.score_floor]
        kept_scores, kept_classes = scores[survivors], classes[survivors]

        final_masks = None
        if from_logits and self.merge_resolution == "original":
            final_masks = _final_masks(mask_logits[survivors], mask_fit)
        if self.merge == "soft":
            merge_masks = final_masks if final_masks is not None else masks[survivors]
            kept_scores = soft_merge_scores(
                kept_scores, kept_classes, merge_masks, pooled[survivors], in_given_order=self.merge_order == "nms"
            )
        order = torch.argsort(kept_scores, descending=True, stable=True)[: self.topk]
        indices = survivors[order]
        if not from_logits:
            return ClassifiedProposals(indices=indices, scores=kept_scores[order], classes=kept_classes[order])
        final_masks = final_masks[order] if final_masks is not None else _final_masks(mask_logits[indices], mask_fit)
        return ClassifiedProposals(
            indices=indices, scores=kept_scores[order], classes=kept_classes[order], masks=final_masks,
            boxes=masks_to_boxes(final_masks, convention=self.box_convention),
        )


def _final_masks(mask_logits: torch.Tensor, fit: ImageFit, *, chunk: int = 64) -> torch.Tensor:
    """``[T, H, W]`` bool: low-resolution logits on the original image grid (antialiased where the
    image is smaller than the mask grid, as the authors' final masks), ``chunk`` masks at a time."""
    if mask_logits.shape[0] <= chunk:
        return masks_to_original(mask_logits, fit, antialias=True)
    return torch.cat([masks_to_original(part, fit, antialias=True) for part in mask_logits.split(chunk)])
