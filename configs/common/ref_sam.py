# RefSAM (reference-prompted SAM), OUR recipe (DESIGN.md, "RefSAM as published", and docs/ref_sam.md):
# frozen HQ-SAM ViT-B; mask tokens of each box-prompted reference -> MLP fuser (1280 -> 1024 ->
# 1024 -> 256); the 4 global-attention block outputs -> 1x1 conv + GroupNorm neck -> Deformable
# DETR (1 encoder layer, 6 decoder layers, 300 queries, box refinement) with the class prompt
# added to every query; Hungarian matching and losses focal 2 / L1 5 / GIoU 2 on every layer;
# AdamW 2e-4, weight decay 1e-4, gradient clipping 0.1, 50 epochs with lr x0.1 at 40.
# Ours differs from the authors' code (github miquel-espinosa/samantics, reference_sam/) in: a multi-stride
# neck (8/16/32/64), encoder FFN 1024, -2 w/h bias on every box branch, 3 categories + 1 negative per
# image, unaugmented references, a box-area reference pool, batch 16, evaluation over every class
# with top-100 per image. `published_recipe()` + `published_schedule()` below give the authors'
# recipe (configs/ref_sam/published/*), keeping our two fixes (RGB input, references paired with GT by
# category id), each with a named option to turn it off (published_recipe's docstring).
#
# Train:     python train_net.py --config-file configs/ref_sam/hq_sam_vit_b_coco.py
# Evaluate:  python train_net.py --config-file ... --eval-only train.init_checkpoint=<model_final.pth>
#            (references encoded on the fly), or with cached tokens:
#            python tools/ref_sam_embeds.py compute --config-file ... --references coco_2017_train_ref10_seed0 \
#                --output embeds.safetensors train.init_checkpoint=<...>
#            python tools/ref_sam_embeds.py eval --config-file ... --embeds embeds.safetensors --shots 5 \
#                train.init_checkpoint=<...>
# Experiment files pick the SAM with `use_sam(model, tag, feature_names=...)` and the classes with
# `base_only(...)`.
from fvcore.common.param_scheduler import MultiStepParamScheduler

from samantics_d2.d2 import LazyCall as L
from samantics_d2.d2 import get_default_optimizer_params
from samantics_d2.data.mapper import random_flip
from samantics_d2.data.ref_sam_mapper import RefSAMMapper
from samantics_d2.data.reference_sets import COCO_BASE_CLASSES
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch.ref_sam import (
    build_optimizer_with_grad_clip,
    build_ref_sam,
    ref_sam_lr_factor_func,
)
from samantics_d2.modeling.meta_arch.training_free import build_sam_proposer
from samantics_d2.modeling.ref_sam import HungarianMatcher, SetCriterion
from samantics_d2.references import build_reference_bank

from .data.coco import dataloader
from .train import train

