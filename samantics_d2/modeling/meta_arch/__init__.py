"""Registered meta-architectures (``META_ARCH_REGISTRY``)."""
from .tiny_segmenter import TinySegmenter

__all__ = ["TinySegmenter"]
