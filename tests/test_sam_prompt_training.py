"""PromptableSamTrainer: training a tiny SAM on shapes, its checkpoint in TrainingFreeSegmenter, the recall evaluator."""
import logging

import pytest
import torch

from samantics_d2.d2 import BitMasks, DetectionCheckpointer, Instances, load_coco_json
from samantics_d2.data.mapper import DetectionMapper
from samantics_d2.data.shapes import generate_shapes
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch.sam_prompt_training import (
    PromptableSamTrainer,
    ProposalRecallEvaluator,
    masks_to_mask_frame,
    sample_points_in_masks,
)
from samantics_d2.modeling.meta_arch.training_free import TrainingFreeSegmenter, build_sam_proposer
from samantics_d2.modeling.preprocess import fit_image, preprocess_spec
from samantics_d2.modeling.semantic import PrototypeClassifier, mask_iou_matrix
from samantics_d2.references import ReferenceBank

# Tiny SAM built for 128 px inputs: 8x8 image tokens, 32x32 low-res masks; a 4x4 grid at eval.
SAM_ARGS = dict(tag="sam_vit_b", size="tiny", input_size=128)
GRID = dict(points_per_side=4, pred_iou_thresh=None)


def _trainer(seed: int, **options) -> PromptableSamTrainer:
    torch.manual_seed(seed)
    return PromptableSamTrainer(proposer=build_sam_proposer(backbone=build_encoder(**SAM_ARGS), **GRID), **options)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Three 64 px shapes images as training inputs (image, instances with gt_masks)."""
    root = tmp_path_factory.mktemp("shapes")
    json_file = generate_shapes(str(root), num_images=3, image_size=64, seed=0)
    mapper = DetectionMapper(is_train=True, augmentations=[])
    inputs = [mapper(d) for d in load_coco_json(json_file, str(root / "images"))]
    assert all(len(x["instances"]) >= 1 for x in inputs)
    return inputs


def test_sampled_points_lie_in_their_masks():
    masks = torch.zeros(2, 20, 30, dtype=torch.bool)
    masks[0, 7, 11] = True  # a one-pixel mask
    masks[1, 2:18, 5:25] = True
    torch.manual_seed(0)
    points, index = sample_points_in_masks(masks, 400)
    assert points.shape == (400, 2) and index.shape == (400,)
    assert set(index.tolist()) == {0, 1}
    x, y = points[:, 0], points[:, 1]
    assert bool(masks[index, y.floor().long(), x.floor().long()].all())
    single = index == 0
    assert bool(((x[single] >= 11) & (x[single] < 12) & (y[single] >= 7) & (y[single] < 8)).all())
    with pytest.raises(ValueError, match="N >= 1"):
        sample_points_in_masks(masks[:0], 3)


def test_targets_follow_the_image_fit():
    # A 48x64 image: SAM's fit resizes it by 2 into 128x128 and pads the bottom 32 rows.
    spec = preprocess_spec("sam_vit_b", input_size=128)
    _, fit = fit_image(torch.zeros(3, 48, 64, dtype=torch.uint8), spec)
    mask = torch.zeros(1, 48, 64, dtype=torch.bool)
    mask[0, 10:30, 8:40] = True
    target = masks_to_mask_frame(mask, fit, mask_size=32)  # 4 input px = 2 image px per target pixel
    assert target.shape == (1, 32, 32)
    # Image rows 10:30, columns 8:40 -> target rows 5:15, columns 4:20; the padding (rows >= 24) is 0.
    expected = torch.zeros(32, 32)
    expected[5:15, 4:20] = 1
    assert torch.allclose(target[0], expected, atol=1e-5)


def test_loss_decreases_and_reaches_encoder_and_decoder(batch):
    model = _trainer(0, points_per_image=8)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(20):
        losses = model(batch)
        assert set(losses) == {"loss_mask_focal", "loss_mask_dice", "loss_iou"}
        assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        if step == 0:
            backbone = model.proposer.backbone
            decoder = model.proposer.proposals.decoder.mask_decoder
            no_grad = [n for n, p in backbone.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
            assert not no_grad, f"encoder parameters without gradient: {no_grad}"
            # Only the best of the 3 masks of a click is supervised: its hypernetwork gets the mask
            # gradient; the single-mask output (index 0) is not used with multimask_output.
            for part in (decoder.transformer, decoder.iou_prediction_head, decoder.output_upscaling,
                         decoder.output_hypernetworks_mlps[1:]):
                grads = [p.grad for p in part.parameters()]
                assert all(g is not None and torch.isfinite(g).all() for g in grads)
                assert sum(float(g.abs().sum()) for g in grads) > 0
            assert all(p.grad is None or not p.grad.any() for p in decoder.output_hypernetworks_mlps[0].parameters())
        optimizer.step()
        history.append(float(total.detach()))
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last < 0.6 * first, history


def _attention_to_click(model, batch):
    """Mean attention (over layers, heads) of the image tokens inside vs outside the clicked instance."""
    from samantics_d2.modeling.meta_arch import sam_prompt_training as spt

    decoder = model.proposer.proposals.decoder
    backbone = model.proposer.backbone
    inside_total, outside_total = [], []
    with torch.no_grad():
        x, fits = backbone.prepare_with_fits([b["image"] for b in batch])
        features = backbone(x)
        for i, (b, fit) in enumerate(zip(batch, fits)):
            masks = b["instances"].gt_masks.tensor
            torch.manual_seed(i)
            points, index = sample_points_in_masks(masks, 8)
            sparse, dense = decoder.embed_prompts(points=fit.points_to_input(points)[:, None], point_labels=torch.ones(8, 1, dtype=torch.long))
            with spt._capture_inputs(spt._image_to_token_attentions(decoder)) as captured:
                decoder.decode_embeddings(decoder.prepare_image({k: v[i] for k, v in features.items()}), sparse, dense, multimask_output=True)
            targets = masks_to_mask_frame(masks[index], fit, mask_size=decoder.mask_size)
            side = int(captured[0][1].shape[1] ** 0.5)
            inside = torch.nn.functional.adaptive_avg_pool2d(targets[:, None], side)[:, 0].flatten(1) > 0.5
            for attention, q, k in captured:
                heads = attention.num_heads
                query = attention.q_proj(q).unflatten(-1, (heads, -1)).transpose(1, 2)
                key = attention.k_proj(k).unflatten(-1, (heads, -1)).transpose(1, 2)
                to_click = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(-1)[..., -2].mean(1)
                inside_total.append(to_click[inside].mean())
                outside_total.append(to_click[~inside].mean())
    return float(torch.stack(inside_total).mean()), float(torch.stack(outside_total).mean())


def test_click_attention_loss_teaches_the_decoder_to_attend_to_the_click(batch):
    model = _trainer(0, points_per_image=8, click_attention_weight=5.0)
    model.train()
    losses = model(batch)
    assert set(losses) == {"loss_mask_focal", "loss_mask_dice", "loss_iou", "loss_click_attention"}
    attention = losses["loss_click_attention"]
    assert attention.ndim == 0 and torch.isfinite(attention) and float(attention.detach()) > 0
    attention.backward()
    q_proj = model.proposer.proposals.decoder.mask_decoder.transformer.layers[0].cross_attn_image_to_token.q_proj
    assert q_proj.weight.grad is not None and bool(q_proj.weight.grad.any())
    # Trained on that loss alone, the image tokens of the clicked instance attend to the click more
    # than the others do (at initialisation the two are about equal).
    before_in, before_out = _attention_to_click(model, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        model(batch)["loss_click_attention"].backward()
        optimizer.step()
    after_in, after_out = _attention_to_click(model, batch)
    assert abs(before_in - before_out) < 0.05, (before_in, before_out)
    assert after_in > after_out + 0.2, (after_in, after_out)
    # Off by default (SAM's recipe); a negative weight is rejected.
    assert "loss_click_attention" not in _trainer(0, points_per_image=2).train()(batch)
    with pytest.raises(ValueError, match="click_attention_weight=-1"):
        _trainer(0, click_attention_weight=-1)


def test_loss_weight_scales_each_loss_and_picks_the_supervised_mask(batch):
    """Detectron2's ``loss_weight`` convention; the mask losses' weights also choose the mask of each
    click that is supervised, so weighting dice alone changes the focal loss too."""
    default = _trainer(0, points_per_image=4).train()
    assert default.loss_weight == {"loss_mask_focal": 20.0, "loss_mask_dice": 1.0, "loss_iou": 1.0}
    torch.manual_seed(1)
    reference = default(batch)
    iou = _trainer(0, points_per_image=4, loss_weight={"loss_iou": 3.0}).train()
    torch.manual_seed(1)
    scaled = iou(batch)
    torch.testing.assert_close(scaled["loss_iou"], 3 * reference["loss_iou"])
    assert torch.equal(scaled["loss_mask_focal"], reference["loss_mask_focal"])
    dice_only = _trainer(0, points_per_image=4, loss_weight={"loss_mask_focal": 0.0}).train()
    torch.manual_seed(1)
    losses = dice_only(batch)
    assert float(losses["loss_mask_focal"].detach()) == 0
    assert float(losses["loss_mask_dice"].detach()) < float(reference["loss_mask_dice"].detach())  # dice-best masks
    with pytest.raises(ValueError, match=r"PromptableSamTrainer: loss_weight names \['loss_focal'\]"):
        _trainer(0, loss_weight={"loss_focal": 1.0})


def test_box_prompts_train_the_single_mask_output(batch):
    model = _trainer(0, points_per_image=4, box_fraction=0.5)
    model.train()
    losses = model(batch)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    decoder = model.proposer.proposals.decoder
    single = [p.grad for p in decoder.mask_decoder.output_hypernetworks_mlps[0].parameters()]
    assert all(g is not None for g in single) and sum(float(g.abs().sum()) for g in single) > 0
    box_corners = decoder.prompt_encoder.point_embeddings[2].weight.grad
    assert box_corners is not None and bool(box_corners.any())
    with pytest.raises(ValueError, match="box_fraction"):
        _trainer(0, box_fraction=1.5)


def test_images_without_instances(batch):
    model = _trainer(0, points_per_image=4)
    model.train()
    empty = dict(batch[0], instances=Instances(batch[0]["instances"].image_size,
                                               gt_masks=BitMasks(torch.zeros(0, 64, 64, dtype=torch.bool))))
    mixed = model([empty, batch[1]])
    assert all(torch.isfinite(v) and float(v.detach()) > 0 for v in mixed.values())
    nothing = model([empty])
    assert all(float(v.detach()) == 0 for v in nothing.values())
    sum(nothing.values()).backward()  # a zero loss that still reaches every parameter (DDP)
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="GT instance masks"):
        model([{k: v for k, v in batch[0].items() if k != "instances"}])


def test_eval_returns_class_agnostic_proposals(batch):
    model = _trainer(1).eval()
    x = dict(batch[0], height=96, width=96)  # the mapper resized a 96 px original to 64 px
    with torch.no_grad():
        (output,) = model([x])
        proposals = model.proposer(x["image"])
    result = output["instances"]
    assert result.image_size == (96, 96)
    assert len(result) == len(proposals) > 0
    assert result.pred_masks.dtype == torch.bool and result.pred_masks.shape[1:] == (96, 96)
    assert torch.equal(result.scores, proposals.iou_pred.float())
    assert result.pred_classes.dtype == torch.int64 and not result.pred_classes.any()
    boxes = result.pred_boxes.tensor
    for mask, box in zip(result.pred_masks, boxes):
        if mask.any():
            ys, xs = mask.nonzero(as_tuple=True)
            assert box[0] <= xs.min() and xs.max() < box[2] and box[1] <= ys.min() and ys.max() < box[3]


def test_checkpoint_loads_into_training_free_segmenter(batch, tmp_path, caplog):
    trainer = _trainer(0, points_per_image=4)
    trainer.train()
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    optimizer.zero_grad()
    sum(trainer(batch).values()).backward()
    optimizer.step()
    trainer.eval()
    DetectionCheckpointer(trainer, str(tmp_path)).save("model_final")

    torch.manual_seed(123)  # other random weights than the trainer's
    segmenter = TrainingFreeSegmenter(
        proposer=build_sam_proposer(backbone=build_encoder(**SAM_ARGS), **GRID),
        semantic_encoder=build_encoder("dinov2_vits14", size="tiny"),
        classifier=PrototypeClassifier(),
        reference_bank=ReferenceBank(class_names=["red circle"], reference_classes=["red circle"]),
    ).eval()
    image = batch[0]["image"]
    with torch.no_grad():
        expected = trainer.proposer(image)
        before = segmenter.proposer(image)
    assert not torch.equal(before.mask_logits, expected.mask_logits)

    with caplog.at_level(logging.WARNING):
        DetectionCheckpointer(segmenter).load(str(tmp_path / "model_final.pth"))
    missing = "\n".join(r.getMessage() for r in caplog.records if "not found in the checkpoint" in r.getMessage())
    assert "semantic_encoder" in missing and "proposer" not in missing

    trained = trainer.state_dict()
    loaded = {k: v for k, v in segmenter.state_dict().items() if k.startswith("proposer.")}
    assert set(trained) == set(loaded)
    assert any(k.startswith("proposer.backbone.") for k in loaded)
    assert any(k.startswith("proposer.proposals.decoder.") for k in loaded)
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    with torch.no_grad():
        after = segmenter.proposer(image)
    assert torch.equal(after.mask_logits, expected.mask_logits)
    assert torch.equal(after.iou_pred, expected.iou_pred)


def test_proposal_recall_evaluator():
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[0, 0:4, 0:4] = True
    gt[1, 4:8, 4:8] = True
    half = torch.zeros(1, 8, 8, dtype=torch.bool)
    half[0, 0:4, 0:2] = True  # IoU 8 / 16 = 0.5 with gt[0], 0 with gt[1]

    def run(pred_masks, scores):
        inputs = [{"file_name": "x.png", "instances": Instances((8, 8), gt_masks=BitMasks(gt))}]
        outputs = [{"instances": Instances((8, 8), pred_masks=pred_masks, scores=scores)}]
        evaluator = ProposalRecallEvaluator(iou_thresholds=(0.5, 0.25), max_proposals=1)
        evaluator.reset()
        evaluator.process(inputs, outputs)
        return evaluator.evaluate()["proposals"]

    perfect = run(torch.cat([gt, half]), torch.tensor([0.9, 0.8, 0.1]))  # max_proposals=1: gt[0] only
    assert perfect == pytest.approx({"mean_best_iou": 50.0, "recall@0.5": 50.0, "recall@0.25": 50.0,
                                     "proposals_per_image": 1.0})
    halves = run(torch.cat([half, gt]), torch.tensor([0.9, 0.1, 0.1]))
    assert halves == pytest.approx({"mean_best_iou": 25.0, "recall@0.5": 0.0, "recall@0.25": 50.0,
                                    "proposals_per_image": 1.0})
    none = run(torch.zeros(0, 8, 8, dtype=torch.bool), torch.zeros(0))
    assert none["mean_best_iou"] == 0.0 and none["proposals_per_image"] == 0.0
    assert mask_iou_matrix(gt, half)[0, 0] == 0.5  # the hand-computed IoU above
    evaluator = ProposalRecallEvaluator()
    with pytest.raises(ValueError, match="needs GT masks"):
        evaluator.process([{"file_name": "x.png"}], [{"instances": Instances((8, 8))}])
