"""A tiny instance segmenter that trains in seconds on CPU, to exercise the engine end to end.

Per-pixel classification (K classes + background) by a small fully convolutional network;
instances are the connected components of each class's pixels. It is not a research model: it
exists so that ``train_net.py`` (training, checkpoints, resume, DDP, COCO evaluation) can be run on
the synthetic shapes dataset before the real models of this project are used.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...d2 import META_ARCH_REGISTRY, BitMasks, Boxes, ImageList, Instances, configurable
from ...yacs_config import check_yacs_config, dataset_classes, node_kwargs

__all__ = ["TinySegmenter"]


@META_ARCH_REGISTRY.register()
class TinySegmenter(nn.Module):
    """Fully convolutional per-pixel classifier whose connected components are instances.

    Input: a list of dataset dicts with ``image`` (uint8 [3, H, W], RGB) and, in training,
    ``instances`` (``gt_masks`` BitMasks [N, H, W], ``gt_classes`` int64 [N]).
    Training returns ``{"loss_sem_seg": scalar}``; inference returns, per image,
    ``{"instances": Instances}`` at the original ``height`` x ``width`` with ``pred_masks``
    (bool [N, H, W]), ``pred_boxes``, ``scores`` and ``pred_classes``.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        width: int = 32,
        pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
        pixel_std: Sequence[float] = (58.395, 57.12, 57.375),
        min_area: int = 16,
        max_instances: int = 100,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.min_area = min_area
        self.max_instances = max_instances
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.GroupNorm(4, width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.GroupNorm(4, width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.GroupNorm(4, width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=4, dilation=4),
            nn.GroupNorm(4, width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, num_classes + 1, 1),
        )
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Yacs path (:mod:`samantics_d2.yacs_config`): ``MODEL.SAMANTICS.TINY_SEGMENTER``, the pixel
        statistics of ``MODEL.PIXEL_MEAN/STD`` and the classes of ``DATASETS.TRAIN[0]`` (else ``TEST[0]``)."""
        check_yacs_config(cfg, cls.__name__)
        classes = dataset_classes(cfg, key="thing_classes", splits=["TRAIN", "TEST"])
        if classes is None:
            raise ValueError("TinySegmenter takes its classes from DATASETS.TRAIN[0] (or TEST[0]); both are empty.")
        return {
            "num_classes": len(classes),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            **node_kwargs(cfg.MODEL.SAMANTICS.TINY_SEGMENTER),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _logits(self, batched_inputs: list[dict]) -> tuple[torch.Tensor, ImageList]:
        images = [(x["image"].to(self.device).float() - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, size_divisibility=2)
        logits = self.net(images.tensor)
        logits = F.interpolate(logits, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        return logits, images

    def forward(self, batched_inputs: list[dict]):
        logits, images = self._logits(batched_inputs)
        if self.training:
            return {"loss_sem_seg": F.cross_entropy(logits, self._semantic_targets(batched_inputs, images))}
        return [
            {"instances": self._instances(logits[i, :, :h, :w], x.get("height", h), x.get("width", w))}
            for i, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes))
        ]

    def _semantic_targets(self, batched_inputs: list[dict], images: ImageList) -> torch.Tensor:
        """[N, H, W] int64 class per pixel, ``num_classes`` for background, -100 for padding."""
        n, _, H, W = images.tensor.shape
        target = torch.full((n, H, W), -100, dtype=torch.long, device=self.device)
        for i, (x, (h, w)) in enumerate(zip(batched_inputs, images.image_sizes)):
            target[i, :h, :w] = self.num_classes
            inst = x["instances"].to(self.device)
            if len(inst) == 0:
                continue
            masks = inst.gt_masks.tensor if isinstance(inst.gt_masks, BitMasks) else inst.gt_masks
            # Later instances overwrite earlier ones where they overlap.
            index = torch.arange(1, len(inst) + 1, device=self.device).view(-1, 1, 1) * masks.bool()
            owner = index.amax(dim=0)
            fg = owner > 0
            target[i, :h, :w][fg] = inst.gt_classes[owner[fg] - 1]
        return target

    def _instances(self, logits: torch.Tensor, height: int, width: int) -> Instances:
        """Connected components of each class's pixels, resized to ``height`` x ``width``."""
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        probs = logits.softmax(dim=0)
        labels = probs.argmax(dim=0).cpu().numpy()
        masks, scores, classes = [], [], []
        for c in np.unique(labels):
            if c == self.num_classes:
                continue
            count, components = cv2.connectedComponents((labels == c).astype(np.uint8), connectivity=8)
            for k in range(1, count):
                mask = components == k
                if mask.sum() < self.min_area:
                    continue
                mask_t = torch.from_numpy(mask).to(probs.device)
                masks.append(mask_t)
                scores.append(probs[c][mask_t].mean())
                classes.append(int(c))
        result = Instances((height, width))
        if masks:
            order = torch.stack(scores).argsort(descending=True)[: self.max_instances]
            pred_masks = torch.stack(masks)[order]
            result.pred_masks = pred_masks
            result.pred_boxes = BitMasks(pred_masks).get_bounding_boxes()
            result.scores = torch.stack(scores)[order]
            result.pred_classes = torch.tensor(classes, dtype=torch.long, device=probs.device)[order]
        else:
            result.pred_masks = torch.zeros((0, height, width), dtype=torch.bool, device=probs.device)
            result.pred_boxes = Boxes(torch.zeros((0, 4), device=probs.device))
            result.scores = torch.zeros((0,), device=probs.device)
            result.pred_classes = torch.zeros((0,), dtype=torch.long, device=probs.device)
        return result
