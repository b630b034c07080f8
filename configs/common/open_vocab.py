# Prompted open-vocabulary recognition (the Open-Vocabulary SAM system, training-free; issue 14),
# evaluated as OVSAM publishes it (docs/open_vocabulary.md):
#   python train_net.py --config-file configs/open_vocab/<x>.py --eval-only
# One prompt per ground-truth instance (its box, or its centre point), SAM's mask for it, and a label
# among the vocabulary's classes from CLIP: mask pooling of a convolutional CLIP's dense map (OVSAM's
# "feature-crop" baseline) or crops through a CLIP ViT ("image-crop"). The text prototypes are built
# when the config is built (cached under $SAMANTICS_CACHE/references/text_prototypes, keyed by the
# text tower's weights, the vocabulary and the templates) from the SAME CLIP file as the image tower.
# Defaults: SAM ViT-H + CLIP ConvNeXt-L (320, LAION-2B), COCO val2017 open-vocabulary 65 classes
# (48 base / 17 novel), box prompts, long side 1024, IoU_b / IoU_n / Acc (PromptedRecognitionEvaluator).
from omegaconf import OmegaConf

from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import build_detection_test_loader, get_detection_dataset_dicts
from samantics_d2.data.prompted import PromptedRecognitionMapper
from samantics_d2.data.vocabularies import get_vocabulary
from samantics_d2.evaluation.prompted_recognition import build_prompted_recognition_evaluator
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch.open_vocab import OpenVocabPromptedSegmenter
from samantics_d2.modeling.meta_arch.training_free import build_sam_proposer
from samantics_d2.modeling.semantic.clip_recognition import DensePoolRecognizer
from samantics_d2.modeling.semantic.open_vocab_classifier import OpenVocabClassifier
from samantics_d2.modeling.semantic.text_prototypes import build_clip_text_encoder, load_or_build_text_prototypes

from .train import train

model = L(OpenVocabPromptedSegmenter)(
    proposer=L(build_sam_proposer)(
        backbone=L(build_encoder)(tag="sam_vit_h", pretrained=True),
        decoder_weights="${.backbone.tag}",  # SAM's prompt decoder from the same checkpoint
    ),
    classifier=L(OpenVocabClassifier)(
        recognizer=L(DensePoolRecognizer)(
            clip=L(build_encoder)(tag="clip_convnext_large_d_320_laion2b", size="full", pretrained=True),
            input_size=1024,  # the SAM-sized image (long side 1024), as OVSAM feeds its CLIP
        ),
        text_prototypes=L(load_or_build_text_prototypes)(
            # the text tower of the image tower's checkpoint (tag, size and loading follow it)
            encoder=L(build_clip_text_encoder)(
                tag="${...recognizer.clip.tag}",
                size="${...recognizer.clip.size}",
                pretrained="${...recognizer.clip.pretrained}",
            ),
            class_names=L(get_vocabulary)(name_or_path="coco_ov"),  # the 65 classes, in the dataset's order
            name="coco_ov",
        ),
        best_synonym=True,  # OVSAM: a class scores as its best synonym
        logit_scale=100.0,  # OVSAM's (and OpenAI CLIP's) scale
        background=None,  # OVSAM drops the background column before its argmax
    ),
    point_multimask_output=True,  # one click: the best of SAM's 3 masks by predicted IoU
    box_multimask_output=False,
    predict_background=False,
)

dataloader = OmegaConf.create()
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val_ov65", filter_empty=False),
    mapper=L(PromptedRecognitionMapper)(prompt="box", long_side=1024),
    num_workers=4,
)
dataloader.evaluator = L(build_prompted_recognition_evaluator)(dataset_name="${..test.dataset.names}")

train.output_dir = "./output/open_vocab"
