"""``COCOEvaluator``: COCO box and mask AP, as in ``detectron2.evaluation.COCOEvaluator``.

Evaluation is pycocotools' ``COCOeval`` (``use_fast_impl=False``) or faster-coco-eval's
``COCOeval_faster`` (``use_fast_impl=True``, C++; same numbers). Predictions are turned into COCO
results (XYWH boxes, RLE masks) as they arrive, so no dense mask is held for the whole dataset.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import io
import itertools
import json
import logging
import os
from collections import OrderedDict
from typing import Any, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
from iopath.common.file_io import g_pathmgr
from tabulate import tabulate

from ...utils.io import atomic_path
from .. import comm
from ..data import DatasetCatalog, MetadataCatalog
from ..structures import BoxMode, Instances
from .evaluator import DatasetEvaluator
from .testing import create_small_table

__all__ = ["COCOEvaluator", "convert_to_coco_json", "instances_to_coco_json"]

logger = logging.getLogger(__name__)

_SUPPORTED_TASKS = ("bbox", "segm")
# The first six of pycocotools' ``COCOeval.stats`` for boxes and masks: Detectron2 reports no AR.
_COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def instances_to_coco_json(instances: Instances, img_id: int) -> list[dict[str, Any]]:
    """COCO results of one image: ``[{"image_id", "category_id", "bbox" (XYWH), "score", "segmentation"}]``.

    Args:
        instances: on CPU, with ``pred_boxes`` (Boxes, XYXY abs), ``scores: [N]``,
            ``pred_classes: [N]`` (contiguous ids) and optionally ``pred_masks: [N, H, W]``.
    Returns:
        One dict per instance; ``category_id`` is still the contiguous id; masks are RLE with
        ``str`` counts.
    """
    num_instances = len(instances)
    if num_instances == 0:
        return []
    boxes = BoxMode.convert(instances.pred_boxes.tensor.numpy(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS).tolist()
    scores = instances.scores.tolist()
    classes = instances.pred_classes.tolist()
    rles = None
    if instances.has("pred_masks"):
        masks = instances.pred_masks
        masks = masks.tensor if hasattr(masks, "tensor") else masks  # BitMasks or [N, H, W] tensor
        # One encode call for all masks: pycocotools takes [H, W, N] Fortran-ordered uint8.
        rles = mask_util.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
        for rle in rles:
            rle["counts"] = rle["counts"].decode("utf-8")  # bytes are not JSON-serialisable
    results = []
    for k in range(num_instances):
        result = {"image_id": img_id, "category_id": classes[k], "bbox": boxes[k], "score": scores[k]}
        if rles is not None:
            result["segmentation"] = rles[k]
        results.append(result)
    return results


def _atomic_write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f)


def _convert_to_coco_dict(dataset_name: str) -> dict[str, Any]:
    """The COCO-format dict (images, categories, annotations) of a registered dataset's dicts.

    An annotation's ``area`` is its own ``"area"`` when present, else its mask area (pycocotools),
    else its box area.
    """
    dataset_dicts = DatasetCatalog.get(dataset_name)
    metadata = MetadataCatalog.get(dataset_name)
    thing_classes = getattr(metadata, "thing_classes", None)
    if thing_classes is None:
        raise ValueError(
            f"Dataset '{dataset_name}' has no metadata 'thing_classes'; set MetadataCatalog.get({dataset_name!r})"
            ".thing_classes to convert it to COCO format."
        )
    id_map = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    if id_map is None:
        to_dataset_id = {i: i for i in range(len(thing_classes))}
    else:
        to_dataset_id = {v: k for k, v in id_map.items()}
    categories = [{"id": to_dataset_id[i], "name": name} for i, name in enumerate(thing_classes)]

    images, annotations = [], []
    for index, record in enumerate(dataset_dicts):
        image_id = record.get("image_id", index)
        height, width = int(record["height"]), int(record["width"])
        images.append({"id": image_id, "width": width, "height": height, "file_name": str(record["file_name"])})
        for anno in record.get("annotations", []):
            bbox = BoxMode.convert(list(map(float, anno["bbox"])), anno["bbox_mode"], BoxMode.XYWH_ABS)
            coco_anno: dict[str, Any] = {
                "id": len(annotations) + 1,  # COCO ids start at 1
                "image_id": image_id,
                "bbox": [round(x, 3) for x in bbox],
                "iscrowd": int(anno.get("iscrowd", 0)),
                "category_id": int(to_dataset_id[anno["category_id"]]),
            }
            segmentation = anno.get("segmentation")
            if isinstance(segmentation, dict):  # RLE
                rle = dict(segmentation)
                if isinstance(rle["counts"], list):  # uncompressed RLE
                    rle = mask_util.frPyObjects(rle, height, width)
                if isinstance(rle["counts"], bytes):
                    rle["counts"] = rle["counts"].decode("ascii")
                coco_anno["segmentation"] = rle
                area = float(mask_util.area(rle))
            elif isinstance(segmentation, list):  # polygons
                coco_anno["segmentation"] = segmentation
                area = float(mask_util.area(mask_util.merge(mask_util.frPyObjects(segmentation, height, width))))
            elif segmentation is None:
                area = float(bbox[2] * bbox[3])
            else:
                raise TypeError(
                    f"Dataset '{dataset_name}', image {image_id}: 'segmentation' is a {type(segmentation).__name__}; "
                    "expected a list of polygons or an RLE dict."
                )
            coco_anno["area"] = float(anno.get("area", area))
            annotations.append(coco_anno)

    coco_dict: dict[str, Any] = {
        "info": {
            "date_created": str(datetime.datetime.now()),
            "description": f"COCO-format json of dataset '{dataset_name}', generated by samantics_d2.lite.",
        },
        "images": images,
        "categories": categories,
        "licenses": None,
    }
    if annotations:
        coco_dict["annotations"] = annotations
    return coco_dict


def convert_to_coco_json(dataset_name: str, output_file: str, allow_cached: bool = True) -> None:
    """Write a registered dataset in COCO json format to ``output_file`` (reused if it exists and
    ``allow_cached``). Safe to call from every process: each writes a whole file atomically."""
    if allow_cached and os.path.exists(output_file):
        logger.warning(
            "Using previously cached COCO format annotations at '%s'. Delete this file if the dataset has changed.",
            output_file,
        )
        return
    logger.info("Converting dataset '%s' to COCO format into '%s'", dataset_name, output_file)
    _atomic_write_json(output_file, _convert_to_coco_dict(dataset_name))


class _InstancesEvaluator(DatasetEvaluator):
    """Shared by the COCO and LVIS evaluators: keeps each image's instances as COCO results and
    gathers them to the main process."""

    _distributed: bool
    _predictions: list[dict[str, Any]]

    def reset(self) -> None:
        self._predictions = []

    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        """Convert each output's ``instances`` to COCO results (RLE masks) and keep them."""
        for input_dict, output in zip(inputs, outputs):
            if "instances" in output:
                image_id = input_dict["image_id"]
                instances = output["instances"].to("cpu")
                results = instances_to_coco_json(instances, image_id)
                self._predictions.append({"image_id": image_id, "instances": results})

    def _gathered_predictions(self) -> Optional[list[dict[str, Any]]]:
        """All processes' predictions on the main process; None on the others."""
        if not self._distributed:
            return self._predictions
        comm.synchronize()
        predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
        return predictions if comm.is_main_process() else None


