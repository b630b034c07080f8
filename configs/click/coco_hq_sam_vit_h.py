# The COCO click benchmark (configs/click/coco_sam_vit_h.py) with HQ-SAM ViT-H (its HQ token's masks).
# HQ-SAM's decoder also reads the first global-attention block (ViT-H: block7): the backbone outputs are the
# decoder's, resolved from the tag and size when the config is built.
from samantics_d2.d2 import LazyCall as L
from samantics_d2.predictor import prompt_decoder_features

from .coco_sam_vit_h import dataloader, model, train

model.backbone.tag = "hq_sam_vit_h"
model.backbone.size = "full"
model.backbone.out_features = L(prompt_decoder_features)(tag="${..tag}", size="${..size}")
train.output_dir = "./output/click/coco_hq_sam_vit_h"
