# SAM-embedding clustering (issue 16) on the synthetic shapes with parts, on CPU in seconds:
#   python train_net.py --config-file configs/sam_clustering/shapes_parts_tiny.py
# The job embeds every instance of shapes_parts_train/val with the tiny SAM (GT boxes; on train also
# the 3 multimask outputs of a click at each whole's deepest pixel, from which whole/part pairs are
# mined), caches them in the references store, builds the K-means memory bank of the train wholes,
# trains one SemanticProjection per embedding source (SAM mask token, SAM image embedding pooled
# under the mask, tiny DINOv2 pooled under the mask) and writes results.json: top-1 on the val
# whole and part masks (parts labelled with their whole's class), training-free and projected.
# As written, SAM has random weights (mechanics only). For meaningful SAM embeddings train the tiny
# SAM on the shapes with parts first (configs/quick/tiny_sam_shapes_parts.py: it segments parts; the
# plain-shapes one, configs/quick/tiny_sam_shapes.py, never saw a part) and pass its checkpoint:
#   ... job.sam_checkpoint=output/quick_tiny_sam_parts/model_final.pth
# (numbers, every projection setting tried: docs/sam_clustering.md).
# DINOv2 is tiny and random here (no weights can be downloaded): its numbers say nothing about DINOv2.
from samantics_d2.d2 import COCOEvaluator
from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import get_detection_dataset_dicts
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch.training_free import build_sam_proposer
from samantics_d2.modeling.semantic import PrototypeClassifier
from samantics_d2.modeling.semantic.projection import run_sam_clustering
from samantics_d2.modeling.semantic.sam_embeddings import SamMaskEmbedder
from samantics_d2.references import dataset_class_names

from ..common.train import train

model = L(SamMaskEmbedder.from_proposer)(
    # the tiny SAM of configs/quick/tiny_sam_shapes.py (256 px input for the 128 px shapes)
    proposer=L(build_sam_proposer)(
        backbone=L(build_encoder)(tag="sam_vit_b", size="tiny", input_size=256), decoder_weights=None,
        # the point-grid proposals of the AP measurement, as configs/quick/tiny_sam_shapes.py evaluates
        # them, with their SAM embeddings from the same decoder call
        points_per_side=16, points_per_batch=256, pred_iou_thresh=0.5, box_nms_thresh=0.7,
        mask_embeddings=["mask_token", "image_pooled"],
    ),
    # 224 px: a 16x16 patch grid over the 128 px images (as configs/training_free/shapes_tiny.py)
    semantic_encoder=L(build_encoder)(tag="dinov2_vits14", size="tiny", input_size=224),
)

job = L(run_sam_clustering)(
    embedder="${model}",
    train_dataset=L(get_detection_dataset_dicts)(names="shapes_parts_train", filter_empty=False),
    val_dataset=L(get_detection_dataset_dicts)(names="shapes_parts_val", filter_empty=False),
    thing_classes=L(dataset_class_names)(name="shapes_parts_train"),
    classes=L(dataset_class_names)(name="shapes_parts_train", key="whole_classes"),  # parts: their whole's class
    train_name="shapes_parts_train",
    val_name="shapes_parts_val",
    output_dir="${train.output_dir}",
    sam_checkpoint=None,
    # one click at each instance's deepest pixel, the multimask output closest to the instance: the tiny SAM is
    # trained with clicks only, its box prompts are untrained (box masks: mean IoU 0.07 with the instances)
    prompt="click",
    sources=["mask_token", "image_pooled", "semantic_pooled"],
    num_centres=4,
    seed=0,
    mining=dict(whole_iou=0.5, part_inside=0.8, part_max_area=0.6),
    # full batch on a few hundred rows: 300 AdamW steps take seconds on CPU
    # (margin 0.2 / cosine 1.0 / fixed centres collapsed the mask-token and image_pooled projections to one
    # point on the trained tiny SAM; docs/sam_clustering.md)
    training=dict(out_dim=128, hidden_dim=256, num_layers=2, learn_centres=True, steps=300, lr=3e-3, margin=0.5,
                  cosine_weight=0.2),
    tsne_figure="${train.output_dir}/tsne_mask_token.png",
    device="${train.device}",
    # box/mask AP of the training-free pipeline (point-grid proposals -> cosine to each source's bank ->
    # per-class NMS -> soft merge -> top 100) on shapes_parts_val, averaged over the whole classes
    evaluator=L(COCOEvaluator)(dataset_name="shapes_parts_val", output_dir="${train.output_dir}/inference"),
    classifier=L(PrototypeClassifier)(),
)

train.output_dir = "./output/sam_clustering/shapes_parts_tiny"
# the tiny DINOv2 (and, without a checkpoint, SAM) are random: a fixed seed fixes them
train.seed = 0
train.device = "cpu"
