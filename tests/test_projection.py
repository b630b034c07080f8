"""The learned projection of mask embeddings (issue 16, item 3), its job, its configs and BDD100K."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from samantics_d2.d2 import BoxMode, DatasetCatalog, LazyConfig, instantiate
from samantics_d2.data import bdd100k
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch.training_free import build_sam_proposer
from samantics_d2.modeling.semantic.projection import (
    SEMANTIC_PROJECTION_REGISTRY,
    ProjectionTrainingConfig,
    SemanticProjection,
    build_semantic_projection,
    projection_loss,
    run_sam_clustering,
    train_projection,
    training_rows,
)
from samantics_d2.modeling.semantic.sam_embeddings import ROLES, SamMaskEmbedder, classify_embeddings, top1_accuracy
from samantics_d2.references.store import StoredFeatures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loss_by_hand():
    centres = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    valid = torch.ones(2, 1, dtype=torch.bool)
    z = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]]), dim=-1)
    labels = torch.tensor([0, 1, 1])
    losses = projection_loss(z, labels, centres, valid, margin=0.2, pairs=torch.tensor([[0, 2], [0, 1]]))
    s = 1 / math.sqrt(2)
    # own cosines 1, s, 0; other 0, s, 1: margin terms 0, 0.2, 1.2
    assert losses["loss_margin"].item() == pytest.approx((0 + 0.2 + 1.2) / 3, abs=1e-6)
    assert losses["loss_cosine"].item() == pytest.approx((0 + (1 - s) + 1) / 3 + (0 + (1 - s)) / 2, abs=1e-6)


def test_registered_and_centres_learned_only_when_asked():
    assert SEMANTIC_PROJECTION_REGISTRY.get("SemanticProjection") is SemanticProjection
    centres, valid = torch.randn(3, 2, 8), torch.ones(3, 2, dtype=torch.bool)
    fixed = build_semantic_projection(in_dim=8, out_dim=4, hidden_dim=16, centres=centres, valid=valid)
    learned = build_semantic_projection(in_dim=8, out_dim=4, hidden_dim=16, centres=centres, valid=valid, learn_centres=True)
    assert "centres" not in dict(fixed.named_parameters()) and "centres" in dict(learned.named_parameters())
    learned.projected_centres().sum().backward()
    assert learned.centres.grad.abs().sum() > 0
    out = fixed(torch.randn(5, 8))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    with pytest.raises(ValueError, match="in_dim=7"):
        SemanticProjection(in_dim=7, centres=centres, valid=valid)


def _whole_part_data(seed: int, per_class: int = 30, classes: int = 4, dim: int = 16):
    """Wholes of class c near direction c, parts near direction classes + c and partly towards the NEXT class's
    wholes (so the bank of whole centres labels them wrong)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.eye(dim)
    labels = torch.arange(classes).repeat_interleave(per_class)
    wholes = basis[labels] + 0.15 * torch.randn(len(labels), dim, generator=g)
    parts = basis[labels + classes] + 0.6 * basis[(labels + 1) % classes] + 0.15 * torch.randn(len(labels), dim, generator=g)
    return wholes, parts, labels


def test_projection_closes_the_whole_part_gap_on_synthetic_embeddings():
    wholes, parts, labels = _whole_part_data(0)
    centres = torch.stack([wholes[labels == c].mean(0) for c in range(4)])[:, None]
    valid = torch.ones(4, 1, dtype=torch.bool)
    n = len(labels)
    pairs = torch.stack([torch.arange(n, 2 * n), torch.arange(n)], dim=1)  # part i belongs to whole i
    config = ProjectionTrainingConfig(out_dim=8, hidden_dim=32, steps=150, lr=1e-2)
    projection, history = train_projection(torch.cat([wholes, parts]), torch.cat([labels, labels]), centres=centres,
                                           valid=valid, pairs=pairs, config=config)
    test_wholes, test_parts, test_labels = _whole_part_data(1)
    before = top1_accuracy(classify_embeddings(test_parts, centres, valid)[0], test_labels)
    with torch.no_grad():
        after = top1_accuracy(projection.classify(test_parts)[0], test_labels)
        whole_after = top1_accuracy(projection.classify(test_wholes)[0], test_labels)
    assert before < 10 and after > 95 and whole_after > 95
    assert history[-1]["loss_margin"] < history[0]["loss_margin"]
    again, _ = train_projection(torch.cat([wholes, parts]), torch.cat([labels, labels]), centres=centres, valid=valid,
                                pairs=pairs, config=config)
    assert all(torch.equal(a, b) for a, b in zip(projection.state_dict().values(), again.state_dict().values()))


