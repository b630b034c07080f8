# Beyond the paper: a grid of 5 learning rates x 2 poolings trained together on the same cache
# (DINOv2's linear evaluation), the best chosen on 10% of train held out, reported on val.
# Use with any encoder file, e.g.
#   train_net.py --config-file configs/linear_probe/grid.py encoder.tag=dinov2_vitl14 \
#       train.output_dir=output/linear_probe/dinov2_vitl14_grid
# --eval-only evaluates model.pooling (default: the first pooling): set it to the pooling of the
# chosen probe, named in <output_dir>/linear_probe_results.json.
from ..common.linear_probe import dataloader, encoder, job, model, train

job.poolings = ["cls", "mean_patch"]
job.normalization = "encoder"  # each encoder's own normalisation
job.config = dict(
    learning_rates=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2], optimizer="adam", epochs=10, batch_size=128, holdout_fraction=0.1
)
train.output_dir = "./output/linear_probe/grid"
