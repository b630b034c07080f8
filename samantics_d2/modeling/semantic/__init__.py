"""The semantic side of the training-free pipeline: reference memory bank, prototypes, mask
resampling and pooling, and the prototype classifier with its semantic-aware merge.

See DESIGN.md, "Data flow of the training-free pipeline".
"""
from .classifier import MERGE_MODES, ClassifiedProposals, PrototypeClassifier, prototype_scores, soft_merge_scores
from .mask_ops import (
    connected_component_areas,
    identity_fit,
    mask_intersections,
    mask_iou_matrix,
    mask_overlap_over_area,
    mask_pooling,
    masks_to_boxes,
    masks_to_original,
    remove_small_regions,
    resample_masks,
)
from .memory_bank import (
    AGGREGATIONS,
    CROP_MODES,
    MEMORY_BANK_FORMAT,
    MemoryBank,
    MemoryBankConfig,
    crop_mask_weights,
    crop_padded,
    kmeans,
    reference_preprocess,
    square_context_window,
    weights_identity,
)

__all__ = [
    "AGGREGATIONS",
    "CROP_MODES",
    "ClassifiedProposals",
    "MEMORY_BANK_FORMAT",
    "MERGE_MODES",
    "MemoryBank",
    "MemoryBankConfig",
    "PrototypeClassifier",
    "connected_component_areas",
    "crop_mask_weights",
    "crop_padded",
    "identity_fit",
    "kmeans",
    "mask_intersections",
    "mask_iou_matrix",
    "mask_overlap_over_area",
    "mask_pooling",
    "masks_to_boxes",
    "masks_to_original",
    "prototype_scores",
    "reference_preprocess",
    "remove_small_regions",
    "resample_masks",
    "soft_merge_scores",
    "square_context_window",
    "weights_identity",
]
