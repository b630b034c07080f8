"""Reference features are prepared in one step after building and loading, never inside ``forward``
(issue 11, item 3), for both reference-prompted models (TrainingFreeSegmenter's prototypes, RefSAM's
reference tokens): ``forward`` on an unprepared model raises and names the step; loading the weights
the features depend on afterwards (the semantic encoder's, the frozen SAM's: ``DetectionCheckpointer``)
discards them; the yacs ``DefaultPredictor`` path works with the documented
``prepare_references(predictor.model)``; RefSAM trains without any preparation."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from samantics_d2 import add_samantics_config
from samantics_d2.d2 import DefaultPredictor, DetectionCheckpointer, LazyConfig, get_cfg, instantiate
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch.training_free import TrainingFreeSegmenter, build_sam_proposer
from samantics_d2.modeling.semantic import MemoryBank, PrototypeClassifier
from samantics_d2.references import build_reference_bank, prepare_references

ROOT = Path(__file__).resolve().parents[1]
REF_SAM_TINY = ROOT / "configs" / "ref_sam" / "tiny_shapes.py"
IMAGE = {"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
         "height": 64, "width": 64}


def _model(tmp_path) -> TrainingFreeSegmenter:
    torch.manual_seed(0)
    return TrainingFreeSegmenter(
        proposer=build_sam_proposer(backbone=build_encoder("sam_vit_b", size="tiny", input_size=64),
                                    points_per_side=2, pred_iou_thresh=None),
        semantic_encoder=build_encoder("dinov2_vits14", size="tiny"),
        classifier=PrototypeClassifier(),
        reference_bank=build_reference_bank(references="shapes_train_ref1_seed0",
                                            cache_path=str(tmp_path / "bank.safetensors")),
    ).eval()


def test_forward_never_prepares_and_names_the_step(tmp_path, monkeypatch):
    model = _model(tmp_path)
    built = []
    monkeypatch.setattr(MemoryBank, "build", lambda **kw: built.append(kw))  # would be the preparation
    with pytest.raises(RuntimeError, match=r"prepare_references\(model\)"), torch.no_grad():
        model([IMAGE])
    assert not built and not (tmp_path / "bank.safetensors").exists()


def test_loading_the_semantic_encoder_discards_prepared_features(tmp_path):
    model = _model(tmp_path)
    prepare_references(model)
    before, _ = model.prepared_prototypes()
    with torch.no_grad():
        model([IMAGE])  # prepared: runs

    # A checkpoint of the proposer only (e.g. a trained tiny SAM): the features stay valid.
    proposer_only = tmp_path / "proposer.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items() if k.startswith("proposer.")}}, proposer_only)
    DetectionCheckpointer(model).load(str(proposer_only))
    assert torch.equal(model.prepared_prototypes()[0], before)

    # Other DINOv2 weights through DetectionCheckpointer: stale until prepared again.
    torch.manual_seed(1)
    other = build_encoder("dinov2_vits14", size="tiny").state_dict()
    full = tmp_path / "full.pth"
    torch.save({"model": {**model.state_dict(), **{f"semantic_encoder.{k}": v for k, v in other.items()}}}, full)
    DetectionCheckpointer(model).load(str(full))
    with pytest.raises(RuntimeError, match="weights were loaded since"), torch.no_grad():
        model([IMAGE])
    prepare_references(model)
    after, _ = model.prepared_prototypes()
    assert after.shape == before.shape and not torch.allclose(after, before)

    model.semantic_encoder.load_state_dict(other)  # loading into the encoder itself counts too
    with pytest.raises(RuntimeError, match="prepare_references"):
        model.prepared_prototypes()


def test_default_predictor_with_the_documented_preparation(tmp_path):
    cfg = get_cfg()
    add_samantics_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "yacs" / "training_free_shapes.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SAMANTICS.TRAINING_FREE.MEMORY_BANK_PATH = str(tmp_path / "bank.safetensors")
    cfg.MODEL.SAMANTICS.TRAINING_FREE.REFERENCES, cfg.MODEL.SAMANTICS.TRAINING_FREE.SHOTS = "shapes_train_ref1_seed0", 1
    cfg.MODEL.SAMANTICS.PROPOSALS.POINTS_PER_SIDE = 2  # small and fast: only the preparation step is tested
    cfg.INPUT.MIN_SIZE_TEST = cfg.INPUT.MAX_SIZE_TEST = 64
    torch.manual_seed(0)
    predictor = DefaultPredictor(cfg)
    image = torch.randint(0, 255, (64, 64, 3), dtype=torch.uint8).numpy()
    with pytest.raises(RuntimeError, match="prepare_references"):
        predictor(image)
    prepare_references(predictor.model)
    assert predictor(image)["instances"].image_size == (64, 64)


def test_copies_and_pickles_keep_their_own_prepared_features(tmp_path):
    import copy
    import io

    model = _model(tmp_path)
    prepare_references(model)
    clone = copy.deepcopy(model)
    clone.semantic_encoder.load_state_dict(clone.semantic_encoder.state_dict())  # the copy's weights loaded
    with pytest.raises(RuntimeError, match="prepare_references"):
        clone.prepared_prototypes()
    model.prepared_prototypes()  # the original keeps its own
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a whole-model pickle works (the hook is a plain function)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert torch.equal(restored.prepared_prototypes()[0], model.prepared_prototypes()[0])


# ----------------------------------------------------------------------------- RefSAM


def _ref_sam(tmp_path, seed: int = 0):
    cfg = LazyConfig.load(str(REF_SAM_TINY))
    cfg.model.reference_bank.references, cfg.model.reference_bank.shots = "shapes_train_ref1_seed0", 1
    cfg.model.reference_bank.cache_path = str(tmp_path / "tokens.safetensors")
    torch.manual_seed(seed)
    return instantiate(cfg.model).eval()


REF_SAM_IMAGE = {"image": torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8,
                                        generator=torch.Generator().manual_seed(0)), "height": 128, "width": 128}


def test_ref_sam_forward_never_prepares_and_names_the_step(tmp_path, monkeypatch):
    from samantics_d2.modeling.meta_arch import ref_sam

    model = _ref_sam(tmp_path)
    encoded = []
    monkeypatch.setattr(ref_sam, "encode_references", lambda **kw: encoded.append(kw))  # would be the preparation
    with pytest.raises(RuntimeError, match=r"RefSAM: .*prepare_references\(model\)"), torch.no_grad():
        model([REF_SAM_IMAGE])
    assert not encoded and not (tmp_path / "tokens.safetensors").exists()


def test_ref_sam_loading_sam_discards_prepared_tokens(tmp_path):
    model = _ref_sam(tmp_path)
    prepare_references(model)
    assert (tmp_path / "tokens.safetensors").exists()  # the store wrote them, in the preparation step
    before = model.prepared_reference_tokens().tokens.clone()
    expected = model([REF_SAM_IMAGE])[0]["instances"]  # prepared: runs

    # A checkpoint of the trained parts only (fuser, neck, head): the tokens (SAM's outputs) stay valid.
    trained = tmp_path / "trained.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith("proposer.")}}, trained)
    DetectionCheckpointer(model).load(str(trained))
    assert torch.equal(model([REF_SAM_IMAGE])[0]["instances"].scores, expected.scores)

    # Other SAM weights through DetectionCheckpointer: stale until prepared again (then encoded anew).
    other = tmp_path / "other.pth"
    torch.save({"model": _ref_sam(tmp_path, seed=1).state_dict()}, other)
    DetectionCheckpointer(model).load(str(other))
    with pytest.raises(RuntimeError, match="frozen SAM's weights were loaded since"):
        model([REF_SAM_IMAGE])
    prepare_references(model)
    after = model.prepared_reference_tokens().tokens
    assert after.shape == before.shape and not torch.allclose(after, before)

    model.proposer.load_state_dict(model.proposer.state_dict())  # loading into SAM itself counts too
    with pytest.raises(RuntimeError, match="prepare_references"):
        model.prepared_reference_tokens()


def test_ref_sam_trains_and_runs_gt_boxes_without_preparation(tmp_path):
    """Training takes its class prompts from the mapper's references; box_source='gt' asks for none."""
    from samantics_d2.d2 import DatasetCatalog
    from samantics_d2.data.mapper import DetectionMapper
    from samantics_d2.data.ref_sam_mapper import RefSAMMapper
    from samantics_d2.data.shapes import SHAPES_SPLITS

    model = _ref_sam(tmp_path)
    mapper = RefSAMMapper(dataset_names="shapes_train_base", categories=list(SHAPES_SPLITS["base"]), max_categories=1,
                          num_negatives=0, min_area=64, seed=0)
    batch = [mapper(r) for r in DatasetCatalog.get("shapes_train_base")[:1]]
    assert batch[0]["references"]  # a real training step (not the no-reference zero losses)
    losses = model.train()(batch)
    assert set(losses) >= {"loss_focal", "loss_bbox", "loss_giou"}
    assert all(torch.isfinite(v).all() for v in losses.values())
    model.eval().box_source = "gt"
    x = DetectionMapper(is_train=True, augmentations=[], use_instance_mask=False)(DatasetCatalog.get("shapes_val_base")[0])
    assert len(model([x])[0]["instances"]) == len(x["instances"])
    assert not (tmp_path / "tokens.safetensors").exists()
