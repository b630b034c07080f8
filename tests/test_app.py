"""The web app (issue 17): its Python API, its endpoints through Gradio's Python client against a
server on a free loopback port, and the page driven in headless Chromium.

One server for the module: tools/app.py's default model (the tiny shapes config; random SAM weights
unless $SAMANTICS_APP_CHECKPOINT names a trained tiny SAM) with the shapes references imported.
Screenshots of the three tabs go to $SAMANTICS_SCREENSHOTS (docs/figures for the README) or a
temporary folder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from samantics_d2.app import ClassBank
from samantics_d2.app.browser import click_image, open_page, serve, wait_for_text
from samantics_d2.d2 import DatasetCatalog, MetadataCatalog
from samantics_d2.data.mapper import segmentation_to_mask
from samantics_d2.utils.image import read_image

ROOT = Path(__file__).resolve().parents[1]
UPLOAD_CAP = "2mb"


def _app_tool():
    spec = importlib.util.spec_from_file_location("samantics_app_tool", ROOT / "tools" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("app")
    tool = _app_tool()
    argv = ["--output", str(out), "--import-config-references"]
    if os.environ.get("SAMANTICS_APP_CHECKPOINT"):
        argv += ["--checkpoint", os.environ["SAMANTICS_APP_CHECKPOINT"]]
    blocks = tool.build(tool.parse_args(argv))
    with serve(blocks, max_file_size=UPLOAD_CAP) as url:
        yield url, blocks.samantics_app, out


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], verbose=False, download_files=str(server[2] / "downloads"))


@pytest.fixture(scope="module")
def shapes_image():
    """A shapes_val image with its first instance's mask and class."""
    d = DatasetCatalog.get("shapes_val")[0]
    ann = d["annotations"][0]
    mask = segmentation_to_mask(ann["segmentation"], d["height"], d["width"])
    name = MetadataCatalog.get("shapes_val").thing_classes[ann["category_id"]]
    return d["file_name"], mask, name


SHAPES = ["red circle", "green square", "blue triangle", "yellow star", "orange cross", "magenta hexagon",
          "cyan diamond", "purple pentagon"]


# ---------------------------------------------------------------------- the class bank (no server)


