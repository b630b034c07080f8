# Linear probe on clip_vit_l14_openai features (projected image embedding at 224 px), the paper's protocol and the authors' resizing (configs/common/linear_probe.py).
from ..common.linear_probe import dataloader, encoder, job, model, train

encoder.tag = "clip_vit_l14_openai"
job.poolings = ["embed"]
job.preprocess = dict(interpolation="bilinear")  # the authors' Resize(224) + CenterCrop(224), bilinear
train.output_dir = "./output/linear_probe/clip_vit_l14"
