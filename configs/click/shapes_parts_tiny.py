# The click benchmarks end to end on CPU in seconds, on the shapes with parts (docs/click.md):
#   python train_net.py --config-file configs/click/shapes_parts_tiny.py --eval-only
# A tiny RANDOMLY INITIALISED SAM answers the clicks (Max | Oracle, NoC@85/90 over 20 iterative clicks), and
# a tiny random DINOv2 labels the first click's candidates with image prototypes of 5 shapes_parts_train
# references per class (wholes and parts): label accuracy per granularity (Acc@Oracle_whole / _part).
# Random SAM masks are meaningless, so expect low IoUs: this config checks the wiring, not a model.
from samantics_d2.d2 import LazyCall as L
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch import TrainingFreeSegmenter, build_sam_proposer
from samantics_d2.modeling.semantic import PrototypeClassifier
from samantics_d2.references import build_reference_bank

from .coco_sam_vit_h import dataloader, model, train

# 256 px input for the 128 px shapes (the tiny SAM of configs/quick/tiny_sam_shapes.py)
model.backbone = L(build_encoder)(tag="sam_vit_b", size="tiny", pretrained=False, input_size=256)
model.decoder_weights = None
# the click's 3 masks plus the click with boxes of 1/4 and 1/2 of the image around it
model.granularity_options = {"box_scales": [0.25, 0.5], "max_masks": 6, "dedup_iou": 0.8}
model.max_clicks = 20
# Labels: the training-free model's semantic encoder and prototypes (its own SAM proposer is not used).
model.label_model = L(TrainingFreeSegmenter)(
    proposer=L(build_sam_proposer)(
        backbone=L(build_encoder)(tag="sam_vit_b", size="tiny", pretrained=False, input_size=64),
        decoder_weights=None,
    ),
    # 224 px: a 16 x 16 patch grid over the 128 px images (as configs/training_free/shapes_tiny.py)
    semantic_encoder=L(build_encoder)(tag="dinov2_vits14", size="tiny", pretrained=False, input_size=224),
    classifier=L(PrototypeClassifier)(),
    reference_bank=L(build_reference_bank)(
        references="shapes_parts_train", shots=5, dataset_name="${dataloader.test.dataset.names}"
    ),
)

dataloader.test.dataset.names = "shapes_parts_val"
dataloader.test.mapper.short_edge = None  # the 128 px images as they are
dataloader.test.num_workers = 0
dataloader.evaluator.miou_clicks = [1, 5, 20]
train.device = "cpu"
train.seed = 0  # the random encoders (and the memory bank of the references) are the same every run
train.output_dir = "./output/click/shapes_parts_tiny"