# The fuser, neck and head are sized from the built SAM (build_ref_sam, as ViTDet's feature pyramid
# reads net.output_shape()): the neck's input channels and stride from backbone.output_shape() of
# feature_names, the fuser's tokens (4 SAM, 5 HQ-SAM) and width from its prompt decoder, one level per
# feature name; any SAM variant or size (model.proposer.backbone.size=tiny) gets parts that fit it.
model = L(build_ref_sam)(
    proposer=L(build_sam_proposer)(
        backbone=L(build_encoder)(
            tag="hq_sam_vit_b", pretrained=True, out_features=["neck", "block2", "block5", "block8", "block11"]
        ),
        decoder_weights="${.backbone.tag}",  # the prompt decoder comes from the same checkpoint
    ),
    feature_names=["block2", "block5", "block8", "block11"],  # ViT-B's global-attention blocks
    d_model=256,
    fuser=dict(hidden_dim=1024),
    neck=dict(strides=(8, 16, 32, 64)),  # ours; None: every level at the block's stride 16 (published)
    transformer=dict(
        num_encoder_layers=1, num_decoder_layers=6, n_heads=8, enc_n_points=4, dec_n_points=4,
        size_bias_layers="all",  # ours; "first": -2 w/h bias on the first box branch only (published)
    ),
    head=dict(num_queries=300),
    criterion=L(SetCriterion)(
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
        loss_weight={"loss_focal": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
    ),
    # eval: the label space (the test set's classes) and the references of the class prompts, resolved
    # when the config is built; their tokens are encoded once the weights are loaded (references store).
    reference_bank=L(build_reference_bank)(
        references="coco_2017_train_ref10_seed0", shots=10, dataset_name="${dataloader.test.dataset.names}"
    ),
    query_classes="all",  # "present" is the published (oracle) evaluation
    box_source="predicted",
    classes_per_batch=16,
    topk=100,
    topk_scope="image",  # "class": the published top-100 per (image, queried class)
    reference_pairing="category_id",  # "sorted_position": the published pairing defect
)


def use_sam(model, tag: str, *, feature_names: list[str]) -> None:
    """Point ``model`` at SAM / HQ-SAM ``tag`` (``"sam_vit_l"``, ``"hq_sam_vit_h"``...) whose block
    outputs ``feature_names`` (its global-attention blocks) feed the neck, one level each."""
    model.proposer.backbone.tag = tag
    model.proposer.backbone.out_features = ["neck", *feature_names]
    model.feature_names = list(feature_names)


def use_tiny_sam(model, *, input_size: int = 128) -> None:
    """Swap in the tiny random SAM (ViT depth 2, width 32, one global-attention block: block1) and
    a head to match, for CPU demos and tests. The windowed block0 gives a finer level; there is no
    deformable encoder layer (the head runs it once per (image, reference) pair, which would double
    the cost on CPU)."""
    model.proposer.backbone.update(size="tiny", pretrained=False, input_size=input_size)
    model.proposer.decoder_weights = None
    use_sam(model, "sam_vit_b", feature_names=["block0", "block1", "block1"])
    model.d_model = 64
    model.neck.strides = (8, 16, 32)
    model.fuser.hidden_dim = 128
    model.transformer.update(num_encoder_layers=0, num_decoder_layers=3, n_heads=4, d_ffn=128, dropout=0.0)
    model.head.num_queries = 20


dataloader.train.mapper = L(RefSAMMapper)(
    dataset_names="${..dataset.names}",
    augmentations=[L(random_flip)(horizontal=True)],
    max_categories=3,
    num_negatives=1,
    categories=None,  # all classes; base_only() restricts to the COCO-FSOD base classes
    min_area=32 * 32,
    pool_area="box",  # ours; "mask": the annotation's mask area, as published
    reference_augmentations=None,  # ours; published: the target's augmentations (an independent flip)
)


def base_only(model, dataloader) -> None:
    """Train on the COCO-FSOD base classes only; evaluate on the novel classes (unseen)."""
    dataloader.train.mapper.categories = list(COCO_BASE_CLASSES)
    dataloader.test.dataset.names = "coco_2017_val_novel"
    model.reference_bank.references = "coco_2017_train_novel_ref10_seed0"


optimizer = L(build_optimizer_with_grad_clip)(
    optimizer_class="torch.optim.AdamW",
    params=L(get_default_optimizer_params)(
        base_lr="${..lr}",
        weight_decay_norm=0.0,
        # Deformable DETR: sampling offsets and reference points learn at 0.1x the base rate.
        lr_factor_func=L(ref_sam_lr_factor_func)(factor=0.1),
    ),
    lr=2e-4,
    weight_decay=1e-4,
    max_norm=0.1,
)

# COCO train2017: 117,266 images / 16 per batch = 7,329 iterations per epoch;
# 50 epochs = 366,450 iterations, lr x0.1 after 40 epochs (293,160).
train.max_iter = 366450
lr_multiplier = L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[293160, 366450])  # no warm-up
train.eval_period = 36645  # every 5 epochs
train.checkpointer = dict(period=7329, max_to_keep=5)
train.output_dir = "./output/ref_sam/hq_sam_vit_b_coco"


