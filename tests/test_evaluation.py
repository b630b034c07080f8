"""Contract tests of evaluation: COCOEvaluator / LVISEvaluator against the reference APIs, the
inference loop and result printing.

A small COCO-format ground truth (4 images, 3 categories with non-contiguous ids, polygon and RLE
masks, one crowd region) and noisy predictions are generated in a temp dir. Expected numbers come
from pycocotools' COCOeval called directly on COCO results built here, independently of the
evaluator's own conversion.
"""
import json
import logging
import math
import os
import uuid

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from samantics_d2.d2 import (
    BitMasks,
    Boxes,
    COCOEvaluator,
    DatasetCatalog,
    DatasetEvaluator,
    DatasetEvaluators,
    Instances,
    MetadataCatalog,
    inference_on_dataset,
    load_coco_json,
    load_lvis_json,
    print_csv_format,
    register_coco_instances,
)
from samantics_d2.evaluation import LVISEvaluator  # the seam's, with np.float for lvis while it evaluates

CAT_IDS = [3, 7, 11]  # dataset ids; contiguous ids are their ranks 0, 1, 2
CAT_NAMES = ["cat", "dog", "kite"]
IMAGES = {1: (120, 140), 2: (64, 80), 4: (96, 96), 5: (100, 100)}  # id -> (height, width)
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]  # Detectron2's COCOEvaluator reports no AR


