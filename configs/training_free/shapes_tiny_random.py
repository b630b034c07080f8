# The training-free pipeline on the synthetic shapes dataset with tiny RANDOMLY INITIALISED encoders:
# it runs every stage in seconds on CPU, but random SAM masks are meaningless, so expect AP near 0.
# configs/training_free/shapes_tiny.py uses a tiny SAM trained on shapes first (the demo).
from ..common.training_free import dataloader, model, train

# (input sizes given: the recipe's fit/interpolation overrides would otherwise take the full models' sizes)
model.proposer.backbone = dict(model.proposer.backbone, tag="sam_vit_b", size="tiny", pretrained=False,
                               out_features=None, input_size=64)
model.proposer.decoder_weights = None
model.proposer.points_per_side = 16
model.proposer.points_per_batch = 64
model.semantic_encoder = dict(model.semantic_encoder, size="tiny", pretrained=False, input_size=56)
model.reference_bank.references = "shapes_train_ref5_seed0"
model.reference_bank.shots = 5
dataloader.test.dataset.names = "shapes_val"
dataloader.test.num_workers = 0
dataloader.evaluator.use_fast_impl = False
train.output_dir = "./output/training_free/shapes_tiny_random"
train.seed = 0  # the random DINOv2 must be the same in every run (and in its memory bank)