def test_class_bank_round_trip_and_errors(tmp_path):
    bank = ClassBank()
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 4:12] = True
    bank.add_reference("cat", image, mask)
    assert bank.add_words("dog/puppy, cat") == ["dog", "cat"]
    assert bank.table() == [["cat", 1, "image+text"], ["dog", 0, "text"]]
    assert bank.text_classes() == ["cat", "dog/puppy"]
    with pytest.raises(ValueError, match="empty"):
        bank.add_reference("cat", image, np.zeros((20, 30), bool))
    with pytest.raises(ValueError, match="30x20"):
        bank.add_reference("cat", image, np.ones((30, 20), bool))
    with pytest.raises(ValueError, match="already has this reference"):
        bank.add_reference("cat", image, mask)
    with pytest.raises(ValueError, match="empty name or synonym"):
        bank.add_words("sofa//couch")

    path = bank.save(tmp_path / "classes.json")
    loaded = ClassBank.load(path)
    assert loaded.table() == bank.table() and loaded.fingerprint() == bank.fingerprint()
    np.testing.assert_array_equal(loaded["cat"].references[0].mask, mask)
    np.testing.assert_array_equal(loaded["cat"].references[0].image, image)
    dicts = loaded.reference_dicts(str(tmp_path / "refs"))
    assert len(dicts) == 1 and dicts[0]["annotations"][0]["bbox"] == [4.0, 5.0, 8.0, 5.0]
    np.testing.assert_array_equal(read_image(dicts[0]["file_name"]), image)

    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="bad.json is not a class bank"):
        ClassBank.load(tmp_path / "bad.json")
    data = bank.to_json()
    data["classes"][0]["references"][0]["mask"] = {"size": [5, 5], "counts": "0"}
    (tmp_path / "broken.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"broken.json: class 0 \('cat'\) is malformed"):
        ClassBank.load(tmp_path / "broken.json")


# ---------------------------------------------------------------------- endpoints (Gradio client)


def test_segment_endpoint(client, shapes_image):
    file, _, _ = shapes_image
    overlay, legend, results_file = client.predict(handle_file(file), 0.0, api_name="/segment")
    overlay = np.asarray(Image.open(overlay))
    assert overlay.shape[0] >= 128 and overlay.shape[2] in (3, 4)
    results = json.loads(Path(results_file).read_text())
    assert isinstance(results, list)
    for r in results:
        assert 1 <= r["category_id"] <= len(SHAPES) and set(r) >= {"bbox", "score", "segmentation"}
    named = [n for n in SHAPES if n in legend]
    assert (named if results else "No instance" in legend)


def test_click_endpoint(client, shapes_image):
    file, mask, _ = shapes_image
    ys, xs = np.nonzero(mask)
    x, y = int(np.median(xs)), int(np.median(ys))
    annotated, result = client.predict(handle_file(file), json.dumps([[x, y, 1]]), api_name="/click")
    assert result["categories"] == SHAPES and result["points"] == [[x, y]]
    masks = result["masks"]
    assert 1 <= len(masks) <= 6 and len(annotated["annotations"]) == len(masks)
    areas = [m["bbox"][2] * m["bbox"][3] for m in masks]
    pixel_areas = [int(np.asarray(Image.open(a["image"])).astype(bool).sum()) for a in annotated["annotations"]]
    assert pixel_areas == sorted(pixel_areas), "granularities are sorted small to large"
    assert all(a > 0 for a in areas)
    for i, m in enumerate(masks):
        assert m["granularity"] == i + 1 and -1 <= m["part_of"] < len(masks) and m["part_of"] != i
        assert m["class_name"] in SHAPES and 1 <= m["category_id"] <= len(SHAPES)
    with pytest.raises(Exception, match="Click on the object"):
        client.predict(handle_file(file), "[]", api_name="/click")


def test_define_classes_endpoints(client, server, shapes_image, tmp_path):
    file, mask, _ = shapes_image
    app = server[1]
    mask_file = tmp_path / "mask.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_file)
    before = app.ws.classes.table()
    try:
        table = client.predict(handle_file(file), handle_file(str(mask_file)), "my thing", api_name="/add_reference")
        assert ["my thing", 1, "image"] in table["data"]
        assert app.ws.classes["my thing"].references[0].mask.sum() == mask.sum()
        try:  # the demo's tiny SAM is trained on clicks only: its box masks may be empty
            box_mask = client.predict(handle_file(file), "10,10,60,70", api_name="/mask_from_box")
            assert np.asarray(Image.open(box_mask)).shape[:2] == mask.shape
        except Exception as e:  # noqa: BLE001  (gradio_client's AppError)
            assert "SAM's mask for this prompt is empty" in str(e)
        with pytest.raises(Exception, match="The box .* is empty"):
            client.predict(handle_file(file), "10,10,5,70", api_name="/mask_from_box")
        saved, status = client.predict(api_name="/save_classes")
        assert "Saved 9 classes" in status
        table, status = client.predict("my thing", api_name="/remove_class")
        assert ["my thing", 1, "image"] not in table["data"]
        table, status = client.predict(handle_file(saved), api_name="/load_classes")
        assert ["my thing", 1, "image"] in table["data"] and status == "Loaded 9 classes."
        table, status = client.predict("a word class, other/synonym", api_name="/add_words")
        assert ["a word class", 0, "text"] in table["data"] and ["other", 0, "text"] in table["data"]
        # words and examples together: the label space is the bank's 11 classes, in its order
        _, _, results_file = client.predict(handle_file(file), 0.0, api_name="/segment")
        assert all(1 <= r["category_id"] <= 11 for r in json.loads(Path(results_file).read_text()))
        assert app.ws.model.class_names() == SHAPES + ["my thing", "a word class", "other"]
        _, status = client.predict("", api_name="/add_words")
        assert "No class name" in status
    finally:
        for name in ("my thing", "a word class", "other"):
            if name in app.ws.classes.names:
                app.ws.classes.remove(name)
    assert app.ws.classes.table() == before


def test_files_endpoint_skips_unreadable_and_caps_uploads(client, shapes_image, tmp_path):
    file, _, _ = shapes_image
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    gallery, downloads, status = client.predict([handle_file(file), handle_file(str(broken))], 0.3,
                                                api_name="/segment_files")
    assert status.startswith("Segmented 1 of 2 image(s)") and "broken.png" in status
    assert len(gallery) == 1 and {Path(d).name for d in downloads} == {"coco_results.json", "overlays.zip"}
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 1000, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 2_100_000
    with pytest.raises(Exception, match="(?i)exceeds the maximum file size|too large|file size"):
        client.predict(handle_file(str(big)), 0.3, api_name="/segment")


# ---------------------------------------------------------------------- the page in headless Chromium


def test_browser_click_shows_labelled_masks(server, shapes_image, tmp_path):
    url = server[0]
    shots = Path(os.environ.get("SAMANTICS_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    file, mask, _ = shapes_image
    ys, xs = np.nonzero(mask)
    height, width = mask.shape
    app = server[1]
    with open_page(url) as page:
        page.locator("#class-table").get_by_text("purple pentagon").wait_for(timeout=30_000)
        # a reference: upload, one short brush stroke inside the object, added as the mask
        with page.expect_file_chooser() as chooser:
            page.locator("#reference-editor button[aria-label=Upload]").click()
        chooser.value.set_files(file)
        page.locator("#reference-editor").get_by_text("Upload an image").wait_for(state="hidden", timeout=30_000)
        page.locator("#reference-editor button[aria-label=Brush]").click()
        page.wait_for_timeout(500)
        canvas = page.locator("#reference-editor canvas").first.bounding_box()
        # the editor shows the image centred in the canvas, as large as fits
        scale = min(canvas["width"] / width, canvas["height"] / height)
        left = canvas["x"] + (canvas["width"] - width * scale) / 2
        top = canvas["y"] + (canvas["height"] - height * scale) / 2
        x0, y0 = left + (np.median(xs) - 4) * scale, top + np.median(ys) * scale
        page.mouse.move(x0, y0)
        page.mouse.down()
        for k in range(7):
            page.mouse.move(x0 + k * scale, y0 + (k % 3) * scale)
        page.mouse.up()
        page.locator("#class-name textarea, #class-name input").first.fill("my shape")
        page.locator("#add-reference").click()  # mask from: the brush strokes (the default)
        page.locator("#class-table").get_by_text("my shape").wait_for(timeout=60_000)
        added = app.ws.classes["my shape"].references[0].mask
        app.ws.classes.remove("my shape")
        assert added.sum() > 0 and (added & mask.astype(bool)).sum() > 0.7 * added.sum(), "the strokes lie on the shape"
        # SAM's mask for a click at the strokes' deepest pixel, shown for confirmation
        page.get_by_text("SAM: click at the strokes' centre").click()
        page.get_by_role("button", name="Preview mask").click()
        try:
            wait_for_text(page, "#classes-status", "Mask of ", timeout_s=60)
        finally:
            page.screenshot(path=str(shots / "app_define_classes.png"), full_page=True)

        page.get_by_role("tab", name="Click").click()
        page.locator("#click-target input[type=file]").set_input_files(file)
        click_image(page, "#click-target", float(np.median(xs)), float(np.median(ys)), image_size=(width, height))
        wait_for_text(page, "#click-masks", "1: ")
        labels = page.locator("#click-masks").inner_text()
        assert any(name in labels for name in SHAPES), labels
        assert "masks for 1 click(s)" in page.locator("#click-status").inner_text()
        page.screenshot(path=str(shots / "app_click.png"), full_page=True)

        page.get_by_role("tab", name="Segment everything").click()
        page.locator("#segment-image input[type=file]").set_input_files(file)
        page.locator("#segment-button").click()
        page.locator("#segment-overlay img").first.wait_for(timeout=120_000)
        legend = page.locator("#segment-legend").filter(has_text=re.compile("|".join(SHAPES + ["No instance"])))
        legend.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "app_segment.png"), full_page=True)
    for name in ("app_define_classes.png", "app_click.png", "app_segment.png"):
        assert Image.open(shots / name).size[0] >= 1000


# ---------------------------------------------------------------------- classes by words (Python API)


def test_workspace_words_and_fused_classes(tmp_path, shapes_image):
    """A config that labels by words (tiny random CLIP): classes by words only, then fused with an
    example; every label is one of the bank's classes, in the bank's order."""
    from samantics_d2.app import Workspace, WorkspaceError

    file, mask, _ = shapes_image
    image = read_image(file)
    ws = Workspace.from_config(str(ROOT / "configs/open_vocab/everything_shapes_tiny.py"), folder=str(tmp_path))
    assert ws.text_encoder is not None
    with pytest.raises(WorkspaceError, match="No class is defined"):
        ws.segment(image)
    ws.classes.add_words("red circle, blue triangle/triangle")
    words_only = ws.segment(image, score_threshold=0.0)
    assert words_only.class_names == ["red circle", "blue triangle"]
    assert set(words_only.classes.tolist()) <= {0, 1}  # (a random tiny SAM may propose nothing)
    assert ws.model.open_vocab.text_weight.tolist() == [1.0, 1.0]  # words only: the text side decides
    ws.classes.add_reference("green thing", image, mask)
    ws.classes.add_reference("red circle", image, mask)
    fused = ws.segment(image, score_threshold=0.0)
    assert fused.class_names == ["red circle", "blue triangle", "green thing"]
    assert set(fused.classes.tolist()) <= {0, 1, 2}
    # per class: examples and words -> the config's weight; words only -> 1; examples only -> 0
    assert ws.model.open_vocab.text_weight.tolist() == [0.5, 1.0, 0.0]
    ys, xs = np.nonzero(mask)
    clicked = ws.click(image, points=[(float(np.median(xs)), float(np.median(ys)))], labels=[1])
    assert 1 <= len(clicked.masks) <= 6 and set(clicked.classes.tolist()) <= {0, 1, 2}
    assert all(0.0 <= s <= 1.0 for s in clicked.scores)


def test_workspace_words_need_a_text_tower(tmp_path):
    from samantics_d2.app import Workspace, WorkspaceError

    ws = Workspace.from_config(str(ROOT / "configs/training_free/shapes_tiny.py"), folder=str(tmp_path))
    assert ws.text_encoder is None
    ws.classes.add_words("cat")
    with pytest.raises(WorkspaceError, match="Classes named by words need a config with a CLIP text tower"):
        ws.sync()


def test_workspace_drops_empty_masks_unless_overridden(tmp_path):
    """What the app shows never includes a detection whose mask vanished at the image size (it would
    be a labelled box at the origin); an override keeps them."""
    from samantics_d2.app import Workspace

    config = str(ROOT / "configs/training_free/shapes_tiny_random.py")
    assert Workspace.from_config(config, folder=str(tmp_path)).model.drop_empty_masks is True
    kept = Workspace.from_config(config, folder=str(tmp_path), overrides=["model.drop_empty_masks=False"])
    assert kept.model.drop_empty_masks is False


def test_app_command_serves_the_page(tmp_path):
    """`python tools/app.py` as a user runs it (`make app`): it serves the page on the given port
    (run from the tools folder, tools/click.py must not shadow the `click` package Gradio imports)."""
    import subprocess
    import sys
    import time
    import urllib.request

    from samantics_d2.app.browser import free_port

    port = free_port()
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen([sys.executable, str(ROOT / "tools" / "app.py"), "--port", str(port), "--output",
                                str(tmp_path / "out"), "--max-upload-mb", "2.5"], stdout=log, stderr=subprocess.STDOUT,
                               cwd=str(ROOT / "tools"))
    try:
        deadline, status = time.time() + 240, None
        while time.time() < deadline and process.poll() is None and status is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status
            except OSError:
                time.sleep(1)
        assert status == 200, (tmp_path / "app.log").read_text()[-2000:]
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
