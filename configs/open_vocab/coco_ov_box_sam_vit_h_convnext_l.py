# COCO open-vocabulary 65 (48 base / 17 novel), box prompts: SAM ViT-H masks, CLIP ConvNeXt-L
# (LAION-2B, 320) mask pooling of the dense map at long side 1024 (OVSAM's "feature-crop" baseline
# with a convolutional CLIP). Published for comparison (SAM-H + CLIP RN50x16): feature-crop Acc 55.1,
# OVSAM 81.5 / 84.0 / 84.3 (docs/open_vocabulary.md).
from ..common.open_vocab import dataloader, model, train

train.output_dir = "./output/open_vocab/coco_ov_box_sam_vit_h_convnext_l"
