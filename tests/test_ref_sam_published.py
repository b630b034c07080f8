"""RefSAM's published recipe (the authors' reference_sam/ code) against ours, each item pinned on
hand-made inputs: neck shapes and strides, FFN widths, box-branch init, the mapper's sampling
(categories, negatives, flipped references, mask-area pool, set order), top-k per (image, class),
the standard test's per-image reference draws, and the published configs' resolved values."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import samantics_d2  # noqa: F401  (registers datasets)
from samantics_d2.config import check_override_keys
from samantics_d2.d2 import DatasetCatalog, LazyConfig, ShapeSpec, instantiate, register_coco_instances
from samantics_d2.data.mapper import random_flip
from samantics_d2.data.ref_sam_mapper import RefSAMMapper
from samantics_d2.modeling.ref_sam import DeformableTransformer, MultiLevelNeck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(ROOT, "configs", "ref_sam", "published")
TINY = os.path.join(ROOT, "configs", "ref_sam", "tiny_shapes.py")
TINY_PUBLISHED = os.path.join(PUBLISHED, "tiny_shapes.py")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- model parts
def test_published_neck_keeps_every_level_at_the_block_stride():
    shapes = [ShapeSpec(channels=32, stride=16)] * 4
    blocks = [torch.randn(1, 32, 64, 64) for _ in range(4)]  # a 1024 px input: 64 x 64 blocks
    published = MultiLevelNeck(input_shapes=shapes, out_channels=32, strides=None)
    ours = MultiLevelNeck(input_shapes=shapes, out_channels=32, strides=(8, 16, 32, 64))
    assert published.strides == (16, 16, 16, 16)
    levels = published(blocks)
    assert [tuple(x.shape) for x in levels] == [(1, 32, 64, 64)] * 4
    assert sum(x.shape[-2] * x.shape[-1] for x in levels) == 16384
    assert sum(x.shape[-2] * x.shape[-1] for x in ours(blocks)) == 21760  # 128^2 + 64^2 + 32^2 + 16^2
    assert all(isinstance(m, nn.Identity) for m in published.resample)  # 1x1 conv + GroupNorm only
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in published.modules())
    assert any(isinstance(m, nn.ConvTranspose2d) for m in ours.modules())
    assert [type(p[1]).__name__ for p in published.projections] == ["GroupNorm"] * 4
    assert published.projections[0][1].num_groups == 32


def test_encoder_and_decoder_ffn_widths_and_box_size_bias():
    published = DeformableTransformer(d_model=32, n_heads=4, d_ffn=128, encoder_d_ffn=64, num_encoder_layers=1,
                                      num_decoder_layers=3, size_bias_layers="first")
    ours = DeformableTransformer(d_model=32, n_heads=4, d_ffn=128, num_encoder_layers=1, num_decoder_layers=3)
    assert published.encoder_layers[0].ffn.linear1.out_features == 64
    assert [layer.deformable.ffn.linear1.out_features for layer in published.decoder_layers] == [128] * 3
    assert ours.encoder_layers[0].ffn.linear1.out_features == 128  # the decoder's width for both
    expected_first = torch.tensor([0.0, 0.0, -2.0, -2.0])
    for transformer, later in ((published, torch.zeros(4)), (ours, expected_first)):
        biases = [mlp.layers[-1].bias.detach() for mlp in transformer.bbox_embed]
        torch.testing.assert_close(biases[0], expected_first)
        for bias in biases[1:]:
            torch.testing.assert_close(bias, later)
        assert all(float(mlp.layers[-1].weight.detach().abs().sum()) == 0 for mlp in transformer.bbox_embed)
    with pytest.raises(ValueError, match="size_bias_layers"):
        DeformableTransformer(d_model=32, n_heads=4, size_bias_layers="last")


# ----------------------------------------------------------------------------- the mapper
NUM_CLASSES = 11  # more than 8, so that Python's set order of {3, 10} is not sorted


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory):
    """A COCO-format set of 6 images (48 x 40 px, a horizontal ramp) with categories 0..10: every image
    has one instance of 3, 10, 0, 5, 7 and 9; the box of 9 is big (40 x 30) but its mask "area" is 500
    (< 32 x 32), so only a box-area pool keeps it; image 6 also has a 1 (the other images' negative)."""
    name = "ref_sam_published_hand_made"
    if name in DatasetCatalog.list():
        return name
    folder = tmp_path_factory.mktemp("hand_made")
    images, annotations = [], []
    pixels = np.zeros((40, 48, 3), dtype=np.uint8)
    pixels[:, 24:] = 200
    pixels[:, :, 1] = np.arange(48, dtype=np.uint8)[None, :] * 3  # a horizontal ramp: flips are visible
    for image_id in range(1, 7):
        Image.fromarray(pixels).save(folder / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 40, "width": 48})
        for k, category in enumerate([3, 10, 0, 5, 7, 9] + ([1] if image_id == 6 else [])):
            box = [2.0 + k, 3.0, 40.0, 30.0] if category == 9 else [2.0 + k, 3.0 + k, 32.0 + k % 3, 33.0]
            area = 500.0 if category == 9 else box[2] * box[3]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category + 1,
                                "bbox": box, "area": area, "iscrowd": 0})
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(NUM_CLASSES)]
    path = folder / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    register_coco_instances(name, {}, str(path), str(folder))
    DatasetCatalog.get(name)  # sets thing_classes / thing_dataset_id_to_contiguous_id
    return name


