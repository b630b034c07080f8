# LVIS v1 val, all 1203 classes (names with LVIS's synonyms, read from lvis_v1_val.json), box prompts:
# SAM ViT-H + CLIP ConvNeXt-L mask pooling. OVSAM's split: base = frequent + common, novel = rare
# (from the json). Published (OVSAM, SAM-H + RN50x16): Acc 66.6.
from samantics_d2.d2 import LazyCall as L
from samantics_d2.data.vocabularies import get_vocabulary

from ..common.open_vocab import dataloader, model, train

model.classifier.text_prototypes.class_names = L(get_vocabulary)(name_or_path="lvis_v1")
model.classifier.text_prototypes.name = "lvis_v1"
dataloader.test.dataset.names = "lvis_v1_val"
train.output_dir = "./output/open_vocab/lvis_box_sam_vit_h_convnext_l"
