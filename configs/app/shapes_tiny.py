# The web app's default model (tools/app.py, `make app`): the demo's training-free pipeline on the
# synthetic shapes (configs/training_free/shapes_tiny.py: the tiny SAM `make demo` trains + a tiny
# random DINOv2 for classes defined by examples) plus a tiny RANDOMLY INITIALISED CLIP (ViT crops
# and its text tower) for classes named by words. The app sets the classes: those with examples
# only are labelled by DINOv2 alone (text weight 0), those with words only by CLIP alone, both
# fused. A random CLIP labels words near chance: it shows the path, not recognition quality.
from samantics_d2.d2 import LazyCall as L
from samantics_d2.data.vocabularies import get_vocabulary
from samantics_d2.references import build_reference_bank

from ..open_vocab.everything_shapes_tiny import dataloader, model, train

# the demo's references (the app's "Import the config's references"), the shapes classes by name
model.reference_bank = L(build_reference_bank)(
    references="shapes_train_ref5_seed0", shots=5, dataset_name="${dataloader.test.dataset.names}"
)
model.open_vocab.text_prototypes.class_names = L(get_vocabulary)(name_or_path="shapes")
train.output_dir = "./output/app"
