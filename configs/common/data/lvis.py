# LVIS v1 ($DETECTRON2_DATASETS/lvis, images from coco/): loaders and LVISEvaluator (AP, APr, APc, APf,
# up to 300 detections per image as LVIS evaluates), as Detectron2's configs/common/data/lvis.py
# without its repeat-factor sampler (no config here trains on LVIS).
from samantics_d2.d2 import LazyCall as L
from samantics_d2.evaluation import LVISEvaluator  # the seam's, runnable on NumPy >= 1.24

from .coco import dataloader

dataloader.train.dataset.names = "lvis_v1_train"
dataloader.test.dataset.names = "lvis_v1_val"
dataloader.evaluator = L(LVISEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${...train.output_dir}/inference",
    max_dets_per_image=300,
)
