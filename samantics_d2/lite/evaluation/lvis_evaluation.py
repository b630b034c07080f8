"""``LVISEvaluator``: LVIS box and mask AP with the ``lvis`` package, as in ``detectron2.evaluation``."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from collections import OrderedDict
from typing import Any, Optional, Sequence

from iopath.common.file_io import g_pathmgr

from ...utils.compat import numpy_float_alias
from ..data import MetadataCatalog
from .coco_evaluation import _SUPPORTED_TASKS, _atomic_write_json, _InstancesEvaluator
from .testing import create_small_table

__all__ = ["LVISEvaluator"]

logger = logging.getLogger(__name__)

_LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


class LVISEvaluator(_InstancesEvaluator):
    """LVIS AP of instance detection ("bbox") and segmentation ("segm").

    Results: ``{"bbox": {...}, "segm": {...}}`` with AP, AP50, AP75, APs, APm, APl, APr, APc, APf in
    percent (NaN when there are no predictions). Category ids are mapped back through
    ``thing_dataset_id_to_contiguous_id`` when the metadata has it, else contiguous id + 1.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks: Optional[Sequence[str]] = None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        max_dets_per_image: Optional[int] = None,
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata's ``json_file`` is an LVIS json.
            tasks: subset of ("bbox", "segm"); None: "bbox", plus "segm" when outputs have masks.
            distributed: gather predictions from all processes and evaluate on the main one.
            output_dir: where ``lvis_instances_results.json`` is written (optional).
            max_dets_per_image: detections kept per image (LVIS default 300).
        """
        from lvis import LVIS

        if tasks is not None:
            tasks = tuple(tasks)
            unknown = [t for t in tasks if t not in _SUPPORTED_TASKS]
            if unknown:
                raise ValueError(f"LVISEvaluator: unsupported tasks {unknown}; lite supports {_SUPPORTED_TASKS}.")
        self._tasks = tasks
        self._distributed = distributed
        self._output_dir = output_dir
        self._max_dets_per_image = 300 if max_dets_per_image is None else int(max_dets_per_image)
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        json_file = getattr(self._metadata, "json_file", None)
        if json_file is None:
            raise ValueError(
                f"Dataset '{dataset_name}' has no metadata 'json_file'; LVISEvaluator needs the LVIS json: set "
                f"MetadataCatalog.get({dataset_name!r}).json_file."
            )
        self._lvis_api = LVIS(g_pathmgr.get_local_path(json_file))
        # Test sets have no annotations: then results are only written, not evaluated.
        self._do_evaluation = len(self._lvis_api.get_ann_ids()) > 0
        self._predictions = []

    def evaluate(self) -> dict[str, Any]:
        """Gather, write and evaluate: ``{task: {metric: value}}`` on the main process, ``{}`` elsewhere."""
        predictions = self._gathered_predictions()
        if predictions is None:  # not the main process
            return {}
        if len(predictions) == 0:
            logger.warning("[LVISEvaluator] Did not receive valid predictions.")
            return {}

        # Copies: mapping the category ids must not change the kept predictions (evaluate may run twice).
        lvis_results = [dict(r) for p in predictions for r in p["instances"]]
        id_map = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        to_dataset_id = {v: k for k, v in id_map.items()} if id_map is not None else None
        for result in lvis_results:
            # Without a mapping, LVIS category ids are 1..K, contiguous ids 0..K-1.
            result["category_id"] = (
                to_dataset_id[result["category_id"]] if to_dataset_id is not None else result["category_id"] + 1
            )
        if self._output_dir:
            path = os.path.join(self._output_dir, "lvis_instances_results.json")
            logger.info("Saving results to %s", path)
            _atomic_write_json(path, lvis_results)
        if not self._do_evaluation:
            logger.info("Annotations are not available for evaluation.")
            return {}

        if self._tasks:
            tasks = self._tasks
        else:
            tasks = ("bbox", "segm") if lvis_results and "segmentation" in lvis_results[0] else ("bbox",)
        logger.info("Evaluating predictions (max %d per image) with the LVIS API...", self._max_dets_per_image)
        results: OrderedDict = OrderedDict()
        for task in sorted(tasks):
            results[task] = _evaluate_predictions_on_lvis(
                self._lvis_api, lvis_results, task, max_dets_per_image=self._max_dets_per_image
            )
        return results


def _evaluate_predictions_on_lvis(
    lvis_gt: Any, lvis_results: list[dict[str, Any]], iou_type: str, *, max_dets_per_image: int
) -> dict[str, float]:
    """The LVIS metrics of ``lvis_results`` (dataset category ids), in percent."""
    if len(lvis_results) == 0:  # LVISResults cannot be built from no results
        logger.warning("No predictions from the model! %s metrics are NaN.", iou_type)
        return {metric: float("nan") for metric in _LVIS_METRICS}
    from lvis import LVISEval, LVISResults

    lvis_results = copy.deepcopy(lvis_results)  # LVISResults adds fields to the dicts
    if iou_type == "segm":
        # With a "bbox", LVIS would take the box area as the instance area; mask AP uses the mask area.
        for c in lvis_results:
            c.pop("bbox", None)
    captured = io.StringIO()
    with numpy_float_alias(), contextlib.redirect_stdout(captured):  # print_results prints
        lvis_dt = LVISResults(lvis_gt, lvis_results, max_dets=max_dets_per_image)
        lvis_eval = LVISEval(lvis_gt, lvis_dt, iou_type)
        lvis_eval.params.max_dets = max_dets_per_image
        lvis_eval.run()
        lvis_eval.print_results()
    logger.info("LVISEval (%s):\n%s", iou_type, captured.getvalue().rstrip())
    raw = lvis_eval.get_results()
    results = {metric: float(raw[metric] * 100) if raw[metric] >= 0 else float("nan") for metric in _LVIS_METRICS}
    logger.info("Evaluation results for %s:\n%s", iou_type, create_small_table(results))
    return results
