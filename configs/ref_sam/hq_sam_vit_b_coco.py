# RefSAM over a frozen hq_sam_vit_b (official weights), trained and evaluated on all 80 COCO classes.
from ..common.ref_sam import dataloader, lr_multiplier, model, optimizer, train, use_sam

use_sam(model, "hq_sam_vit_b")
train.output_dir = "./output/ref_sam/hq_sam_vit_b_coco"
