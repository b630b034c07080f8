# A tiny random DINOv2 on crops of the synthetic shapes dataset (one crop per instance): the whole
# linear-probe path (cache, grid, head, --eval-only) in seconds on CPU. The classes differ in colour
# and shape, so even random features separate them; the numbers say nothing about DINOv2.
from ..common.linear_probe import dataloader, encoder, job, model, train

encoder.tag = "dinov2_vits14"
encoder.size = "tiny"
encoder.pretrained = False
job.train_dataset = "shapes_train_cls"
job.val_dataset = "shapes_val_cls"
job.poolings = ["mean_patch"]  # one pooling: the chosen head then always matches model.pooling
job.normalization = "encoder"
job.config = dict(learning_rates=[1e-3, 1e-2], optimizer="adam", epochs=20, batch_size=32, holdout_fraction=0.2)
job.batch_size = 32
job.num_workers = 0
model.num_classes = 8
dataloader.test.num_workers = 0
train.output_dir = "./output/linear_probe/tiny_shapes"
# The tiny encoder has random weights: a fixed seed makes the encoder of the training job and the
# one --eval-only builds identical (both are built first after seeding).
train.seed = 0
