# RefSAM over a frozen sam_vit_h, trained on the 60 COCO-FSOD base classes; evaluated on the 20 novel
# (never seen) classes of COCO val with 10-shot references.
from ..common.ref_sam import base_only, dataloader, lr_multiplier, model, optimizer, train, use_sam

use_sam(model, "sam_vit_h")
base_only(model, dataloader)
train.output_dir = "./output/ref_sam/sam_vit_h_coco_base"
