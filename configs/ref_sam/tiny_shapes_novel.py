# The tiny shapes RefSAM evaluated on the 3 novel (never trained on) shape classes, with 5-shot
# references of those classes:
#   python train_net.py --config-file configs/ref_sam/tiny_shapes_novel.py --eval-only \
#       train.init_checkpoint=output/ref_sam/tiny_shapes/model_final.pth
from .tiny_shapes import dataloader, lr_multiplier, model, optimizer, train

dataloader.test.dataset.names = "shapes_val_novel"
model.reference_bank.references = "shapes_train_novel_ref5_seed0"
