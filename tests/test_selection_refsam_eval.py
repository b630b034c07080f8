"""The RefSAM evaluation-reference preset against a re-implementation of the authors' rule.

``reference_rule`` below is written from the rule's description (reference_sam/create_eval_jsons.py:
shuffle the annotation list once with random.Random(seed), walk it, take an annotation when its
category is not full, its image unused and every filter passes, stop when all categories are full,
sort each category by area, largest first), straightforwardly: dense masks from pycocotools'
COCO.annToMask, box IoU from torchvision.ops.box_iou. The preset must give the same annotation ids
in the same order on COCO-format files built here.
"""
import importlib.util
import json
import os
import random

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from samantics_d2.data.reference_presets import (
    MULTI_INSTANCE_ANNOTATION_IDS,
    RefSAMEvalSelection,
    select_refsam_eval_references,
)

torchvision_ops = pytest.importorskip("torchvision.ops")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "create_reference_json.py")


def reference_rule(json_path, n_ref, seed):
    """{category id: [annotation ids, largest area first]} by the authors' rule, from its description."""
    with open(json_path) as f:
        data = json.load(f)
    coco = COCO(json_path)
    annotations = list(data["annotations"])
    random.Random(seed).shuffle(annotations)
    images = {image["id"]: image for image in data["images"]}
    chosen = {c["id"]: [] for c in data["categories"]}
    used = []

    def far_from_edges(ann, h, w, m=10):
        x1, y1, x2, y2 = ann["bbox"][0], ann["bbox"][1], ann["bbox"][0] + ann["bbox"][2], ann["bbox"][1] + ann["bbox"][3]
        return not (x1 < m or y1 < m or x2 > w - m or y2 > h - m)

    def frame_share(ann, h, w, px=15):
        frame = np.zeros((h, w), dtype=np.uint8)
        frame[:px, :] = 1
        frame[-px:, :] = 1
        frame[:, :px] = 1
        frame[:, -px:] = 1
        return np.logical_and(coco.annToMask(ann), frame).sum() / frame.sum() * 100

    def iou_ok(ann):
        others = [o for o in coco.loadAnns(coco.getAnnIds(imgIds=ann["image_id"])) if o["id"] != ann["id"]]
        if not others:
            return True
        xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]  # noqa: E731
        ious = torchvision_ops.box_iou(torch.tensor([xyxy(ann["bbox"])]), torch.tensor([xyxy(o["bbox"]) for o in others]))
        return not ious.max() > 0.35

    for ann in annotations:
        image = images[ann["image_id"]]
        h, w = image["height"], image["width"]
        if (len(chosen[ann["category_id"]]) < n_ref and ann["image_id"] not in used and ann["iscrowd"] == 0
                and ann["area"] > 1024 and ann["area"] < h * w * 50 / 100 and 1 / 5 <= w / h <= 5
                and far_from_edges(ann, h, w) and frame_share(ann, h, w) < 5 and iou_ok(ann)
                and ann["id"] not in MULTI_INSTANCE_ANNOTATION_IDS):
            chosen[ann["category_id"]].append(ann)
            used.append(ann["image_id"])
        if all(len(v) == n_ref for v in chosen.values()):
            break
    return {c: [a["id"] for a in sorted(v, key=lambda a: a["area"], reverse=True)] for c, v in chosen.items()}


def polygon_annotation(ann_id, image_id, category_id, x, y, w, h, *, height, width, crowd=0):
    """A diamond-with-corners polygon inside the box (x, y, w, h); area and box from its mask."""
    poly = [x, y + h / 3, x + w / 3, y, x + w, y, x + w, y + h, x + w / 4, y + h, x, y + 2 * h / 3]
    rle = mask_util.merge(mask_util.frPyObjects([poly], height, width))
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": crowd,
            "segmentation": [[round(v, 2) for v in poly]], "area": float(mask_util.area(rle)),
            "bbox": [round(v, 2) for v in (x, y, w, h)]}


