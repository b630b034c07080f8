# COCO open-vocabulary 65, box prompts: SAM ViT-H + OpenAI CLIP RN50x16 (the CLIP of OVSAM's
# published numbers), mask pooling of its dense map, then its attention pool restricted to the mask.
from ..common.open_vocab import dataloader, model, train

model.classifier.recognizer.clip.tag = "clip_rn50x16_openai"
train.output_dir = "./output/open_vocab/coco_ov_box_sam_vit_h_rn50x16"
