# The authors' RefSAM recipe over a frozen hq_sam_vit_b (reference_sam/work_configs/RefSAM_det_coco_base.py),
# trained and evaluated on all 80 COCO classes with the published "standard test" (one random val2017
# reference per present class, drawn per image; no cap on the classes per image for ViT-B).
# Our two fixes stay on (RGB input, references paired with GT by category id); call
# published_defects(model, dataloader) to reproduce them too. docs/ref_sam.md lists every value.
#   python train_net.py --config-file configs/ref_sam/published/hq_sam_vit_b_coco.py
#   python train_net.py --config-file configs/ref_sam/published/hq_sam_vit_b_coco.py --eval-only train.init_checkpoint=<...>
from ...common.ref_sam import dataloader, model, optimizer, published_recipe, published_schedule, train, use_sam

use_sam(model, "hq_sam_vit_b", feature_names=["block2", "block5", "block8", "block11"])  # ViT-B's global-attention blocks
published_recipe(model, dataloader, test_max_categories=None)
lr_multiplier = published_schedule(dataloader, train, batch_size=48)  # 16 GPUs x 3
train.output_dir = "./output/ref_sam/published/hq_sam_vit_b_coco"
