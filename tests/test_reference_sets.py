"""Reference-set selection: every filter, reproducibility, k-shot prefix and nesting, distinct images,
shortfalls, category subsets, bad inputs, the command-line tool, and lazy dataset registration."""
import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_util

from samantics_d2.d2 import DatasetCatalog, MetadataCatalog, register_coco_instances
from samantics_d2.data.reference_sets import (
    COCO_BASE_CLASSES,
    COCO_CLASSES,
    COCO_NOVEL_CLASSES,
    ReferenceSelection,
    _BorderOverlap,
    _max_box_iou,
    register_all_reference_sets,
    register_reference_set,
    resolve_categories,
    select_references,
    sidecar_path,
    take_k_shot,
    write_reference_json,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "create_reference_json.py")
# Every filter off (or as loose as it gets): a test switches on only the one it is about.
LOOSE = ReferenceSelection(
    n_ref=2,
    min_area=None,
    max_area=None,
    min_area_fraction=None,
    max_area_fraction=None,
    min_aspect_ratio=None,
    max_aspect_ratio=None,
    min_border_distance=0.0,
    max_border_overlap=1.0,
    max_box_iou=1.0,
)


def square(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def ann(ann_id, image_id, category_id, bbox, *, iscrowd=0, segmentation=None, area=None):
    x, y, w, h = bbox
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x, y, w, h],
        "area": float(w * h) if area is None else area,
        "iscrowd": iscrowd,
        "segmentation": square(x, y, w, h) if segmentation is None else segmentation,
    }


def coco(images, annotations, names=("a", "b", "c")):
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in images.items()],
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
    }


def random_coco(seed, *, num_images=40, per_image=3, num_categories=3, size=100):
    """Images of ``size`` px with ``per_image`` well-separated squares, categories drawn at random."""
    rng = np.random.default_rng(seed)
    images = {i: (size, size) for i in range(1, num_images + 1)}
    annotations, k = [], 1
    for i in images:
        for j in range(per_image):
            side = int(rng.integers(8, 25))
            x, y = 5 + 30 * j, int(rng.integers(5, size - side - 5))
            annotations.append(ann(k, i, int(rng.integers(1, num_categories + 1)), [x, y, side, side]))
            k += 1
    return coco(images, annotations, names=tuple("abcdefgh"[:num_categories]))


# ------------------------------------------------------------------------------------------ filters
# (what breaks the bad candidate, the filter that must reject it). The good candidate (id 1, image 1)
# is a 20x20 square at (40, 40) of a 100x100 image, alone in its image.
FILTER_CASES = {
    "crowd": (dict(iscrowd=1), {}),
    "min_area": (dict(bbox=[40, 40, 10, 10]), dict(min_area=300.0)),
    "max_area": (dict(bbox=[20, 20, 40, 40]), dict(max_area=500.0)),
    "min_area_fraction": (dict(bbox=[40, 40, 10, 10]), dict(min_area_fraction=0.03)),
    "max_area_fraction": (dict(bbox=[10, 10, 60, 60]), dict(max_area_fraction=0.1)),
    "min_aspect_ratio": (dict(bbox=[40, 20, 10, 60]), dict(min_aspect_ratio=0.5)),
    "max_aspect_ratio": (dict(bbox=[20, 40, 60, 10]), dict(max_aspect_ratio=2.0)),
    "min_border_distance": (dict(bbox=[2, 40, 20, 20]), dict(min_border_distance=5.0)),
    "max_border_overlap": (dict(bbox=[0, 40, 20, 20]), dict(border_frame=4, max_border_overlap=0.1)),
    "max_box_iou": (dict(other=[42, 42, 20, 20]), dict(max_box_iou=0.5)),
}


def filter_case(bad):
    images = {1: (100, 100), 2: (100, 100)}
    bbox = bad.pop("bbox", [40, 40, 20, 20])
    other = bad.pop("other", None)
    annotations = [ann(1, 1, 1, [40, 40, 20, 20]), ann(2, 2, 1, bbox, **bad)]
    if other is not None:  # an instance of another category overlapping the bad one
        annotations.append(ann(3, 2, 2, other))
    return coco(images, annotations)


