# The COCO click benchmark (configs/click/coco_sam_vit_h.py) with SAM ViT-L.
from .coco_sam_vit_h import dataloader, model, train

model.backbone.tag = "sam_vit_l"
train.output_dir = "./output/click/coco_sam_vit_l"
