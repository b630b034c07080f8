"""Every experiment config loads, and its model instantiates (full-size encoders swapped for their
tiny random variants: no weights exist here; the architecture wiring is what is checked). The RefSAM
configs are built as written, through command-line overrides only, in test_ref_sam_configs.py."""
import glob
import os

import pytest
import torch
from omegaconf import DictConfig, ListConfig

from samantics_d2.d2 import LazyConfig, instantiate
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.references import build_reference_bank

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/open_vocab: built in tests/test_open_vocab_configs.py (one prompt template instead of 80, so
# that the text prototypes of 65 classes take no time; the LVIS ones on a stand-in LVIS json).
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
                 if os.sep + "common" + os.sep not in p and os.sep + "ref_sam" + os.sep not in p
                 and os.sep + "open_vocab" + os.sep not in p)


def _tiny(node):
    """Make every build_encoder node tiny and random, recursively; drop decoder weights; COCO / LVIS
    reference sets and label spaces (resolved when the model is built) become the shapes ones."""
    if isinstance(node, DictConfig):
        if node.get("_target_") is build_encoder:
            node.size, node.pretrained = "tiny", False
            if "input_size" in node:
                node.input_size = None
            if node.get("pre_resize") is not None:  # (its size may follow an input_size just reset)
                node.pre_resize = None
        if node.get("_target_") is build_reference_bank and not str(node.get("references")).startswith("shapes_"):
            node.references, node.dataset_name = "shapes_train_ref5_seed0", "shapes_val"
        if "decoder_weights" in node:
            node.decoder_weights = None
        for key in list(node.keys()):
            _tiny(node._get_node(key))
    elif isinstance(node, ListConfig):
        for item in node:
            _tiny(item)


def test_every_config_directory_has_configs():
    names = {os.path.relpath(p, os.path.join(ROOT, "configs")).split(os.sep)[0] for p in CONFIGS}
    assert {"quick", "linear_probe", "training_free"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_config_builds(path):
    cfg = LazyConfig.load(path)
    assert "train" in cfg and "model" in cfg
    _tiny(cfg)
    if "encoder" in cfg:  # linear probe: the encoder node is interpolated into the model
        _tiny(cfg.encoder)
    model = instantiate(cfg.model)
    assert isinstance(model, torch.nn.Module)
    if any(isinstance(p, torch.Tensor) for p in model.parameters()):
        assert all(torch.isfinite(p).all() for p in model.parameters())
