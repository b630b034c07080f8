# Prompted open-vocabulary recognition end to end on the synthetic shapes, on CPU in seconds:
#   python train_net.py --config-file configs/open_vocab/shapes_tiny.py --eval-only
# The tiny SAM of the demo (configs/quick/tiny_sam_shapes.py: random here, or its trained checkpoint
# as train.init_checkpoint, which fills proposer.*) prompted with each shape's GT box, and a tiny
# RANDOMLY INITIALISED CLIP (ViT crops + its text tower) against the shapes vocabulary ("red circle",
# ...). Random CLIP towers give labels near chance (1 in 8): this config checks the wiring, the
# evaluator and the speed, never the recognition quality of a real CLIP.
from samantics_d2.d2 import LazyCall as L
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.semantic.clip_recognition import CropRecognizer

from ..common.open_vocab import dataloader, model, train
from ..quick.tiny_sam_shapes import model as sam_trainer

model.proposer = sam_trainer.proposer  # the demo's tiny SAM architecture (its checkpoint loads into it)
model.classifier.recognizer = L(CropRecognizer)(
    clip=L(build_encoder)(tag="clip_vit_b16_openai", size="tiny", pretrained=False),  # 64 px, 32-d
    context=0.2,
    background="grey",
)
model.classifier.text_prototypes.class_names.name_or_path = "shapes"
model.classifier.text_prototypes.name = "shapes"
model.classifier.logit_scale = 100.0
dataloader.test.dataset.names = "shapes_val"
dataloader.test.mapper.long_side = 128  # the shapes images' own size: no resize
dataloader.test.num_workers = 0
train.output_dir = "./output/open_vocab/shapes_tiny"
train.seed = 0  # the random CLIP (and its text prototypes) are the same in every run
train.device = "cpu"
del sam_trainer  # (imported for its proposer node only)