class COCOEvaluator(_InstancesEvaluator):
    """COCO AP of instance detection ("bbox") and segmentation ("segm").

    Each model output needs ``"instances"`` with ``pred_boxes``, ``scores``, ``pred_classes`` (contiguous
    ids, mapped back to dataset ids through ``thing_dataset_id_to_contiguous_id``) and, for "segm",
    ``pred_masks``. Results: ``{"bbox": {...}, "segm": {...}}`` with AP, AP50, AP75, APs, APm, APl,
    in percent (NaN when undefined), plus ``AP-<class name>`` per category; no AR, as in Detectron2.
    Keypoint evaluation is not in lite (``tasks=("keypoints",)`` is an error).
    """

    def __init__(
        self,
        dataset_name: str,
        tasks: Optional[Sequence[str]] = None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        max_dets_per_image: Optional[int] = None,
        use_fast_impl: bool = True,
        allow_cached_coco: bool = True,
    ):
        """
        Args:
            dataset_name: a registered dataset; its metadata's ``json_file`` is the ground truth.
                Without ``json_file``, the dataset dicts are converted to COCO json in ``output_dir``.
            tasks: subset of ("bbox", "segm"); None: "bbox", plus "segm" when outputs have masks.
            distributed: gather predictions from all processes and evaluate on the main one.
            output_dir: where ``coco_instances_results.json`` is written (optional).
            max_dets_per_image: COCOeval's maxDets becomes [1, 10, this] (default 100); like COCOeval,
                it limits detections per image and category.
            use_fast_impl: faster-coco-eval's C++ evaluation instead of pycocotools' Python one.
            allow_cached_coco: reuse a COCO json converted by an earlier run.
        """
        if tasks is not None:
            tasks = tuple(tasks)
            unknown = [t for t in tasks if t not in _SUPPORTED_TASKS]
            if unknown:
                raise ValueError(f"COCOEvaluator: unsupported tasks {unknown}; lite supports {_SUPPORTED_TASKS}.")
        self._tasks = tasks
        self._distributed = distributed
        self._output_dir = output_dir
        self._use_fast_impl = use_fast_impl
        self._max_dets_per_image = [1, 10, 100 if max_dets_per_image is None else int(max_dets_per_image)]
        if self._max_dets_per_image[2] < 10:
            raise ValueError(f"COCOEvaluator: max_dets_per_image={max_dets_per_image}; expected at least 10.")

        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        if getattr(self._metadata, "json_file", None) is None:
            if output_dir is None:
                raise ValueError(
                    f"Dataset '{dataset_name}' has no metadata 'json_file'; pass output_dir= to COCOEvaluator so "
                    "that the dataset can be converted to COCO json there."
                )
            cache_path = os.path.join(output_dir, f"{dataset_name}_coco_format.json")
            self._metadata.json_file = cache_path
            convert_to_coco_json(dataset_name, cache_path, allow_cached=allow_cached_coco)

        json_file = g_pathmgr.get_local_path(self._metadata.json_file)
        if use_fast_impl:
            from faster_coco_eval import COCO
        else:
            from pycocotools.coco import COCO
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self._coco_api = COCO(json_file)
        # Test sets have no annotations: then results are only written, not evaluated.
        self._do_evaluation = "annotations" in self._coco_api.dataset
        self._predictions = []

    def evaluate(self, img_ids: Optional[Sequence[int]] = None) -> dict[str, Any]:
        """Gather, write and evaluate; ``img_ids`` restricts evaluation to those images.

        Returns ``{task: {metric: value}}`` on the main process, ``{}`` on the others and when no
        image was processed.
        """
        predictions = self._gathered_predictions()
        if predictions is None:  # not the main process
            return {}
        if len(predictions) == 0:
            logger.warning("[COCOEvaluator] Did not receive valid predictions.")
            return {}

        # Copies: mapping the category ids must not change the kept predictions (evaluate may run twice).
        coco_results = self._to_dataset_ids([dict(r) for p in predictions for r in p["instances"]])
        if self._output_dir:
            path = os.path.join(self._output_dir, "coco_instances_results.json")
            logger.info("Saving results to %s", path)
            _atomic_write_json(path, coco_results)
        if not self._do_evaluation:
            logger.info("Annotations are not available for evaluation.")
            return {}

        tasks = self._tasks or self._tasks_from_predictions(coco_results)
        api = "faster-coco-eval" if self._use_fast_impl else "pycocotools"
        logger.info("Evaluating predictions with the %s COCO API...", api)
        results: OrderedDict = OrderedDict()
        for task in sorted(tasks):
            if len(coco_results) == 0:  # the COCO API does not handle empty results
                coco_eval = None
            else:
                coco_eval = _evaluate_predictions_on_coco(
                    self._coco_api,
                    coco_results,
                    task,
                    use_fast_impl=self._use_fast_impl,
                    img_ids=img_ids,
                    max_dets_per_image=self._max_dets_per_image,
                )
            results[task] = self._derive_coco_results(coco_eval, task)
        return copy.deepcopy(results)

    def _tasks_from_predictions(self, coco_results: list[dict[str, Any]]) -> tuple[str, ...]:
        return ("bbox", "segm") if coco_results and "segmentation" in coco_results[0] else ("bbox",)

    def _to_dataset_ids(self, coco_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        id_map = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if id_map is None:
            unknown = {r["category_id"] for r in coco_results} - set(self._coco_api.getCatIds())
            if unknown:
                logger.warning(
                    "Dataset '%s' has no thing_dataset_id_to_contiguous_id in its metadata (it is set when the "
                    "dataset is loaded), so predicted classes are taken as dataset category ids, but %s are not "
                    "categories of %s: those predictions count for nothing.",
                    self._dataset_name, sorted(unknown)[:10], self._metadata.json_file,
                )
            return coco_results
        num_classes = len(id_map)
        to_dataset_id = {v: k for k, v in id_map.items()}
        if sorted(to_dataset_id) != list(range(num_classes)):
            raise ValueError(
                f"Dataset '{self._dataset_name}': thing_dataset_id_to_contiguous_id values are "
                f"{sorted(to_dataset_id)}; expected 0..{num_classes - 1}."
            )
        for result in coco_results:
            category_id = result["category_id"]
            if category_id not in to_dataset_id:
                raise ValueError(
                    f"A prediction has class={category_id}, but dataset '{self._dataset_name}' has {num_classes} "
                    f"classes: predicted class ids must be in [0, {num_classes - 1}]."
                )
            result["category_id"] = to_dataset_id[category_id]
        return coco_results

    def _derive_coco_results(self, coco_eval: Any, iou_type: str) -> dict[str, float]:
        """Percent metrics from a run ``coco_eval`` (None: no predictions, all NaN) and per-class AP."""
        names = _COCO_STAT_NAMES
        if coco_eval is None:
            logger.warning("No predictions from the model! %s metrics are NaN.", iou_type)
            return {name: float("nan") for name in names}
        stats = coco_eval.stats
        results = {name: float(stats[i] * 100) if stats[i] >= 0 else float("nan") for i, name in enumerate(names)}
        logger.info("Evaluation results for %s:\n%s", iou_type, create_small_table(results))
        if not np.isfinite(sum(results.values())):
            logger.info("Some metrics cannot be computed and are shown as NaN.")

        class_names = getattr(self._metadata, "thing_classes", None)
        if class_names is None or len(class_names) <= 1:
            return results
        id_map = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        # precision: [iou thresholds, recall thresholds, categories, area ranges, max dets]
        precisions = coco_eval.eval["precision"]
        per_category = []
        for k, cat_id in enumerate(coco_eval.params.catIds):
            contiguous = id_map.get(cat_id) if id_map is not None else k
            if contiguous is None or not 0 <= contiguous < len(class_names):
                continue  # a ground-truth category the model does not know
            precision = precisions[:, :, k, 0, -1]
            precision = precision[precision > -1]
            ap = float(np.mean(precision)) * 100 if precision.size else float("nan")
            per_category.append((class_names[contiguous], ap))
        results.update({f"AP-{name}": ap for name, ap in per_category})

        num_cols = min(6, len(per_category) * 2)
        flat = list(itertools.chain(*per_category))
        rows = itertools.zip_longest(*[flat[i::num_cols] for i in range(num_cols)])
        table = tabulate(rows, tablefmt="pipe", floatfmt=".3f", headers=["category", "AP"] * (num_cols // 2),
                         numalign="left")
        logger.info("Per-category %s AP:\n%s", iou_type, table)
        return results


def _evaluate_predictions_on_coco(
    coco_gt: Any,
    coco_results: list[dict[str, Any]],
    iou_type: str,
    *,
    use_fast_impl: bool,
    img_ids: Optional[Sequence[int]] = None,
    max_dets_per_image: Sequence[int] = (1, 10, 100),
) -> Any:
    """Run COCO evaluation (evaluate, accumulate, summarize) and return the evaluator object."""
    coco_results = copy.deepcopy(coco_results)  # loadRes adds fields to the dicts
    if iou_type == "segm":
        # With a "bbox", the COCO API would take the box area as the instance area for the
        # small/medium/large split; mask AP must use the mask area.
        for c in coco_results:
            c.pop("bbox", None)
    if use_fast_impl:
        from faster_coco_eval import COCOeval_faster

        coco_dt = coco_gt.loadRes(coco_results)
        coco_eval = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=logger.info)
    else:
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(coco_results)
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
    coco_eval.params.maxDets = list(max_dets_per_image)
    if img_ids is not None:
        coco_eval.params.imgIds = list(img_ids)

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):  # pycocotools prints its summary
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    if captured.getvalue():
        logger.info("COCOeval (%s):\n%s", iou_type, captured.getvalue().rstrip())
    if not use_fast_impl and coco_eval.params.maxDets[2] != 100:
        # pycocotools' summarize() computes AP (stats[0]) at maxDets=100 whatever params.maxDets is;
        # take it at maxDets[2] like the other stats (faster-coco-eval already does).
        precision = coco_eval.eval["precision"][:, :, :, 0, 2]
        coco_eval.stats[0] = float(np.mean(precision[precision > -1])) if (precision > -1).any() else -1.0
    return coco_eval

