"""samantics_d2.references: the one ordering rule, the one feature store, the label space resolved at build."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import samantics_d2  # noqa: F401  (registers datasets)
from samantics_d2.d2 import DatasetCatalog, MetadataCatalog
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch.training_free import TrainingFreeSegmenter, build_sam_proposer
from samantics_d2.modeling.semantic import PrototypeClassifier
from samantics_d2.references import (
    ORDERING,
    StoredFeatures,
    build_reference_bank,
    default_store_path,
    load_features,
    load_or_build_features,
    order_references,
    save_features,
)


def _record(file_name, anns, image_id=1):
    return {"file_name": file_name, "height": 8, "width": 8, "image_id": image_id, "annotations": [
        {"bbox": [0, 0, 4, 4], "bbox_mode": 1, "segmentation": [[0, 0, 4, 0, 4, 4]], **a} for a in anns]}


def test_one_order_by_category_then_shot_rank_then_annotation_id():
    dicts = [
        _record("a.png", [{"id": 5, "category_id": 1, "reference_rank": 1}, {"id": 9, "category_id": 0}]),
        _record("b.png", [{"id": 3, "category_id": 1, "reference_rank": 0}, {"id": 2, "category_id": 0},
                          {"id": 7, "category_id": 0, "iscrowd": 1}], image_id=2),
    ]
    items = order_references(dicts, 2)
    assert ORDERING == "category_id, shot_rank, annotation_id"
    # class 0 has no reference_rank: its ranks are the order of appearance (id 9 first); crowds never count
    assert [(r.class_id, r.shot_rank, r.annotation_id) for r in items] == [(0, 0, 9), (0, 1, 2), (1, 0, 3), (1, 1, 5)]
    assert [r.index for r in items] == [1, 3, 2, 0]  # positions in the dataset dicts
    assert items[0].box_xyxy() == [0.0, 0.0, 4.0, 4.0] and items[0].mask().shape == (8, 8)


def test_order_rejects_equal_ranks_and_bad_categories():
    same = [_record("a.png", [{"id": 1, "category_id": 0, "reference_rank": 0},
                              {"id": 2, "category_id": 0, "reference_rank": 0}])]
    with pytest.raises(ValueError, match="two references of shot rank 0"):
        order_references(same, 1, class_names=["cat"])
    with pytest.raises(ValueError, match=r"category_id 3; expected a contiguous id in \[0, 2\)"):
        order_references([_record("a.png", [{"id": 1, "category_id": 3}])], 2)


def _stored(value=1.0):
    return StoredFeatures(tensors={"x": torch.full((2, 3), value)}, provenance={"kind": "test", "v": 1},
                          class_names=["a", "b"], records=[{"annotation_id": 1}, {"annotation_id": 2}])


def test_store_round_trip_sidecar_and_exact_provenance_hits(tmp_path):
    path = tmp_path / "f.safetensors"
    save_features(path, _stored())
    loaded = load_features(path)
    assert torch.equal(loaded.tensors["x"], torch.ones(2, 3)) and loaded.class_names == ["a", "b"]
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["provenance"] == {"kind": "test", "v": 1} and sidecar["records"][1] == {"annotation_id": 2}
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # atomic writes leave no temporary file

    calls = []

    def build(value):
        calls.append(value)
        return _stored(value)

    hit = load_or_build_features(path, provenance={"kind": "test", "v": 1}, build=lambda: build(2.0))
    assert calls == [] and torch.equal(hit.tensors["x"], torch.ones(2, 3))
    miss = load_or_build_features(path, provenance={"kind": "test", "v": 2}, build=lambda: build(3.0))
    assert calls == [3.0] and miss.provenance == {"kind": "test", "v": 2}
    assert load_features(path).provenance == {"kind": "test", "v": 2}  # stored with the new provenance
    path.write_bytes(path.read_bytes()[:40])  # cut short: computed again
    load_or_build_features(path, provenance={"kind": "test", "v": 2}, build=lambda: build(4.0))
    assert calls == [3.0, 4.0]
    with pytest.raises(ValueError, match="ends in .json"):
        save_features(tmp_path / "f.json", _stored())


def test_default_path_under_the_cache_root_one_file_per_provenance(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path))
    a = default_store_path({"kind": "memory_bank", "v": 1}, name="memory_bank-shapes ref/5")
    b = default_store_path({"kind": "memory_bank", "v": 2}, name="memory_bank-shapes ref/5")
    assert a.startswith(os.path.join(str(tmp_path), "references", "memory_bank", "memory_bank-shapes_ref_5-"))
    assert a != b and a.endswith(".safetensors")


def test_reference_token_files_written_before_the_store_still_load(tmp_path):
    path = tmp_path / "old.safetensors"
    metadata = {"format": 1, "class_names": ["cat"], "references": [{"annotation_id": 4, "rank": 0}],
                "provenance": {"source": "shapes_train_ref5_seed0", "sam_fingerprint": "abc"}}
    save_file({"tokens": torch.zeros(1, 4, 8), "labels": torch.zeros(1, dtype=torch.long),
               "ranks": torch.zeros(1, dtype=torch.long)}, str(path),
              metadata={"samantics_d2.reference_tokens": json.dumps(metadata)})
    stored = load_features(path)
    assert stored.class_names == ["cat"] and stored.records == [{"annotation_id": 4, "rank": 0}]
    assert stored.provenance["sam_fingerprint"] == "abc" and stored.provenance["kind"] == "reference_tokens"


def test_build_reference_bank_resolves_sets_jsons_and_label_spaces(tmp_path):
    bank = build_reference_bank(references="shapes_train_ref5_seed0", dataset_name="shapes_val_base", shots=3)
    assert bank.source == "shapes_train_ref5_seed0" and len(bank.reference_classes) == 8 and bank.shots == 3
    assert bank.class_names == list(MetadataCatalog.get("shapes_val_base").thing_classes)
    index = bank.output_index(require_all=False)
    assert [bank.class_names[j] if j is not None else None for j in index][:1] == [bank.reference_classes[0]]
    assert index.count(None) == 3  # the 3 novel shapes are not in the base label space
    with pytest.raises(ValueError, match="not among the output classes"):
        bank.output_index(require_all=True)
    assert len(bank.instances()) == 40 and bank.replace(shots=1).shots == 1

    metadata = MetadataCatalog.get("shapes_train_ref5_seed0")
    from_json = build_reference_bank(references=metadata.json_file, image_root=metadata.image_root)
    assert from_json.reference_classes == bank.reference_classes and from_json.class_names == bank.reference_classes
    assert [r.annotation_id for r in from_json.instances()] == [r.annotation_id for r in bank.instances()]

    with pytest.raises(KeyError, match="no_such_set"):
        build_reference_bank(references="no_such_set")
    with pytest.raises(ValueError, match="need reference_classes"):
        build_reference_bank(references=[])
    with pytest.raises(ValueError, match="exactly one of references"):
        build_reference_bank(references="shapes_train_ref5_seed0", features_path=str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError, match="shots=0"):
        build_reference_bank(references="shapes_train_ref5_seed0", shots=0)


def test_forward_does_math_only(tmp_path, monkeypatch):
    """The label space is checked when the model is built; after prepare_references, forward looks
    no dataset up and writes no file."""
    torch.manual_seed(0)
    parts = dict(
        proposer=build_sam_proposer(backbone=build_encoder("sam_vit_b", size="tiny", input_size=64),
                                    points_per_side=2, pred_iou_thresh=None),
        semantic_encoder=build_encoder("dinov2_vits14", size="tiny"),
        classifier=PrototypeClassifier(),
    )
    cache = str(tmp_path / "bank.safetensors")
    with pytest.raises(ValueError, match="not among the output classes"):  # at build time, not at the first image
        TrainingFreeSegmenter(**parts, reference_bank=build_reference_bank(
            references="shapes_train_ref5_seed0", dataset_name="shapes_val_base", cache_path=cache))
    model = TrainingFreeSegmenter(**parts, reference_bank=build_reference_bank(
        references="shapes_train_novel_ref5_seed0", dataset_name="shapes_val", shots=2, cache_path=cache)).eval()
    model.prepare_references()
    assert os.path.isfile(cache) and load_features(cache).provenance["kind"] == "memory_bank"
    prototypes, valid = model.prepare_prototypes()
    assert prototypes.shape[0] == len(model.class_names()) == 8 and int(valid.any(dim=1).sum()) == 3

    def forbidden(*args, **kwargs):
        raise AssertionError("forward looked a dataset up or wrote a file")

    monkeypatch.setattr(DatasetCatalog, "get", forbidden)
    monkeypatch.setattr(MetadataCatalog, "get", forbidden)
    monkeypatch.setattr("samantics_d2.references.store.save_features", forbidden)
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 64, "width": 64}])
    assert output["instances"].image_size == (64, 64)
