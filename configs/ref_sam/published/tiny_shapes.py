# The tiny shapes RefSAM (configs/ref_sam/tiny_shapes.py: same tiny random SAM, head sizes, batch 4 and
# 500 iterations) with the authors' recipe: neck levels all at the SAM's stride, encoder FFN 2 x d_model,
# -2 w/h bias on the first box branch only, 4 categories and no negative per image, references flipped
# like the targets, mask-area reference pool; evaluated with the standard test (one random
# shapes_val_base reference per present class, drawn per image) and top-100 per (image, class).
#   python train_net.py --config-file configs/ref_sam/published/tiny_shapes.py
#   python train_net.py --config-file configs/ref_sam/published/tiny_shapes.py --eval-only \
#       train.init_checkpoint=output/ref_sam/published/tiny_shapes/model_final.pth
from ...common.ref_sam import published_recipe
from ..tiny_shapes import dataloader, lr_multiplier, model, optimizer, train

published_recipe(model, dataloader)
train.output_dir = "./output/ref_sam/published/tiny_shapes"
