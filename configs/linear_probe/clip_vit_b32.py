# Linear probe on clip_vit_b32_openai features (projected image embedding at 224 px), the paper's protocol (configs/common/linear_probe.py).
from ..common.linear_probe import dataloader, encoder, job, model, train

encoder.tag = "clip_vit_b32_openai"
job.poolings = ["embed"]
train.output_dir = "./output/linear_probe/clip_vit_b32"
