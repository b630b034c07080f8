# LVIS v1 val (1203 classes), 10 references per class from lvis_v1_train, evaluated with
# LVISEvaluator (AP, APr, APc, APf). Classes without training instances get no prototype and are
# never predicted. Up to 300 detections per image, as LVIS evaluates.
from samantics_d2.d2 import LazyCall as L
from samantics_d2.evaluation import LVISEvaluator  # the seam's, runnable on NumPy >= 1.24

from ..common.training_free import dataloader, model, train

model.references = "lvis_v1_train_ref10_seed0"
model.shots = 10
model.classifier.topk = 300
dataloader.test.dataset.names = "lvis_v1_val"
dataloader.evaluator = L(LVISEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${...train.output_dir}/inference",
    max_dets_per_image=300,
)
train.output_dir = "./output/training_free/lvis_v1_10shot"
