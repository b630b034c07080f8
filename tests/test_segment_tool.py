"""tools/segment.py as a user runs it: own references (COCO json or class folders) -> results + overlays."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from samantics_d2.data.shapes import generate_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/training_free/shapes_tiny_random.py"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    json_file = generate_shapes(str(root), num_images=6, image_size=96, seed=3)
    return root, json_file


def run(args, tmp_path, check=True, cwd=ROOT, config=CONFIG, env=None, wait=True):
    """tools/segment.py in a subprocess (``config=None``: its default config; ``wait=False``: the Popen)."""
    env = dict(os.environ, SAMANTICS_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", **(env or {}))
    command = [sys.executable, os.path.join(ROOT, "tools", "segment.py"),
               *(["--config-file", config] if config else []), *args]
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _image_dir(json_file):
    return os.path.join(os.path.dirname(json_file), "images")  # generate_shapes' layout


def _results_by_file(out):
    """{file name: its results} through index.json, checking that every id points at one file."""
    index = json.loads((out / "index.json").read_text())
    ids = {i["id"]: i["file_name"] for i in index["images"]}
    assert len(ids) == len(index["images"]), "two images share an id"
    by_file = {f: [] for f in ids.values()}
    for r in json.loads((out / "coco_results.json").read_text()):
        by_file[ids[r["image_id"]]].append(r)
    return by_file


def _no_temporary_files(out):
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files if f.endswith(".tmp")]
    assert not leftovers, leftovers


def test_coco_references_resume_and_changed_fingerprints(shapes, tmp_path):
    root, json_file = shapes
    images_dir = tmp_path / "images"
    shutil.copytree(_image_dir(json_file), images_dir)
    out = tmp_path / "out"
    # Points prompts from a random tiny SAM rarely pass the IoU filter: keep every proposal so that
    # the overlays and results have content.
    common = ["--images", str(images_dir), "--output", str(out), "model.proposer.pred_iou_thresh=-100.0",
              "model.proposer.points_per_side=4"]
    args = ["--references", json_file, "--image-root", _image_dir(json_file), *common]
    first = run(args, tmp_path)
    images = sorted(os.listdir(images_dir))
    assert sorted(os.listdir(out / "overlays")) == sorted(f + ".png" for f in images)
    results = json.loads((out / "coco_results.json").read_text())
    index = json.loads((out / "index.json").read_text())
    assert sorted(i["file_name"] for i in index["images"]) == images and index["skipped"] == []
    assert len(index["categories"]) == 8
    assert results, "no instance predicted"
    for r in results:
        assert 1 <= r["category_id"] <= 8 and 0 <= r["score"] <= 1 and len(r["bbox"]) == 4
        assert mask_util.area(dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())) > 0
    assert f"{len(images)} image(s) (0 resumed" in first.stdout + first.stderr
    before = _results_by_file(out)

    # One image changes (content, size and mtime): only it is segmented again; the others are resumed
    # with the same ids and results.
    changed = images[0]
    Image.open(images_dir / images[1]).save(images_dir / changed)
    second = run(args, tmp_path)
    assert f"1 image(s) ({len(images) - 1} resumed" in second.stdout + second.stderr
    after = _results_by_file(out)
    assert json.loads((out / "index.json").read_text())["images"] == index["images"]
    for f in images[1:]:
        assert after[f] == before[f]
    assert after[changed] != before[changed]

    # Other references (two classes fewer): every image is segmented again, with the new class ids.
    data = json.load(open(json_file))
    keep = {c["id"] for c in data["categories"][:6]}
    data["categories"] = [c for c in data["categories"] if c["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep]
    refs = tmp_path / "refs6.json"
    refs.write_text(json.dumps(data))
    third = run(["--references", str(refs), "--image-root", _image_dir(json_file), *common], tmp_path)
    assert f"{len(images)} image(s) (0 resumed" in third.stdout + third.stderr
    assert len(json.loads((out / "index.json").read_text())["categories"]) == 6
    assert all(1 <= r["category_id"] <= 6 for r in json.loads((out / "coco_results.json").read_text()))
    _no_temporary_files(out)


def test_unreadable_images_are_skipped_and_same_stems_kept_apart_from_another_folder(shapes, tmp_path):
    _, json_file = shapes
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    source = sorted(os.listdir(_image_dir(json_file)))
    for name in source[:2]:
        shutil.copy(os.path.join(_image_dir(json_file), name), images_dir / name)
    Image.open(os.path.join(_image_dir(json_file), source[2])).convert("RGB").save(images_dir / "x.jpg")
    shutil.copy(os.path.join(_image_dir(json_file), source[3]), images_dir / "x.png")
    (images_dir / "empty.png").write_bytes(b"")
    jpg = (images_dir / "x.jpg").read_bytes()
    (images_dir / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (images_dir / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    # From another folder, with the config path relative to the project (as in the README).
    proc = run(["--references", json_file, "--image-root", _image_dir(json_file), "--images", str(images_dir),
                "--output", str(out), "model.proposer.points_per_side=4", "model.proposer.pred_iou_thresh=-100.0"],
               tmp_path, check=False, cwd=elsewhere)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert "3 of 7 image(s) could not be read and were skipped" in log
    index = json.loads((out / "index.json").read_text())
    skipped = {s["file_name"]: s["reason"] for s in index["skipped"]}
    assert sorted(skipped) == ["empty.png", "notes.png", "truncated.jpg"]
    for name, reason in skipped.items():
        assert name in reason and name in log
    done = {i["file_name"]: i["id"] for i in index["images"]}
    assert sorted(done) == sorted([*source[:2], "x.jpg", "x.png"])
    assert len(set(done.values())) == 4  # x.jpg and x.png: distinct ids ...
    assert {"x.jpg.png", "x.png.png"} <= set(os.listdir(out / "overlays"))  # ... and distinct outputs
    records = {f: json.loads((out / "predictions" / (f + ".json")).read_text()) for f in done}
    assert records["x.jpg"]["results"] != records["x.png"]["results"]  # two different images were segmented
    for f, record in records.items():
        assert record["file_name"] == f and all(r["image_id"] == done[f] for r in record["results"])
    assert not any(name.startswith(("empty", "notes", "truncated")) for name in os.listdir(out / "overlays"))
    _no_temporary_files(out)


def test_default_config_from_another_folder_lists_every_missing_weight(shapes, tmp_path):
    _, json_file = shapes
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    proc = run(["--references", json_file, "--images", _image_dir(json_file), "--output", str(tmp_path / "o")],
               tmp_path, check=False, cwd=elsewhere, config=None, env={"SAMANTICS_WEIGHTS": str(tmp_path / "w")})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    # The default config was found (its weights are listed): both of its files at once, where to put
    # them, and how to try the tool without weights.
    assert "needs 2 weight file(s)" in log
    assert "sam2.1_hiera_large.pt" in log and "dinov2_vitl14_pretrain.pth" in log
    assert str(tmp_path / "w") in log and "shapes_tiny.py" in log and "make demo" in log


def test_kill_and_resume_with_an_added_image(shapes, tmp_path):
    _, json_file = shapes
    images_dir = tmp_path / "images"
    shutil.copytree(_image_dir(json_file), images_dir)
    for name in sorted(os.listdir(images_dir)):  # more, larger images so that the run can be killed midway
        Image.open(images_dir / name).resize((256, 256)).save(images_dir / ("big_" + name))
    out = tmp_path / "out"
    args = ["--references", json_file, "--image-root", _image_dir(json_file), "--images", str(images_dir),
            "--output", str(out), "model.proposer.points_per_side=8", "model.proposer.pred_iou_thresh=-100.0"]
    proc = run(args, tmp_path, wait=False)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (out / "predictions").is_dir() and os.listdir(out / "predictions"):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    finished = {}
    for name in os.listdir(out / "predictions"):
        if name.endswith(".json"):
            record = json.loads((out / "predictions" / name).read_text())
            finished[record["file_name"]] = record["image_id"]
    assert proc.returncode == -signal.SIGKILL and finished  # killed after the first image, before the last
    assert len(finished) < len(os.listdir(images_dir))
    # A new image that sorts first: with ids taken from the order, every id would shift.
    shutil.copy(images_dir / sorted(os.listdir(images_dir))[-1], images_dir / "0_added.png")
    resumed = run(args, tmp_path)
    index = json.loads((out / "index.json").read_text())
    ids = {i["file_name"]: i["id"] for i in index["images"]}
    assert sorted(ids) == sorted(os.listdir(images_dir)) and len(set(ids.values())) == len(ids)
    assert {f: ids[f] for f in finished} == finished
    total = len(ids)
    assert f"{total - len(finished)} image(s) ({len(finished)} resumed" in resumed.stdout + resumed.stderr
    by_file = _results_by_file(out)
    for f in ids:
        record = json.loads((out / "predictions" / (f + ".json")).read_text())
        assert by_file[f] == record["results"] and record["image_id"] == ids[f]
    _no_temporary_files(out)


def test_folder_references(shapes, tmp_path):
    root, json_file = shapes
    data = json.load(open(json_file))
    refs = tmp_path / "refs"
    names = {c["id"]: c["name"] for c in data["categories"]}
    for ann in data["annotations"][:6]:
        image = next(i for i in data["images"] if i["id"] == ann["image_id"])
        folder = refs / names[ann["category_id"]].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"ref{ann['id']}"
        Image.open(os.path.join(_image_dir(json_file), image["file_name"])).save(folder / f"{stem}.png")
        rle = mask_util.frPyObjects(ann["segmentation"], image["height"], image["width"])
        mask = mask_util.decode(mask_util.merge(rle))
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / f"{stem}_mask.png")
    out = tmp_path / "out"
    run(["--references", str(refs), "--images", _image_dir(json_file), "--output", str(out),
         "model.proposer.points_per_side=4"], tmp_path)
    index = json.loads((out / "index.json").read_text())
    assert [c["name"] for c in index["categories"]] == sorted(os.listdir(refs))
    assert (out / "references.json").exists() and (out / "coco_results.json").exists()


def test_registered_reference_set_and_image_folder(tmp_path):
    # The README's "try it without weights" command, with a random tiny SAM instead of the demo's trained one.
    out = tmp_path / "out"
    run(["--references", "shapes_train_ref5_seed0", "--images", "shapes_val", "--output", str(out),
         "model.proposer.points_per_side=4"], tmp_path)
    index = json.loads((out / "index.json").read_text())
    assert [c["name"] for c in index["categories"]][:2] == ["red circle", "green square"]
    assert len(index["categories"]) == 8 and len(index["images"]) == 16 and index["skipped"] == []
    assert len(os.listdir(out / "overlays")) == 16


def test_bad_reference_folder_names_the_file(shapes, tmp_path):
    _, json_file = shapes
    refs = tmp_path / "refs" / "cat"
    refs.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(refs / "a.png")
    proc = run(["--references", str(tmp_path / "refs"), "--images", _image_dir(json_file), "--output",
                str(tmp_path / "o")], tmp_path, check=False)
    assert proc.returncode != 0 and "a_mask.png" in proc.stdout + proc.stderr


def test_overlays_enlarge_small_images_and_keep_the_masks_in_place():
    from samantics_d2.utils.visualization import class_colour, draw_instances

    image = np.full((40, 50, 3), 100, dtype=np.uint8)
    masks = np.zeros((1, 40, 50), dtype=bool)
    masks[0, 30:38, 5:15] = True
    kwargs = dict(masks=masks, boxes=np.array([[5.0, 30.0, 15.0, 38.0]]), classes=[2], scores=[0.9], class_names=["a", "b", "c"])
    same = draw_instances(image, min_side=0, **kwargs)
    big = draw_instances(image, **kwargs)  # shorter side 40 < 512: enlarged 13x
    assert same.shape == (40, 50, 3) and big.shape == (520, 650, 3)
    expected = (0.55 * 100 + 0.45 * np.array(class_colour(2), dtype=np.float32)).astype(np.uint8)
    np.testing.assert_array_equal(big[34 * 13 + 6, 10 * 13 + 6], expected)  # inside the mask, away from the box lines
    np.testing.assert_array_equal(big[10 * 13, 40 * 13], [100, 100, 100])  # far from the instance: untouched
