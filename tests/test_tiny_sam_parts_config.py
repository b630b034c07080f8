"""configs/quick/tiny_sam_shapes_parts.py: the tiny SAM recipe of configs/quick/tiny_sam_shapes.py on the
shapes with parts, whose part annotations reach PromptableSamTrainer as click targets."""
import os

import torch

from samantics_d2.d2 import LazyConfig, instantiate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    return LazyConfig.load(os.path.join(ROOT, "configs", "quick", name))


def test_same_recipe_as_the_plain_shapes_config_on_the_parts_data():
    parts, plain = _load("tiny_sam_shapes_parts.py"), _load("tiny_sam_shapes.py")
    assert parts.dataloader.train.dataset.names == "shapes_parts_train"
    assert parts.dataloader.test.dataset.names == "shapes_parts_val"
    assert parts.train.output_dir != plain.train.output_dir
    # everything else is the plain config's: model, optimizer, schedule, batch, mapper, evaluator
    for key in ("model", "optimizer", "lr_multiplier"):
        assert parts[key] == plain[key], key
    for key in ("max_iter", "seed", "eval_period", "checkpointer"):
        assert parts.train[key] == plain.train[key], key
    assert parts.dataloader.train.total_batch_size == plain.dataloader.train.total_batch_size
    assert parts.dataloader.train.mapper == plain.dataloader.train.mapper
    assert parts.model.click_attention_weight > 0 and parts.model.get("multimask_output", True)  # min over 3 masks


def test_parts_are_click_targets_and_a_training_step_has_finite_losses():
    cfg = _load("tiny_sam_shapes_parts.py")
    cfg.dataloader.train.mapper.augmentations = []
    dataset = instantiate(cfg.dataloader.train.dataset)
    mapper = instantiate(cfg.dataloader.train.mapper)
    inputs = [mapper(d) for d in dataset[:2]]
    for x, d in zip(inputs, dataset[:2]):
        instances = x["instances"]
        # wholes and parts are both instances with masks: the trainer draws clicks among all of them
        assert len(instances) == len(d["annotations"]) and len(instances) % 2 == 0
        part_rows = [i for i, a in enumerate(d["annotations"]) if "part_of" in a]
        assert len(part_rows) == len(instances) // 2
        masks = instances.gt_masks.tensor
        for i in part_rows:
            whole = next(j for j, a in enumerate(d["annotations"]) if a.get("id") == d["annotations"][i]["part_of"])
            # a part's mask lies inside its whole's (the whole's polygon includes the part)
            inside = (masks[i] & masks[whole]).sum() / masks[i].sum()
            assert inside > 0.95 and masks[i].sum() < masks[whole].sum()
    torch.manual_seed(0)
    cfg.model.proposer.backbone.input_size = 64  # smaller than the config's 256 px: wiring only
    model = instantiate(cfg.model)
    model.train()
    losses = model(inputs)
    assert {"loss_mask_focal", "loss_mask_dice", "loss_iou", "loss_click_attention"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.proposer.proposals.decoder.parameters())
