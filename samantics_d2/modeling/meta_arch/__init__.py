"""Registered meta-architectures (``META_ARCH_REGISTRY``)."""
from .click import ClickSegmenter
from .open_vocab import OpenVocabPromptedSegmenter
from .ref_sam import RefSAM, build_optimizer_with_grad_clip, ref_sam_lr_factor, ref_sam_lr_factor_func
from .sam_prompt_training import PromptableSamTrainer
from .tiny_segmenter import TinySegmenter
from .training_free import SamProposer, TrainingFreeSegmenter, build_sam_proposer

__all__ = [
    "ClickSegmenter",
    "OpenVocabPromptedSegmenter",
    "PromptableSamTrainer",
    "RefSAM",
    "SamProposer",
    "TinySegmenter",
    "TrainingFreeSegmenter",
    "build_optimizer_with_grad_clip",
    "build_sam_proposer",
    "ref_sam_lr_factor",
    "ref_sam_lr_factor_func",
]
