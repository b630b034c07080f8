"""Registered meta-architectures (``META_ARCH_REGISTRY``)."""
from .tiny_segmenter import TinySegmenter
from .training_free import SamProposer, TrainingFreeSegmenter, build_sam_proposer

__all__ = ["SamProposer", "TinySegmenter", "TrainingFreeSegmenter", "build_sam_proposer"]
