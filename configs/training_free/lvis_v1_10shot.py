# LVIS v1 val (1203 classes), 10 references per class from lvis_v1_train, evaluated with
# LVISEvaluator (AP, APr, APc, APf). Classes without training instances get no prototype and are
# never predicted. Up to 300 detections per image, as LVIS evaluates.
from ..common.data.lvis import dataloader
from ..common.training_free import model, train

model.reference_bank.references = "lvis_v1_train_ref10_seed0"
model.reference_bank.shots = 10
model.classifier.topk = 300
del dataloader.train  # training-free: evaluation only
train.output_dir = "./output/training_free/lvis_v1_10shot"
