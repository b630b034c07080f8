"""Click evaluation: Semantic-SAM's "1-IoU@COCO Max|Oracle", NoC@85/90 and mIoU@k, and label quality.

Protocol (the rules are in :mod:`samantics_d2.utils.clicks`, shared with the model that simulates
the clicks, :class:`samantics_d2.modeling.meta_arch.click.ClickSegmenter`):

- every non-crowd GT segment of an image is clicked (COCO panoptic val2017: things and stuff); the
  first click is the pixel farthest from the segment and image borders, on the GT at the original
  resolution; the model answers each click with K candidate masks and their predicted IoUs;
- **Max**: the IoU with the GT of the candidate with the highest predicted IoU; **Oracle**: the
  highest IoU with the GT among the candidates; both after the first click, averaged over all
  segments (not images), in percent (Semantic-SAM SwinT 54.5 | 73.8, SwinL 55.1 | 74.1);
- iterative clicks (when the model ran ``max_clicks > 1`` rounds): after each click the model's
  prediction is its Max candidate; the next click goes to the centre of the largest error region of
  that prediction (positive or negative); **NoC@t** = the mean over segments of the clicks needed to
  reach IoU >= t (``max_clicks`` when never reached), **mIoU@k** = the mean IoU after ``k`` clicks;
- **labels** (when the model labels its masks): ``Acc@Max`` / ``Acc@Oracle`` = the share of segments
  whose Max / Oracle candidate's label is the GT class (first click); on a dataset with parts
  (metadata ``part_classes``, e.g. ``shapes_parts_val``) the same per granularity: ``*_whole`` over
  segments of the other classes, ``*_part`` over segments of part classes, with Max and Oracle IoU.

Model output read here (per image ``output["clicks"]``, a dict; S = GT segments of the input in
order, R = ``max_clicks`` rounds, K_r candidates in round r, H x W = the original image size):

===================  ==========================================  =======================================
key                  value                                       meaning
===================  ==========================================  =======================================
``"masks"``          list of R bool ``[S, K_r, H, W]``           candidate masks after click r + 1
``"pred_ious"``      list of R float ``[S, K_r]``                their predicted IoU (padding: ``-inf``)
``"pred_classes"``   list of R int64 ``[S, K_r]`` (optional)     their labels (class ids; -1: none)
``"points"``         float ``[S, R, 2]``                         the clicks, (x, y) original pixels
``"point_labels"``   int64 ``[S, R]``                            1 positive, 0 negative, -1 no click
===================  ==========================================  =======================================

A round may hold fewer candidates than the first (a model may keep only the Max candidate after the
first click: NoC and mIoU@k use only it). Candidates that pad a round to K_r are empty masks with
predicted IoU ``-inf``. The first round's clicks must be the click rule's on the GT (checked).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..d2 import BitMasks, DatasetEvaluator, MetadataCatalog, comm
from ..utils.clicks import click_points, mask_ious, miou_at_clicks, number_of_clicks

__all__ = ["ClickEvaluator", "click_metrics", "segment_click_records"]

logger = logging.getLogger(__name__)

_RECORD_FIELDS = ("max_iou", "oracle_iou", "round_ious", "gt_classes", "max_correct", "oracle_correct")


def segment_click_records(
    *,
    gt_masks: torch.Tensor,
    gt_classes: torch.Tensor,
    masks: Sequence[torch.Tensor],
    pred_ious: Sequence[torch.Tensor],
    pred_classes: Optional[Sequence[torch.Tensor]] = None,
) -> dict[str, np.ndarray]:
    """Per-segment records of one image.

    Args:
        gt_masks: ``[S, H, W]`` bool.
        gt_classes: ``[S]`` int64.
        masks, pred_ious, pred_classes: the model's rounds (module docstring).

    Returns:
        ``max_iou [S]``, ``oracle_iou [S]`` (first click), ``round_ious [S, R]`` (the Max candidate's
        IoU after each click), ``gt_classes [S]``, and ``max_correct`` / ``oracle_correct`` ``[S]`` bool
        (False without ``pred_classes``). Ties: the first of equal predicted IoUs (or IoUs).
    """
    gt_masks = gt_masks.detach().cpu().bool()
    round_ious = []
    max_iou = oracle_iou = None
    max_correct = oracle_correct = np.zeros(len(gt_masks), dtype=bool)
    for r, (round_masks, round_pred) in enumerate(zip(masks, pred_ious)):
        ious = mask_ious(round_masks.detach().cpu().bool().transpose(0, 1), gt_masks).transpose(0, 1)  # [S, K]
        best = round_pred.detach().cpu().float().argmax(dim=1)
        chosen = ious.gather(1, best[:, None])[:, 0]
        round_ious.append(chosen.numpy())
        if r == 0:
            max_iou, oracle_iou = chosen.numpy(), ious.max(dim=1).values.numpy()
            if pred_classes is not None:
                labels = pred_classes[0].detach().cpu().long()
                gt = gt_classes.detach().cpu().long()
                max_correct = (labels.gather(1, best[:, None])[:, 0] == gt).numpy()
                oracle_correct = (labels.gather(1, ious.argmax(dim=1)[:, None])[:, 0] == gt).numpy()
    return {
        "max_iou": max_iou,
        "oracle_iou": oracle_iou,
        "round_ious": np.stack(round_ious, axis=1),
        "gt_classes": gt_classes.detach().cpu().long().numpy(),
        "max_correct": max_correct,
        "oracle_correct": oracle_correct,
    }


def click_metrics(
    records: dict[str, np.ndarray],
    *,
    max_clicks: int,
    noc_thresholds: Sequence[float] = (0.85, 0.9),
    miou_clicks: Sequence[int] = (1,),
    labelled: bool = False,
    part_class_ids: Optional[Sequence[int]] = None,
) -> dict[str, float]:
    """The metrics of all segments' records (:func:`segment_click_records`, concatenated); IoUs and
    accuracies in percent, NoC in clicks.

    Returns:
        ``Max``, ``Oracle``, ``num_segments``; with ``max_clicks > 1`` ``NoC@85``, ``NoC@90`` (one per
        threshold, named by its percent) and ``mIoU@k``; with ``labelled`` ``Acc@Max``, ``Acc@Oracle``;
        with ``part_class_ids`` the same over whole and part segments (``Max_part``, ``Acc@Oracle_whole``,
        ``num_part``, ...; an empty group gives NaN).
    """
    def percent(values: np.ndarray) -> float:
        return float(100.0 * np.mean(values)) if values.size else float("nan")

    results: dict[str, float] = {
        "Max": percent(records["max_iou"]),
        "Oracle": percent(records["oracle_iou"]),
        "num_segments": int(records["max_iou"].size),
    }
    if max_clicks > 1:
        for threshold in noc_thresholds:
            noc = number_of_clicks(records["round_ious"], threshold, max_clicks=max_clicks)
            results[f"NoC@{round(100 * threshold)}"] = float(noc.mean()) if noc.size else float("nan")
    for k, value in miou_at_clicks(records["round_ious"], miou_clicks).items():
        results[f"mIoU@{k}"] = 100.0 * value
    if labelled:
        results["Acc@Max"] = percent(records["max_correct"])
        results["Acc@Oracle"] = percent(records["oracle_correct"])
    if part_class_ids is not None:
        is_part = np.isin(records["gt_classes"], np.asarray(list(part_class_ids), dtype=np.int64))
        for group, member in (("whole", ~is_part), ("part", is_part)):
            results[f"Max_{group}"] = percent(records["max_iou"][member])
            results[f"Oracle_{group}"] = percent(records["oracle_iou"][member])
            if labelled:
                results[f"Acc@Max_{group}"] = percent(records["max_correct"][member])
                results[f"Acc@Oracle_{group}"] = percent(records["oracle_correct"][member])
            results[f"num_{group}"] = int(member.sum())
    return results


class ClickEvaluator(DatasetEvaluator):
    """Max / Oracle IoU of the first click, NoC and mIoU@k of the iterative clicks, label accuracy.

    Inputs (per image): ``"instances"`` with the GT segments at the original size (``gt_masks``
    BitMasks or bool ``[S, H, W]``, ``gt_classes`` int64 ``[S]``), e.g. from
    :class:`samantics_d2.data.panoptic.ClickMapper`. Outputs: ``{"clicks": ...}`` (module docstring).
    ``evaluate`` gathers every rank's records and returns, on the main process,
    ``{"click": click_metrics(...)}`` (None on the other ranks).

    Args:
        max_clicks: click rounds the model runs per segment (1: single-click Max | Oracle only;
            20: the standard NoC protocol). Every output must hold exactly this many rounds.
        noc_thresholds: IoU thresholds of NoC (fractions).
        miou_clicks: the ``k`` of mIoU@k (each ``<= max_clicks``).
        dataset_name: read ``thing_classes`` and ``part_classes`` from its metadata, for the
            per-granularity label quality (datasets with parts); None: no per-granularity split.
    """

    def __init__(
        self,
        *,
        max_clicks: int = 20,
        noc_thresholds: Sequence[float] = (0.85, 0.9),
        miou_clicks: Sequence[int] = (1, 5, 10, 20),
        dataset_name: Optional[str] = None,
    ):
        miou_clicks = tuple(int(k) for k in miou_clicks)
        bad_k = [k for k in miou_clicks if not 1 <= k <= max_clicks]
        if max_clicks < 1 or bad_k or any(not 0 < t <= 1 for t in noc_thresholds):
            raise ValueError(
                f"ClickEvaluator got max_clicks={max_clicks}, miou_clicks={miou_clicks}, noc_thresholds="
                f"{tuple(noc_thresholds)}; expected max_clicks >= 1, every k in [1, max_clicks] (not {bad_k}) and "
                "thresholds in (0, 1]."
            )
        self.max_clicks = int(max_clicks)
        self.noc_thresholds = tuple(float(t) for t in noc_thresholds)
        self.miou_clicks = miou_clicks
        self.part_class_ids: Optional[tuple[int, ...]] = None
        if dataset_name is not None:
            meta = MetadataCatalog.get(dataset_name)
            parts = meta.get("part_classes")
            if parts:
                classes = list(meta.thing_classes)
                self.part_class_ids = tuple(classes.index(c) for c in parts)
        self.reset()

    def reset(self) -> None:
        self._records: list[dict[str, np.ndarray]] = []
        self._labelled = True

    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        for x, output in zip(inputs, outputs):
            name = x.get("file_name", "<no file_name>")
            if "instances" not in x or "clicks" not in output:
                raise ValueError(
                    f"ClickEvaluator: input {name!r} lacks 'instances' (build the test loader with "
                    "samantics_d2.data.panoptic.ClickMapper) or its output lacks 'clicks' (use ClickSegmenter)."
                )
            gt = x["instances"]
            gt_masks = (gt.gt_masks.tensor if isinstance(gt.gt_masks, BitMasks) else gt.gt_masks).detach().cpu().bool()
            clicks = output["clicks"]
            self._check(name, clicks, gt_masks)
            pred_classes = clicks.get("pred_classes")
            self._labelled &= pred_classes is not None
            self._records.append(
                segment_click_records(
                    gt_masks=gt_masks,
                    gt_classes=gt.gt_classes,
                    masks=clicks["masks"],
                    pred_ious=clicks["pred_ious"],
                    pred_classes=pred_classes,
                )
            )

    def _check(self, name: str, clicks: dict, gt_masks: torch.Tensor) -> None:
        S, H, W = gt_masks.shape
        problems = []
        rounds = len(clicks.get("masks", ()))
        if rounds != self.max_clicks or len(clicks.get("pred_ious", ())) != rounds:
            problems.append(
                f"{rounds} rounds of masks and {len(clicks.get('pred_ious', ()))} of pred_ious (expected max_clicks="
                f"{self.max_clicks} of each)"
            )
        for r, (masks, ious) in enumerate(zip(clicks.get("masks", ()), clicks.get("pred_ious", ()))):
            if masks.dim() != 4 or tuple(masks.shape[:1]) + tuple(masks.shape[2:]) != (S, H, W):
                problems.append(f"round {r}: masks {tuple(masks.shape)}, expected [{S}, K, {H}, {W}]")
            elif tuple(ious.shape) != tuple(masks.shape[:2]):
                problems.append(f"round {r}: pred_ious {tuple(ious.shape)}, expected {tuple(masks.shape[:2])}")
        points = clicks.get("points")
        if points is None or tuple(points.shape) != (S, self.max_clicks, 2):
            got = None if points is None else tuple(points.shape)
            problems.append(f"points {got}, expected [{S}, {self.max_clicks}, 2]")
        elif S and not torch.equal(points[:, 0].detach().cpu().float(), click_points(gt_masks)):
            problems.append("the first clicks are not the click rule's on the GT (samantics_d2.utils.clicks.click_points)")
        if problems:
            raise ValueError(f"ClickEvaluator: the output of {name!r} does not follow the click format: " + "; ".join(problems))

    def evaluate(self) -> Optional[dict[str, dict[str, float]]]:
        gathered = comm.gather((self._records, self._labelled))
        if not comm.is_main_process():
            return None
        records = [r for part, _ in gathered for r in part]
        labelled = all(flag for _, flag in gathered)
        if not records:
            logger.warning("ClickEvaluator received no images.")
            return {}
        merged = {key: np.concatenate([r[key] for r in records]) for key in _RECORD_FIELDS}
        results = click_metrics(
            merged,
            max_clicks=self.max_clicks,
            noc_thresholds=self.noc_thresholds,
            miou_clicks=self.miou_clicks,
            labelled=labelled,
            part_class_ids=self.part_class_ids,
        )
        logger.info("Click evaluation over %d images: %s", len(records), results)
        return {"click": results}