# ---------------------------------------------------------------- the authors' recipe (docs/ref_sam.md)
COCO_TRAIN_IMAGES = 117266  # COCO train2017 images with annotations (the authors filter empty ones too)


def published_model(model) -> None:
    """The authors' head over whatever SAM and sizes ``model`` has (call it after use_sam / use_tiny_sam):
    1x1 conv + GroupNorm per block with every level at the block's own stride (16); encoder FFN
    2 x d_model (512; the decoder's stays as set, 1024); -2 w/h bias on the first box branch only."""
    model.neck.strides = None
    model.transformer.encoder_d_ffn = 2 * model.d_model
    model.transformer.size_bias_layers = "first"


def published_training(dataloader) -> None:
    """The authors' training sampling: 4 present categories per image and no negative, references
    through the target's augmentations (an independent random flip), reference pool filtered by the
    mask area. Our fixes stay on: RGB (``image_format="BGR"``: the published defect) and references
    paired with GT by category id (``category_sampling="set_order"`` + ``model.reference_pairing=
    "sorted_position"``: the published defect)."""
    mapper = dataloader.train.mapper
    mapper.max_categories = 4
    mapper.num_negatives = 0
    mapper.pool_area = "mask"
    mapper.reference_augmentations = mapper.augmentations
    mapper.image_format = "RGB"
    mapper.category_sampling = "shuffled"


def standard_test(model, dataloader, *, test_max_categories=None) -> None:
    """The authors' evaluation, the "standard test": one random test-set reference per present class,
    drawn per image (seeded by (0, image_id) so reruns agree), at most ``test_max_categories`` classes
    per image (their per-size caps: None ViT-B, 8 ViT-L, 6 ViT-H), top-100 per (image, queried class)."""
    model.topk_scope = "class"
    model.query_classes = "image_references"
    model.reference_bank = None  # each image's own references
    dataloader.test.mapper = L(RefSAMMapper)(
        dataset_names="${..dataset.names}",
        augmentations=[],
        max_categories=test_max_categories,
        num_negatives=0,
        min_area=dataloader.train.mapper.min_area,
        pool_area="mask",
        seed=0,
        image_format="RGB",
        category_sampling="shuffled",
    )


def published_recipe(model, dataloader, *, test_max_categories=None) -> None:
    """The authors' code (reference_sam/: RefSAMDetector, COCORefSegTrainDataset,
    work_configs/RefSAM_det_coco_{base,large,huge}.py) but for our two fixes: published_model,
    published_training and standard_test. To reproduce the published defects too (command-line
    overrides):

    - BGR images normalised with RGB statistics:
      ``dataloader.train.mapper.image_format=BGR dataloader.test.mapper.image_format=BGR``;
    - references paired with GT by position (references in ``set`` order of their labels, GT sorted):
      ``model.reference_pairing=sorted_position dataloader.train.mapper.category_sampling=set_order
      dataloader.test.mapper.category_sampling=set_order``.
    """
    published_model(model)
    published_training(dataloader)
    standard_test(model, dataloader, test_max_categories=test_max_categories)


def published_schedule(dataloader, train, *, batch_size: int, images_per_epoch: int = COCO_TRAIN_IMAGES):
    """The authors' batch (48 = 16 GPUs x 3 for ViT-B, 28 = 28 GPUs x 1 for ViT-L/H, at the same lr
    2e-4: their auto_scale_lr is off) and 50 epochs with lr x0.1 after 40, in iterations of
    ``batch_size``. Returns the lr_multiplier."""
    per_epoch = -(-images_per_epoch // batch_size)  # their sampler keeps the last, partial batch
    dataloader.train.total_batch_size = batch_size
    train.max_iter = 50 * per_epoch
    train.eval_period = 5 * per_epoch
    train.checkpointer = dict(period=per_epoch, max_to_keep=5)
    return L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[40 * per_epoch, 50 * per_epoch])

