"""tools/segment.py with words (issue 14, item 3c): --classes on real photos (scikit-learn's bundled
sample images), --vocabulary with --references (words and examples fused), and the argument errors.
Tiny random models (configs/open_vocab/everything_shapes_tiny.py): the labels mean nothing, the
outputs' structure and the label spaces are what is checked."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import sklearn.datasets
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/open_vocab/everything_shapes_tiny.py"
# a random tiny SAM rarely passes the IoU filter: keep every proposal of a 4 x 4 grid
KEEP_ALL = ["model.proposer.pred_iou_thresh=-100.0", "model.proposer.points_per_side=4"]


def run(args, tmp_path):
    env = dict(os.environ, SAMANTICS_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    command = [sys.executable, os.path.join(ROOT, "tools", "segment.py"), "--config-file", CONFIG, *args, *KEEP_ALL]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _segment_module():
    spec = importlib.util.spec_from_file_location("segment_tool", os.path.join(ROOT, "tools", "segment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_outputs(out, images, classes):
    index = json.loads((out / "index.json").read_text())
    assert [c["name"] for c in index["categories"]] == classes
    assert sorted(i["file_name"] for i in index["images"]) == sorted(images) and index["skipped"] == []
    assert sorted(os.listdir(out / "overlays")) == sorted(f + ".png" for f in images)
    results = json.loads((out / "coco_results.json").read_text())
    assert results, "no instance"
    for r in results:
        assert 1 <= r["category_id"] <= len(classes) and 0 <= r["score"] <= 1 and len(r["bbox"]) == 4
    return results


def test_classes_on_real_photos(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")  # load_sample_images' files
    for name in ("china.jpg", "flower.jpg"):
        shutil.copy(os.path.join(folder, name), images / name)
    out = tmp_path / "out"
    proc = run(["--classes", "temple/pagoda,flower,traffic light", "--images", str(images), "--output", str(out)],
               tmp_path)
    _check_outputs(out, ["china.jpg", "flower.jpg"], ["temple/pagoda", "flower", "traffic light"])
    assert "Classes by words: temple/pagoda, flower, traffic light" in proc.stdout + proc.stderr
    for name in ("china.jpg", "flower.jpg"):  # the overlay: the photo drawn at a whole multiple of its size
        (width, height), (ow, oh) = Image.open(images / name).size, Image.open(out / "overlays" / (name + ".png")).size
        assert ow % width == 0 and ow // width == oh // height >= 1


def test_vocabulary_file_with_references_fuses_words_and_examples(tmp_path):
    from samantics_d2.data.shapes import generate_shapes

    images = os.path.join(os.path.dirname(generate_shapes(str(tmp_path / "shapes"), num_images=2, image_size=96,
                                                          seed=3)), "images")
    vocabulary = tmp_path / "words.txt"
    vocabulary.write_text("# words first\nred circle\ntree/bush\n")
    out = tmp_path / "out"
    # the label space: the file's classes, then the reference classes not among them ("red circle" is both)
    run(["--vocabulary", str(vocabulary), "--references", "shapes_train_ref5_seed0", "--shots", "1",
         "--images", images, "--output", str(out)], tmp_path)
    from samantics_d2.data.shapes import SHAPES_CLASSES

    classes = ["red circle", "tree/bush", *SHAPES_CLASSES[1:]]
    index = json.loads((out / "index.json").read_text())
    _check_outputs(out, [i["file_name"] for i in index["images"]], classes)
    assert len(index["images"]) == 2
    assert any(f.startswith("memory_bank-") for f in os.listdir(out))  # the references' DINOv2 prototypes


def test_argument_errors(tmp_path, capsys):
    segment = _segment_module()
    common = ["--images", "shapes_val", "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        segment.main(common)
    assert exit_info.value.code == 2 and "--references (annotated examples), --classes / --vocabulary" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        segment.main(["--classes", "cat,,dog", *common])
    assert "empty class or synonym" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        segment.main(["--classes", "cat", "--vocabulary", "coco", *common])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        segment.main(["--vocabulary", str(tmp_path / "missing.txt"), *common])
    assert "neither a vocabulary name" in capsys.readouterr().err
    # words with a config that cannot label by words
    with pytest.raises(ValueError, match=r"open_vocab classifier.*shapes_tiny_random.py has none.*everything_sam2_1_convnext_l\.py"):
        segment.main(["--classes", "cat", "--config-file", "configs/training_free/shapes_tiny_random.py", *common])
    # words and references with a words-only config (no semantic encoder)
    with pytest.raises(ValueError, match=r"semantic_encoder.*everything_fused_sam2_1_convnext_l\.py"):
        segment.main(["--classes", "cat", "--references", "shapes_train_ref5_seed0", "--config-file",
                      "configs/open_vocab/everything_sam2_1_convnext_l.py", *common])
    assert segment.label_space(["cat", "dog/puppy"], ["dog", "cat", "bird"]) == ["cat", "dog/puppy", "dog", "bird"]
