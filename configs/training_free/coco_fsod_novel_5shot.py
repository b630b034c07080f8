# COCO-FSOD novel classes (the 20 PASCAL VOC classes), 5-shot, the "No Time to Train" protocol:
# SAM 2.1 Hiera-L proposals + DINOv2 ViT-L/14 prototypes (configs/common/training_free.py).
# The memory bank is computed once for the 30 references per class of the seed's reference set;
# k-shot uses the first k of them (sorted by area). Seed study: model.reference_bank.references=coco_2017_train_novel_ref30_seed{0..9}.
from ..common.training_free import dataloader, model, train

model.reference_bank.references = "coco_2017_train_novel_ref30_seed0"
model.reference_bank.shots = 5
train.output_dir = "./output/training_free/coco_fsod_novel_5shot"