def random_coco(seed, *, num_images=40, num_categories=5):
    """Images of varied sizes (a few beyond the 1:5 aspect bound), 1-7 polygons each: large ones (area
    bound), some 10-14 px from an edge (inside the box margin but reaching into the 15 px frame), some
    near-duplicates (box IoU), a few crowd, one with an excluded id."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    next_id = 1
    for image_id in range(1, num_images + 1):
        height = int(rng.integers(80, 260))
        width = int(height * rng.choice([0.15, 0.5, 1.0, 1.33, 2.0, 5.0, 6.0]))
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": height, "width": width})
        for _ in range(int(rng.integers(1, 8))):
            w = float(rng.uniform(8, 0.95 * width))
            h = float(rng.uniform(8, 0.95 * height))
            x = float(rng.uniform(0, width - w))
            y = float(rng.uniform(0, height - h))
            if rng.random() < 0.4:  # hug one edge, 10-14 px away: passes the box margin, may cover the frame
                side = int(rng.integers(4))
                gap = float(rng.uniform(10, 14))
                if side == 0:
                    x = gap
                elif side == 1:
                    y = gap
                elif side == 2:
                    x = max(0.0, width - gap - w)
                else:
                    y = max(0.0, height - gap - h)
            if rng.random() < 0.2 and annotations and annotations[-1]["image_id"] == image_id:  # a near-duplicate
                x, y, w, h = (v + float(rng.uniform(-3, 3)) for v in annotations[-1]["bbox"])
                x, y = max(x, 0.0), max(y, 0.0)
                w, h = min(max(w, 8.0), width - x), min(max(h, 8.0), height - y)
            ann = polygon_annotation(next_id, image_id, int(rng.integers(1, num_categories + 1)), x, y, w, h,
                                     height=height, width=width, crowd=int(rng.random() < 0.05))
            annotations.append(ann)
            next_id += 1
    annotations[7]["id"] = MULTI_INSTANCE_ANNOTATION_IDS[0]
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, num_categories + 1)]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def write(tmp_path, coco, name="instances.json"):
    path = tmp_path / name
    path.write_text(json.dumps(coco))
    return str(path)


@pytest.mark.parametrize("data_seed", [0, 1])
@pytest.mark.parametrize("seed", [42, 123, 33])
def test_same_annotation_ids_as_the_rule_re_implemented(tmp_path, data_seed, seed):
    path = write(tmp_path, random_coco(data_seed))
    expected = reference_rule(path, n_ref=3, seed=seed)
    got = select_refsam_eval_references(path, RefSAMEvalSelection(n_ref=3, seed=seed))
    assert {c: list(ids) for c, ids in got.picks.items()} == expected
    assert sum(map(len, expected.values())) >= 5  # the rule picked something: the comparison has teeth


def test_the_seeds_give_different_sets_and_k_shot_is_a_prefix(tmp_path):
    path = write(tmp_path, random_coco(0))
    picks = {s: select_refsam_eval_references(path, RefSAMEvalSelection(n_ref=3, seed=s)).picks for s in (42, 123, 33)}
    assert picks[42] != picks[123] and picks[42] != picks[33]
    full = select_refsam_eval_references(path, RefSAMEvalSelection(n_ref=3, seed=42))
    assert full.k_shot(1).picks == {c: ids[:1] for c, ids in full.picks.items()}


def one_candidate_per_category(height, width, boxes, extra=()):
    """One image per (category, box): category c's only annotation is boxes[c - 1] in its own image."""
    images, annotations = [], []
    for c, (x, y, w, h) in enumerate(boxes, start=1):
        images.append({"id": c, "file_name": f"{c}.jpg", "height": height, "width": width})
        annotations.append(polygon_annotation(c, c, c, x, y, w, h, height=height, width=width))
    for ann in extra:
        annotations.append(ann)
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, len(boxes) + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def test_each_filter_on_hand_made_annotations():
    """One annotation per category, each just inside or just outside one bound."""
    H, W = 200, 300
    coco = one_candidate_per_category(H, W, [
        (50, 50, 100, 80),     # 1: passes everything
        (10, 10, 100, 80),     # 2: box exactly 10 px from the top-left edges: passes (>= 10)
        (9.99, 50, 100, 80),   # 3: 9.99 px from the left edge: rejected
        (50, 50, 240, 80),     # 4: x + w = 290 = W - 10: passes
        (50, 50, 240.01, 80),  # 5: x + w > W - 10: rejected
        (30, 30, 240, 140),    # 6: area about 0.54 of the image... set below to exactly 50 %: rejected
        (50, 50, 100, 80),     # 7: area set to exactly 1024: rejected (strict)
        (50, 50, 100, 80),     # 8: area 1024.5: passes
        (50, 50, 100, 80),     # 9: crowd: rejected
        (50, 50, 100, 80),     # 10: a second box of IoU > 0.35 in its image: rejected
        (50, 50, 100, 80),     # 11: a second box of IoU < 0.35 in its image: passes
    ], extra=[
        # crowd (never picked, but counted in the IoU check): IoU 0.73 with 10's box, 0.18 with 11's
        polygon_annotation(101, 10, 99, 60, 55, 100, 80, height=H, width=W, crowd=1),
        polygon_annotation(102, 11, 99, 120, 50, 100, 80, height=H, width=W, crowd=1),
    ])
    coco["categories"].append({"id": 99, "name": "other"})
    anns = {a["id"]: a for a in coco["annotations"]}
    anns[6]["area"] = H * W * 0.5
    anns[7]["area"] = 1024.0
    anns[8]["area"] = 1024.5
    anns[9]["iscrowd"] = 1
    got = select_refsam_eval_references(coco, RefSAMEvalSelection(n_ref=1, seed=0))
    picked = {c for c, ids in got.picks.items() if ids}
    assert picked == {1, 2, 4, 8, 11}, got.rejected
    assert got.rejected[10]["box_iou"] == 1 and got.rejected[3]["box_edges"] == 1 and got.rejected[7]["area"] == 1


