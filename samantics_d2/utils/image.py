"""Image reading and image arrays to RGB ``uint8``: every image of the project enters through here.

``read_image`` opens any path iopath understands, applies the EXIF orientation and converts whatever
the file holds (grayscale, palette, RGBA, 16-bit) to the requested format. ``to_rgb_uint8`` does the
same conversion for arrays that did not come from a file. It sits in ``utils`` so that both
``data`` and ``modeling`` (preprocessing, the linear probe's feature cache) use it without
``modeling`` importing ``data``; :mod:`samantics_d2.data.io` re-exports both.
"""
from __future__ import annotations

import logging

import numpy as np
from iopath.common.file_io import PathManager as _PathManagerClass
from PIL import Image, ImageOps, UnidentifiedImageError

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


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert an image array to RGB ``uint8``.

    Args:
        image: ``[H, W]`` or ``[H, W, 1]`` (gray), ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA, the
            alpha channel is dropped), of dtype ``uint8``, ``uint16`` (scaled to 8 bit), ``bool``
            (``True`` -> 255) or float with values in ``[0, 1]``.

    Returns:
        ``[H, W, 3]`` ``uint8``, C-contiguous and writable.

    Raises:
        ValueError: any other shape or dtype, or float values outside ``[0, 1]``.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(
            f"to_rgb_uint8 got an array of shape {image.shape} (dtype {image.dtype}); expected [H, W] or "
            "[H, W, C] with C in (1, 3, 4) and H, W > 0."
        )
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype == np.uint8:
        out = image
    elif image.dtype == np.uint16:
        out = np.round(image.astype(np.float32) / 257.0).astype(np.uint8)
    elif image.dtype == np.bool_:
        out = image.astype(np.uint8) * 255
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all() or image.min() < 0.0 or image.max() > 1.0:
            raise ValueError(
                f"to_rgb_uint8 got a float image (shape {image.shape}, dtype {image.dtype}) with values in "
                f"[{np.nanmin(image)}, {np.nanmax(image)}] or non-finite values; expected values in [0, 1]. "
                "Divide by 255 first if it holds 0..255 values, or pass it as uint8."
            )
        out = np.round(image * 255.0).astype(np.uint8)
    else:
        raise ValueError(
            f"to_rgb_uint8 got an array of dtype {image.dtype} (shape {image.shape}); expected uint8, uint16, "
            "bool or float in [0, 1]."
        )
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    out = np.ascontiguousarray(out)
    return out if out.flags.writeable else out.copy()  # arrays from PIL are read-only