def test_training_rows_pair_mined_masks_with_their_instance():
    box_is_part = torch.tensor([False, True, False])
    stored = StoredFeatures(tensors={
        "box/mask_token": torch.arange(3.0)[:, None].repeat(1, 2), "box/class_ids": torch.tensor([0, 0, 1]),
        "box/is_part": box_is_part,
        "click/mask_token": 10 + torch.arange(6.0)[:, None].repeat(1, 2), "click/class_ids": torch.tensor([0, 0, 0, 1, 1, 1]),
        "click/role": torch.tensor([ROLES["part"], ROLES["whole"], 0, 0, ROLES["whole"], 0]),
        "click/whole_row": torch.tensor([0, 0, 0, 2, 2, 2]),
    }, provenance={})
    x, labels, pairs = training_rows(stored, "mask_token")
    assert x[:, 0].tolist() == [0, 2, 10, 11, 14]  # box wholes, then mined click rows; the GT part is left out
    assert labels.tolist() == [0, 1, 0, 0, 1]
    assert pairs.tolist() == [[2, 0], [3, 0], [4, 1]]


def _tiny_parts_dataset(root) -> list[dict]:
    dicts = []
    for i, (colour, category, box) in enumerate([((220, 30, 30), 0, (8, 8, 44, 44)), ((30, 200, 40), 1, (18, 14, 60, 58)),
                                                 ((30, 200, 40), 1, (4, 20, 44, 60)), ((220, 30, 30), 0, (20, 2, 58, 42))]):
        image = np.full((64, 64, 3), 90, np.uint8)
        x0, y0, x1, y1 = box
        image[y0:y1, x0:x1] = colour
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        image[cy - 7 : cy + 7, cx - 7 : cx + 7] = 245
        path = os.path.join(root, f"{i}.png")
        Image.fromarray(image).save(path)
        square = lambda a, b, c, d: {"bbox": [a, b, c - a, d - b], "bbox_mode": BoxMode.XYWH_ABS,  # noqa: E731
                                     "segmentation": [[a, b, c, b, c, d, a, d]]}
        whole = {"id": 10 * i + 1, "category_id": category, **square(*box)}
        part = {"id": 10 * i + 2, "category_id": 2, "part_of": 10 * i + 1, **square(cx - 7, cy - 7, cx + 7, cy + 7)}
        dicts.append({"file_name": path, "height": 64, "width": 64, "image_id": i, "annotations": [whole, part]})
    return dicts


def test_job_end_to_end(tmp_path):
    dicts = _tiny_parts_dataset(str(tmp_path))
    torch.manual_seed(0)
    proposer = build_sam_proposer(backbone=build_encoder("sam_vit_b", size="tiny"))
    embedder = SamMaskEmbedder.from_proposer(proposer=proposer, semantic_encoder=build_encoder("dinov2_vits14", size="tiny"))
    checkpoint = tmp_path / "sam.pth"
    torch.save({"model": {f"proposer.{k}": v for k, v in proposer.state_dict().items()}}, checkpoint)
    figure = tmp_path / "tsne.png"
    results = run_sam_clustering(
        embedder=embedder, train_dataset=dicts[:2], val_dataset=dicts[2:], thing_classes=["red", "green", "disc"],
        classes=["red", "green"], train_name="tiny_train", val_name="tiny_val", output_dir=str(tmp_path / "out"),
        sam_checkpoint=str(checkpoint), num_centres=2, mining={"whole_iou": 0.0}, cache_dir=str(tmp_path / "cache"),
        training={"steps": 20, "out_dim": 8, "hidden_dim": 16}, tsne_figure=str(figure),
    )
    assert set(results["sources"]) == {"mask_token", "image_pooled", "semantic_pooled"}
    for numbers in results["sources"].values():
        for stage in ("training_free", "projected"):
            assert set(numbers[stage]) == {"whole", "part", "gap"}
            assert numbers[stage]["gap"] == pytest.approx(numbers[stage]["whole"] - numbers[stage]["part"])
    assert results["mined"]["clicks"] == 2 and results["mined"]["wholes"] == 2
    assert json.loads((tmp_path / "out" / "results.json").read_text())["sources"].keys() == results["sources"].keys()
    assert (tmp_path / "out" / "projection_mask_token.pth").is_file() and figure.stat().st_size > 1000
    assert sorted(os.listdir(tmp_path / "cache")) == ["tiny_train.json", "tiny_train.safetensors", "tiny_val.json",
                                                      "tiny_val.safetensors"]


