"""tools/click.py: the strip and the JSON of one click (tiny random SAM by tag: no weights, no references)."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("click_tool", os.path.join(ROOT, "tools", "click.py"))
click_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(click_tool)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("click") / "blob.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_click_writes_strip_and_json(image_file, tmp_path):
    status = click_tool.main(["--image", image_file, "--point", "40,30", "--point", "5,5,0", "--tag", "sam_vit_b",
                              "--size", "tiny", "--max-masks", "4", "--output", str(tmp_path)])
    assert status == 0
    record = json.loads((tmp_path / "blob_click.json").read_text())
    assert record["random_weights"] is True and "meaningless" in record["note"]
    assert record["prompts"] == {"points": [[40.0, 30.0], [5.0, 5.0]], "point_labels": [1, 0], "box": None}
    masks = record["masks"]
    assert 1 <= len(masks) <= 4
    areas = [m["area"] for m in masks]
    assert areas == sorted(areas) and all(a > 0 for a in areas)
    for k, m in enumerate(masks):
        decoded = mask_util.decode({"size": m["segmentation"]["size"], "counts": m["segmentation"]["counts"].encode()})
        assert decoded.shape == (60, 80) and int(decoded.sum()) == m["area"]
        assert all(j > k for j in m["part_of"]) and (m["parent"] == (m["part_of"][0] if m["part_of"] else -1))
        assert m["labels"] == {}  # a tag: no prototypes
    strip = np.asarray(Image.open(tmp_path / "blob_click.png"))
    # one panel per mask: the image enlarged x5 (60 px -> at least 256), 4 px gaps between them
    assert strip.shape[1] == len(masks) * (80 * 5) + 4 * (len(masks) - 1)


def test_click_rejects_bad_prompts(image_file, tmp_path):
    with pytest.raises(SystemExit):
        click_tool.main(["--image", image_file, "--point", "400,30", "--tag", "sam_vit_b", "--size", "tiny",
                         "--output", str(tmp_path)])
    with pytest.raises(SystemExit):
        click_tool.main(["--image", image_file, "--point", "4;3", "--output", str(tmp_path)])
    with pytest.raises(SystemExit):
        click_tool.main(["--image", image_file, "--output", str(tmp_path)])
    assert click_tool.parse_point("3,4,0") == (3.0, 4.0, 0)
    assert click_tool.parse_box("1,2,3,4") == (1.0, 2.0, 3.0, 4.0)
