# A tiny per-pixel segmenter on the synthetic shapes dataset: trains in well under a minute on 2 CPU
# cores. It exists to exercise the engine end to end (training, checkpoints, resume, DDP, COCO
# evaluation); see samantics_d2/modeling/meta_arch/tiny_segmenter.py.
from fvcore.common.param_scheduler import MultiStepParamScheduler

from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import WarmupParamScheduler
from samantics_d2.data.shapes import SHAPES_CLASSES
from samantics_d2.modeling.meta_arch import TinySegmenter

from ..common.data.shapes import dataloader
from ..common.optim import AdamW as optimizer
from ..common.train import train

model = L(TinySegmenter)(num_classes=len(SHAPES_CLASSES), width=32)

optimizer.lr = 3e-3
optimizer.weight_decay = 1e-4

dataloader.train.total_batch_size = 8

# 200 iterations x 8 images = 25 epochs of the 64-image shapes_train split.
train.max_iter = 200
train.eval_period = 200
train.log_period = 20
train.checkpointer = dict(period=100, max_to_keep=3)
train.output_dir = "./output/quick_tiny_segmenter"
train.seed = 0

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[160, 200]),
    warmup_length=10 / 200,  # 10 iterations
    warmup_factor=0.01,
)
