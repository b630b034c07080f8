# As coco_ov_box_sam_vit_h_convnext_l.py with point prompts: each instance's centre point (the pixel
# farthest from the border of its zero-padded mask), one foreground click (published feature-crop
# baseline with points: Acc 32.1).
from ..common.open_vocab import dataloader, model, train

dataloader.test.mapper.prompt = "point"
train.output_dir = "./output/open_vocab/coco_ov_point_sam_vit_h_convnext_l"
