# RefSAM over a frozen hq_sam_vit_l, trained on the 60 COCO-FSOD base classes; evaluated on the 20 novel
# (never seen) classes of COCO val with 10-shot references.
from ..common.ref_sam import base_only, dataloader, lr_multiplier, model, optimizer, train, use_sam

# ViT-L's global-attention blocks feed the neck, one level each.
use_sam(model, "hq_sam_vit_l", feature_names=["block5", "block11", "block17", "block23"])
base_only(model, dataloader)
train.output_dir = "./output/ref_sam/hq_sam_vit_l_coco_base"
