# Semantic-SAM's click benchmark "1-IoU@COCO Max|Oracle" (arXiv 2307.04767) with SAM ViT-H, training-free:
#   python train_net.py --config-file configs/click/coco_sam_vit_h.py --eval-only
# COCO panoptic val2017 ($DETECTRON2_DATASETS/coco: val2017, panoptic_val2017, annotations/panoptic_val2017.json),
# every non-crowd segment (things and stuff) clicked once at the pixel farthest from the segment and image
# borders (samantics_d2/utils/clicks.py), test size short side 800 / long side <= 1333 (ClickMapper; SAM then
# fits the image into its 1024 px input). Max = the candidate with the highest predicted IoU, Oracle = the one
# with the highest IoU with the GT, mean IoU over segments (docs/click.md has the published numbers beside ours).
# The other configs of this folder change the encoder (coco_sam_vit_b/l, coco_hq_sam_vit_h,
# coco_sam2_1_hiera_l) or the protocol (coco_sam_vit_h_noc: 20 iterative clicks, NoC@85/90).
from omegaconf import OmegaConf

from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import build_detection_test_loader, get_detection_dataset_dicts
from samantics_d2.data.panoptic import ClickMapper
from samantics_d2.evaluation.click import ClickEvaluator
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch.click import build_click_segmenter

from ..common.train import train

model = L(build_click_segmenter)(
    backbone=L(build_encoder)(tag="sam_vit_h", pretrained=True),
    decoder_weights="${.backbone.tag}",  # the prompt decoder from the same checkpoint
    # The candidates of a click: SAM's three multimask outputs (whole, part, subpart), deduplicated
    # (mask IoU > 0.8), sorted small to large; no extra box prompts (box_scales) in the SAM anchor.
    granularity_options={"box_scales": [], "max_masks": 6, "dedup_iou": 0.8},
    max_clicks=1,  # single click: Max | Oracle (coco_sam_vit_h_noc.py runs the 20-click protocol)
    click_box=None,  # Semantic-SAM gives its click as a +-3 px box; SAM gets the point (set 3 to add the box)
)

dataloader = OmegaConf.create()
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val_panoptic", filter_empty=False),
    mapper=L(ClickMapper)(short_edge=800, max_size=1333),
    num_workers=4,
)
dataloader.evaluator = L(ClickEvaluator)(
    max_clicks="${...model.max_clicks}", miou_clicks=[1], dataset_name="${..test.dataset.names}"
)

train.output_dir = "./output/click/coco_sam_vit_h"
