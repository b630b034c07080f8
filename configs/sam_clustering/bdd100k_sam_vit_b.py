# SAM-embedding clustering (issue 16) on BDD100K instance segmentation, the seed's dataset: bank of
# SAM ViT-B mask embeddings of the GT boxes of bdd100k_ins_seg_train, evaluated on bdd100k_ins_seg_val
# (no part annotations: the "part" top-1 is NaN). Needs $DETECTRON2_DATASETS/bdd100k (official layout,
# samantics_d2/data/bdd100k.py) and the sam_vit_b / dinov2_vits14 weights.
#   python train_net.py --config-file configs/sam_clustering/bdd100k_sam_vit_b.py
from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import get_detection_dataset_dicts
from samantics_d2.references import dataset_class_names

from .coco_sam_vit_b import job, model, train  # noqa: F401  (model: the embedder the job uses)

job.train_dataset = L(get_detection_dataset_dicts)(names="bdd100k_ins_seg_train", filter_empty=True)
job.val_dataset = L(get_detection_dataset_dicts)(names="bdd100k_ins_seg_val", filter_empty=True)
job.thing_classes = L(dataset_class_names)(name="bdd100k_ins_seg_val")
job.classes = L(dataset_class_names)(name="bdd100k_ins_seg_val")
job.train_name = "bdd100k_ins_seg_train"
job.val_name = "bdd100k_ins_seg_val"
job.evaluator.dataset_name = "bdd100k_ins_seg_val"

train.output_dir = "./output/sam_clustering/bdd100k_sam_vit_b"
