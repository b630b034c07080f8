"""RefSAM's building blocks, independent of SAM: class-prompt fuser, multi-level neck, a Deformable
DETR head conditioned on the class prompt, Hungarian matcher and set losses. Pure PyTorch."""
from .deformable_attention import MSDeformAttn, multi_scale_deformable_attention
from .deformable_detr import DeformableTransformer, RefDETRHead, sine_position_embedding
from .losses import SetCriterion
from .matcher import HungarianMatcher, box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, generalized_box_iou
from .neck import MultiLevelNeck
from .token_fuser import TokenFuser

__all__ = [
    "DeformableTransformer",
    "HungarianMatcher",
    "MSDeformAttn",
    "MultiLevelNeck",
    "RefDETRHead",
    "SetCriterion",
    "TokenFuser",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "multi_scale_deformable_attention",
    "sine_position_embedding",
]
