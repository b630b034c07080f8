# tiny_shapes.py with the authors' preprocessing and probe recipe (linprob_img_encoders/train.py): the
# tiny DINOv2 input resized bilinear to its size + centre crop (crop_pct 1.0; ours: bicubic, crop_pct
# 0.875), PyTorch's default Linear init, gradients clipped to norm 1.0, ReduceLROnPlateau (0.5, patience
# 5) and early stopping (patience 7) on the val loss, 16-mixed (float32 on CPU). Same learning-rate
# grid, epochs, batch and held-out selection as tiny_shapes.py, so only the recipe differs.
from .tiny_shapes import dataloader, encoder, job, model, train

job.preprocess = dict(fit="resize_center_crop", interpolation="bilinear", crop_pct=1.0)
job.config.update(
    head_init="torch_default", grad_clip_norm=1.0, schedule="plateau", plateau_factor=0.5, plateau_patience=5,
    early_stopping_patience=7, monitor="val", precision="16-mixed",
)
train.output_dir = "./output/linear_probe/tiny_shapes_published"
