# The authors' RefSAM recipe over a frozen hq_sam_vit_h (reference_sam/work_configs/RefSAM_det_coco_huge.py),
# trained and evaluated on all 80 COCO classes with the published "standard test" (one random val2017
# reference per present class, drawn per image; at most 6 classes per image: 6 for ViT-H).
# Our two fixes stay on (RGB input, references paired with GT by category id); call
# published_defects(model, dataloader) to reproduce them too. docs/ref_sam.md lists every value.
#   python train_net.py --config-file configs/ref_sam/published/hq_sam_vit_h_coco.py
#   python train_net.py --config-file configs/ref_sam/published/hq_sam_vit_h_coco.py --eval-only train.init_checkpoint=<...>
from ...common.ref_sam import dataloader, model, optimizer, published_recipe, published_schedule, train, use_sam

use_sam(model, "hq_sam_vit_h", feature_names=["block7", "block15", "block23", "block31"])  # ViT-H's global-attention blocks
published_recipe(model, dataloader, test_max_categories=6)
lr_multiplier = published_schedule(dataloader, train, batch_size=28)  # 28 GPUs x 1
train.output_dir = "./output/ref_sam/published/hq_sam_vit_h_coco"