@pytest.mark.parametrize("name", sorted(FILTER_CASES))
def test_each_filter_rejects_exactly_the_violating_candidate(name):
    bad, strict = FILTER_CASES[name]
    data = filter_case(dict(bad))
    kept = select_references(data, dataclasses.replace(LOOSE, **strict), categories=["a"])
    assert kept.picks[1] == (1,)
    assert kept.shortfall == {1: 1}
    reason = {"min_area": "area", "max_area": "area", "min_area_fraction": "area_fraction",
              "max_area_fraction": "area_fraction", "min_aspect_ratio": "aspect_ratio",
              "max_aspect_ratio": "aspect_ratio", "min_border_distance": "border_distance",
              "max_border_overlap": "border_overlap", "max_box_iou": "box_iou", "crowd": "crowd"}[name]
    assert kept.rejected[1][reason] == 1
    assert sum(kept.rejected[1].values()) == 1
    if name != "crowd":  # the same data with the filter off: both candidates are picked
        both = select_references(data, LOOSE, categories=["a"])
        assert sorted(both.picks[1]) == [1, 2] and both.shortfall == {}


def test_bounds_are_inclusive():
    data = filter_case({"bbox": [40, 40, 10, 10]})
    sel = dataclasses.replace(LOOSE, min_area=100.0, max_area=400.0, min_aspect_ratio=1.0, max_aspect_ratio=1.0)
    assert sorted(select_references(data, sel, categories=["a"]).picks[1]) == [1, 2]


def test_border_overlap_matches_a_dense_computation():
    rng = np.random.default_rng(0)
    height, width, frame = 37, 53, 3
    overlap = _BorderOverlap(frame)
    dense_frame = np.ones((height, width), dtype=bool)
    dense_frame[frame:-frame, frame:-frame] = False
    for _ in range(20):
        points = rng.uniform([-5, -5], [width + 5, height + 5], size=(6, 2)).round(1)
        polygon = points.ravel().tolist()
        mask = mask_util.decode(mask_util.frPyObjects([polygon], height, width)[0]).astype(bool)
        if not mask.any():
            continue
        expected = (mask & dense_frame).sum() / mask.sum()
        got = overlap({"id": 0, "segmentation": [polygon], "bbox": [0, 0, 1, 1]}, height, width)
        assert got == pytest.approx(expected)


def test_masks_are_not_decoded_for_candidates_rejected_by_cheaper_filters():
    data = filter_case({"bbox": [40, 40, 5, 5]})  # too small
    # A broken RLE that pycocotools would refuse: only reached if the mask were decoded.
    data["annotations"][1]["segmentation"] = {"size": [1, 1], "counts": "broken"}
    sel = dataclasses.replace(LOOSE, min_area=100.0, max_border_overlap=0.5)
    assert select_references(data, sel, categories=["a"]).picks[1] == (1,)
    with pytest.raises(ValueError, match=r"Annotation 2 has an RLE of size \[1, 1\]"):
        select_references(data, dataclasses.replace(sel, min_area=None), categories=["a"])


def test_box_iou_matches_a_pairwise_loop():
    rng = np.random.default_rng(1)
    xywh = np.c_[rng.uniform(0, 50, (60, 2)), rng.uniform(1, 30, (60, 2))]
    image = rng.integers(0, 9, 60)
    wanted = rng.random(60) < 0.7
    got = _max_box_iou(xywh, image, wanted, chunk=7)  # tiny chunks: the batching is exercised too

    def iou(a, b):
        ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / (a[2] * a[3] + b[2] * b[3] - inter)

    for i in range(60):
        if not wanted[image == image[i]].any():
            assert got[i] == 0
            continue
        others = [iou(xywh[i], xywh[j]) for j in range(60) if j != i and image[j] == image[i]]
        assert got[i] == pytest.approx(max(others, default=0.0))


# ------------------------------------------------------------------------------------ reproducibility
def test_same_seed_gives_identical_bytes_and_another_seed_other_picks(tmp_path):
    data = random_coco(0)
    sel = dataclasses.replace(LOOSE, n_ref=4)
    paths = [write_reference_json(select_references(data, sel), tmp_path / f"r{i}.json") for i in range(2)]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert sidecar_path(paths[0]).read_bytes() == sidecar_path(paths[1]).read_bytes()
    shuffled = dict(data, annotations=list(reversed(data["annotations"])))  # file order does not matter
    assert select_references(shuffled, sel).picks == select_references(data, sel).picks
    picks = [select_references(data, dataclasses.replace(sel, seed=s)).picks for s in range(3)]
    assert picks[0] != picks[1] and picks[1] != picks[2]


