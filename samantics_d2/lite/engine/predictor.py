"""``DefaultPredictor``, as in ``detectron2.engine.defaults``: one image in, one prediction out."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..checkpoint import DetectionCheckpointer
from ..data import MetadataCatalog
from ..modeling import build_model

__all__ = ["DefaultPredictor"]


def _resize_shortest_edge(image: np.ndarray, short_edge: int, max_size: int) -> np.ndarray:
    """Detectron2's test-time ``ResizeShortestEdge``: the shorter side to ``short_edge`` unless the
    longer side would exceed ``max_size`` (then the longer side to ``max_size``), bilinear (PIL for
    uint8 ``[H, W, C]``, torch otherwise, as ``ResizeTransform``); ``short_edge == 0`` leaves the
    image as it is."""
    if short_edge == 0:
        return image
    h, w = image.shape[:2]
    scale = short_edge / min(h, w)
    new_h, new_w = (short_edge, scale * w) if h < w else (scale * h, short_edge)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    new_h, new_w = int(new_h + 0.5), int(new_w + 0.5)
    if image.dtype != np.uint8:  # [H, W, C] -> [1, C, H, W] -> resized -> [h, w, C]
        pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
        resized = F.interpolate(pixels, (new_h, new_w), mode="bilinear", align_corners=False)
        return resized[0].permute(1, 2, 0).numpy()
    if image.ndim == 3 and image.shape[2] == 1:
        resized = Image.fromarray(image[:, :, 0], mode="L").resize((new_w, new_h), Image.BILINEAR)
        return np.asarray(resized)[:, :, None]
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


class DefaultPredictor:
    """Build ``cfg``'s model, load ``cfg.MODEL.WEIGHTS`` and predict one image at a time.

    ``predictor(bgr_image)`` takes an ``[H, W, C]`` uint8 array in BGR order (``cv2.imread``), flips
    it to RGB when ``cfg.INPUT.FORMAT == "RGB"``, resizes it with ``INPUT.{MIN,MAX}_SIZE_TEST``
    (shortest edge), and returns the model's output for it (``model([inputs])[0]``), computed from
    ``{"image": float32 [C, h, w], "height": H, "width": W}`` under ``torch.no_grad()``.

    Attributes:
        metadata: the metadata of ``cfg.DATASETS.TEST[0]`` (only when DATASETS.TEST is set).
    """

    def __init__(self, cfg):
        self.cfg = cfg.clone()  # the model may modify its config
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.min_size_test, self.max_size_test = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        self.input_format = cfg.INPUT.FORMAT
        assert self.input_format in ["RGB", "BGR"], self.input_format

    def __call__(self, original_image: np.ndarray) -> dict:
        with torch.no_grad():
            if self.input_format == "RGB":
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            image = _resize_shortest_edge(original_image, self.min_size_test, self.max_size_test)
            # The image stays on the CPU, as in Detectron2: the model moves it to its device.
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            return self.model([{"image": image, "height": height, "width": width}])[0]
