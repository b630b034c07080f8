# A tiny SAM (image encoder + prompt decoder at depth 2 / width 32, random init) trained on the
# synthetic shapes dataset to segment the shape under a point prompt (PromptableSamTrainer: SAM's
# recipe of best-of-3 masks, focal + dice + IoU-prediction losses). It exists because no pretrained
# SAM can be downloaded here: the training-free demo (configs/training_free/shapes_tiny.py) loads
# its checkpoint (proposer.* keys) as its SAM.
from fvcore.common.param_scheduler import CosineParamScheduler

from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import WarmupParamScheduler
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch import build_sam_proposer
from samantics_d2.data.mapper import DetectionMapper
from samantics_d2.modeling.meta_arch.sam_prompt_training import PromptableSamTrainer, ProposalRecallEvaluator

from ..common.data.shapes import dataloader
from ..common.optim import AdamW as optimizer
from ..common.train import train

model = L(PromptableSamTrainer)(
    proposer=L(build_sam_proposer)(
        # 256 px input: 16 x 16 tokens and 64 x 64 low-resolution masks for the 128 px shapes images.
        backbone=L(build_encoder)(tag="sam_vit_b", size="tiny", input_size=256),
        decoder_weights=None,
        points_per_side=16,  # the proposals of the training-free pipeline
        points_per_batch=64,
        pred_iou_thresh=0.4,
    ),
    points_per_image=16,  # point prompts sampled inside ground-truth masks per image and step
)

optimizer.lr = 1e-2
optimizer.weight_decay = 0.01
dataloader.train.total_batch_size = 4

# 400 iterations x 4 images = 25 epochs of the 64-image shapes_train split.
train.max_iter = 400
# After training: class-agnostic recall of the point-grid proposals on shapes_val (best IoU per GT
# instance, recall at IoU 0.5 / 0.75); the GT masks come from the training mapper without augmentation.
dataloader.test.mapper = L(DetectionMapper)(is_train=True, augmentations=[])
dataloader.evaluator = L(ProposalRecallEvaluator)()
train.eval_period = 0  # only after training
train.log_period = 20
train.checkpointer = dict(period=200, max_to_keep=2)
train.output_dir = "./output/quick_tiny_sam"
train.seed = 0

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(CosineParamScheduler)(start_value=1.0, end_value=0.0),
    warmup_length=20 / 400,  # 20 iterations
    warmup_factor=0.01,
)
