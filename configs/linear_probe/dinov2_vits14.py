# Linear probe on dinov2_vits14 features (CLS token at 224 px), the paper's protocol (configs/common/linear_probe.py).
from ..common.linear_probe import dataloader, encoder, job, model, train

encoder.tag = "dinov2_vits14"
job.poolings = ["cls"]
train.output_dir = "./output/linear_probe/dinov2_vits14"
