# COCO open-vocabulary 65, box prompts: SAM ViT-H + OpenAI CLIP ViT-L/14 on square crops around each
# mask (20 % context, outside the mask greyed to CLIP's mean colour): OVSAM's "image-crop" baseline
# (published Acc 46.2, points 24.5). Mask-pooled ViT features recognise far worse (OVSAM: 14.3).
from samantics_d2.d2 import LazyCall as L
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.semantic.clip_recognition import CropRecognizer

from ..common.open_vocab import dataloader, model, train

model.classifier.recognizer = L(CropRecognizer)(
    clip=L(build_encoder)(tag="clip_vit_l14_openai", size="full", pretrained=True),
    context=0.2,
    background="grey",
    chunk_size=64,
)
train.output_dir = "./output/open_vocab/coco_ov_box_sam_vit_h_vit_l14_crops"
