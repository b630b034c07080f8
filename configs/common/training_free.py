# Training-free instance segmentation (SAM proposals + DINOv2 prototypes), evaluated with --eval-only:
#   python train_net.py --config-file configs/training_free/<x>.py --eval-only
# The label space (the test set's classes) and the reference set are resolved when the config is
# built (build_reference_bank). The first run computes the memory bank of the references (stored
# under $SAMANTICS_CACHE/references/memory_bank with its provenance: docs/references.md); later runs
# reuse it while the references, encoder and weights are unchanged.
# Defaults: the "No Time to Train" recipe (DESIGN.md).
from samantics_d2.d2 import LazyCall as L
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch import TrainingFreeSegmenter, build_sam_proposer
from samantics_d2.modeling.semantic import MemoryBankConfig, PrototypeClassifier
from samantics_d2.references import build_reference_bank

from .data.coco import dataloader
from .train import train

model = L(TrainingFreeSegmenter)(
    proposer=L(build_sam_proposer)(
        backbone=L(build_encoder)(
            tag="sam2.1_hiera_l",
            pretrained=True,
            input_size=1024,  # (the tag's; DINOv2's target is first resized to it too, below)
            out_features=["p2", "p3", "p4"],
            fit="resize_square",  # theirs: 1024 x 1024, aspect ratio ignored,
            interpolation="pil_bicubic",  # with PIL's bicubic (sam2's _load_img_as_tensor)
        ),
        decoder_weights="${.backbone.tag}",  # the prompt decoder comes from the same checkpoint
        # theirs: the bare mask decoder on the backbone features (no no_mem_embed, no logit clamp)
        decoder_options={"predictor_steps": False},
        points_per_side=32,  # 32 x 32 single-point prompts
        points_per_batch=256,
        multimask_output=True,  # best of 3 masks by predicted IoU
        pred_iou_thresh=0.4,
        point_layout="input_linspace",  # theirs: linspace(0, S-1, n) + 0.5 over the input, x slowest
    ),
    # 37 x 37 patches over the whole image, no centre crop. Theirs, in two steps: the target as
    # loaded for SAM (PIL bicubic to the SAM input square), that tensor then F.interpolate bicubic
    # (no antialias, float) to 518 x 518
    semantic_encoder=L(build_encoder)(
        tag="dinov2_vitl14",
        pretrained=True,
        input_size=518,
        fit="resize_square",
        pre_resize=("${...proposer.backbone.input_size}", "pil_bicubic"),
        interpolation="bicubic_float",
    ),
    # No Time to Train's post-processing, step by step (docs/results.md has the AP of each variant):
    classifier=L(PrototypeClassifier)(
        score_floor=0.0,  # masks scoring <= 0 are dropped
        nms_thresh=0.5,
        merge="soft",
        topk=100,
        nms_rank="predicted_iou",  # NMS ranks by SAM's predicted IoU, not by the semantic score
        merge_order="nms",  # the soft merge's "earlier" is NMS order
        box_convention="inclusive",  # boxes as sam2's batched_mask_to_box
        nms_cap_factor=8,  # at most 8 x topk NMS survivors
        pooling="mask_grid",  # features upsampled to the mask grid, mean where the logit > 0
        merge_resolution="original",  # merge on the full-size masks
    ),
    reference_bank=L(build_reference_bank)(
        references="coco_2017_train_novel_ref30_seed0", shots=30, dataset_name="${dataloader.test.dataset.names}"
    ),
    aggregation="mean",
    # theirs (COCOMemoryFillCropDataset, context_ratio=0.2): a square of 1.2 x the box's longer side
    # (0.1 per side) from the integer box, clipped to the image, bicubic (no antialias) to 518; the
    # mask bilinear to 518 then nearest to the 37 x 37 grid
    memory_bank=L(MemoryBankConfig)(
        crop="square_clipped", context=0.1, mask_weights="bilinear_nearest", crop_interpolation="bicubic_float"
    ),
    prompt_mode="points",
    # theirs: a detection whose mask is empty at the image size (a thin proposal lost when the mask
    # grid is resized down) is kept; tools/segment.py and the web app set True (USER_TOOL_OVERRIDES)
    drop_empty_masks=False,
)

dataloader.test.dataset.names = "coco_2017_val_novel"
del dataloader.train  # training-free: evaluation only

train.output_dir = "./output/training_free"