def test_json_is_coco_with_selection_in_info_and_sidecar(tmp_path):
    data = random_coco(1)
    sel = dataclasses.replace(LOOSE, n_ref=3, seed=5)
    reference_set = select_references(data, sel, categories=["a", "c"])
    path = write_reference_json(reference_set, tmp_path / "sub" / "ref.json")
    written = json.loads(path.read_text())
    info = written["info"]["samantics_d2_reference_set"]
    assert ReferenceSelection.from_dict(info["selection"]) == sel
    assert info == json.loads(sidecar_path(path).read_text())
    assert [c["name"] for c in written["categories"]] == ["a", "c"]
    source = {a["id"]: a for a in data["annotations"]}
    for a in written["annotations"]:
        assert {k: v for k, v in a.items() if k != "reference_rank"} == source[a["id"]]
    assert {im["id"] for im in written["images"]} == {a["image_id"] for a in written["annotations"]}
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]  # atomic writes leave nothing
    from pycocotools.coco import COCO

    api = COCO()
    api.dataset = written
    api.createIndex()
    assert len(api.getAnnIds()) == 6


# -------------------------------------------------------------------------------- k-shot and nesting
@pytest.mark.parametrize("order", ["random", "largest"])
def test_k_shot_is_the_prefix_of_largest_picks_and_sets_are_nested(order, tmp_path):
    data = random_coco(2, num_images=30, per_image=3)
    five = select_references(data, dataclasses.replace(LOOSE, n_ref=5, order=order, seed=3))
    area = {a["id"]: a["area"] for a in data["annotations"]}
    for c, ids in five.picks.items():
        assert len(ids) == 5
        assert [area[i] for i in ids] == sorted((area[i] for i in ids), reverse=True)
    two = five.k_shot(2)
    assert two.picks == {c: ids[:2] for c, ids in five.picks.items()} and two.shots == 2
    # In the json: grouped by category, reference_rank 0..n-1; take_k_shot keeps rank < k.
    written = json.loads(write_reference_json(five, tmp_path / "five.json").read_text())
    by_cat = {c: [a["id"] for a in written["annotations"] if a["category_id"] == c] for c in five.picks}
    assert by_cat == {c: list(ids) for c, ids in five.picks.items()}
    dicts = [{"image_id": a["image_id"], "annotations": [a]} for a in written["annotations"]]
    kept = take_k_shot(dicts, 2)
    assert sorted(d["annotations"][0]["id"] for d in kept) == sorted(i for ids in two.picks.values() for i in ids)
    # Nesting: n_ref=k picks a subset of n_ref=n picks, same seed.
    for k in (1, 2, 4):
        small = select_references(data, dataclasses.replace(LOOSE, n_ref=k, order=order, seed=3))
        for c in five.picks:
            assert set(small.picks[c]) <= set(five.picks[c]) and len(small.picks[c]) == k


def test_picks_come_from_distinct_images_across_categories():
    data = random_coco(3, num_images=12, per_image=3)  # 36 instances but only 12 images
    reference_set = select_references(data, dataclasses.replace(LOOSE, n_ref=6))
    images = [reference_set.annotations[i]["image_id"] for ids in reference_set.picks.values() for i in ids]
    assert len(images) == len(set(images)) > 6
    assert sum(reference_set.shortfall.values()) == 3 * 6 - len(images)
    assert sum(r["image_used"] for r in reference_set.rejected.values()) > 0


def test_shortfall_is_logged_and_listed(tmp_path, caplog):
    # "a" in images 1-12, "b" in images 13-15 only, "empty" nowhere.
    annotations = [ann(i, i, 1 if i <= 12 else 2, [30, 30, 20, 20]) for i in range(1, 16)]
    data = coco({i: (100, 100) for i in range(1, 16)}, annotations, names=("a", "b", "empty"))
    n_b = 3
    with caplog.at_level(logging.WARNING, logger="samantics_d2.data.reference_sets"):
        reference_set = select_references(data, dataclasses.replace(LOOSE, n_ref=8))
    assert reference_set.shortfall == {2: 8 - n_b, 3: 8}
    assert "'b' (id 2) got %d of 8" % n_b in caplog.text and "'empty' (id 3) got 0 of 8" in caplog.text
    info = json.loads(sidecar_path(write_reference_json(reference_set, tmp_path / "r.json")).read_text())
    assert [(s["name"], s["picked"], s["missing"]) for s in info["shortfall"]] == [("b", n_b, 8 - n_b), ("empty", 0, 8)]


