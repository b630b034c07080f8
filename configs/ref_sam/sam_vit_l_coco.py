# RefSAM over a frozen sam_vit_l (official weights), trained and evaluated on all 80 COCO classes.
from ..common.ref_sam import dataloader, lr_multiplier, model, optimizer, train, use_sam

# ViT-L's global-attention blocks feed the neck, one level each.
use_sam(model, "sam_vit_l", feature_names=["block5", "block11", "block17", "block23"])
train.output_dir = "./output/ref_sam/sam_vit_l_coco"
