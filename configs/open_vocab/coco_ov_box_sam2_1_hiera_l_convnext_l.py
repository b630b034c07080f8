# COCO open-vocabulary 65, box prompts, with SAM 2.1 Hiera-L masks (SAM2ImagePredictor's steps) and
# CLIP ConvNeXt-L mask pooling.
from ..common.open_vocab import dataloader, model, train

model.proposer.backbone.tag = "sam2.1_hiera_l"
model.proposer.backbone.out_features = ["p2", "p3", "p4"]  # the decoder's high-resolution features too
train.output_dir = "./output/open_vocab/coco_ov_box_sam2_1_hiera_l_convnext_l"
