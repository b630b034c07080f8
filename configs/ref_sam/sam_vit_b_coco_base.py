# RefSAM over a frozen sam_vit_b, trained on the 60 COCO-FSOD base classes; evaluated on the 20 novel
# (never seen) classes of COCO val with 10-shot references.
from ..common.ref_sam import base_only, dataloader, lr_multiplier, model, optimizer, train, use_sam

# ViT-B's global-attention blocks feed the neck, one level each.
use_sam(model, "sam_vit_b", feature_names=["block2", "block5", "block8", "block11"])
base_only(model, dataloader)
train.output_dir = "./output/ref_sam/sam_vit_b_coco_base"
