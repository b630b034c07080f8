# Our tiny shapes RefSAM (tiny_shapes.py) evaluated with the authors' "standard test": one random
# shapes_val_base reference per present class, drawn per image, top-100 per (image, class):
#   python train_net.py --config-file configs/ref_sam/tiny_shapes_standard_test.py --eval-only \
#       train.init_checkpoint=output/ref_sam/tiny_shapes/model_final.pth
from ..common.ref_sam import standard_test
from .tiny_shapes import dataloader, lr_multiplier, model, optimizer, train

standard_test(model, dataloader)
