"""RefSAM: reference tokens (vs upstream), the training mapper, the meta-architecture's training and
eval paths, cached tokens (compute/eval) against references encoded on the fly, configs."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import samantics_d2  # noqa: F401  (registers datasets)
from samantics_d2.d2 import DatasetCatalog, LazyConfig, MetadataCatalog, instantiate, register_coco_instances
from samantics_d2.data.ref_sam_mapper import RefSAMMapper
from samantics_d2.modeling.backbone import HQSAMBackbone, SAMBackbone
from samantics_d2.modeling.meta_arch.ref_sam import RefSAM, build_optimizer_with_grad_clip, ref_sam_heads, ref_sam_lr_factor
from samantics_d2.modeling.ref_sam import TokenFuser
from samantics_d2.modeling.proposals import build_prompt_decoder
from samantics_d2.modeling.ref_sam.reference_encoder import ReferenceTokens, mask_token_outputs
from samantics_d2.references import build_reference_bank, prepare_references

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "ref_sam", "tiny_shapes.py")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machines are shared: one intra-op thread keeps these tiny models from oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def val4(tmp_path_factory):
    """``shapes_val_base`` cut to its first 4 images (json and all), so evaluations stay fast."""
    name = "ref_sam_test_shapes_val_base4"
    if name not in DatasetCatalog.list():
        DatasetCatalog.get("shapes_val_base")  # generates the files and sets json_file
        meta = MetadataCatalog.get("shapes_val_base")
        with open(meta.json_file) as f:
            coco = json.load(f)
        keep = {image["id"] for image in coco["images"][:4]}
        coco["images"] = [image for image in coco["images"] if image["id"] in keep]
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        path = tmp_path_factory.mktemp("val4") / "val4.json"
        path.write_text(json.dumps(coco))
        register_coco_instances(name, {}, str(path), meta.image_root)
    return name


@pytest.fixture(scope="module")
def tiny_cfg():
    return LazyConfig.load(TINY)


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return instantiate(tiny_cfg.model).eval()


# ----------------------------------------------------------------------------- reference tokens
@pytest.mark.parametrize("backbone_class, expected_tokens", [(SAMBackbone, 4), (HQSAMBackbone, 5)])
def test_mask_token_outputs_equal_the_upstream_decoder(backbone_class, expected_tokens):
    torch.manual_seed(0)
    backbone = backbone_class(variant="vit_b", size="tiny", out_features=["neck", "block1"]).eval()
    decoder = build_prompt_decoder(backbone)
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 64, 64))
    boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0], [10.0, 12.0, 60.0, 50.0]])
    captured = {}

    def keep_transformer_output(module, inputs, outputs):
        captured["hs"] = outputs[0]  # returns None: the output is left unchanged

    hook = decoder.mask_decoder.transformer.register_forward_hook(keep_transformer_output)
    with torch.no_grad():  # upstream decoder, image 1, both boxes
        decoder.decode({k: v[1] for k, v in features.items()}, boxes=boxes, multimask_output=False)
        hook.remove()
        ours_one_image = mask_token_outputs(decoder, features["neck"][1:2], boxes)
        ours_per_box = mask_token_outputs(decoder, features["neck"][[1, 1]], boxes)
        other_image = mask_token_outputs(decoder, features["neck"][0:1], boxes)
    assert ours_one_image.shape == (2, expected_tokens, 32)
    torch.testing.assert_close(ours_one_image, captured["hs"][:, 1 : 1 + expected_tokens])
    torch.testing.assert_close(ours_per_box, ours_one_image)
    assert not torch.allclose(other_image, ours_one_image)  # the tokens depend on the reference image


def test_reference_tokens_save_load_and_first_n_shots(tmp_path):
    tokens = torch.arange(5 * 4 * 3, dtype=torch.float32).reshape(5, 4, 3)
    refs = ReferenceTokens(
        tokens=tokens,
        labels=torch.tensor([0, 0, 0, 1, 1]),
        ranks=torch.tensor([0, 2, 1, 1, 0]),
        class_names=["cat", "dog"],
        references=[{"annotation_id": i} for i in range(5)],
        provenance={"sam_fingerprint": "x"},
    )
    path = tmp_path / "refs.safetensors"
    refs.save(path)
    assert (tmp_path / "refs.json").is_file()
    loaded = ReferenceTokens.load(path)
    torch.testing.assert_close(loaded.tokens, tokens)
    assert loaded.class_names == ["cat", "dog"] and loaded.provenance == {"kind": "reference_tokens", "sam_fingerprint": "x"}
    # Output classes in another order, one without references; 2 shots = ranks 0 and 1.
    out, valid = loaded.class_tokens(["dog", "bird", "cat"], shots=2)
    assert valid.tolist() == [True, False, True]
    torch.testing.assert_close(out[0], (tokens[3] + tokens[4]) / 2)
    torch.testing.assert_close(out[2], (tokens[0] + tokens[2]) / 2)
    torch.testing.assert_close(loaded.class_tokens(["cat"], shots=1)[0][0], tokens[0])
    torch.testing.assert_close(loaded.class_tokens(["cat"])[0][0], tokens[:3].mean(0))
    with pytest.raises(ValueError, match="at most 3"):
        loaded.class_tokens(["cat"], shots=4)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="compute it again"):
        ReferenceTokens.load(tmp_path / "bad.safetensors")


# ----------------------------------------------------------------------------- training data
def test_mapper_draws_references_of_allowed_classes_from_other_images():
    np.random.seed(0)
    allowed = ["red circle", "green square", "blue triangle"]
    mapper = RefSAMMapper(dataset_names="shapes_train", categories=allowed, max_categories=2, num_negatives=1,
                          min_area=64)
    classes = MetadataCatalog.get("shapes_train").thing_classes
    allowed_ids = {classes.index(c) for c in allowed}
    dicts = DatasetCatalog.get("shapes_train")
    seen_negative = False
    for record in dicts[:12]:
        out = mapper(record)
        gt = set(out["instances"].gt_classes.tolist())
        assert gt <= allowed_ids  # other classes are neither targets nor references
        labels = [r["category_id"] for r in out["references"]]
        assert len(labels) == len(set(labels)) and set(labels) <= allowed_ids
        assert len([c for c in labels if c in gt]) == min(2, len(gt))
        seen_negative |= any(c not in gt for c in labels)
        for ref in out["references"]:
            assert ref["image_id"] != record["image_id"]
            assert ref["image"].dtype == torch.uint8 and ref["image"].shape[0] == 3
            x0, y0, x1, y1 = ref["box"].tolist()
            assert 0 <= x0 < x1 <= ref["image"].shape[2] and 0 <= y0 < y1 <= ref["image"].shape[1]
            assert (x1 - x0) * (y1 - y0) >= 64
    assert seen_negative
    with pytest.raises(ValueError, match="not classes of"):
        RefSAMMapper(dataset_names="shapes_train", categories=["unicorn"])


def test_training_step_pairs_each_reference_with_its_own_gt_and_trains_only_the_head(tiny_cfg):
    torch.manual_seed(0)
    np.random.seed(0)
    model = instantiate(tiny_cfg.model).train()
    mapper = instantiate(tiny_cfg.dataloader.train.mapper)
    batch = [mapper(r) for r in DatasetCatalog.get("shapes_train_base")[:2]]
    for x in batch:  # references out of sorted order: the pairing must follow each reference's own id
        x["references"] = x["references"][::-1]
    captured = {}
    original = model.criterion.forward

    def capture(outputs, targets):
        captured["targets"] = targets
        return original(outputs, targets)

    model.criterion.forward = capture
    losses = model(batch)
    assert {"loss_focal", "loss_bbox", "loss_giou", "loss_focal_0"} <= set(losses)
    pairs = [(x, r) for x in batch for r in x["references"]]
    assert len(captured["targets"]) == len(pairs)
    size = model.decoder.image_size
    for (x, ref), target in zip(pairs, captured["targets"]):
        keep = x["instances"].gt_classes == ref["category_id"]
        assert len(target["boxes"]) == int(keep.sum())
        gt = x["instances"].gt_boxes.tensor[keep] * (size / 128.0) / size  # 128 px images fitted to `size`
        expected = torch.cat([(gt[:, :2] + gt[:, 2:]) / 2, gt[:, 2:] - gt[:, :2]], dim=1)
        torch.testing.assert_close(target["boxes"], expected)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is None for p in model.proposer.parameters())
    for part in (model.fuser, model.neck, model.head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert not model.proposer.training  # SAM stays in eval mode

    model.zero_grad()
    for x in batch:
        x["references"] = []
    zero = model(batch)  # no reference in the batch: zero losses that still reach the trainable parameters
    assert float(sum(zero.values()).detach()) == 0.0
    sum(zero.values()).backward()
    assert all(p.grad is not None for p in model.head.parameters())


def test_optimizer_groups_and_gradient_clipping(tiny_cfg, tiny_model):
    names = [name for name, _ in tiny_model.named_parameters()]  # real names of the built model
    for name, factor in (("head.transformer.decoder_layers.0.deformable.attn.sampling_offsets.weight", 0.1),
                         ("head.transformer.reference_points.bias", 0.1),
                         ("head.transformer.decoder_layers.0.deformable.attn.value_proj.weight", 1.0)):
        assert name in names and ref_sam_lr_factor(name) == factor, name
    cfg = LazyConfig.load(TINY).optimizer
    cfg.params.model = tiny_model
    optimizer = instantiate(cfg)
    lrs = sorted({group["lr"] for group in optimizer.param_groups})
    assert lrs == pytest.approx([cfg.lr * 0.1, cfg.lr])
    slow = {id(p) for g in optimizer.param_groups if g["lr"] < cfg.lr for p in g["params"]}
    for name, p in tiny_model.named_parameters():
        assert (id(p) in slow) == ("sampling_offsets" in name or "reference_points" in name), name
    frozen = {id(p) for p in tiny_model.proposer.parameters()}
    assert not any(id(p) in frozen for g in optimizer.param_groups for p in g["params"])

    weight = torch.nn.Parameter(torch.zeros(3))
    clipped = build_optimizer_with_grad_clip(optimizer_class="torch.optim.SGD", params=[weight], lr=1.0, max_norm=0.5)
    weight.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped to 0.5
    clipped.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([-0.3, -0.4, 0.0]))


# ----------------------------------------------------------------------------- evaluation
def _test_inputs(names, count, *, with_gt=False):
    from samantics_d2.data.mapper import DetectionMapper

    mapper = DetectionMapper(is_train=with_gt, augmentations=[], use_instance_mask=False)
    return [mapper(r) for r in DatasetCatalog.get(names)[:count]]


def test_eval_modes_gt_boxes_and_present_classes(tiny_cfg):
    torch.manual_seed(0)
    model = instantiate(tiny_cfg.model).eval()
    prepare_references(model)  # after building (and loading), before the first image
    inputs = _test_inputs("shapes_val_base", 2, with_gt=True)
    out = model(inputs)
    assert len(out[0]["instances"]) == model.topk
    inst = out[0]["instances"]
    assert inst.pred_masks.shape[1:] == (128, 128) and inst.pred_masks.dtype == torch.bool
    assert inst.scores.max() <= 1 and inst.pred_classes.max() < 5

    model.query_classes = "present"
    for x, o in zip(inputs, model(inputs)):
        assert set(o["instances"].pred_classes.tolist()) <= set(x["instances"].gt_classes.tolist())

    empty = dict(inputs[0], instances=inputs[0]["instances"][:0])  # no class present: nothing asked, nothing found
    none_found = model([empty])[0]["instances"]
    assert len(none_found) == 0 and none_found.pred_masks.shape == (0, 128, 128)

    model.box_source = "gt"
    for x, o in zip(inputs, model(inputs)):
        torch.testing.assert_close(o["instances"].pred_boxes.tensor, x["instances"].gt_boxes.tensor, atol=1e-4, rtol=0)
        assert o["instances"].pred_classes.tolist() == x["instances"].gt_classes.tolist()
        assert bool((o["instances"].scores == 1).all())
    with pytest.raises(ValueError, match="needs GT instances"):
        model(_test_inputs("shapes_val_base", 1))


def _load_tool():
    spec = importlib.util.spec_from_file_location("ref_sam_embeds", os.path.join(ROOT, "tools", "ref_sam_embeds.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_cfg, val4):
    """A checkpoint of a (random) tiny RefSAM and its tokens of shapes_train_ref5_seed{0,1} (the tool's compute)."""
    from samantics_d2.d2 import DetectionCheckpointer

    folder = tmp_path_factory.mktemp("ref_sam")
    torch.manual_seed(0)
    DetectionCheckpointer(instantiate(tiny_cfg.model).eval(), str(folder)).save("model")
    overrides = [f"train.init_checkpoint={folder / 'model.pth'}", f"train.output_dir={folder}",
                 f"dataloader.test.dataset.names={val4}"]
    tool = _load_tool()
    for seed in (0, 1):
        tool.main(["compute", "--config-file", TINY, "--references", f"shapes_train_ref5_seed{seed}", "--output",
                   str(folder / f"embeds_seed{seed}.safetensors"), *overrides])
    return {"folder": folder, "checkpoint": str(folder / "model.pth"), "overrides": overrides, "tool": tool,
            "embeds": str(folder / "embeds_seed0.safetensors")}


def test_cached_embeds_give_the_same_results_as_references_on_the_fly(saved, tiny_cfg, val4):
    from samantics_d2.d2 import DetectionCheckpointer, inference_on_dataset

    tool, embeds, checkpoint, overrides = saved["tool"], saved["embeds"], saved["checkpoint"], saved["overrides"]
    cached = ReferenceTokens.load(embeds)
    assert max(cached.shots_per_class().values()) == 5 and cached.tokens.shape[1:] == (4, 32)

    # Same predictions, 2 shots of the 5 cached, on the fly vs from the file.
    on_the_fly = instantiate(tiny_cfg.model).eval()
    DetectionCheckpointer(on_the_fly).load(checkpoint)
    on_the_fly.set_reference_bank(build_reference_bank(references="shapes_train_ref5_seed0", dataset_name=val4, shots=2))
    from_file = instantiate(tiny_cfg.model).eval()
    DetectionCheckpointer(from_file).load(checkpoint)
    from_file.set_reference_bank(build_reference_bank(features_path=embeds, dataset_name=val4, shots=2))
    prepare_references(on_the_fly)
    prepare_references(from_file)
    inputs = _test_inputs(val4, 2)
    for a, b in zip(on_the_fly(inputs), from_file(inputs)):
        a, b = a["instances"], b["instances"]
        torch.testing.assert_close(a.scores, b.scores)
        torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.pred_classes, b.pred_classes) and torch.equal(a.pred_masks, b.pred_masks)

    # The same AP through COCOEvaluator: the tool's eval and the on-the-fly model.
    cfg = LazyConfig.apply_overrides(LazyConfig.load(TINY), overrides)
    expected = inference_on_dataset(on_the_fly, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    results = tool.main(["eval", "--config-file", TINY, "--embeds", embeds, "--shots", "2", *overrides])
    assert results["bbox"]["AP"] == pytest.approx(expected["bbox"]["AP"], nan_ok=True)
    assert results["segm"]["AP"] == pytest.approx(expected["segm"]["AP"], nan_ok=True)
    assert os.path.isfile(saved["folder"] / "ref_sam_eval.json")

    # Another SAM: the file is refused.
    other = instantiate(tiny_cfg.model).eval()
    other.set_reference_bank(build_reference_bank(features_path=embeds, dataset_name=val4))
    with pytest.raises(ValueError, match="other SAM weights"):
        prepare_references(other)
    with pytest.raises(RuntimeError, match="prepare_references"):
        other(inputs[:1])


def test_tsne_and_shots_analysis(saved):
    tool, folder = saved["tool"], saved["folder"]
    png = str(folder / "tsne.png")
    coordinates = tool.main(["tsne", "--config-file", TINY, "--embeds", saved["embeds"], "--encoders", "dinov2_vits14",
                             "clip_vit_b32_openai", "--encoder-size", "tiny", "--output", png, *saved["overrides"]])
    assert len(coordinates) == 4 and all(xy.shape == (40, 2) for xy in coordinates.values())  # 8 classes x 5 shots
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    stem = str(folder / "ap_vs_shots")
    template = str(folder / "embeds_seed{seed}.safetensors")
    rows = tool.main(["shots", "--config-file", TINY, "--embeds-template", template,
                      "--seeds", "0", "1", "--shots", "1", "3", "--output", stem, *saved["overrides"]])
    assert [(r["seed"], r["shots"]) for r in rows] == [(0, 1), (0, 3), (1, 1), (1, 3)]
    with open(stem + ".csv") as f:
        assert f.read().splitlines()[0] == "seed,shots,bbox_AP,segm_AP"
    assert os.path.getsize(stem + ".png") > 0


# ----------------------------------------------------------------------------- configs
# Every configs/ref_sam/ file instantiated as written: tests/test_ref_sam_configs.py.
def test_ref_sam_rejects_mismatched_parts(tiny_cfg):
    """Parts built by hand (not by build_ref_sam) that do not fit the SAM are named."""
    proposer = instantiate(tiny_cfg.model.proposer)
    parts = ref_sam_heads(proposer, feature_names=["block0", "block1"], d_model=32, neck={"strides": (8, 16)})
    criterion = instantiate(tiny_cfg.model.criterion)
    hq_fuser = TokenFuser(num_tokens=5, token_dim=32, out_dim=32)
    with pytest.raises(ValueError, match="the fuser takes 5 tokens but SAMPromptDecoder has 4 mask tokens"):
        RefSAM(proposer=proposer, criterion=criterion, **{**parts, "fuser": hq_fuser})
    with pytest.raises(ValueError, match="2 neck levels and 2 head levels must agree"):
        RefSAM(proposer=proposer, criterion=criterion, **{**parts, "feature_names": ["block1"]})
    assert isinstance(RefSAM(proposer=proposer, criterion=criterion, **parts), RefSAM)
