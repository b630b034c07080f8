"""The Gradio page of the web app (``tools/app.py``): three tabs over one :class:`Workspace`.

Every button calls one :class:`Workspace` / :class:`ClassBank` method (the Python API); this module
only converts between Gradio values and arrays and turns :class:`WorkspaceError` / ``ValueError``
into a message in the page (``gr.Warning`` / the status line), never a stack trace. The functions
are also Gradio API endpoints (``api_name``), which the tests call with ``gradio_client``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import zipfile
from typing import Any, Optional

import gradio as gr
import numpy as np
import torch
from PIL import Image

from ..utils.clicks import click_points
from ..utils.image import read_image
from ..utils.io import atomic_path
from ..utils.visualization import class_colour
from .classes import ClassBank, mask_bounding_box
from .workspace import Workspace, WorkspaceError

__all__ = ["build_app"]

logger = logging.getLogger(__name__)
USER_ERRORS = (WorkspaceError, ValueError, KeyError, OSError)
TABLE_HEADERS = ["class", "shots", "source"]
MASK_MODES = ("brush strokes", "SAM: box around the strokes", "SAM: click at the strokes' centre")


def _message(e: Exception) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def _rgb(image: Any, what: str) -> np.ndarray:
    """An uploaded image as ``[H, W, 3]`` uint8 RGB (a path is read; RGBA/grey converted)."""
    if image is None:
        raise WorkspaceError(f"No {what}: upload an image first.")
    if isinstance(image, str):
        try:
            return read_image(image)
        except (OSError, ValueError) as e:
            raise WorkspaceError(f"The {what} {os.path.basename(image)!r} is not a readable image ({e}).") from e
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def _mask_preview(image: np.ndarray, mask: np.ndarray, *, min_side: int = 360) -> np.ndarray:
    """The mask in cyan over the image, enlarged by pixel repetition when the image is small."""
    out = image.astype(np.float32)
    out[mask] = 0.4 * out[mask] + 0.6 * np.array([0, 200, 255], np.float32)  # cyan: visible on most objects
    scale = max(1, -(-min_side // max(1, min(image.shape[:2]))))
    return out.clip(0, 255).astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)


def _legend(names: list[str], classes: np.ndarray) -> str:
    present = sorted(set(int(c) for c in classes))
    if not present:
        return "No instance above the threshold."
    items = []
    for c in present:
        r, g, b = class_colour(c)
        items.append(f'<span style="display:inline-block;margin-right:12px"><span style="display:inline-block;'
                     f'width:12px;height:12px;background:rgb({r},{g},{b});margin-right:4px"></span>{names[c]}</span>')
    return "<div class='samantics-legend'>" + "".join(items) + "</div>"


class App:
    """The page's callbacks (one per button) over a :class:`Workspace`."""

    def __init__(self, workspace: Workspace, *, output_dir: str) -> None:
        self.ws = workspace
        self.output_dir = output_dir
        self._cancel = threading.Event()
        os.makedirs(output_dir, exist_ok=True)

    # ------------------------------------------------------------------ define classes

    def table(self):
        import pandas as pd  # a Gradio dependency

        return pd.DataFrame(self.ws.classes.table(), columns=TABLE_HEADERS)

    def editor_mask(self, editor: Optional[dict], mode: str) -> tuple[np.ndarray, np.ndarray]:
        """The reference image and mask of the image editor (``mode``, one of :data:`MASK_MODES`): the
        brush strokes; SAM's mask for the box around them; or SAM's mask for a click at the strokes'
        deepest pixel (:func:`~samantics_d2.utils.clicks.click_points`)."""
        if not editor or editor.get("background") is None:
            raise WorkspaceError("No reference image: upload one in the editor first.")
        image = _rgb(editor["background"], "reference image")
        strokes = np.zeros(image.shape[:2], bool)
        for layer in editor.get("layers") or []:
            layer = np.asarray(layer)
            if layer.shape[:2] == strokes.shape:
                strokes |= (layer[..., 3] > 0) if layer.ndim == 3 and layer.shape[2] == 4 else (layer.max(-1) > 0)
        if not strokes.any():
            raise WorkspaceError("Paint over the object with the brush first (or around it, for a SAM box).")
        if mode == MASK_MODES[1]:
            return image, self.ws.mask_from_box(image, mask_bounding_box(strokes))
        if mode == MASK_MODES[2]:
            point = click_points(torch.from_numpy(strokes[None]))[0].tolist()
            return image, self.ws.mask_from_prompt(image, point=point)
        return image, strokes

    def preview(self, editor, mode):
        try:
            image, mask = self.editor_mask(editor, mode)
        except USER_ERRORS as e:
            gr.Warning(_message(e))
            return None, _message(e)
        return _mask_preview(image, mask), f"Mask of {int(mask.sum())} pixels: check it, then add it to a class."

    def add_from_editor(self, editor, mode, name):
        try:
            image, mask = self.editor_mask(editor, mode)
            self.ws.classes.add_reference(name, image, mask)
        except USER_ERRORS as e:
            gr.Warning(_message(e))
            return self.table(), _message(e)
        return self.table(), f"Added a reference of {name.strip()!r}."

    def add_reference(self, image, mask_image, name):
        """API: add a reference from an image and a mask image (non-zero = object)."""
        try:
            image = _rgb(image, "reference image")
            mask = _rgb(mask_image, "mask image").max(axis=-1) > 0
            self.ws.classes.add_reference(name, image, mask)
        except USER_ERRORS as e:
            raise gr.Error(_message(e)) from e
        return self.table()

    def box_mask(self, image, box: str):
        """API: SAM's mask for the box ``"x0,y0,x1,y1"``, as a PNG-ready image (255 = object)."""
        try:
            values = [float(v) for v in box.split(",")]
            if len(values) != 4:
                raise WorkspaceError(f"Box {box!r}: expected x0,y0,x1,y1.")
            mask = self.ws.mask_from_box(_rgb(image, "reference image"), values)
        except USER_ERRORS as e:
            raise gr.Error(_message(e)) from e
        return (mask.astype(np.uint8) * 255)

    def add_words(self, text):
        try:
            names = self.ws.classes.add_words(text or "")
        except USER_ERRORS as e:
            gr.Warning(_message(e))
            return self.table(), _message(e)
        return self.table(), f"Added {', '.join(names)}."

    def import_references(self):
        try:
            names = self.ws.import_config_references()
        except USER_ERRORS as e:
            gr.Warning(_message(e))
            return self.table(), _message(e)
        return self.table(), f"Imported the config's references of {len(names)} classes."

    def remove_class(self, name):
        try:
            self.ws.classes.remove(name.strip())
        except USER_ERRORS as e:
            gr.Warning(_message(e))
            return self.table(), _message(e)
        return self.table(), f"Removed {name.strip()!r}."

    def save_classes(self):
        path = self.ws.classes.save(os.path.join(self.output_dir, "classes.json"))
        return path, f"Saved {len(self.ws.classes)} classes to {path}."

    def load_classes(self, file):
        try:
            if file is None:
                raise WorkspaceError("Choose a classes file (saved with 'Save classes') first.")
            bank = ClassBank.load(file if isinstance(file, str) else file.name)
            self.ws.classes.merge(bank)
        except USER_ERRORS as e:
            gr.Warning(_message(e))
            return self.table(), _message(e)
        return self.table(), f"Loaded {len(bank)} classes."

    # ------------------------------------------------------------------ click

    def click(self, image, clicks: list, threshold: float = 0.0):
        """The up-to-K labelled masks of the click set ``clicks`` (``[[x, y, 1 or 0], ...]``)."""
        image = _rgb(image, "target image")
        if not clicks:
            raise WorkspaceError("Click on the object in the image.")
        points = [(float(x), float(y)) for x, y, _ in clicks]
        labels = [int(v) for _, _, v in clicks]
        result = self.ws.click(image, points=points, labels=labels)
        annotations = [(m.astype(np.float32), label) for m, label in zip(result.masks, result.captions())]
        return (image, annotations), result

    def on_select(self, image, clicks, kind, evt: gr.SelectData):
        clicks = list(clicks or []) + [[evt.index[0], evt.index[1], 1 if kind == "positive" else 0]]
        return self._click_outputs(image, clicks)

    def click_api(self, image, clicks_json: str):
        """API: the labelled masks of ``clicks_json`` (``[[x, y, label], ...]``): annotated image + JSON."""
        try:
            clicks = json.loads(clicks_json)
            (image, annotations), result = self.click(image, clicks)
        except USER_ERRORS as e:
            raise gr.Error(_message(e)) from e
        return (image, annotations), result.to_json()

    def _click_outputs(self, image, clicks):
        try:
            annotated, result = self.click(image, clicks)
        except USER_ERRORS as e:
            gr.Warning(_message(e))
            return clicks, None, gr.update(choices=[], value=None), _message(e), None
        choices = result.captions()
        return (clicks, annotated, gr.update(choices=choices, value=choices[-1] if choices else None),
                f"{len(choices)} masks for {len(clicks)} click(s), part (1) to whole ({len(choices)}).", result)

    def clear_clicks(self):
        return [], None, gr.update(choices=[], value=None), "Clicks cleared.", None

    def export_mask(self, image, result, choice):
        if result is None or choice is None:
            gr.Warning("Click on the image first, then choose a mask.")
            return None
        index = result.captions().index(choice)
        folder = tempfile.mkdtemp(dir=self.output_dir, prefix="export-")
        png, js = os.path.join(folder, "mask.png"), os.path.join(folder, "mask_coco.json")
        Image.fromarray(result.masks[index].astype(np.uint8) * 255).save(png)
        with open(js, "w", encoding="utf-8") as f:
            json.dump(result.coco_result(index), f)
        return [png, js]

    # ------------------------------------------------------------------ segment everything

    def segment(self, image, threshold: float):
        """API: the labelled overlay, the legend and ``coco_results.json`` of one image."""
        try:
            result = self.ws.segment(_rgb(image, "image"), score_threshold=float(threshold))
        except USER_ERRORS as e:
            raise gr.Error(_message(e)) from e
        folder = tempfile.mkdtemp(dir=self.output_dir, prefix="segment-")
        path = os.path.join(folder, "coco_results.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result.coco_results(score_threshold=float(threshold)), f)
        keep = result.scores >= float(threshold)
        return result.overlay, _legend(result.class_names, result.classes[keep]), path

    def segment_files(self, files, threshold: float, progress=gr.Progress()):
        """API: segment several images (a folder's files): overlays, ``coco_results.json`` and a zip
        of the overlays; unreadable files are listed, not fatal; ``Stop`` cancels between images."""
        self._cancel.clear()
        paths = [f if isinstance(f, str) else f.name for f in (files or [])]
        if not paths:
            raise gr.Error("Choose image files (or a whole folder) first.")
        progress(0, desc="segmenting")
        try:
            done, skipped = self.ws.segment_files(
                paths, score_threshold=float(threshold), cancelled=self._cancel.is_set,
                progress=lambda i, n, p: progress((i, n), desc=os.path.basename(p), unit="images"))
        except USER_ERRORS as e:
            raise gr.Error(_message(e)) from e
        folder = tempfile.mkdtemp(dir=self.output_dir, prefix="segment-")
        results, gallery, names = [], [], {}
        archive = os.path.join(folder, "overlays.zip")
        with atomic_path(archive) as tmp, zipfile.ZipFile(tmp, "w") as zf:
            for image_id, (path, result) in enumerate(done.items(), start=1):
                results.extend(result.coco_results(image_id, score_threshold=float(threshold)))
                name = os.path.basename(path)
                names[image_id] = name
                overlay = os.path.join(folder, f"{image_id:05d}_{os.path.splitext(name)[0]}.png")
                Image.fromarray(result.overlay).save(overlay)
                zf.write(overlay, os.path.basename(overlay))
                gallery.append((overlay, name))
        coco = os.path.join(folder, "coco_results.json")
        with open(coco, "w", encoding="utf-8") as f:
            json.dump(results, f)
        status = f"Segmented {len(done)} of {len(paths)} image(s)"
        if len(done) + len(skipped) < len(paths):
            status += " (stopped)"
        if skipped:
            status += "; skipped (unreadable): " + ", ".join(os.path.basename(p) for p in skipped)
        return gallery, [coco, archive], status + "."

    def stop(self):
        self._cancel.set()
        return "Stopping after the current image."


def build_app(workspace: Workspace, *, output_dir: str, title: str = "samantics_d2") -> gr.Blocks:
    """The page: tabs "Define classes", "Click", "Segment everything" (see the module docstring)."""
    app = App(workspace, output_dir=output_dir)
    with gr.Blocks(title=title) as blocks:
        gr.Markdown(f"# {title}\nDefine your classes, click on an object, or segment everything. "
                    "Model: `" + workspace.description + "`")
        with gr.Tab("Define classes", id="classes"):
            with gr.Row():
                with gr.Column():
                    editor = gr.ImageEditor(label="Reference image: upload, then paint over the object",
                                            type="numpy", image_mode="RGBA", layers=False,
                                            brush=gr.Brush(colors=["#ff2828"], color_mode="fixed", default_size=8),
                                            elem_id="reference-editor")
                    mode = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], label="Mask from")
                    name = gr.Textbox(label="Class name", placeholder="e.g. red circle", elem_id="class-name")
                    with gr.Row():
                        preview_button = gr.Button("Preview mask")
                        add_button = gr.Button("Add reference", variant="primary", elem_id="add-reference")
                with gr.Column():
                    preview = gr.Image(label="Mask to add (cyan)", interactive=False, height=360)
                    words = gr.Textbox(label="Classes by words ( , between classes, / between synonyms)",
                                       placeholder="cat, dog/puppy")
                    words_button = gr.Button("Add words")
                    table = gr.Dataframe(headers=TABLE_HEADERS, value=app.table(), interactive=False,
                                         label="Classes", elem_id="class-table")
                    with gr.Row():
                        import_button = gr.Button("Import the config's references", elem_id="import-references")
                        remove_name = gr.Textbox(label="Class to remove", scale=2)
                        remove_button = gr.Button("Remove")
                    with gr.Row():
                        save_button = gr.Button("Save classes")
                        saved = gr.File(label="Classes file", interactive=False)
                        load_file = gr.File(label="Load a classes file", file_types=[".json"])
            classes_status = gr.Markdown(elem_id="classes-status")
            preview_button.click(app.preview, [editor, mode], [preview, classes_status], api_name="preview_mask")
            add_button.click(app.add_from_editor, [editor, mode, name], [table, classes_status], api_visibility="private")
            words_button.click(app.add_words, [words], [table, classes_status], api_name="add_words")
            import_button.click(app.import_references, None, [table, classes_status], api_name="import_references")
            remove_button.click(app.remove_class, [remove_name], [table, classes_status], api_name="remove_class")
            save_button.click(app.save_classes, None, [saved, classes_status], api_name="save_classes")
            load_file.upload(app.load_classes, [load_file], [table, classes_status], api_name="load_classes")
            # API-only endpoints (Python client): hidden components, one hidden button each
            with gr.Row(visible=False):
                api_image, api_mask = gr.Image(type="numpy"), gr.Image(type="numpy", image_mode="L")
                api_name, api_box = gr.Textbox(), gr.Textbox()
                api_table = gr.Dataframe(headers=TABLE_HEADERS)
                api_button = gr.Button()
            api_button.click(app.add_reference, [api_image, api_mask, api_name], [api_table], api_name="add_reference")
            api_button.click(app.box_mask, [api_image, api_box], [api_mask], api_name="mask_from_box")

        with gr.Tab("Click", id="click"):
            clicks = gr.State([])
            result_state = gr.State(None)
            with gr.Row():
                with gr.Column():
                    target = gr.Image(label="Target: upload, then click on an object", type="numpy",
                                      elem_id="click-target", height=360)
                    kind = gr.Radio(["positive", "negative"], value="positive", label="Next click")
                    clear_button = gr.Button("Clear clicks")
                with gr.Column():
                    masks = gr.AnnotatedImage(label="Masks, part to whole (label, score)", elem_id="click-masks")
                    choice = gr.Dropdown(label="Mask to export", choices=[])
                    export_button = gr.Button("Export mask (PNG + COCO JSON)")
                    exported = gr.File(label="Exported", interactive=False, file_count="multiple")
            click_status = gr.Markdown(elem_id="click-status")
            target.select(app.on_select, [target, clicks, kind], [clicks, masks, choice, click_status, result_state],
                          api_visibility="private")
            target.upload(app.clear_clicks, None, [clicks, masks, choice, click_status, result_state],
                          api_visibility="private")
            clear_button.click(app.clear_clicks, None, [clicks, masks, choice, click_status, result_state],
                               api_visibility="private")
            export_button.click(app.export_mask, [target, result_state, choice], [exported], api_visibility="private")
            with gr.Row(visible=False):
                api_target, api_clicks = gr.Image(type="numpy"), gr.Textbox()
                api_masks, api_json = gr.AnnotatedImage(), gr.JSON()
                api_click = gr.Button()
            api_click.click(app.click_api, [api_target, api_clicks], [api_masks, api_json], api_name="click")

        with gr.Tab("Segment everything", id="segment"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(label="Image", type="numpy", elem_id="segment-image", height=360)
                    files = gr.File(label="...or several images (a folder's files)", file_count="multiple",
                                    file_types=["image"])
                    threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="Score threshold")
                    with gr.Row():
                        segment_button = gr.Button("Segment the image", variant="primary", elem_id="segment-button")
                        files_button = gr.Button("Segment the files", elem_id="segment-files-button")
                        stop_button = gr.Button("Stop")
                with gr.Column():
                    overlay = gr.Image(label="Labelled instances", interactive=False, elem_id="segment-overlay")
                    legend = gr.HTML(elem_id="segment-legend")
                    gallery = gr.Gallery(label="Overlays", columns=3)
                    downloads = gr.File(label="coco_results.json and overlays", interactive=False,
                                        file_count="multiple")
            segment_status = gr.Markdown(elem_id="segment-status")
            segment_button.click(app.segment, [image, threshold], [overlay, legend, downloads], api_name="segment")
            run_files = files_button.click(app.segment_files, [files, threshold], [gallery, downloads, segment_status],
                                     api_name="segment_files")
            stop_button.click(app.stop, None, [segment_status], cancels=[run_files], api_name="stop")
    blocks.samantics_app = app  # for tests
    return blocks