PRESENT = {0, 3, 5, 7, 9, 10}


def test_published_sampling_four_present_categories_and_no_negative(hand_made):
    np.random.seed(0)
    published = RefSAMMapper(dataset_names=hand_made, max_categories=4, num_negatives=0, pool_area="mask",
                             categories=[f"class{c}" for c in sorted(PRESENT - {9})])  # 5 present, 4 drawn
    ours = RefSAMMapper(dataset_names=hand_made, max_categories=3, num_negatives=1, pool_area="box",
                        categories=[f"class{c}" for c in sorted(PRESENT | {1})])
    for record in DatasetCatalog.get(hand_made)[:5]:
        labels = [r["category_id"] for r in published(record)["references"]]
        assert len(labels) == 4 and len(set(labels)) == 4 and set(labels) <= PRESENT - {9}
        labels = [r["category_id"] for r in ours(record)["references"]]
        assert len(labels) == 4 and set(labels[:3]) <= PRESENT and labels[3] not in PRESENT  # 3 + 1 negative
    masked = RefSAMMapper(dataset_names=hand_made, pool_area="mask")
    assert 9 not in masked.pool and len(ours.pool[9]) == 6  # box 40 x 30 >= 1024, mask area 500 < 1024
    assert {a["area"] for _, a in published.pool[3]} == {32.0 * 33.0}  # the json's "area", kept by the pool loader
    assert {a["id"] for _, a in published.pool[3]} == {1 + 6 * i for i in range(6)}  # the json's ids


def test_published_references_go_through_the_target_augmentations(hand_made):
    flip = RefSAMMapper(dataset_names=hand_made, max_categories=1, num_negatives=0,
                        reference_augmentations=[random_flip(prob=1.0)])
    plain = RefSAMMapper(dataset_names=hand_made, max_categories=1, num_negatives=0)
    record = DatasetCatalog.get(hand_made)[0]
    np.random.seed(3)
    flipped = flip(record)["references"][0]
    np.random.seed(3)
    original = plain(record)["references"][0]
    assert (flipped["annotation_id"], flipped["category_id"]) == (original["annotation_id"], original["category_id"])
    assert torch.equal(flipped["image"], original["image"].flip(-1))
    x0, y0, x1, y1 = original["box"].tolist()
    torch.testing.assert_close(flipped["box"], torch.tensor([48 - x1, y0, 48 - x0, y1]))


def test_set_order_sampling_lists_references_in_python_set_order(hand_made):
    two = RefSAMMapper(dataset_names=hand_made, categories=["class3", "class10"], max_categories=None,
                       num_negatives=0, category_sampling="set_order")
    labels = [r["category_id"] for r in two(DatasetCatalog.get(hand_made)[0])["references"]]
    assert labels == list({3, 10}) == [10, 3]  # in a set of 8 slots, 10 sits at 10 % 8 = 2, before 3
    shuffled = RefSAMMapper(dataset_names=hand_made, categories=["class3", "class10"], num_negatives=0)
    orders = {tuple(r["category_id"] for r in shuffled(DatasetCatalog.get(hand_made)[0])["references"])
              for _ in range(20)}
    assert orders == {(3, 10), (10, 3)}  # ours: a random order (paired by category id, order is harmless)
    capped = RefSAMMapper(dataset_names=hand_made, max_categories=2, num_negatives=0, pool_area="box",
                          category_sampling="set_order")
    for record in DatasetCatalog.get(hand_made):
        labels = [r["category_id"] for r in capped(record)["references"]]
        order = list(set(capped(record)["instances"].gt_classes.tolist()))
        assert len(labels) == 2 and order.index(labels[0]) < order.index(labels[1])  # a subset, in set order


