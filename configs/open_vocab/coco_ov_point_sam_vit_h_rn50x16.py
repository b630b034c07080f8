# As coco_ov_box_sam_vit_h_rn50x16.py with centre-point prompts.
from ..common.open_vocab import dataloader, model, train

model.classifier.recognizer.clip.tag = "clip_rn50x16_openai"
dataloader.test.mapper.prompt = "point"
train.output_dir = "./output/open_vocab/coco_ov_point_sam_vit_h_rn50x16"
