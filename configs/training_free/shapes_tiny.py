# The demo: the training-free pipeline on the synthetic shapes dataset, on CPU, with
#  - the tiny SAM of configs/quick/tiny_sam_shapes.py (trained on shapes first: pass its checkpoint
#    as train.init_checkpoint, which fills proposer.*; tools/demo.py does both steps), and
#  - a tiny RANDOMLY INITIALISED DINOv2 as the semantic encoder (random features still separate
#    the colour-coded shape classes; nothing here says anything about the real DINOv2).
# 5 references per class from shapes_train, evaluated on shapes_val: the data and seed of
# shapes_tiny_random.py, with the trained SAM's architecture and a larger DINOv2 input.
from ..quick.tiny_sam_shapes import model as sam_trainer
from .shapes_tiny_random import dataloader, model, train

model.proposer = sam_trainer.proposer  # the same architecture the checkpoint was trained with
model.proposer.point_layout = "input_linspace"  # the recipe's grid (configs/common/training_free.py)
model.proposer.backbone.fit = "resize_square"  # the recipe's SAM input: square, PIL bicubic
model.proposer.backbone.interpolation = "pil_bicubic"
model.proposer.decoder_options = {"predictor_steps": False}  # (SAM 1: nothing to skip)
# 224 px: a 16x16 patch grid over the 128 px images, so that masks pool a few patches each (the tiny
# default, 56 px, gives a 4x4 grid and about half the AP: docs/benchmarks.md, training-free section).
model.semantic_encoder.input_size = 224
train.output_dir = "./output/training_free/shapes_tiny"