def _rect_polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _encode(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _segmentation_mask(seg, h, w):
    rle = mask_util.frPyObjects(seg, h, w) if isinstance(seg, list) else seg
    rle = mask_util.merge(rle) if isinstance(rle, list) else rle
    return mask_util.decode(rle).astype(bool)


def _make_ground_truth(rng):
    annotations = []

    def add(image_id, cat_index, segmentation, iscrowd=0):
        h, w = IMAGES[image_id]
        mask = _segmentation_mask(segmentation, h, w)
        bbox = mask_util.toBbox(_encode(mask)).tolist()
        if isinstance(segmentation, list):  # polygon boxes are exact
            xs, ys = segmentation[0][0::2], segmentation[0][1::2]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        annotations.append(
            dict(id=len(annotations) + 1, image_id=image_id, category_id=CAT_IDS[cat_index], bbox=bbox,
                 area=float(mask.sum()), iscrowd=iscrowd, segmentation=segmentation)
        )

    for image_id in (1, 2, 4):
        h, w = IMAGES[image_id]
        for _ in range(int(rng.integers(3, 6))):
            bw, bh = int(rng.integers(6, min(w, 105))), int(rng.integers(6, min(h, 105)))
            x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            add(image_id, int(rng.integers(0, 3)), _rect_polygon(x0, y0, x0 + bw, y0 + bh))
        add(image_id, int(rng.integers(0, 3)), _encode(_ellipse(h, w, h / 2, w / 2, h / 4, w / 5)))
    add(1, 2, _rect_polygon(10, 5, 120, 110))  # a large one (area > 96 x 96)
    add(2, 1, _encode(_ellipse(64, 80, 10, 60, 6, 12)), iscrowd=1)
    for k in range(25):  # image 5: 25 small cats, to make maxDets matter
        x0, y0 = 2 + 20 * (k % 5), 2 + 20 * (k // 5)
        add(5, 0, _rect_polygon(x0, y0, x0 + 8, y0 + 8))
    images = [
        dict(id=i, file_name=f"{i:06d}.jpg", height=h, width=w, coco_url=f"http://images/val2017/{i:06d}.jpg",
             not_exhaustive_category_ids=[], neg_category_ids=[])
        for i, (h, w) in IMAGES.items()
    ]
    categories = [dict(id=c, name=n) for c, n in zip(CAT_IDS, CAT_NAMES)]
    return dict(images=images, annotations=annotations, categories=categories)


def _make_predictions(gt, rng):
    """Per image: (Instances with contiguous classes, COCO results with dataset ids), built separately."""
    per_image = {}
    scores_used = set()

    def unique_score():  # distinct scores: the ranking (and so the expected numbers) has no ties
        while True:
            s = float(np.float32(rng.uniform(0.05, 1.0)))
            if s not in scores_used:
                scores_used.add(s)
                return s

    for image_id, (h, w) in IMAGES.items():
        boxes, scores, classes, masks = [], [], [], []
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        for ann in anns:
            x, y, bw, bh = (int(round(v)) for v in ann["bbox"])
            jitter = 1 if min(bw, bh) < 20 else 3
            dx0, dy0, dx1, dy1 = (int(v) for v in rng.integers(-jitter, jitter + 1, size=4))
            x0, y0 = min(max(x + dx0, 0), w - 2), min(max(y + dy0, 0), h - 2)
            x1, y1 = min(max(x + bw + dx1, x0 + 1), w), min(max(y + bh + dy1, y0 + 1), h)
            cls = CAT_IDS.index(ann["category_id"])
            if rng.random() < 0.15:
                cls = (cls + 1) % 3
            mask = np.zeros((h, w), dtype=bool)
            mask[y0:y1, x0:x1] = True
            if isinstance(ann["segmentation"], dict):  # an ellipse: predict it shifted by one pixel
                mask = np.roll(_segmentation_mask(ann["segmentation"], h, w), 1, axis=1)
            boxes.append([x0, y0, x1, y1]), scores.append(unique_score()), classes.append(cls), masks.append(mask)
        for _ in range(2):  # false positives
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            mask = np.zeros((h, w), dtype=bool)
            mask[y0:y0 + 10, x0:x0 + 10] = True
            boxes.append([x0, y0, x0 + 10, y0 + 10]), scores.append(unique_score())
            classes.append(int(rng.integers(0, 3))), masks.append(mask)
        if image_id == 4:  # box area medium (40 x 40), mask area small (20 x 20): mask AP must use the mask
            mask = np.zeros((h, w), dtype=bool)
            mask[10:30, 10:30] = True
            boxes.append([10, 10, 50, 50]), scores.append(0.999), classes.append(0), masks.append(mask)
        instances = Instances(
            (h, w),
            pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
            scores=torch.tensor(scores, dtype=torch.float32),
            pred_classes=torch.tensor(classes, dtype=torch.int64),
            pred_masks=torch.from_numpy(np.stack(masks)),
        )
        results = [
            dict(image_id=image_id, category_id=CAT_IDS[c], bbox=[b[0], b[1], b[2] - b[0], b[3] - b[1]], score=s,
                 segmentation=_encode(m))
            for b, s, c, m in zip(boxes, scores, classes, masks)
        ]
        per_image[image_id] = (instances, results)
    return per_image


def _reference(gt_file, results, iou_type, cat_ids=None):
    """pycocotools' COCOeval stats on ``results`` (bbox dropped for segm, as Detectron2 does)."""
    results = [dict(r) for r in results]
    if iou_type == "segm":
        for r in results:
            r.pop("bbox")
    gt = COCO(gt_file)
    ev = COCOeval(gt, gt.loadRes(results), iou_type)
    if cat_ids is not None:
        ev.params.catIds = cat_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float("nan") if s < 0 else float(s) * 100 for s in ev.stats]


def _same(a, b, tol):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


@pytest.fixture(scope="module")
def coco_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    gt = _make_ground_truth(rng)
    gt_file = str(root / "instances.json")
    with open(gt_file, "w") as f:
        json.dump(gt, f)
    name = f"test_eval_coco_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, gt_file, str(root))
    DatasetCatalog.get(name)  # loading sets thing_classes and the id map, as a test loader would
    predictions = _make_predictions(gt, rng)
    all_results = [r for _, results in predictions.values() for r in results]
    return dict(root=root, gt_file=gt_file, name=name, predictions=predictions, results=all_results)


def _run(evaluator, predictions, batch_size=2):
    evaluator.reset()
    items = sorted(predictions.items())
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        inputs = [dict(image_id=i, height=inst.image_size[0], width=inst.image_size[1]) for i, (inst, _) in batch]
        evaluator.process(inputs, [dict(instances=inst) for _, (inst, _) in batch])
    return evaluator.evaluate()


def _check_against_reference(results, setup, tol, reference_results=None):
    reference_results = reference_results or setup["results"]
    assert set(results) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        expected = _reference(setup["gt_file"], reference_results, iou_type)
        got = results[iou_type]
        for name, value in zip(STAT_NAMES, expected):
            assert _same(got[name], value, tol), (iou_type, name, got[name], value)
        for cat_id, cat_name in zip(CAT_IDS, CAT_NAMES):
            expected_ap = _reference(setup["gt_file"], reference_results, iou_type, cat_ids=[cat_id])[0]
            assert _same(got[f"AP-{cat_name}"], expected_ap, tol), (iou_type, cat_name)
        assert set(got) == set(STAT_NAMES) | {f"AP-{n}" for n in CAT_NAMES}
    # the predictions are decent but not perfect: a wrong implementation could not pass by accident
    assert 20 < results["bbox"]["AP"] < 95 and 20 < results["segm"]["AP"] < 95
    assert all(not math.isnan(results["bbox"][k]) for k in ("APs", "APm", "APl"))  # every area range is used


def test_coco_evaluator_matches_pycocotools(coco_setup, tmp_path):
    evaluator = COCOEvaluator(coco_setup["name"], output_dir=str(tmp_path), use_fast_impl=False)
    results = _run(evaluator, coco_setup["predictions"])
    _check_against_reference(results, coco_setup, tol=1e-9)
    with open(tmp_path / "coco_instances_results.json") as f:
        written = json.load(f)
    assert len(written) == len(coco_setup["results"])
    assert {r["category_id"] for r in written} <= set(CAT_IDS)  # dataset ids, not contiguous ones
    assert all(isinstance(r["segmentation"]["counts"], str) for r in written)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no temp file left behind


def test_coco_evaluator_fast_impl_matches_pycocotools(coco_setup):
    evaluator = COCOEvaluator(coco_setup["name"], distributed=False, use_fast_impl=True)
    # faster-coco-eval computes the same matches in C++; here they equal pycocotools' up to float rounding (1e-14).
    _check_against_reference(_run(evaluator, coco_setup["predictions"], batch_size=3), coco_setup, tol=1e-9)


@pytest.mark.parametrize("use_fast_impl", [False, True])
def test_max_dets_per_image_sets_max_dets(coco_setup, use_fast_impl):
    evaluator = COCOEvaluator(coco_setup["name"], max_dets_per_image=20, use_fast_impl=use_fast_impl)
    results = _run(evaluator, coco_setup["predictions"])
    # COCOeval's maxDets keeps the top detections per image and category: the same as evaluating,
    # with the default maxDets, only the 20 best-scored results of each image and category.
    kept = []
    for image_id in IMAGES:
        for cat_id in CAT_IDS:
            group = [r for r in coco_setup["results"] if r["image_id"] == image_id and r["category_id"] == cat_id]
            kept += sorted(group, key=lambda r: -r["score"])[:20]
    for iou_type in ("bbox", "segm"):
        expected = dict(zip(STAT_NAMES, _reference(coco_setup["gt_file"], kept, iou_type)))
        got = results[iou_type]
        assert set(got) == set(STAT_NAMES) | {f"AP-{n}" for n in CAT_NAMES}
        for name in STAT_NAMES:
            assert _same(got[name], expected[name], 1e-9), (iou_type, name)
    default = _run(COCOEvaluator(coco_setup["name"], use_fast_impl=use_fast_impl), coco_setup["predictions"])
    assert results["bbox"]["AP"] < default["bbox"]["AP"]  # image 5 has 25 true positives


def test_coco_evaluator_converts_datasets_without_json(coco_setup, tmp_path):
    name = f"test_eval_nojson_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: load_coco_json(coco_setup["gt_file"], str(coco_setup["root"]), name))
    DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).get("json_file") is None
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path), use_fast_impl=False)
    converted = tmp_path / f"{name}_coco_format.json"
    assert converted.exists() and MetadataCatalog.get(name).json_file == str(converted)
    _check_against_reference(_run(evaluator, coco_setup["predictions"]), coco_setup, tol=1e-9)