def test_standard_test_draws_one_reference_per_present_class_fixed_per_image(hand_made):
    def draws(mapper, record):
        return [(r["category_id"], r["annotation_id"]) for r in mapper(record)["references"]]

    test = RefSAMMapper(dataset_names=hand_made, max_categories=None, num_negatives=0, pool_area="mask", seed=0)
    records = DatasetCatalog.get(hand_made)
    first = [draws(test, r) for r in records]
    np.random.seed(123)  # the global RNG plays no part
    assert [draws(test, r) for r in reversed(records)] == first[::-1]
    for record, drawn in zip(records, first):
        assert sorted(c for c, _ in drawn) == sorted(PRESENT - {9})  # one per present class with candidates
        assert all(min((a - 1) // 6, 5) + 1 != record["image_id"] for _, a in drawn)  # from another image
    other = RefSAMMapper(dataset_names=hand_made, max_categories=None, num_negatives=0, pool_area="mask", seed=1)
    assert [draws(other, r) for r in records] != first
    capped = RefSAMMapper(dataset_names=hand_made, max_categories=2, num_negatives=0, pool_area="mask", seed=0,
                          categories=[f"class{c}" for c in sorted(PRESENT - {9})])
    assert all(len(draws(capped, r)) == 2 for r in records)  # the per-size validation cap (8 L, 6 H)


# ----------------------------------------------------------------------------- the model
class _ScoreByPrompt(nn.Module):
    """A stand-in head: query q of prompt p scores sigmoid(p[0] - q), boxes all the same."""

    def __init__(self, num_queries: int = 5):
        super().__init__()
        self.num_queries = num_queries

    def forward(self, levels, prompts, masks=None):
        logits = prompts[:, :1] - torch.arange(self.num_queries, dtype=torch.float32)[None]
        boxes = torch.tensor([0.5, 0.5, 0.2, 0.2]).expand(len(prompts), self.num_queries, 4)
        return {"pred_logits": logits[..., None], "pred_boxes": boxes}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return instantiate(LazyConfig.load(TINY_PUBLISHED).model).eval()


def test_topk_per_image_or_per_class(tiny_model):
    model = tiny_model
    head, topk, scope = model.head, model.topk, model.topk_scope
    try:
        model.head, model.topk = _ScoreByPrompt(), 2
        prompts = torch.zeros(3, 64)
        prompts[:, 0] = torch.tensor([10.0, 0.0, 5.0])  # class 0 best, then 2, then 1
        classes = torch.tensor([4, 6, 7])  # the rows' labels
        model.topk_scope = "image"
        scores, labels, _ = model._detect([], prompts, torch.arange(3))
        assert classes[labels].tolist() == [4, 4]  # both from the best class
        model.topk_scope = "class"
        scores, labels, boxes = model._detect([], prompts, torch.arange(3))
        assert classes[labels].tolist() == [4, 4, 6, 6, 7, 7] and boxes.shape == (6, 4)
        torch.testing.assert_close(scores, torch.tensor([10.0, 9.0, 0.0, -1.0, 5.0, 4.0]).sigmoid())
    finally:
        model.head, model.topk, model.topk_scope = head, topk, scope


def _standard_test_inputs(hand_made):
    mapper = RefSAMMapper(dataset_names=hand_made, max_categories=3, num_negatives=0, pool_area="mask", seed=0,
                          categories=[f"class{c}" for c in sorted(PRESENT - {9})])
    return [mapper(r) for r in DatasetCatalog.get(hand_made)[:2]]


def test_standard_test_mode_queries_each_image_with_its_own_references(tiny_model, hand_made):
    model = tiny_model
    assert model.query_classes == "image_references" and model.topk_scope == "class" and model.reference_bank is None
    model.prepare_references()  # nothing to prepare: no reference bank
    inputs = _standard_test_inputs(hand_made)
    inputs[1]["references"] = []  # an image without references: nothing asked, nothing found
    out = model(inputs)
    first = out[0]["instances"]
    drawn = [r["category_id"] for r in inputs[0]["references"]]
    assert len(drawn) == 3 and sorted(first.pred_classes.unique().tolist()) == sorted(drawn)
    assert first.pred_classes.bincount(minlength=NUM_CLASSES)[drawn].tolist() == [model.head.num_queries] * 3
    assert len(out[1]["instances"]) == 0
    with pytest.raises(ValueError, match="needs 'references'"):
        model([{k: v for k, v in inputs[0].items() if k != "references"}])


def test_reference_pairing_by_category_id_or_by_sorted_position(tiny_model):
    model = tiny_model
    inputs = [{"references": [{"category_id": 10}, {"category_id": 3}]}, {"references": [{"category_id": 5}]}]
    assert model._paired_categories(inputs) == [10, 3, 5]
    model.reference_pairing = "sorted_position"  # the published defect
    try:
        assert model._paired_categories(inputs) == [3, 10, 5]
    finally:
        model.reference_pairing = "category_id"


# ----------------------------------------------------------------------------- configs
TINY_SAM_OVERRIDES = [
    "model.proposer.backbone.size=tiny",
    "model.proposer.backbone.pretrained=False",
    "model.proposer.decoder_weights=null",
    "model.proposer.backbone.out_features=[neck,block0,block1]",
    "model.feature_names=[block0,block1,block1,block1]",
]


@pytest.mark.parametrize(
    "name, batch, per_epoch, cap", [("b", 48, 2444, None), ("l", 28, 4189, 8), ("h", 28, 4189, 6)]
)
def test_published_configs_resolve_the_authors_values(name, batch, per_epoch, cap):
    cfg = LazyConfig.load(os.path.join(PUBLISHED, f"hq_sam_vit_{name}_coco.py"))
    assert cfg.dataloader.train.total_batch_size == batch
    assert cfg.train.max_iter == 50 * per_epoch and list(cfg.lr_multiplier.milestones) == [40 * per_epoch, 50 * per_epoch]
    train_mapper, test_mapper = cfg.dataloader.train.mapper, cfg.dataloader.test.mapper
    assert (train_mapper.max_categories, train_mapper.num_negatives, train_mapper.pool_area) == (4, 0, "mask")
    assert train_mapper.reference_augmentations == train_mapper.augmentations
    assert (test_mapper.max_categories, test_mapper.num_negatives, test_mapper.seed) == (cap, 0, 0)
    assert train_mapper.get("image_format", "RGB") == "RGB" and cfg.model.reference_pairing == "category_id"
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.max_norm) == (2e-4, 1e-4, 0.1)
    if name != "b":
        return
    check_override_keys(cfg, TINY_SAM_OVERRIDES)
    model = instantiate(LazyConfig.apply_overrides(cfg, TINY_SAM_OVERRIDES).model)
    assert model.neck.strides == (16, 16, 16, 16)
    transformer = model.head.transformer
    assert [layer.ffn.linear1.out_features for layer in transformer.encoder_layers] == [512]
    assert [layer.deformable.ffn.linear1.out_features for layer in transformer.decoder_layers] == [1024] * 6
    assert [float(mlp.layers[-1].bias.detach()[2]) for mlp in transformer.bbox_embed] == [-2.0] + [0.0] * 5
    assert (model.topk, model.topk_scope, model.query_classes, model.head.num_queries) == (100, "class",
                                                                                          "image_references", 300)


DEFECTS = [
    "dataloader.train.mapper.image_format=BGR",
    "dataloader.test.mapper.image_format=BGR",
    "model.reference_pairing=sorted_position",
    "dataloader.train.mapper.category_sampling=set_order",
    "dataloader.test.mapper.category_sampling=set_order",
]


def test_published_defects_are_named_options(hand_made):
    cfg = LazyConfig.load(TINY_PUBLISHED)
    check_override_keys(cfg, DEFECTS)  # every key exists: train_net.py accepts them
    cfg = LazyConfig.apply_overrides(cfg, DEFECTS)
    cfg.dataloader.test.mapper.dataset_names = hand_made
    bgr, rgb = instantiate(cfg.dataloader.test.mapper), RefSAMMapper(dataset_names=hand_made, num_negatives=0, seed=0)
    record = DatasetCatalog.get(hand_made)[0]
    assert torch.equal(bgr(record)["image"], rgb(record)["image"].flip(0))
    assert bgr.category_sampling == "set_order" and cfg.model.reference_pairing == "sorted_position"


def test_ours_stays_the_default_of_the_common_config():
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "ref_sam", "hq_sam_vit_b_coco.py"))
    assert tuple(cfg.model.neck.strides) == (8, 16, 32, 64) and cfg.model.transformer.size_bias_layers == "all"
    assert (cfg.dataloader.train.mapper.max_categories, cfg.dataloader.train.mapper.num_negatives) == (3, 1)
    assert (cfg.model.topk_scope, cfg.model.query_classes, cfg.dataloader.train.total_batch_size) == ("image", "all", 16)
