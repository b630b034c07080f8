"""Set-prediction losses of RefSAM's detector: focal, L1 and GIoU after Hungarian matching.

Each decoder layer's predictions are matched to the ground truth on their own and get their own
losses (the auxiliary ones carry a ``_{i}`` suffix, ``i`` the decoder layer). All losses are
divided by the number of ground-truth boxes in the batch, averaged over the processes of a
distributed run and at least 1, so that every process weighs a box the same.
"""
from __future__ import annotations

from types import MappingProxyType

import torch
import torch.distributed as dist
import torch.nn as nn
import torchvision.ops

from ...utils.checks import LossWeight, loss_weights
from .matcher import HungarianMatcher, box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["SetCriterion"]


def _average_num_boxes(num_boxes: int, device: torch.device) -> float:
    """The number of target boxes averaged over processes (when torch.distributed is initialised), >= 1."""
    total = torch.tensor(float(num_boxes), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        total = total / dist.get_world_size()
    return max(total.item(), 1.0)


class SetCriterion(nn.Module):
    """Losses of RefDETRHead's outputs, already multiplied by their weights.

    ``sum(criterion(outputs, targets).values())`` is the training loss. Keys: ``loss_focal``,
    ``loss_bbox``, ``loss_giou`` for the last decoder layer, and the same with a ``_{i}`` suffix for
    ``outputs["aux_outputs"][i]``.

    The focal loss uses the matcher's ``focal_alpha`` and ``focal_gamma``: the loss a query is
    trained with and the cost it is matched by are one focal loss, set in one place.

    Args:
        matcher: assigns queries to ground-truth boxes.
        loss_weight: the weight of each loss, Detectron2's convention (``FastRCNNOutputLayers``): a
            number for all of them or ``{"loss_focal": ..., "loss_bbox": ..., "loss_giou": ...}``;
            a loss left out keeps its default (Deformable DETR's 2, 5, 2). The auxiliary losses of a
            decoder layer take the weight of the loss they repeat.
    """

    DEFAULT_LOSS_WEIGHT = MappingProxyType({"loss_focal": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0})

    def __init__(self, *, matcher: HungarianMatcher, loss_weight: LossWeight = DEFAULT_LOSS_WEIGHT):
        super().__init__()
        self.matcher = matcher
        self.loss_weight = loss_weights("SetCriterion", self.DEFAULT_LOSS_WEIGHT, loss_weight)

    def layer_losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict[str, torch.Tensor]:
        """Weighted losses of one layer's ``{"pred_logits": [B, Q, 1], "pred_boxes": [B, Q, 4]}``."""
        logits, pred_boxes = outputs["pred_logits"], outputs["pred_boxes"]
        matches = self.matcher(outputs, targets)
        batch_index = torch.cat([torch.full_like(query, i) for i, (query, _) in enumerate(matches)])
        query_index = torch.cat([query for query, _ in matches])
        batch_index, query_index = batch_index.to(logits.device), query_index.to(logits.device)

        labels = torch.zeros_like(logits)
        labels[batch_index, query_index, 0] = 1.0
        focal = torchvision.ops.sigmoid_focal_loss(
            logits, labels, alpha=self.matcher.focal_alpha, gamma=self.matcher.focal_gamma, reduction="sum"
        )

        matched_boxes = pred_boxes[batch_index, query_index]  # [K, 4]; K = 0 keeps a grad_fn
        gt_boxes = torch.cat(
            [target["boxes"][target_idx.to(target["boxes"].device)] for target, (_, target_idx) in zip(targets, matches)]
        ).to(matched_boxes)
        l1 = (matched_boxes - gt_boxes).abs().sum()
        giou = generalized_box_iou(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(gt_boxes))
        giou_loss = (1.0 - giou.diagonal()).sum()
        return {
            "loss_focal": self.loss_weight["loss_focal"] * focal / num_boxes,
            "loss_bbox": self.loss_weight["loss_bbox"] * l1 / num_boxes,
            "loss_giou": self.loss_weight["loss_giou"] * giou_loss / num_boxes,
        }

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: RefDETRHead's output, ``{"pred_logits", "pred_boxes", "aux_outputs"}``.
            targets: one dict per image with ``"boxes"``: [N_i, 4] (cx, cy, w, h) normalised to [0, 1]
                (N_i may be 0: the image has no instance of the reference's class).

        Returns:
            Scalar losses by name (see the class docstring).
        """
        for i, target in enumerate(targets):
            boxes = target.get("boxes")
            if boxes is None or boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(
                    f"targets[{i}]['boxes'] must be a [N, 4] cxcywh tensor, got "
                    f"{None if boxes is None else tuple(boxes.shape)}."
                )
        num_boxes = _average_num_boxes(sum(len(t["boxes"]) for t in targets), outputs["pred_logits"].device)
        losses = self.layer_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.layer_losses(aux, targets, num_boxes).items()})
        return losses