def test_coco_evaluator_tasks_and_empty_predictions(coco_setup, caplog):
    evaluator = COCOEvaluator(coco_setup["name"], tasks=("bbox",), use_fast_impl=False)
    assert set(_run(evaluator, coco_setup["predictions"])) == {"bbox"}
    # outputs without masks: bbox only
    no_masks = {}
    for i, (inst, results) in coco_setup["predictions"].items():
        inst = inst[:]
        inst.remove("pred_masks")
        no_masks[i] = (inst, results)
    assert set(_run(COCOEvaluator(coco_setup["name"]), no_masks)) == {"bbox"}
    # images processed but nothing detected: a warning and NaN metrics
    empty = {
        i: (Instances(inst.image_size, pred_boxes=Boxes([]), scores=torch.zeros(0),
                      pred_classes=torch.zeros(0, dtype=torch.int64)), [])
        for i, (inst, _) in coco_setup["predictions"].items()
    }
    with caplog.at_level(logging.WARNING):
        results = _run(COCOEvaluator(coco_setup["name"], use_fast_impl=False), empty)
    assert all(math.isnan(v) for v in results["bbox"].values()) and "AP" in results["bbox"]
    assert any("No predictions" in r.getMessage() for r in caplog.records)
    # nothing processed at all
    assert _run(COCOEvaluator(coco_setup["name"]), {}) == {}


