"""``add_samantics_config``: this project's keys added to a Detectron2 yacs config (the keys and the
helpers the models' ``from_config`` use are in :mod:`samantics_d2.yacs_config`; this function is in
its own module because it reads the models' signatures, and the models import those helpers)."""
from __future__ import annotations

from .d2 import CfgNode
from .modeling.backbone import build_encoder
from .modeling.linear_probe import LinearProbe
from .modeling.meta_arch import RefSAM, TinySegmenter, TrainingFreeSegmenter
from .modeling.meta_arch.click import ClickSegmenter
from .modeling.meta_arch.open_vocab import OpenVocabPromptedSegmenter
from .modeling.meta_arch.sam_prompt_training import PromptableSamTrainer
from .modeling.proposals import PointGridProposals
from .modeling.proposals.granularity import MultiGranularityDecoder
from .modeling.ref_sam import (
    DeformableTransformer,
    HungarianMatcher,
    MultiLevelNeck,
    RefDETRHead,
    SetCriterion,
    TokenFuser,
)
from .modeling.semantic import MemoryBankConfig, OpenVocabClassifier, PrototypeClassifier, load_or_build_text_prototypes
from .modeling.semantic.clip_recognition import MASK_RECOGNIZER_REGISTRY
from .yacs_config import options_node, registry_node

__all__ = ["add_samantics_config"]


def add_samantics_config(cfg: CfgNode) -> None:
    """Add this project's keys (``cfg.MODEL.SAMANTICS``, see the module docstring) to a yacs config.

    Call it on ``get_cfg()`` before ``merge_from_file``, as Mask2Former's ``add_maskformer2_config``.
    """
    opts = cfg.MODEL.SAMANTICS = CfgNode()
    opts.BACKBONE = options_node(build_encoder, TAG="sam_vit_b")
    # The "No Time to Train" semantic encoder: DINOv2 ViT-L/14 on a 37 x 37 patch grid.
    opts.SEMANTIC_ENCODER = options_node(build_encoder, TAG="dinov2_vitl14", INPUT_SIZE=518)
    opts.PROPOSALS = options_node(PointGridProposals, exclude=["decoder"])
    # The reference set (yacs_reference_bank): REFERENCES, SHOTS, and where its features are stored.
    built = ["proposer", "reference_bank"]
    opts.TRAINING_FREE = options_node(
        TrainingFreeSegmenter, exclude=built + ["semantic_encoder", "classifier", "memory_bank"], REFERENCES="",
        SHOTS=None, MEMORY_BANK_PATH=None,
    )
    opts.TRAINING_FREE.CLASSIFIER = options_node(PrototypeClassifier)
    opts.TRAINING_FREE.MEMORY_BANK = options_node(MemoryBankConfig)
    opts.REF_SAM = options_node(
        RefSAM, exclude=built + ["fuser", "neck", "head", "criterion"], D_MODEL=256, REFERENCES=None, EMBEDS_PATH=None,
        SHOTS=None,
    )
    opts.REF_SAM.FUSER = options_node(TokenFuser, exclude=["num_tokens", "token_dim", "out_dim"])
    opts.REF_SAM.NECK = options_node(MultiLevelNeck, exclude=["input_shapes", "out_channels"])
    opts.REF_SAM.TRANSFORMER = options_node(DeformableTransformer, exclude=["d_model", "n_levels"])
    opts.REF_SAM.HEAD = options_node(RefDETRHead, exclude=["transformer"])
    opts.REF_SAM.MATCHER = options_node(HungarianMatcher)
    opts.REF_SAM.LOSS = options_node(SetCriterion, exclude=["matcher"])
    opts.LINEAR_PROBE = options_node(
        LinearProbe, exclude=["backbone", "num_classes", "in_features", "round_features_to"], POOLING="cls"
    )
    opts.SAM_TRAINER = options_node(PromptableSamTrainer, exclude=["proposer"])
    opts.TINY_SEGMENTER = options_node(TinySegmenter, exclude=["num_classes", "pixel_mean", "pixel_std"])
    # LABELS: label the first click's candidates with the config's TrainingFreeSegmenter (sharing the SAM).
    opts.CLICK = options_node(ClickSegmenter, exclude=["backbone", "granularity", "label_model"], LABELS=False)
    opts.CLICK.GRANULARITY = options_node(MultiGranularityDecoder, exclude=["decoder"])
    opts.OPEN_VOCAB = options_node(OpenVocabPromptedSegmenter, exclude=["proposer", "classifier"])
    # The CLIP of configs/common/open_vocab.py; its text tower comes from the same TAG / SIZE / WEIGHTS / PRETRAINED.
    opts.OPEN_VOCAB.CLIP = options_node(build_encoder, TAG="clip_convnext_large_d_320_laion2b")
    opts.OPEN_VOCAB.RECOGNIZER = registry_node(MASK_RECOGNIZER_REGISTRY, default="DensePoolRecognizer", exclude=["clip"])
    opts.OPEN_VOCAB.TEXT_PROTOTYPES = options_node(load_or_build_text_prototypes, exclude=["encoder", "class_names"])
    # Text prototypes only on the yacs path (no reference prototypes, hence no text_weight).
    opts.OPEN_VOCAB.CLASSIFIER = options_node(
        OpenVocabClassifier,
        exclude=["recognizer", "text_prototypes", "class_names", "reference_prototypes", "reference_classes", "text_weight"],
    )
