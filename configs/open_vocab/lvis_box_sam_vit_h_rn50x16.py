# As lvis_box_sam_vit_h_convnext_l.py with OpenAI CLIP RN50x16 (the CLIP of OVSAM's published numbers).
from .lvis_box_sam_vit_h_convnext_l import dataloader, model, train

model.classifier.recognizer.clip.tag = "clip_rn50x16_openai"
train.output_dir = "./output/open_vocab/lvis_box_sam_vit_h_rn50x16"