# ---------------------------------------------------------------- LVIS
def test_lvis_evaluator(tmp_path):
    frequencies = {1: "r", 2: "c", 3: "f"}
    h, w = 60, 80
    boxes = {1: [(5, 5, 30, 25)], 2: [(40, 10, 70, 50), (10, 30, 25, 55)]}  # image -> XYXY boxes
    labels = {1: [1], 2: [2, 3]}  # dataset category ids
    anns, images = [], []
    for image_id in (1, 2):
        negatives = [c for c in (1, 2, 3) if c not in labels[image_id]]
        images.append(dict(id=image_id, height=h, width=w, coco_url=f"http://images/val2017/{image_id:012d}.jpg",
                           not_exhaustive_category_ids=[], neg_category_ids=negatives))
        for (x0, y0, x1, y1), cat in zip(boxes[image_id], labels[image_id]):
            anns.append(dict(id=len(anns) + 1, image_id=image_id, category_id=cat, bbox=[x0, y0, x1 - x0, y1 - y0],
                             area=float((x1 - x0) * (y1 - y0)), segmentation=_rect_polygon(x0, y0, x1, y1)))
    cats = [dict(id=c, name=f"c{c}", frequency=f, synonyms=[f"c{c}"], image_count=1, instance_count=1)
            for c, f in frequencies.items()]
    gt_file = str(tmp_path / "lvis.json")
    with open(gt_file, "w") as f:
        json.dump(dict(images=images, annotations=anns, categories=cats), f)
    name = f"test_eval_lvis_{uuid.uuid4().hex[:8]}"
    # no dataset name for the loader: Detectron2 only knows built-in LVIS versions' metadata
    DatasetCatalog.register(name, lambda: load_lvis_json(gt_file, str(tmp_path) + os.sep))
    MetadataCatalog.get(name).set(json_file=gt_file, evaluator_type="lvis")
    DatasetCatalog.get(name)

    def predictions(extra_false_positive):
        out = {}
        for image_id in (1, 2):
            bxs, cls = list(boxes[image_id]), [c - 1 for c in labels[image_id]]  # contiguous = id - 1 here
            if extra_false_positive and image_id == 2:
                bxs.append((0, 0, 20, 20)), cls.append(0)  # category 1 ("r") is a negative of image 2
            masks = np.zeros((len(bxs), h, w), dtype=bool)
            for k, (x0, y0, x1, y1) in enumerate(bxs):
                masks[k, y0:y1, x0:x1] = True
            scores = [0.9] * len(boxes[image_id]) + [0.95] * (len(bxs) - len(boxes[image_id]))
            inst = Instances((h, w), pred_boxes=Boxes(torch.tensor(bxs, dtype=torch.float32)),
                             scores=torch.tensor(scores), pred_classes=torch.tensor(cls),
                             pred_masks=BitMasks(torch.from_numpy(masks)))
            out[image_id] = (inst, None)
        return out

    perfect = _run(LVISEvaluator(name, output_dir=str(tmp_path)), predictions(False))
    for iou_type in ("bbox", "segm"):
        for metric in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
            assert perfect[iou_type][metric] == pytest.approx(100.0), (iou_type, metric)
    with open(tmp_path / "lvis_instances_results.json") as f:
        assert sorted(r["category_id"] for r in json.load(f)) == [1, 2, 3]
    # A false positive of the rare category ranked above its only true positive: precision 1/2 at
    # every recall level for that category, so APr = 50; the others are untouched.
    noisy = _run(LVISEvaluator(name, tasks=("bbox",)), predictions(True))
    assert set(noisy) == {"bbox"}
    assert noisy["bbox"]["APr"] == pytest.approx(50.0)
    assert noisy["bbox"]["APc"] == pytest.approx(100.0) and noisy["bbox"]["APf"] == pytest.approx(100.0)
    assert "float" not in np.__dict__  # the np.float alias for lvis is gone again


