# Linear probe on dinov2_vits14 features (CLS token at 224 px), the paper's protocol and the authors' resizing (configs/common/linear_probe.py).
from ..common.linear_probe import dataloader, encoder, job, model, train

encoder.tag = "dinov2_vits14"
job.poolings = ["cls"]
job.preprocess = dict(fit="resize_center_crop", interpolation="bilinear", crop_pct=1.0)  # Resize(224) + CenterCrop(224)
train.output_dir = "./output/linear_probe/dinov2_vits14"
