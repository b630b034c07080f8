"""Every RefSAM config under configs/ref_sam/ instantiated AS WRITTEN, with only command-line overrides
(those train_net.py accepts: checked by check_override_keys, applied by LazyConfig.apply_overrides):
the full-size SAM becomes its tiny random variant through the backbone's ``size`` / weights keys,
and the fuser, neck and head must then size themselves from the built SAM (no module swapped in
Python). Each model runs one training forward and backward on a tiny synthetic batch."""
import glob
import os

import pytest
import torch

import samantics_d2  # noqa: F401  (registers datasets)
from samantics_d2.config import check_override_keys
from samantics_d2.d2 import Boxes, Instances, LazyConfig, instantiate
from samantics_d2.data.shapes import SHAPES_SPLITS
from samantics_d2.modeling.meta_arch.ref_sam import RefSAM, ref_sam_heads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "ref_sam", "*.py")))
SAM_CONFIGS = [p for p in CONFIGS if "tiny" not in os.path.basename(p)]

# What a user types to try a full-size config on a CPU: the tiny random SAM (depth 2, width 32, 64 px;
# its global-attention block is block1), no weights, and the four neck levels read from its two blocks.
TINY_SAM_OVERRIDES = [
    "model.proposer.backbone.size=tiny",
    "model.proposer.backbone.pretrained=False",
    "model.proposer.decoder_weights=null",
    "model.proposer.backbone.out_features=[neck,block0,block1]",
    "model.feature_names=[block0,block1,block1,block1]",
    # no COCO here: the reference set and label space (resolved when the model is built) of the shapes
    "model.reference_bank.references=shapes_train_ref5_seed0",
    "model.reference_bank.dataset_name=shapes_val",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(path, overrides):
    cfg = LazyConfig.load(path)
    check_override_keys(cfg, overrides)  # what train_net.py does before applying them
    return LazyConfig.apply_overrides(cfg, overrides)


def _training_batch(size):
    """One target image with two GT boxes of class 0 and one reference of class 0, ``size`` px."""
    g = torch.Generator().manual_seed(0)
    image = lambda: (torch.rand(3, size, size, generator=g) * 255).to(torch.uint8)  # noqa: E731
    instances = Instances((size, size))
    instances.gt_boxes = Boxes(torch.tensor([[4.0, 4.0, size / 2, size / 2], [size / 2, 8.0, size - 2.0, size - 8.0]]))
    instances.gt_classes = torch.tensor([0, 0])
    reference = {"image": image(), "box": [2.0, 3.0, size * 0.75, size * 0.6], "category_id": 0}
    return [{"image": image(), "height": size, "width": size, "instances": instances, "references": [reference]}]


def _forward_backward(model, size):
    model.train()
    losses = model(_training_batch(size))
    total = sum(losses.values())
    assert torch.isfinite(total), {k: float(v) for k, v in losses.items()}
    total.backward()
    assert model.head.query_embed.weight.grad.abs().sum() > 0 and model.fuser.mlp[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.proposer.parameters()), "the SAM is frozen"
    return losses


def test_every_sam_variant_has_a_config():
    names = {os.path.basename(p) for p in SAM_CONFIGS}
    expected = {f"{family}_vit_{v}_coco{split}.py" for family in ("sam", "hq_sam") for v in "blh" for split in ("", "_base")}
    assert names == expected


@pytest.mark.parametrize("path", SAM_CONFIGS, ids=os.path.basename)
def test_sam_variant_config_builds_tiny_through_overrides(path):
    cfg = _load(path, TINY_SAM_OVERRIDES)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert isinstance(model, RefSAM)
    backbone, decoder = model.backbone, model.decoder
    assert backbone.size == "tiny" and backbone.variant == "vit_" + path.split("_vit_")[1][0]
    # The published recipe as the config writes it: 4 levels, 300 queries, 6 decoder layers, width 256 ...
    assert model.head.n_levels == 4 and model.head.num_queries == 300 and len(model.head.transformer.decoder_layers) == 6
    assert model.neck.out_channels == model.head.d_model == model.fuser.mlp[-1].out_features == 256
    # ... sized from the built tiny SAM, not from the tag: 32-wide blocks, its decoder's tokens and width.
    assert model.neck.in_channels == (32,) * 4 == tuple(backbone.output_shape()[n].channels for n in model.feature_names)
    hq = os.path.basename(path).startswith("hq_sam")
    assert model.fuser.num_tokens == (5 if hq else 4) == decoder.mask_decoder.num_mask_tokens
    assert model.fuser.token_dim == decoder.embed_dim == 32
    _forward_backward(model, backbone.img_size)
    assert cfg.optimizer.max_norm == 0.1 and cfg.optimizer.lr == 2e-4
    cfg.optimizer.params.model = model
    assert isinstance(instantiate(cfg.optimizer), torch.optim.AdamW)
    if path.endswith("_base.py"):  # trained on the 60 COCO-FSOD base classes, evaluated on the novel ones
        assert len(cfg.dataloader.train.mapper.categories) == 60
        assert cfg.dataloader.test.dataset.names == "coco_2017_val_novel"


@pytest.mark.parametrize("path", [p for p in CONFIGS if p not in SAM_CONFIGS], ids=os.path.basename)
def test_tiny_config_builds_as_written(path):
    cfg = _load(path, [])
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    assert model.backbone.size == "tiny" and model.neck.in_channels == (32, 32, 32)
    assert set(cfg.dataloader.train.mapper.categories) == set(SHAPES_SPLITS["base"])
    _forward_backward(model, 128)


def test_tag_override_resizes_the_fuser():
    """The SAM of a config changed on the command line: HQ-SAM's 5 mask tokens instead of SAM's 4."""
    path = os.path.join(ROOT, "configs", "ref_sam", "sam_vit_b_coco.py")
    model = instantiate(_load(path, [*TINY_SAM_OVERRIDES, "model.proposer.backbone.tag=hq_sam_vit_b"]).model)
    assert model.fuser.num_tokens == 5 and type(model.decoder).__name__ == "HQSAMPromptDecoder"


def test_heads_follow_the_output_shape_and_name_missing_features():
    cfg = _load(os.path.join(ROOT, "configs", "ref_sam", "tiny_shapes.py"), [])
    proposer = instantiate(cfg.model.proposer)
    parts = ref_sam_heads(proposer, feature_names=["block1", "block0"], d_model=32, neck={"strides": (16, 32)})
    assert parts["neck"].in_channels == (32, 32) and parts["head"].n_levels == 2 and parts["fuser"].num_tokens == 4
    with pytest.raises(ValueError, match=r"does not output \['block2'\].*add them to its out_features"):
        ref_sam_heads(proposer, feature_names=["block1", "block2"])
