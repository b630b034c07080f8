# Image encoders as Detectron2 backbones: one entry per architecture and weight tag.
#
#   <tag>          the published architecture with its official weights, read strictly from
#                  $SAMANTICS_WEIGHTS/<official file name> (file names: samantics_d2/modeling/catalog.py);
#                  pretrained=False gives the same architecture with random weights.
#   <family>_tiny  the same structure at depth 2 / width 32 with random weights (tests, CPU demos).
#
# Use in an experiment config:
#     from ..common.backbones import dinov2_vitl14 as backbone
#     backbone.input_size = 518          # DINOv2's own 37x37 grid ("No Time to Train")
#     backbone.fit = "resize_square"     # whole image, no centre crop
# A model built elsewhere takes official weights with
#     L(load_encoder_weights)(model=L(SAMBackbone)(variant="vit_b", out_features=[...]), weights="sam_vit_b")
from samantics_d2.d2 import LazyCall as L
from samantics_d2.modeling.backbone import (
    CLIPBackbone,
    CLIPConvNeXtBackbone,
    CLIPResNetBackbone,
    DINOv2Backbone,
    HQSAMBackbone,
    SAM2Backbone,
    SAMBackbone,
    build_encoder,
)

# --- SAM (segment_anything), stride-16 neck map; RefSAM adds out_features=[..., "block2", ...]
sam_vit_b = L(build_encoder)(tag="sam_vit_b", pretrained=True)
sam_vit_l = L(build_encoder)(tag="sam_vit_l", pretrained=True)
sam_vit_h = L(build_encoder)(tag="sam_vit_h", pretrained=True)

# --- HQ-SAM (segment_anything_hq)
hq_sam_vit_b = L(build_encoder)(tag="hq_sam_vit_b", pretrained=True)
hq_sam_vit_l = L(build_encoder)(tag="hq_sam_vit_l", pretrained=True)
hq_sam_vit_h = L(build_encoder)(tag="hq_sam_vit_h", pretrained=True)

# --- SAM 2 and SAM 2.1 (sam2): same Hiera + FPN architectures, different weights
sam2_hiera_t = L(build_encoder)(tag="sam2_hiera_t", pretrained=True)
sam2_hiera_s = L(build_encoder)(tag="sam2_hiera_s", pretrained=True)
sam2_hiera_b_plus = L(build_encoder)(tag="sam2_hiera_b+", pretrained=True)
sam2_hiera_l = L(build_encoder)(tag="sam2_hiera_l", pretrained=True)
sam2_1_hiera_t = L(build_encoder)(tag="sam2.1_hiera_t", pretrained=True)
sam2_1_hiera_s = L(build_encoder)(tag="sam2.1_hiera_s", pretrained=True)
sam2_1_hiera_b_plus = L(build_encoder)(tag="sam2.1_hiera_b+", pretrained=True)
sam2_1_hiera_l = L(build_encoder)(tag="sam2.1_hiera_l", pretrained=True)

# --- DINOv2 (timm trunk, hub weights), stride-14 patch grid + CLS token; default 224 px centre crop
dinov2_vits14 = L(build_encoder)(tag="dinov2_vits14", pretrained=True)
dinov2_vitb14 = L(build_encoder)(tag="dinov2_vitb14", pretrained=True)
dinov2_vitl14 = L(build_encoder)(tag="dinov2_vitl14", pretrained=True)
dinov2_vitg14 = L(build_encoder)(tag="dinov2_vitg14", pretrained=True)
dinov2_vits14_reg = L(build_encoder)(tag="dinov2_vits14_reg", pretrained=True)
dinov2_vitb14_reg = L(build_encoder)(tag="dinov2_vitb14_reg", pretrained=True)
dinov2_vitl14_reg = L(build_encoder)(tag="dinov2_vitl14_reg", pretrained=True)
dinov2_vitg14_reg = L(build_encoder)(tag="dinov2_vitg14_reg", pretrained=True)

# --- CLIP (open_clip vision tower, OpenAI weights), patch grid + projected embedding
clip_vit_b32_openai = L(build_encoder)(tag="clip_vit_b32_openai", pretrained=True)
clip_vit_b16_openai = L(build_encoder)(tag="clip_vit_b16_openai", pretrained=True)
clip_vit_l14_openai = L(build_encoder)(tag="clip_vit_l14_openai", pretrained=True)
clip_vit_l14_336_openai = L(build_encoder)(tag="clip_vit_l14_336_openai", pretrained=True)
# convolutional CLIPs (dense map + CLIP's own head per mask: DensePoolRecognizer, issue 14)
clip_rn50x16_openai = L(build_encoder)(tag="clip_rn50x16_openai", pretrained=True)
clip_convnext_large_d_320_laion2b = L(build_encoder)(tag="clip_convnext_large_d_320_laion2b", pretrained=True)

# --- tiny random variants (same structure as the variant named, depth 2 / width 32)
sam_tiny = L(SAMBackbone)(variant="vit_b", size="tiny")
hq_sam_tiny = L(HQSAMBackbone)(variant="vit_b", size="tiny")
sam2_tiny = L(SAM2Backbone)(variant="hiera_t", size="tiny")
dinov2_tiny = L(DINOv2Backbone)(variant="vits14", size="tiny")
dinov2_reg_tiny = L(DINOv2Backbone)(variant="vits14_reg", size="tiny")
dinov2_swiglu_reg_tiny = L(DINOv2Backbone)(variant="vitg14_reg", size="tiny")
clip_b32_tiny = L(CLIPBackbone)(variant="vit_b32", size="tiny")
clip_b16_tiny = L(CLIPBackbone)(variant="vit_b16", size="tiny")
clip_l14_tiny = L(CLIPBackbone)(variant="vit_l14", size="tiny")
clip_rn50x16_tiny = L(CLIPResNetBackbone)(variant="rn50x16", size="tiny")
clip_convnext_tiny = L(CLIPConvNeXtBackbone)(variant="convnext_large_d_320", size="tiny")