@pytest.mark.parametrize("name", ["shapes_parts_tiny", "coco_sam_vit_b", "bdd100k_sam_vit_b"])
def test_configs_build(name):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "sam_clustering", f"{name}.py"))
    assert cfg.job.embedder == cfg.model and cfg.train.output_dir.endswith(name)  # the job embeds with the model
    for node in (cfg.model.proposer.backbone, cfg.model.semantic_encoder):
        node.size, node.pretrained = "tiny", False
        node.pop("input_size", None)
    cfg.model.proposer.decoder_weights = None
    embedder = instantiate(cfg.model)
    assert isinstance(embedder, SamMaskEmbedder) and embedder.sources == ("mask_token", "image_pooled", "semantic_pooled")
    for key in ("train_dataset", "val_dataset"):
        assert cfg.job[key].names in DatasetCatalog.list()


def test_bdd100k_from_the_official_layout(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="DETECTRON2_DATASETS.*bdd100k/"):
        bdd100k.bdd100k_files(str(tmp_path), "val")
    labels = tmp_path / "bdd100k" / "labels" / "ins_seg" / "rles"
    labels.mkdir(parents=True)
    from pycocotools import mask as mask_util

    mask = np.zeros((720, 1280), np.uint8, order="F")
    mask[100:200, 300:500] = 1
    rle = mask_util.encode(mask)
    rle = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    frames = [{"name": "a.jpg", "labels": [
        {"id": "1", "category": "car", "attributes": {"crowd": False}, "rle": rle},
        {"id": "2", "category": "traffic sign", "rle": rle},  # not an instance-segmentation class
        {"id": "3", "category": "rider", "attributes": {"crowd": True}, "rle": rle,
         "box2d": {"x1": 300, "y1": 100, "x2": 499, "y2": 199}},
    ]}, {"name": "b.jpg", "labels": []}]
    (labels / "ins_seg_val.json").write_text(json.dumps(frames))
    json_file, image_root = bdd100k.bdd100k_files(str(tmp_path), "val")
    dicts = bdd100k.load_bdd100k_ins_seg(json_file, image_root)
    assert [d["file_name"] for d in dicts] == [os.path.join(image_root, "a.jpg"), os.path.join(image_root, "b.jpg")]
    anns = dicts[0]["annotations"]
    assert [a["category_id"] for a in anns] == [2, 1] and [a["iscrowd"] for a in anns] == [0, 1]
    assert anns[0]["bbox"] == [300.0, 100.0, 200.0, 100.0] and anns[0]["bbox_mode"] == BoxMode.XYWH_ABS
    assert anns[1]["bbox_mode"] == BoxMode.XYXY_ABS and (dicts[0]["height"], dicts[0]["width"]) == (720, 1280)
    assert mask_util.decode(anns[0]["segmentation"]).sum() == 20000
    assert "bdd100k_ins_seg_val" in DatasetCatalog.list()


def test_standardised_inputs_and_collapse_report():
    from samantics_d2.modeling.semantic.projection import _collapsed

    g = torch.Generator().manual_seed(0)
    x = 5.0 + 0.01 * torch.randn(12, 6, generator=g)  # a large common part, small variation (as SAM's mask tokens)
    labels = torch.arange(12) % 3
    centres = torch.stack([x[labels == c].mean(0) for c in range(3)])[:, None]
    model, history = train_projection(x, labels, centres=centres, valid=torch.ones(3, 1, dtype=torch.bool),
                                      config=ProjectionTrainingConfig(out_dim=4, hidden_dim=8, steps=3))
    torch.testing.assert_close(model.input_mean, x.mean(0))
    torch.testing.assert_close(model.input_std, x.std(0))
    assert history[-1]["collapsed"] is False
    same = F.normalize(torch.ones(5, 3) + 1e-4 * torch.randn(5, 3, generator=g), dim=-1)
    assert _collapsed(same) and not _collapsed(torch.eye(3))
