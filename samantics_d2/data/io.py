"""Image reading (re-exported from :mod:`samantics_d2.utils.image`, where it lives so that
``modeling`` can read images without importing ``data``)."""
from ..utils.image import read_image, to_rgb_uint8

__all__ = ["read_image", "to_rgb_uint8"]
