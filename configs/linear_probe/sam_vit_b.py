# Linear probe on sam_vit_b features (mean of the 256-d neck map at 1024 px), the paper's protocol (configs/common/linear_probe.py).
from ..common.linear_probe import dataloader, encoder, job, model, train

encoder.tag = "sam_vit_b"
job.poolings = ["neck_mean"]
train.output_dir = "./output/linear_probe/sam_vit_b"
