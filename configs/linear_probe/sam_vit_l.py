# Linear probe on sam_vit_l features (mean of the 256-d neck map at 1024 px), the paper's protocol and the authors' resizing (configs/common/linear_probe.py).
from ..common.linear_probe import dataloader, encoder, job, model, train

encoder.tag = "sam_vit_l"
job.poolings = ["neck_mean"]
job.preprocess = dict(fit="resize_square", interpolation="bilinear")  # the authors' Resize((1024, 1024))
train.output_dir = "./output/linear_probe/sam_vit_l"
