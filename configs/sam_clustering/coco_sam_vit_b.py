# SAM-embedding clustering (issue 16) on COCO: bank of SAM ViT-B mask embeddings of the GT boxes of
# the 30-shot COCO reference set (all 80 classes), evaluated on the GT boxes of coco_2017_val
# (COCO has no part annotations: the "part" top-1 is NaN; the projection still trains on the parts
# mined from the clicks). Needs $DETECTRON2_DATASETS/coco and the sam_vit_b / dinov2_vits14 weights.
#   python train_net.py --config-file configs/sam_clustering/coco_sam_vit_b.py
from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import get_detection_dataset_dicts
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.references import dataset_class_names

from .shapes_parts_tiny import job, model, train

model.proposer.backbone = L(build_encoder)(tag="sam_vit_b", pretrained=True)
model.proposer.decoder_weights = "sam_vit_b"
model.proposer.points_per_side = 32  # the recipe's grid at 1024 px
model.semantic_encoder = L(build_encoder)(tag="dinov2_vits14", pretrained=True)

job.train_dataset = L(get_detection_dataset_dicts)(names="coco_2017_train_ref30_seed0", filter_empty=False)
job.val_dataset = L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False)
job.thing_classes = L(dataset_class_names)(name="coco_2017_val")
job.classes = L(dataset_class_names)(name="coco_2017_val")
job.train_name = "coco_2017_train_ref30_seed0"
job.val_name = "coco_2017_val"
job.training = dict(out_dim=256, hidden_dim=512, num_layers=2, learn_centres=False, steps=2000, lr=1e-3, margin=0.2)
job.tsne_figure = None
job.evaluator.dataset_name = "coco_2017_val"
job.prompt = "box"  # the seed's GT-box prompts (the official SAM is trained with boxes)

train.output_dir = "./output/sam_clustering/coco_sam_vit_b"