# ---------------------------------------------------------------- inference loop and printing
class _Recorder(DatasetEvaluator):
    def __init__(self, key):
        self.key, self.seen = key, []

    def reset(self):
        self.seen = []

    def process(self, inputs, outputs):
        self.seen += [o["value"] for o in outputs]

    def evaluate(self):
        return {self.key: {"count": len(self.seen)}}


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.modes = []

    def forward(self, inputs):
        self.modes.append((self.training, torch.is_grad_enabled()))
        return [{"value": x["x"] * 2} for x in inputs]


def test_inference_on_dataset_modes_callbacks_and_results():
    model = _Model().train()
    loader = [[{"x": 1}, {"x": 2}], [{"x": 3}], [{"x": 4}]]
    calls = []
    names = ("on_start", "before_inference", "after_inference", "on_end")
    callbacks = {k: (lambda k=k: calls.append(k)) for k in names}
    recorders = [_Recorder("a"), _Recorder("b")]
    results = inference_on_dataset(model, loader, DatasetEvaluators(recorders), callbacks=callbacks)
    assert results == {"a": {"count": 4}, "b": {"count": 4}}
    assert recorders[0].seen == [2, 4, 6, 8]
    assert model.modes == [(False, False)] * 3 and model.training  # eval + no_grad inside, mode restored after
    assert calls[0] == "on_start" and calls[-1] == "on_end" and calls.count("before_inference") == 3
    assert inference_on_dataset(model.eval(), loader, None) == {} and not model.training
    with pytest.raises(Exception):
        DatasetEvaluators([_Recorder("a"), _Recorder("a")]).evaluate()  # colliding result keys


def test_print_csv_format_logs_copypaste_lines(caplog):
    with caplog.at_level(logging.INFO):
        print_csv_format({"bbox": {"AP": 12.345678, "AP50": 50.0, "AP-cat": 1.0}, "top1": 0.5})
    lines = [r.getMessage() for r in caplog.records]
    assert "copypaste: Task: bbox" in lines
    assert "copypaste: AP,AP50" in lines and "copypaste: 12.3457,50.0000" in lines
    assert not any("AP-cat" in line for line in lines)
