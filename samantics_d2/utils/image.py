"""Image arrays to RGB ``uint8``: shared by image reading (:mod:`samantics_d2.data.io`) and the
encoders' preprocessing (:mod:`samantics_d2.modeling.preprocess`), which does not import ``data``."""
from __future__ import annotations

import numpy as np

__all__ = ["to_rgb_uint8"]


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
