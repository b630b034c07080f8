"""tools/segment.py as a user runs it: own references (COCO json or class folders) -> results + overlays."""
import json
import os
import subprocess
import sys

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


def run(args, tmp_path, check=True):
    env = dict(os.environ, SAMANTICS_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "tools/segment.py", "--config-file", CONFIG, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _image_dir(json_file):
    return os.path.join(os.path.dirname(json_file), "images")  # generate_shapes' layout


def test_coco_references_then_resume(shapes, tmp_path):
    root, json_file = shapes
    out = tmp_path / "out"
    # Points prompts from a random tiny SAM rarely pass the IoU filter: keep every proposal so that
    # the overlays and results have content.
    args = ["--references", json_file, "--image-root", _image_dir(json_file), "--images", _image_dir(json_file),
            "--output", str(out), "model.proposer.pred_iou_thresh=-100.0", "model.proposer.points_per_side=4"]
    first = run(args, tmp_path)
    images = sorted(os.listdir(_image_dir(json_file)))
    assert sorted(os.listdir(out / "overlays")) == sorted(os.path.splitext(f)[0] + ".png" for f in images)
    results = json.loads((out / "coco_results.json").read_text())
    index = json.loads((out / "index.json").read_text())
    assert len(index["images"]) == len(images) and len(index["categories"]) == 8
    assert results, "no instance predicted"
    for r in results:
        assert 1 <= r["category_id"] <= 8 and 0 <= r["score"] <= 1 and len(r["bbox"]) == 4
        assert mask_util.area(dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())) > 0
    assert "Segmented" in first.stdout + first.stderr
    # A second run finds every image done and rewrites the same results.
    second = run(args, tmp_path)
    assert f"0 image(s) ({len(images)} resumed" in second.stdout + second.stderr
    assert json.loads((out / "coco_results.json").read_text()) == results


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