def test_frame_cover_aspect_and_excluded_ids():
    H, W = 200, 300
    frame = np.ones((H, W), dtype=bool)
    frame[15:-15, 15:-15] = False
    # Rectangles reaching t = 3 and 4 rows into the bottom 15 px frame over 200 columns (the box stays
    # >= 10 px from the edges): 600 and 800 of the frame's 14100 px, 4.3 % (kept) and 5.7 % (dropped).
    coco = one_candidate_per_category(H, W, [(50, 50, 200, 100)] * 2)
    shares = []
    for ann, t in zip(coco["annotations"], (3, 4)):
        x, y, w, h = 50.0, 50.0, 200.0, H - 15 + t - 50.0
        poly = [x, y, x + w, y, x + w, y + h, x, y + h]
        rle = mask_util.merge(mask_util.frPyObjects([poly], H, W))
        ann.update(segmentation=[poly], area=float(mask_util.area(rle)), bbox=[x, y, w, h])
        shares.append(100 * (mask_util.decode(rle).astype(bool) & frame).sum() / frame.sum())
    assert shares[0] < 5 < shares[1], shares
    got = select_refsam_eval_references(coco, RefSAMEvalSelection(n_ref=1, seed=0))
    cover = [got.rejected[c]["frame_cover"] for c in (1, 2)]
    assert [bool(got.picks[1]), bool(got.picks[2])] == [True, False] and cover == [0, 1]

    aspect = one_candidate_per_category(100, 500, [(100, 30, 200, 40)])  # 5:1 image: passes (inclusive)
    wide = one_candidate_per_category(100, 501, [(100, 30, 200, 40)])  # 5.01:1: rejected
    assert select_refsam_eval_references(aspect, RefSAMEvalSelection(n_ref=1)).picks[1]
    assert not select_refsam_eval_references(wide, RefSAMEvalSelection(n_ref=1)).picks[1]

    excluded = one_candidate_per_category(H, W, [(50, 50, 100, 80)])
    excluded["annotations"][0]["id"] = 1549254
    assert not select_refsam_eval_references(excluded, RefSAMEvalSelection(n_ref=1)).picks[1]


def test_distinct_images_across_categories_and_novel_subset_from_the_same_pass(tmp_path):
    path = write(tmp_path, random_coco(1))
    full = select_refsam_eval_references(path, RefSAMEvalSelection(n_ref=3, seed=33))
    images = [full.annotations[a]["image_id"] for ids in full.picks.values() for a in ids]
    assert len(images) == len(set(images))
    subset = select_refsam_eval_references(path, RefSAMEvalSelection(n_ref=3, seed=33), categories=[2, 4])
    assert subset.category_ids == (2, 4) and subset.picks == {c: full.picks[c] for c in (2, 4)}


def test_tool_preset_writes_the_same_ids(tmp_path, capsys):
    path = write(tmp_path, random_coco(0))
    out = tmp_path / "refsam_eval_seed123.json"
    spec = importlib.util.spec_from_file_location("create_reference_json", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # in-process: a subprocess would spend most of the test importing torch
    assert tool.main(["--input", path, "--output", str(out), "--preset", "refsam_eval", "--seed", "123",
                      "--n-ref", "3", "--quiet"]) == 0
    written = json.loads(out.read_text())
    by_category = {}
    for ann in written["annotations"]:
        by_category.setdefault(ann["category_id"], []).append((ann["reference_rank"], ann["id"]))
    expected = reference_rule(path, n_ref=3, seed=123)
    assert {c: [i for _, i in sorted(v)] for c, v in by_category.items()} == {c: v for c, v in expected.items() if v}
    assert written["info"]["samantics_d2_reference_set"]["selection"]["preset"] == "refsam_eval"
    # Filter options belong to ReferenceSelection: with --preset they are refused, not ignored.
    with pytest.raises(SystemExit) as refused:
        tool.main(["--input", path, "--output", str(out), "--preset", "refsam_eval", "--max-box-iou", "0.2"])
    assert refused.value.code == 2 and "--max-box-iou" in capsys.readouterr().err


def test_invalid_parameters_name_the_value():
    with pytest.raises(ValueError, match="n_ref=0"):
        RefSAMEvalSelection(n_ref=0)
    with pytest.raises(ValueError, match="unknown parameters"):
        RefSAMEvalSelection.from_dict({"n_ref": 3, "max_iou": 0.2})
    assert RefSAMEvalSelection.from_dict(RefSAMEvalSelection(seed=33).to_dict()) == RefSAMEvalSelection(seed=33)
