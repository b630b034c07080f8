# RefSAM over a frozen sam_vit_h, trained on the 60 COCO-FSOD base classes; evaluated on the 20 novel
# (never seen) classes of COCO val with 10-shot references.
from ..common.ref_sam import base_only, dataloader, lr_multiplier, model, optimizer, train, use_sam

# ViT-H's global-attention blocks feed the neck, one level each.
use_sam(model, "sam_vit_h", feature_names=["block7", "block15", "block23", "block31"])
base_only(model, dataloader)
train.output_dir = "./output/ref_sam/sam_vit_h_coco_base"
