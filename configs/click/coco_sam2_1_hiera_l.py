# The COCO click benchmark (configs/click/coco_sam_vit_h.py) with SAM 2.1 Hiera-L (its image predictor's
# decoder steps: the high-resolution features p2, p3 and the no-memory embedding).
from .coco_sam_vit_h import dataloader, model, train

model.backbone.tag = "sam2.1_hiera_l"
model.backbone.out_features = ["p2", "p3", "p4"]
train.output_dir = "./output/click/coco_sam2_1_hiera_l"
