# RefSAM over a frozen hq_sam_vit_h (official weights), trained and evaluated on all 80 COCO classes.
from ..common.ref_sam import dataloader, lr_multiplier, model, optimizer, train, use_sam

# ViT-H's global-attention blocks feed the neck, one level each.
use_sam(model, "hq_sam_vit_h", feature_names=["block7", "block15", "block23", "block31"])
train.output_dir = "./output/ref_sam/hq_sam_vit_h_coco"
