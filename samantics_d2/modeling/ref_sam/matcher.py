"""Box utilities and the Hungarian matcher between queries and ground-truth boxes.

Boxes: ``cxcywh`` is (cx, cy, w, h), ``xyxy`` is (x0, y0, x1, y1); RefSAM's boxes are normalised
to [0, 1]. The box math is torchvision's (:mod:`torchvision.ops`); the names here are the ones the
DETR family uses.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.ops
from scipy.optimize import linear_sum_assignment

__all__ = ["HungarianMatcher", "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou"]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    return torchvision.ops.box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    return torchvision.ops.box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (in [-1, 1]) of xyxy boxes: [N, 4] x [M, 4] -> [N, M].

    IoU minus the fraction of the smallest enclosing box that neither box covers: 1 for identical
    boxes, negative for disjoint ones, closer to -1 the farther apart they are.
    """
    return torchvision.ops.generalized_box_iou(boxes1, boxes2)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth boxes, minimising a weighted cost.

    cost = cost_class * focal cost of the query's "matches the reference" logit
         + cost_bbox * L1 distance of the (cx, cy, w, h) boxes
         + cost_giou * (-GIoU) of the (x0, y0, x1, y1) boxes.
    The focal cost is the difference between the focal losses of calling the query positive and
    negative. Each image is solved exactly with scipy's ``linear_sum_assignment``.
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; set at least one of cost_class, cost_bbox, cost_giou.")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, logits: torch.Tensor, pred_boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """logits: [Q, 1]; pred_boxes: [Q, 4] cxcywh; gt_boxes: [N, 4] cxcywh. Returns the cost [Q, N]."""
        logit = logits[:, 0].float()
        prob = logit.sigmoid()
        positive = self.focal_alpha * (1 - prob) ** self.focal_gamma * -F.logsigmoid(logit)
        negative = (1 - self.focal_alpha) * prob**self.focal_gamma * -F.logsigmoid(-logit)
        class_cost = (positive - negative)[:, None]  # [Q, 1], the same for every target
        pred_boxes = pred_boxes.float()
        gt_boxes = gt_boxes.float()
        l1_cost = torch.cdist(pred_boxes, gt_boxes, p=1)
        giou_cost = -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(gt_boxes))
        return self.cost_class * class_cost + self.cost_bbox * l1_cost + self.cost_giou * giou_cost

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: ``{"pred_logits": [B, Q, 1], "pred_boxes": [B, Q, 4] cxcywh}``.
            targets: B dicts with ``"boxes"``: [N_i, 4] cxcywh (normalised like the predictions).

        Returns:
            B pairs ``(query_indices, target_indices)``, int64 [min(Q, N_i)] each (on CPU): query
            ``query_indices[k]`` is matched to target ``target_indices[k]``. Empty when N_i = 0.
        """
        logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]} predictions; pass one per image.")
        matches = []
        for i, target in enumerate(targets):
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                matches.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits[i], pred_boxes[i], gt_boxes).cpu()
            if not torch.isfinite(cost).all():
                raise ValueError(
                    f"matching cost of image {i} is not finite: check its predictions and target boxes "
                    f"(boxes: {gt_boxes.tolist()[:4]}...) for NaN/inf."
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches
