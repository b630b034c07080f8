# COCO 2017 instances ($DETECTRON2_DATASETS/coco, datasets/README.md): loaders and COCOEvaluator, as
# Detectron2's configs/common/data/coco.py. Experiment configs import `dataloader` and change names.
from omegaconf import OmegaConf

from samantics_d2.d2 import COCOEvaluator
from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
from samantics_d2.data.mapper import DetectionMapper, random_flip

dataloader = OmegaConf.create()

dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(DetectionMapper)(is_train=True, augmentations=[L(random_flip)(horizontal=True)]),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DetectionMapper)(is_train=False, augmentations=[]),
    num_workers=4,
)

dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${...train.output_dir}/inference",
    max_dets_per_image=100,
)
