# Oracle: SAM prompted with the ground-truth boxes instead of the point grid (mask and classification
# quality with perfect localisation), COCO-FSOD novel classes, 10-shot.
from samantics_d2.d2 import LazyCall as L
from samantics_d2.data.mapper import DetectionMapper

from ..common.training_free import dataloader, model, train

model.reference_bank.references = "coco_2017_train_novel_ref30_seed0"
model.reference_bank.shots = 10
model.prompt_mode = "gt_boxes"
# is_train=True keeps the ground-truth instances in the inputs; no augmentation, so they stay in
# image coordinates.
dataloader.test.mapper = L(DetectionMapper)(is_train=True, augmentations=[])
train.output_dir = "./output/training_free/coco_fsod_novel_gt_boxes"
