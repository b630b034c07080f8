# RefSAM over a frozen sam_vit_b (official weights), trained and evaluated on all 80 COCO classes.
from ..common.ref_sam import dataloader, lr_multiplier, model, optimizer, train, use_sam

# ViT-B's global-attention blocks feed the neck, one level each.
use_sam(model, "sam_vit_b", feature_names=["block2", "block5", "block8", "block11"])
train.output_dir = "./output/ref_sam/sam_vit_b_coco"
