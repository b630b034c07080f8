# "Segment everything with labels" from words: the training-free pipeline's point-grid proposals
# (SAM 2.1 Hiera-L, configs/common/training_free.py) labelled by CLIP ConvNeXt-L mask pooling against
# the text prototypes of a vocabulary (TrainingFreeSegmenter with an open_vocab classifier), here the
# 80 COCO classes on COCO val2017 (COCOEvaluator):
#   python train_net.py --config-file configs/open_vocab/everything_sam2_1_convnext_l.py --eval-only
# tools/segment.py --classes/--vocabulary (without --references) uses it with your vocabulary;
# everything_fused_sam2_1_convnext_l.py adds references (fusion).
from samantics_d2.d2 import LazyCall as L
from samantics_d2.data.vocabularies import get_vocabulary
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.semantic.clip_recognition import DensePoolRecognizer
from samantics_d2.modeling.semantic.open_vocab_classifier import OpenVocabClassifier
from samantics_d2.modeling.semantic.text_prototypes import build_clip_text_encoder, load_or_build_text_prototypes

from ..common.training_free import dataloader, model, train

model.open_vocab = L(OpenVocabClassifier)(
    recognizer=L(DensePoolRecognizer)(
        clip=L(build_encoder)(tag="clip_convnext_large_d_320_laion2b", size="full", pretrained=True),
        input_size=1024,
    ),
    text_prototypes=L(load_or_build_text_prototypes)(
        encoder=L(build_clip_text_encoder)(
            tag="${...recognizer.clip.tag}", size="${...recognizer.clip.size}", pretrained="${...recognizer.clip.pretrained}"
        ),
        class_names=L(get_vocabulary)(name_or_path="coco"),  # tools/segment.py: --classes / --vocabulary
        name="coco",
    ),
    logit_scale=100.0,
    # masks whose best class is less similar than this cosine lean to background; proposals keep
    # the best of the K classes, scored by its probability (the background takes its share)
    background=0.2,
    text_weight=0.5,  # fused with references: the geometric mean of the two distributions
)
model.reference_bank = None  # words only (everything_fused_sam2_1_convnext_l.py: with references)
model.semantic_encoder = None  # DINOv2 serves the references only
model.classifier.score_floor = 0.05  # proposals whose best class has a probability <= 5 % are dropped
dataloader.test.dataset.names = "coco_2017_val"
train.output_dir = "./output/open_vocab/everything_sam2_1_convnext_l"
