# The COCO click benchmark (configs/click/coco_sam_vit_h.py) with SAM ViT-B.
from .coco_sam_vit_h import dataloader, model, train

model.backbone.tag = "sam_vit_b"
train.output_dir = "./output/click/coco_sam_vit_b"
