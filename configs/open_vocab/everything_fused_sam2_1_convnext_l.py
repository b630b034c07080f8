# "Segment everything with labels" from words AND examples, fused: everything_sam2_1_convnext_l.py
# plus the training-free DINOv2 ViT-L/14 prototypes of a reference set. Per class, the text and the
# DINOv2 class distributions are fused (weighted geometric mean, text_weight 0.5); classes without
# references are labelled by words only. Here: the 80 COCO classes by name, the 20 novel ones also by
# 30 references each (coco_2017_train_novel_ref30_seed0), on COCO val2017.
# tools/segment.py --classes/--vocabulary with --references uses it (the label space: your words,
# then the reference classes not among them).
from ..common.training_free import model as training_free
from .everything_sam2_1_convnext_l import dataloader, model, train

model.semantic_encoder = training_free.semantic_encoder  # DINOv2 ViT-L/14, 518 px
model.reference_bank = training_free.reference_bank
model.reference_bank.dataset_name = "${dataloader.test.dataset.names}"  # the label space: the 80 COCO classes
model.image_logit_scale = 100.0  # the DINOv2 cosines' softmax scale
train.output_dir = "./output/open_vocab/everything_fused_sam2_1_convnext_l"
del training_free  # (imported for its DINOv2 and reference nodes only)
