# A tiny RefSAM trained on the synthetic shapes (base classes only) on CPU in a few minutes.
#
# The frozen tiny SAM (ViT depth 2, width 32, 128 px input: an 8x8 embedding of the 128 px
# images) is RANDOMLY INITIALISED: its box-prompted masks are meaningless, so box AP is the
# metric of this demo (segm AP is reported, not claimed). The fuser, neck and Deformable DETR head
# train. Seen classes: shapes_val_base (this file); unseen: tiny_shapes_novel.py, same weights.
#
#   python train_net.py --config-file configs/ref_sam/tiny_shapes.py
#   python train_net.py --config-file configs/ref_sam/tiny_shapes.py --eval-only \
#       train.init_checkpoint=output/ref_sam/tiny_shapes/model_final.pth
from fvcore.common.param_scheduler import MultiStepParamScheduler

from samantics_d2.d2 import LazyCall as L
from samantics_d2.data import shapes as _shapes

from ..common.ref_sam import dataloader, model, optimizer, train, use_tiny_sam

use_tiny_sam(model, input_size=128)  # 128 px images: an 8x8 embedding, levels 16x16, 8x8, 4x4
model.reference_bank.references = "shapes_train_ref5_seed0"  # all 8 classes; matched to the evaluated classes by name
model.reference_bank.shots = 5
model.reference_batch_size = 16

dataloader.train.dataset.names = "shapes_train_base"  # the 5 base classes: the novel ones stay unseen
dataloader.train.mapper.categories = list(_shapes.SHAPES_SPLITS["base"])
dataloader.train.mapper.max_categories = 2
dataloader.train.mapper.num_negatives = 1
dataloader.train.mapper.min_area = 64
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "shapes_val_base"
dataloader.test.num_workers = 0
dataloader.evaluator.use_fast_impl = False

optimizer.lr = 1e-3
optimizer.weight_decay = 1e-4
optimizer.max_norm = 1.0

# 500 iterations x 4 images = 31 epochs of the 64-image shapes_train_base; lr x0.1 after 400.
train.max_iter = 500
lr_multiplier = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[400, 500])
train.eval_period = 500
train.log_period = 50
train.checkpointer = dict(period=250, max_to_keep=2)
train.device = "cpu"
train.seed = 0
train.output_dir = "./output/ref_sam/tiny_shapes"
