# "Segment everything with labels" from words on CPU in seconds: the tiny SAM of the demo
# (configs/training_free/shapes_tiny.py; random unless its checkpoint is given as
# train.init_checkpoint) and a tiny RANDOMLY INITIALISED CLIP (ViT crops + its text tower) against
# the shapes vocabulary. Random CLIP towers label near chance: this checks the wiring (and the
# tools/segment.py --classes path in its tests), not recognition quality.
from samantics_d2.d2 import LazyCall as L
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.semantic.clip_recognition import CropRecognizer

from ..training_free.shapes_tiny import dataloader, model, train
from .everything_sam2_1_convnext_l import model as everything

model.open_vocab = everything.open_vocab
model.open_vocab.recognizer = L(CropRecognizer)(
    clip=L(build_encoder)(tag="clip_vit_b16_openai", size="tiny", pretrained=False), context=0.2, background="grey"
)
model.open_vocab.text_prototypes.class_names = ["red circle", "green square", "blue triangle", "yellow star"]
model.open_vocab.background = None  # random towers: no meaningful background cosine
model.classifier.score_floor = 0.0
# keep the DINOv2 node (tools/segment.py --references fuses with it) but start from words only
model.reference_bank = None
train.output_dir = "./output/open_vocab/everything_shapes_tiny"
train.seed = 0
del everything  # (imported for its open_vocab node only)
