"""Class-agnostic mask proposals from SAM, HQ-SAM and SAM 2: the promptable decoders beside our
image encoders (:mod:`.prompt_decoder`) and point-grid / box-prompted proposals (:mod:`.point_grid`).

Typical use, one encoder forward per image and all prompts through the decoder together::

    backbone = build_encoder("sam2.1_hiera_l", out_features=["p2", "p3", "p4"])
    proposals = PointGridProposals(decoder=build_prompt_decoder(backbone, weights="sam2.1_hiera_l"))
    x, fits = backbone.prepare_with_fits(images)
    feats = backbone(x)
    per_image = [proposals({k: v[i] for k, v in feats.items()}, fits[i]) for i in range(len(fits))]
"""
from . import prompt_decoder as _prompt_decoder
from .granularity import ClickSet, GranularityMasks, MultiGranularityDecoder
from .point_grid import MaskProposals, PointGridProposals, mask_logits_to_boxes, point_grid, stability_score
from .prompt_decoder import *  # noqa: F401,F403  (its __all__: the decoders, their builder and loader)

__all__ = sorted(
    ["ClickSet", "GranularityMasks", "MaskProposals", "MultiGranularityDecoder", "PointGridProposals",
     "mask_logits_to_boxes", "point_grid", "stability_score"]
    + _prompt_decoder.__all__
)
