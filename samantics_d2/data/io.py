"""Image reading: every image of the project enters as RGB ``uint8`` through here.

``read_image`` opens any path iopath understands, applies the EXIF orientation and converts whatever
the file holds (grayscale, palette, RGBA, 16-bit) to the requested format. ``to_rgb_uint8`` does the
same conversion for arrays that did not come from a file.
"""
from __future__ import annotations

import logging

import numpy as np
from iopath.common.file_io import PathManager as _PathManagerClass
from PIL import Image, ImageOps, UnidentifiedImageError

from ..utils.image import to_rgb_uint8

__all__ = ["read_image", "to_rgb_uint8"]

logger = logging.getLogger(__name__)

PathManager = _PathManagerClass()

_FORMATS = ("RGB", "BGR", "L")
# PIL modes whose pixel arrays to_rgb_uint8 takes as they are; other modes are converted by PIL first.
_ARRAY_MODES = {"1", "L", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I", "F"}


def _pil_to_array(pil_image: Image.Image, file_name: str) -> np.ndarray:
    """Pixel array of a PIL image in a dtype ``to_rgb_uint8`` accepts."""
    if pil_image.mode not in _ARRAY_MODES:
        has_alpha = "A" in pil_image.mode or "transparency" in pil_image.info
        pil_image = pil_image.convert("RGBA" if has_alpha else "RGB")
    array = np.asarray(pil_image)
    if pil_image.mode == "I":  # 32-bit integer gray: 16-bit PNGs are often opened this way
        if array.min() < 0 or array.max() > np.iinfo(np.uint16).max:
            raise ValueError(
                f"Image {file_name!r} is 32-bit integer gray with values in [{array.min()}, {array.max()}]; "
                "expected 8- or 16-bit values. Convert it to an 8-bit image."
            )
        array = array.astype(np.uint16)
    elif pil_image.mode.startswith("I;16"):
        array = array.astype(np.uint16)  # also turns big-endian I;16B into native order
    return array


def read_image(file_name: str, format: str = "RGB") -> np.ndarray:
    """Read an image file, EXIF orientation applied.

    Args:
        file_name: a local path or any URI registered with iopath.
        format: ``"RGB"``, ``"BGR"`` or ``"L"`` (gray).

    Returns:
        ``[H, W, 3]`` ``uint8`` for ``"RGB"``/``"BGR"``, ``[H, W, 1]`` ``uint8`` for ``"L"``.

    Raises:
        FileNotFoundError: the file does not exist.
        OSError: the file exists but is not a readable image.
        ValueError: ``format`` is unknown, or the pixels cannot be converted.
    """
    if format not in _FORMATS:
        raise ValueError(f"read_image got format={format!r}; expected one of {_FORMATS}.")
    file_name = str(file_name)
    if not PathManager.exists(file_name):
        raise FileNotFoundError(f"Image file {file_name!r} does not exist. Check the dataset's image_root.")
    try:
        with PathManager.open(file_name, "rb") as f:
            pil_image = Image.open(f)
            pil_image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL raises SyntaxError for some broken files
        raise OSError(f"Cannot read image file {file_name!r}: {e}. The file is corrupt or not an image.") from e
    pil_image = ImageOps.exif_transpose(pil_image)
    rgb = to_rgb_uint8(_pil_to_array(pil_image, file_name))
    if format == "RGB":
        return rgb
    if format == "BGR":
        return np.ascontiguousarray(rgb[:, :, ::-1])
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    return gray[:, :, None]
