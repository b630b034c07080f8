# COCO val, all 80 classes, the "There is no SAMantics!" protocol: SAM ViT-H point-grid proposals
# labelled by DINOv2 ViT-L/14 prototypes from 10 references per class.
from ..common.training_free import dataloader, model, train

model.proposer.backbone.tag = "sam_vit_h"
model.proposer.backbone.out_features = None  # SAM's decoder reads the 256-d neck map
model.reference_bank.references = "coco_2017_train_ref10_seed0"
model.reference_bank.shots = 10
dataloader.test.dataset.names = "coco_2017_val"
train.output_dir = "./output/training_free/coco_all_sam_vit_h"
