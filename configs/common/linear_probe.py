# Linear probing of a frozen encoder on ImageNet-1K ("There is no SAMantics!", experiment 1).
#
# Training (`train_net.py --config-file ...`) runs `job`: one pass of the frozen encoder over
# imagenet_train and imagenet_val into a float16 feature cache (resumable, reused when nothing
# changed), then the probes of `job.config` trained together on the cache; the best head is saved
# as <output_dir>/linear_probe_head.pth. `--eval-only` loads that head into `model` and evaluates it
# image by image with ClassificationEvaluator (top-1/top-5, per-class accuracy, confusion matrix).
#
# The probe recipe here is the authors' (linprob_img_encoders/train.py, PAPER_PROTOCOL); each
# encoder file sets the authors' resizing in job.preprocess. Ours stay as named options:
# job.preprocess=None (each encoder's own fitting: SAM letterbox, DINOv2 256 bicubic + crop 224,
# CLIP bicubic) and job.config=OUR_PROTOCOL's values (N(0, 0.01^2) head, constant learning rate, no
# clipping, float32 probes); docs/linear_probe.md lists both side by side.
import os

from omegaconf import OmegaConf

from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import build_detection_test_loader, get_detection_dataset_dicts
from samantics_d2.data import ClassificationMapper
from samantics_d2.data.classification import cache_root
from samantics_d2.evaluation import ClassificationEvaluator, run_linear_probe
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.linear_probe import LinearProbe

from .train import train

encoder = L(build_encoder)(tag="dinov2_vits14", pretrained=True)

job = L(run_linear_probe)(
    encoder="${encoder}",
    encoder_tag="${encoder.tag}",
    poolings=["cls"],
    train_dataset="imagenet_train",
    val_dataset="imagenet_val",
    cache_root=os.path.join(cache_root(), "features"),
    output_dir="${train.output_dir}",
    # The paper's protocol: Adam 1e-3, 10 epochs, batch 128, ImageNet mean/std for every encoder;
    # PyTorch's default Linear init, gradients clipped to norm 1.0, ReduceLROnPlateau (0.5, patience 5)
    # and early stopping (patience 7) on the val loss, 16-bit mixed precision (CUDA; float32 on CPU).
    normalization="imagenet",
    config=dict(
        learning_rates=[1e-3], optimizer="adam", epochs=10, batch_size=128, holdout_fraction=0.0,
        head_init="torch_default", grad_clip_norm=1.0, schedule="plateau", plateau_factor=0.5, plateau_patience=5,
        early_stopping_patience=7, monitor="val", precision="16-mixed",
    ),
    preprocess=None,  # changes to the encoder's preprocessing (PreprocessSpec fields); set per encoder file
    device="${train.device}",
    batch_size=64,  # images per encoder forward while caching
    num_workers=4,
)

model = L(LinearProbe)(
    backbone="${encoder}",
    pooling="${job.poolings[0]}",
    num_classes=1000,
    normalization="${job.normalization}",
    preprocess="${job.preprocess}",
    precision="${oc.select:job.config.precision,'32'}",  # evaluated under the autocast it was trained with
)

dataloader = OmegaConf.create()
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="${job.val_dataset}", filter_empty=False),
    mapper=L(ClassificationMapper)(),
    batch_size=64,
    num_workers=4,
)
dataloader.evaluator = L(ClassificationEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${...train.output_dir}/inference",
)

train.output_dir = "./output/linear_probe/dinov2_vits14"
train.init_checkpoint = "${train.output_dir}/linear_probe_head.pth"
