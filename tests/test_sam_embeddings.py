"""SAM-embedding memory banks (issue 16, item 2): embeddings per instance from GT boxes and clicks,
whole/part mining, seeded K-means centres, unknown decisions, and the cache (reuse only when nothing
changed)."""
from __future__ import annotations

import dataclasses
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from samantics_d2.d2 import BoxMode
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch.training_free import build_sam_proposer
from samantics_d2.modeling.semantic import sam_embeddings
from samantics_d2.references import order_references
from samantics_d2.utils.clicks import click_points
from samantics_d2.utils.io import CACHE_ENV
from samantics_d2.modeling.semantic.sam_embeddings import (
    ROLES,
    InstanceEmbeddingConfig,
    MiningConfig,
    SamMaskEmbedder,
    classify_embeddings,
    instance_embeddings,
    mine_whole_part,
    sam_memory_bank,
    top1_accuracy,
)

THING_CLASSES = ["red square", "green square", "white disc"]  # the last one: a part class


def _square(x0, y0, x1, y1):
    return {"bbox": [x0, y0, x1 - x0, y1 - y0], "bbox_mode": BoxMode.XYWH_ABS,
            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three 64x64 images: a red or green square (whole) with a white square inside (its part)."""
    root = tmp_path_factory.mktemp("sam_embeddings")
    dicts = []
    for i, (colour, category, box) in enumerate([((220, 30, 30), 0, (8, 8, 40, 40)), ((30, 200, 40), 1, (20, 16, 60, 56)),
                                                 ((220, 30, 30), 0, (24, 4, 60, 44))]):
        image = np.full((64, 64, 3), 90, np.uint8)
        x0, y0, x1, y1 = box
        image[y0:y1, x0:x1] = colour
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        image[cy - 6 : cy + 6, cx - 6 : cx + 6] = 245
        path = root / f"{i}.png"
        Image.fromarray(image).save(path)
        whole = {"id": 10 * i + 1, "category_id": category, **_square(*box)}
        part = {"id": 10 * i + 2, "category_id": 2, "part_of": 10 * i + 1, **_square(cx - 6, cy - 6, cx + 6, cy + 6)}
        dicts.append({"file_name": str(path), "height": 64, "width": 64, "image_id": i, "annotations": [whole, part]})
    return dicts


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    proposer = build_sam_proposer(backbone=build_encoder("sam_vit_b", size="tiny"), points_per_batch=64)
    torch.manual_seed(1)
    return SamMaskEmbedder(backbone=proposer.backbone, proposals=proposer.proposals,
                           semantic_encoder=build_encoder("dinov2_vits14", size="tiny")).eval()


def test_mining_marks_whole_and_parts():
    instance = torch.zeros(20, 20, dtype=torch.bool)
    instance[2:18, 2:18] = True  # 256 px
    whole, part, outside, tiny = (torch.zeros(20, 20, dtype=torch.bool) for _ in range(4))
    whole[3:18, 2:18] = True  # IoU 240/256
    part[6:12, 6:12] = True  # 36 px inside
    outside[0:20, 0:20] = True  # the image: IoU 0.64, but not the best
    tiny[5, 5] = True
    roles = mine_whole_part(torch.stack([part, whole, outside, tiny]), instance, MiningConfig())
    assert roles.tolist() == [ROLES["part"], ROLES["whole"], ROLES["none"], ROLES["none"]]
    # no output reaches whole_iou: no whole; a part must lie inside the instance
    shifted = torch.roll(part, shifts=12, dims=1)  # columns 18..23 wrap: half outside
    roles = mine_whole_part(torch.stack([part, shifted]), instance, MiningConfig(whole_iou=0.9))
    assert roles.tolist() == [ROLES["part"], ROLES["none"]]


def test_classify_with_threshold_and_background():
    prototypes = torch.tensor([[[1.0, 0, 0], [0.8, 0.6, 0]], [[0, 1.0, 0], [0, 0, 0]]])
    valid = torch.tensor([[True, True], [True, False]])
    features = torch.tensor([[2.0, 0.1, 0], [0.1, 1.0, 0.0], [0.0, 0.1, 1.0], [0.5, 0.5, 0.0]])
    classes, cosine = classify_embeddings(features, prototypes, valid)
    assert classes.tolist() == [0, 1, 1, 0]  # the last one: 0.8/0.6 centre of class 0
    torch.testing.assert_close(cosine[3], torch.tensor(0.7 * 2**0.5), rtol=1e-5, atol=1e-6)
    classes, _ = classify_embeddings(features, prototypes, valid, unknown_threshold=0.5)
    assert classes.tolist() == [0, 1, -1, 0]
    classes, _ = classify_embeddings(features, prototypes, valid, background=torch.tensor([[1.0, 1.0, 0.0]]))
    assert classes.tolist() == [0, 1, 1, -1]  # the diagonal one is closer to the background centre
    assert top1_accuracy(classes, torch.tensor([0, 1, 1, 0])) == 75.0


def test_embeddings_of_boxes_and_clicks(dataset, embedder):
    config = InstanceEmbeddingConfig(classes=THING_CLASSES[:2], mining=MiningConfig(whole_iou=0.0, background_points_per_side=3))
    stored = instance_embeddings(dataset, embedder=embedder, thing_classes=THING_CLASSES, config=config)
    t = stored.tensors
    assert t["box/mask_token"].shape == (6, 32) and t["box/image_pooled"].shape == (6, 32)
    assert t["box/semantic_pooled"].shape[0] == 6
    # parts are labelled with their whole's class
    assert t["box/class_ids"].tolist() == [0, 0, 1, 1, 0, 0] and t["box/is_part"].tolist() == [False, True] * 3
    assert [r["annotation_id"] for r in stored.records] == [1, 2, 11, 12, 21, 22]
    assert t["click/mask_token"].shape == (9, 32) and t["click/whole_row"].tolist() == [0] * 3 + [2] * 3 + [4] * 3
    assert (t["click/role"] == ROLES["whole"]).sum() == 3  # whole_iou=0: every click has its whole
    assert t["background/mask_token"].shape[1] == 32 and t["box/iou_gt"].shape == (6,)
    # the box rows are the decoder's tokens for those boxes (one decoder call per image)
    with torch.no_grad():
        out = embedder(np.asarray(Image.open(dataset[1]["file_name"]).convert("RGB")), boxes=torch.tensor([[20.0, 16, 60, 56]]))
    torch.testing.assert_close(t["box/mask_token"][2], out["mask_token"][0, 0])


def test_bank_centres_are_seeded(dataset):
    g = torch.Generator().manual_seed(0)
    stored = sam_embeddings.StoredFeatures(
        tensors={"box/mask_token": torch.randn(40, 8, generator=g), "box/class_ids": torch.arange(40) % 2,
                 "box/is_part": torch.arange(40) % 5 == 0},
        provenance={"kind": "test"}, class_names=["a", "b"], records=[{"annotation_id": i} for i in range(40)],
    )
    bank = sam_memory_bank(stored, "mask_token")
    assert len(bank) == 32 and bank.class_ids.tolist() == sorted(bank.class_ids.tolist())
    a, valid = bank.prototypes(aggregation="kmeans", num_centres=3, seed=7)
    b, _ = bank.prototypes(aggregation="kmeans", num_centres=3, seed=7)
    c, _ = bank.prototypes(aggregation="kmeans", num_centres=3, seed=8)
    assert a.shape == (2, 3, 8) and bool(valid.all()) and torch.equal(a, b) and not torch.equal(a, c)
    assert len(sam_memory_bank(stored, "mask_token", parts=True)) == 40
    with pytest.raises(KeyError, match="image_pooled"):
        sam_memory_bank(stored, "image_pooled")


def test_cache_is_reused_only_when_nothing_changed(dataset, embedder, tmp_path):
    embedder = SamMaskEmbedder(backbone=embedder.backbone, proposals=embedder.proposals)  # SAM only: faster
    config = InstanceEmbeddingConfig(classes=THING_CLASSES[:2], clicks=False)
    options = dict(embedder=embedder, thing_classes=THING_CLASSES, cache=tmp_path / "bank.safetensors")
    with mock.patch.object(sam_embeddings, "_embed_instances", wraps=sam_embeddings._embed_instances) as compute:
        first = instance_embeddings(dataset, **options, config=config)
        again = instance_embeddings(dataset, **options, config=config)
        assert compute.call_count == 1 and torch.equal(first.tensors["box/mask_token"], again.tensors["box/mask_token"])
        assert again.provenance["options"]["classes"] == THING_CLASSES[:2] and again.provenance["options"]["clicks"] is False
        # the same config spelled again (a list of classes, the default mining): the same provenance, reused
        instance_embeddings(dataset, **options, config=InstanceEmbeddingConfig(classes=list(THING_CLASSES[:2]), clicks=False))
        assert compute.call_count == 1
        uncached = instance_embeddings(dataset, embedder=embedder, thing_classes=THING_CLASSES, config=config)
        assert compute.call_count == 2 and uncached.provenance == {}  # no cache: computed, nothing stored
        assert torch.equal(uncached.tensors["box/mask_token"], first.tensors["box/mask_token"])
        moved = [dict(d, annotations=[dict(d["annotations"][0], bbox=[9, 8, 32, 32]), d["annotations"][1]]) if i == 0 else d
                 for i, d in enumerate(dataset)]
        instance_embeddings(moved, **options, config=config)  # an annotation changed
        assert compute.call_count == 3
        relinked = [dict(d, annotations=[d["annotations"][0], dict(d["annotations"][1], part_of=None)]) if i == 2 else d
                    for i, d in enumerate(dataset)]
        instance_embeddings(relinked, **options, config=config)  # a part-of link changed
        assert compute.call_count == 4
        with torch.no_grad():
            embedder.proposals.decoder.mask_decoder.mask_tokens.weight[0, 0] += 1.0
        try:
            instance_embeddings(dataset, **options, config=config)  # the weights changed
        finally:
            with torch.no_grad():
                embedder.proposals.decoder.mask_decoder.mask_tokens.weight[0, 0] -= 1.0
        assert compute.call_count == 5
        count = compute.call_count
        for changed in (dict(mining=MiningConfig(whole_iou=0.7)), dict(classes=THING_CLASSES[:1]), dict(prompt="click"),
                        dict(clicks=True)):  # each field of the config is in the provenance
            instance_embeddings(dataset, **options, config=dataclasses.replace(config, **changed))
            count += 1
            assert compute.call_count == count, changed
        instance_embeddings(dataset, **options, config=config)  # the file now holds the last build: recomputed
        assert compute.call_count == count + 1
    with pytest.raises(ValueError, match="cache=3"):
        instance_embeddings(dataset, embedder=embedder, thing_classes=THING_CLASSES, cache=3)


def test_default_store_path_keeps_one_file_per_provenance(dataset, embedder, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    embedder = SamMaskEmbedder(backbone=embedder.backbone, proposals=embedder.proposals)
    options = dict(embedder=embedder, thing_classes=THING_CLASSES, cache=True, source="shapes", weights_id="tiny-seed-0")
    with mock.patch.object(sam_embeddings, "_embed_instances", wraps=sam_embeddings._embed_instances) as compute:
        for config in (InstanceEmbeddingConfig(clicks=False), InstanceEmbeddingConfig(clicks=False, prompt="click")) * 2:
            instance_embeddings(dataset[:1], **options, config=config)
        assert compute.call_count == 2  # switching back and forth rebuilds nothing
    files = sorted(p.name for p in (tmp_path / "references" / "sam_instance_embeddings").glob("*.safetensors"))
    assert len(files) == 2 and all(name.startswith("shapes-") for name in files)


def test_click_prompts_keep_the_output_closest_to_the_instance(dataset, embedder):
    embedder = SamMaskEmbedder(backbone=embedder.backbone, proposals=embedder.proposals)
    config = InstanceEmbeddingConfig(classes=THING_CLASSES[:2], prompt="click", clicks=False)
    stored = instance_embeddings(dataset[:1], embedder=embedder, thing_classes=THING_CLASSES, config=config)
    items = sorted(order_references(dataset[:1], 3), key=lambda r: r.index)  # whole, part
    gt = torch.from_numpy(np.stack([r.mask() for r in items]))
    assert gt[0, 8:40, 8:40].all() and gt[1, 18:30, 18:30].all() and int(gt[1].sum()) < 200
    image = np.asarray(Image.open(dataset[0]["file_name"]).convert("RGB"))
    points = click_points(gt) + 0.5
    assert (points - 24.5).abs().max() <= 1  # both near the centre
    with torch.no_grad():
        out = embedder(image, points=points)
    ious = torch.stack([sam_embeddings.mask_iou_matrix(out["masks"][i], gt[i : i + 1])[:, 0] for i in range(2)])
    torch.testing.assert_close(stored.tensors["box/iou_gt"], ious.amax(dim=1))
    best = ious.argmax(dim=1)
    torch.testing.assert_close(stored.tensors["box/mask_token"], out["mask_token"][torch.arange(2), best])
    assert "click/role" not in stored.tensors
    with pytest.raises(ValueError, match="prompt='points'"):
        InstanceEmbeddingConfig(prompt="points")


def test_bank_detections_label_proposals_by_their_embeddings(dataset, embedder):
    from samantics_d2.modeling.proposals import PointGridProposals
    from samantics_d2.modeling.proposals.point_grid import MASK_EMBEDDINGS
    from samantics_d2.modeling.semantic import PrototypeClassifier

    proposals = PointGridProposals(decoder=embedder.proposals.decoder, points_per_side=4, pred_iou_thresh=None,
                                   mask_embeddings=MASK_EMBEDDINGS)
    grid_embedder = SamMaskEmbedder(backbone=embedder.backbone, proposals=proposals, semantic_encoder=embedder.semantic_encoder)
    g = torch.Generator().manual_seed(3)
    banks = {"mask_token": (torch.randn(2, 2, 32, generator=g), torch.tensor([[True, True], [True, False]])),
             "semantic_pooled": (torch.randn(2, 1, 32, generator=g), torch.ones(2, 1, dtype=torch.bool))}
    image = np.asarray(Image.open(dataset[0]["file_name"]).convert("RGB"))
    classifier = PrototypeClassifier(nms_thresh=1.0, merge="none", score_floor=-1.0)
    out = sam_embeddings.bank_detections(grid_embedder, image, banks=banks, classifier=classifier)
    with torch.no_grad():
        x, fits = embedder.backbone.prepare_with_fits([image])
        props = proposals({k: v[0] for k, v in embedder.backbone(x).items()}, fits[0])
    kept = out["mask_token"]
    classes, cosine = classify_embeddings(props.mask_tokens, *banks["mask_token"])
    assert 0 < len(kept.indices) == len(props)  # no NMS, no merge: every proposal, best first
    assert kept.classes.tolist() == torch.where(cosine[kept.indices] > 0, classes[kept.indices], 0).tolist()
    torch.testing.assert_close(kept.scores, cosine[kept.indices].clamp_min(0))
    assert kept.masks.shape == (len(props), 64, 64) and kept.boxes.shape == (len(props), 4)
    assert out["semantic_pooled"].masks.shape[1:] == (64, 64)
