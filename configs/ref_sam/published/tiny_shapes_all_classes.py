# The tiny shapes RefSAM with the authors' model and training (published/tiny_shapes.py), evaluated as
# ours is (tiny_shapes.py): every class asked with its 5-shot shapes_train_ref5_seed0 prompt, top-100 per image:
#   python train_net.py --config-file configs/ref_sam/published/tiny_shapes_all_classes.py --eval-only \
#       train.init_checkpoint=output/ref_sam/published/tiny_shapes/model_final.pth
from ...common.ref_sam import published_model, published_training
from ..tiny_shapes import dataloader, lr_multiplier, model, optimizer, train

published_model(model)
published_training(dataloader)
train.output_dir = "./output/ref_sam/published/tiny_shapes"