# --------------------------------------------------------------------------------- category subsets
def test_coco_fsod_splits():
    assert len(COCO_CLASSES) == len(set(COCO_CLASSES)) == 80
    assert len(COCO_NOVEL_CLASSES) == 20 and set(COCO_NOVEL_CLASSES) <= set(COCO_CLASSES)
    assert set(COCO_BASE_CLASSES) == set(COCO_CLASSES) - set(COCO_NOVEL_CLASSES) and len(COCO_BASE_CLASSES) == 60
    categories = [{"id": 2 * i + 1, "name": n} for i, n in enumerate(COCO_CLASSES)]
    novel = resolve_categories("novel", categories)
    assert [categories[(i - 1) // 2]["name"] for i in novel] == sorted(COCO_NOVEL_CLASSES, key=COCO_CLASSES.index)
    assert sorted(novel + resolve_categories("base", categories)) == resolve_categories("all", categories)
    assert resolve_categories(["dog", 1], categories) == [1, 2 * COCO_CLASSES.index("dog") + 1]


def test_unknown_categories_are_errors_with_close_names():
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(COCO_CLASSES)]
    with pytest.raises(ValueError, match="Unknown category name 'dinning table'.*'dining table'"):
        resolve_categories(["person", "dinning table"], categories)
    with pytest.raises(ValueError, match="Unknown category id 99"):
        resolve_categories([99], categories)
    with pytest.raises(ValueError, match="'novel' is the COCO-FSOD split.*lacks"):
        resolve_categories("novel", [{"id": 1, "name": "a"}])
    with pytest.raises(ValueError, match="is empty"):
        resolve_categories([], categories)


def test_selecting_a_subset_only_picks_its_categories():
    data = random_coco(5)
    reference_set = select_references(data, LOOSE, categories=["b"])
    assert reference_set.category_ids == (2,) and list(reference_set.picks) == [2]
    assert {a["category_id"] for a in reference_set.annotations.values()} == {2}


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        select_references(tmp_path / "nope.json")
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        select_references(tmp_path / "text.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON list; expected a COCO"):
        select_references(tmp_path / "list.json")
    with pytest.raises(ValueError, match="key 'annotations' is missing"):
        select_references({"images": [], "categories": []})
    data = random_coco(6, num_images=3)
    data["annotations"][0]["image_id"] = 777
    with pytest.raises(ValueError, match="refers to image_id 777"):
        select_references(data)
    data = random_coco(6, num_images=3)
    data["annotations"][1]["bbox"] = [1, 2, 3]
    with pytest.raises(ValueError, match="bbox"):
        select_references(data)
    for bad in (dict(n_ref=0), dict(order="biggest"), dict(min_area=10.0, max_area=5.0), dict(max_box_iou=1.5),
                dict(seed=-1), dict(max_area_fraction=2.0)):
        with pytest.raises(ValueError, match="ReferenceSelection got"):
            ReferenceSelection(**bad)
    with pytest.raises(ValueError, match="unknown parameters"):
        ReferenceSelection.from_dict({"n_reff": 3})


# ------------------------------------------------------------------------------------------- the tool
def load_tool():
    spec = importlib.util.spec_from_file_location("create_reference_json", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shapes_json(tmp_path_factory):
    from samantics_d2.data.shapes import generate_shapes

    return generate_shapes(str(tmp_path_factory.mktemp("shapes")), num_images=16, image_size=64, seed=0)


def test_tool_on_shapes_as_a_subprocess(shapes_json, tmp_path):
    output = tmp_path / "ref.json"
    sheets = tmp_path / "sheets"
    env = dict(os.environ, PYTHONPATH=ROOT, SAMANTICS_D2_BACKEND="lite", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, TOOL, "--input", shapes_json, "--output", str(output), "--n-ref", "2", "--seed", "1",
         "--min-area", "none", "--min-area-fraction", "0.002", "--contact-sheets", str(sheets),
         "--image-root", os.path.join(os.path.dirname(shapes_json), "images")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(output.read_text())
    selection = ReferenceSelection(n_ref=2, seed=1, min_area=None, min_area_fraction=0.002)
    expected = select_references(shapes_json, selection)
    assert written == json.loads(json.dumps(expected.to_coco_dict()))
    assert written["info"]["samantics_d2_reference_set"]["selection"] == selection.to_dict()
    assert f"Wrote {len(written['annotations'])} references" in proc.stdout
    pngs = sorted(os.listdir(sheets))
    assert len(pngs) == sum(1 for ids in expected.picks.values() if ids) > 0
    from PIL import Image

    for png in pngs:  # one 160-px cell per reference, plus a caption line
        with Image.open(sheets / png) as sheet:
            picked = len(expected.picks[int(png.split("_")[0])])
            assert sheet.size == (picked * 160, 160 + 14) and sheet.mode == "RGB"


def test_tool_errors(shapes_json, tmp_path, capsys):
    tool = load_tool()
    out = str(tmp_path / "r.json")
    assert tool.main(["--input", str(tmp_path / "missing.json"), "--output", out]) == 2
    assert "missing.json' does not exist" in capsys.readouterr().err
    (tmp_path / "x.json").write_text('{"images": []}')
    assert tool.main(["--input", str(tmp_path / "x.json"), "--output", out]) == 2
    assert "is not a COCO instances file" in capsys.readouterr().err
    assert tool.main(["--input", shapes_json, "--output", out, "--categories", "red circle,blue triangel"]) == 2
    assert "'blue triangel'" in (err := capsys.readouterr().err) and "'blue triangle'" in err
    assert not os.path.exists(out)
    with pytest.raises(SystemExit):
        tool.main(["--input", shapes_json, "--output", out, "--contact-sheets", str(tmp_path)])
    assert "--image-root" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ registration
def test_registration_is_lazy_and_loads_with_ranks(tmp_path):
    data = random_coco(7, num_images=10)
    source_json = tmp_path / "source.json"
    source_json.write_text(json.dumps(data))
    register_coco_instances("refset_test_source", {}, str(source_json), str(tmp_path))
    loads = []
    original = DatasetCatalog["refset_test_source"]
    DatasetCatalog["refset_test_source"] = lambda: loads.append(1) or original()
    out_dir = tmp_path / "refs"
    sel = dataclasses.replace(LOOSE, n_ref=2, seed=4)
    register_reference_set("refset_test_ref2", source="refset_test_source", selection=sel, output_dir=out_dir)
    assert not out_dir.exists() and not loads
    assert MetadataCatalog.get("refset_test_ref2").evaluator_type == "coco"

    dicts = DatasetCatalog.get("refset_test_ref2")
    (path,) = [p for p in out_dir.glob("refset_test_ref2-*.json") if not p.name.endswith(".selection.json")]
    assert not loads  # the source's json was read directly, the source dataset never loaded
    meta = MetadataCatalog.get("refset_test_ref2")
    assert meta.json_file == str(path) and meta.thing_classes == ["a", "b", "c"]
    expected = select_references(str(source_json), sel)
    got = {a["id"] for d in dicts for a in d["annotations"]}
    assert got == {i for ids in expected.picks.values() for i in ids}
    assert all(len(d["annotations"]) == 1 for d in dicts)
    one = take_k_shot(dicts, 1)
    assert {d["annotations"][0]["id"] for d in one} == {ids[0] for ids in expected.picks.values()}
    mtime = path.stat().st_mtime_ns
    DatasetCatalog.get("refset_test_ref2")
    assert path.stat().st_mtime_ns == mtime  # made once, reused


def test_standard_names_register_lazily_and_shapes_sets_load(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path))
    register_all_reference_sets()
    assert register_all_reference_sets() == []  # idempotent
    for name in ("coco_2017_train_ref10_seed0", "coco_2017_train_novel_ref30_seed9", "shapes_train_ref5_seed2"):
        assert name in DatasetCatalog.list()
    assert not any(tmp_path.iterdir())  # registering computed and wrote nothing
    dicts = DatasetCatalog.get("shapes_train_novel_ref1_seed0")
    assert len(dicts) == 3 and len({d["image_id"] for d in dicts}) == 3
    assert list(tmp_path.glob("reference_sets/shapes_train_novel_ref1_seed0-*.json"))
