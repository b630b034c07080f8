"""CLIP text prototypes (issue 14, item 1) and the open-vocabulary vocabularies (items 1 and 5).

Parity: a tiny randomly initialised open_clip ``CLIP`` (the real tokenizer's vocabulary and context)
is saved as an official-format file; our text tower and image tower are loaded from that one file,
and the prototypes and zero-shot logits are compared with open_clip's own ``encode_text`` and
``build_zero_shot_classifier``.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from samantics_d2.data.vocabularies import (
    COCO_OV_BASE_CLASSES,
    COCO_OV_CLASSES,
    COCO_OV_NOVEL_CLASSES,
    get_vocabulary,
    lvis_v1_class_names,
    parse_class_list,
    read_vocabulary,
)
from samantics_d2.modeling.backbone import CLIPBackbone
from samantics_d2.modeling.semantic.text_prototypes import (
    OPENAI_IMAGENET_TEMPLATES,
    CLIPTextEncoder,
    _text_part,
    compute_text_prototypes,
    load_clip_text_weights,
    load_or_build_text_prototypes,
    split_synonyms,
    text_prototypes_provenance,
    zero_shot_logits,
)
from samantics_d2.modeling.weights import KeyMismatchError, WeightsError, load_encoder_weights, match_state_dict

CLASSES = ["cat", "dog", "traffic light", "red circle"]
TEMPLATES = OPENAI_IMAGENET_TEMPLATES[:5]


def _tiny_open_clip(seed: int):
    """open_clip's CLIP with the tiny dims of our CLIP towers (vit_b32, size="tiny") and the real
    tokenizer's vocabulary and context length, every parameter random (not CLIP's init only)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=32, image_size=64),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
        quick_gelu=True,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        model.logit_scale.fill_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(open_clip model, its state dict saved as an OpenAI-layout .bin: with attn_mask and the TorchScript scalars)."""
    model = _tiny_open_clip(seed=3)
    state = dict(model.state_dict())
    state.update(attn_mask=model.attn_mask, input_resolution=torch.tensor(64), context_length=torch.tensor(77))
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.bin"
    torch.save(state, path)
    return model, path


@pytest.fixture(scope="module")
def text_encoder(checkpoint):
    return load_clip_text_weights(CLIPTextEncoder(variant="vit_b32", size="tiny"), checkpoint[1]).eval()


def test_templates_are_open_clip_s():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as upstream

    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert [t.format("dog") for t in OPENAI_IMAGENET_TEMPLATES] == [t("dog") for t in upstream]


def test_text_embeddings_equal_open_clip_encode_text(checkpoint, text_encoder):
    import open_clip

    model, _ = checkpoint
    tokens = open_clip.tokenize(["a photo of a cat.", "a traffic light", "x"])
    assert torch.equal(text_encoder.tokenize(["a photo of a cat.", "a traffic light", "x"]), tokens)
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(tokens), model.encode_text(tokens), rtol=1e-5, atol=1e-5)
    assert text_encoder.logit_scale.item() == 4.0


def test_prototypes_and_zero_shot_logits_equal_open_clip_classifier(checkpoint, text_encoder):
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    model, path = checkpoint
    classifier = build_zero_shot_classifier(
        model, open_clip.get_tokenizer("ViT-B-32"), CLASSES, [lambda c, t=t: t.format(c) for t in TEMPLATES],
        num_classes_per_batch=None,
    )  # [D, K]
    prototypes = compute_text_prototypes(text_encoder, CLASSES, templates=TEMPLATES, batch_size=7)  # 7: chunks cut classes
    torch.testing.assert_close(prototypes.embeddings, classifier.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prototypes.embeddings.norm(dim=1), torch.ones(len(CLASSES)))

    image_tower = load_encoder_weights(CLIPBackbone(variant="vit_b32", size="tiny"), path).eval()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = 100.0 * F.normalize(model.encode_image(images), dim=-1) @ classifier  # open_clip's zero-shot eval
        ours = zero_shot_logits(image_tower(images)["image_embed"], prototypes.embeddings, logit_scale=100.0)
        upstream_model_logits, _ = model.get_logits(images, open_clip.tokenize(CLASSES))
        ours_model_scale = zero_shot_logits(
            image_tower(images)["image_embed"],
            F.normalize(text_encoder(text_encoder.tokenize(CLASSES)), dim=-1),
            logit_scale=text_encoder.logit_scale.exp().item(),
        )
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_model_scale, upstream_model_logits, rtol=1e-4, atol=1e-4)


def test_synonyms_average_their_template_ensembles(text_encoder):
    both = compute_text_prototypes(text_encoder, ["sofa/couch", "cat"], templates=TEMPLATES)
    alone = compute_text_prototypes(text_encoder, ["sofa", "couch", "cat"], templates=TEMPLATES)
    assert both.synonyms == [["sofa", "couch"], ["cat"]]
    assert both.synonym_class.tolist() == [0, 0, 1]
    torch.testing.assert_close(both.synonym_embeddings, alone.embeddings)
    # mean of the per-synonym template means (before their renormalisation), renormalised
    raw = [F.normalize(text_encoder(text_encoder.tokenize([t.format(s) for t in TEMPLATES])), dim=-1).mean(0) for s in ("sofa", "couch")]
    torch.testing.assert_close(both.embeddings[0], F.normalize((raw[0] + raw[1]) / 2, dim=0).detach())
    torch.testing.assert_close(both.embeddings[1], alone.embeddings[2])


@pytest.mark.parametrize(
    "name,expected",
    [
        ("sofa/couch", ["sofa", "couch"]),
        ("tv_or_television", ["tv", "television"]),
        (" cat ,  kitty ", ["cat", "kitty"]),
        ("traffic_light", ["traffic light"]),
        ("bow_(weapon)", ["bow (weapon)"]),
        ("a; b | c", ["a", "b", "c"]),
        ("dog/dog", ["dog"]),
        ("orange", ["orange"]),  # "or" inside a word is not a separator
        ("red circle", ["red circle"]),
    ],
)
def test_split_synonyms(name, expected):
    assert split_synonyms(name) == expected


@pytest.mark.parametrize("name", ["", "  ", "cat//dog", "cat,", "/cat"])
def test_split_synonyms_refuses_empty_synonyms(name):
    with pytest.raises(ValueError, match="empty synonym"):
        split_synonyms(name)


def test_bad_inputs_are_refused(text_encoder):
    with pytest.raises(ValueError, match="more than once"):
        compute_text_prototypes(text_encoder, ["cat", "cat"], templates=TEMPLATES)
    with pytest.raises(ValueError, match="exactly one"):
        compute_text_prototypes(text_encoder, ["cat"], templates=["a photo"])
    with pytest.raises(ValueError, match="non-empty list"):
        compute_text_prototypes(text_encoder, "cat", templates=TEMPLATES)
    with pytest.raises(ValueError, match=r"\[N, D\] embeddings"):
        zero_shot_logits(torch.zeros(2, 5), torch.zeros(3, 4), logit_scale=1.0)


def test_cache_hit_and_miss(tmp_path, monkeypatch, text_encoder, checkpoint):
    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path))
    calls = []
    import samantics_d2.modeling.semantic.text_prototypes as module

    real = module.compute_text_prototypes
    monkeypatch.setattr(module, "compute_text_prototypes", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = load_or_build_text_prototypes(text_encoder, CLASSES, templates=TEMPLATES, name="test")
    again = load_or_build_text_prototypes(text_encoder, CLASSES, templates=TEMPLATES, name="test")
    assert len(calls) == 1  # hit
    assert torch.equal(first.embeddings, again.embeddings) and again.class_names == CLASSES
    assert again.synonyms == first.synonyms and torch.equal(again.synonym_class, first.synonym_class)
    files = list((tmp_path / "references" / "text_prototypes").glob("test-*.safetensors"))
    assert len(files) == 1 and files[0].with_suffix(".json").is_file()

    load_or_build_text_prototypes(text_encoder, CLASSES[:3], templates=TEMPLATES, name="test")  # vocabulary
    load_or_build_text_prototypes(text_encoder, ["cat/kitty", *CLASSES[1:]], templates=TEMPLATES, name="test")
    load_or_build_text_prototypes(text_encoder, CLASSES, templates=TEMPLATES[:4], name="test")  # templates
    assert len(calls) == 4

    other = CLIPTextEncoder(variant="vit_b32", size="tiny")  # same model, other (random) weights
    other.load_state_dict(text_encoder.state_dict())
    assert load_or_build_text_prototypes(other, CLASSES, templates=TEMPLATES, name="test") is not None
    assert len(calls) == 4  # equal weights: a hit
    with torch.no_grad():
        other.encoder.text_projection.add_(1e-3)
    changed = load_or_build_text_prototypes(other, CLASSES, templates=TEMPLATES, name="test")
    assert len(calls) == 5 and not torch.equal(changed.embeddings, first.embeddings)

    # the same path given explicitly, with a changed vocabulary: recomputed, never the stale file
    path = tmp_path / "fixed.safetensors"
    load_or_build_text_prototypes(text_encoder, CLASSES, templates=TEMPLATES, path=path)
    stale = load_or_build_text_prototypes(text_encoder, CLASSES[::-1], templates=TEMPLATES, path=path)
    assert len(calls) == 7 and stale.class_names == CLASSES[::-1]
    torch.testing.assert_close(stale.embeddings, first.embeddings.flip(0))


def test_provenance_names_model_weights_and_vocabulary(text_encoder):
    p = text_prototypes_provenance(text_encoder, ["sofa/couch"], templates=TEMPLATES)
    assert p["encoder"]["variant"] == "vit_b32" and p["encoder"]["size"] == "tiny" and len(p["encoder"]["weights"]) == 64
    assert p["vocabulary"] == {"class_names": ["sofa/couch"], "synonyms": [["sofa", "couch"]]}
    assert p["options"]["templates"] == list(TEMPLATES)


@pytest.mark.parametrize("variant,config", [("vit_b32", "ViT-B-32"), ("vit_b16", "ViT-B-16"), ("vit_l14", "ViT-L-14"), ("vit_l14_336", "ViT-L-14-336")])
def test_full_size_text_towers_fit_official_layouts(variant, config):
    import open_clip

    with torch.device("meta"):
        official = open_clip.CLIP(**open_clip.get_model_config(config), quick_gelu=True).state_dict()
        ours = CLIPTextEncoder(variant=variant)
    official["attn_mask"] = torch.empty(77, 77, device="meta")  # OpenAI files carry the causal mask
    converted = _text_part(official)
    match_state_dict(ours, converted, source=config, family="clip", looked_like="clip")
    assert "attn_mask" in converted.dropped and all(k.startswith("visual.") for k in converted.dropped if k != "attn_mask")


def test_weight_mismatches_name_the_file(tmp_path, checkpoint):
    _, path = checkpoint
    with torch.device("meta"):
        full = CLIPTextEncoder(variant="vit_l14", size="full")
    with pytest.raises(KeyMismatchError, match=r"tiny_clip\.bin.*Wrong shapes"):
        load_clip_text_weights(full, path)
    with pytest.raises(WeightsError, match="'clip'/'vit_b32' checkpoint.*variant 'vit_l14'"):
        load_clip_text_weights(CLIPTextEncoder(variant="vit_l14", size="tiny"), "clip_vit_b32_openai")


# ----------------------------------------------------------------------------- vocabularies


def test_coco_open_vocabulary_split():
    from samantics_d2.data.reference_sets import COCO_CLASSES

    assert len(COCO_OV_BASE_CLASSES) == 48 and len(COCO_OV_NOVEL_CLASSES) == 17 and len(COCO_OV_CLASSES) == 65
    assert not set(COCO_OV_BASE_CLASSES) & set(COCO_OV_NOVEL_CLASSES)
    assert set(COCO_OV_BASE_CLASSES) | set(COCO_OV_NOVEL_CLASSES) == set(COCO_OV_CLASSES) <= set(COCO_CLASSES)
    # OVSAM's split (ext/class_names/coco_4817_ids.py), as 0-based COCO-80 indices
    ovsam_base = [0, 1, 2, 3, 7, 8, 13, 14, 17, 18, 22, 23, 24, 26, 30, 33, 37, 39, 44, 45, 46, 47, 49, 50, 51, 53,
                  54, 56, 59, 62, 63, 65, 68, 69, 72, 73, 74, 75, 79, 6, 21, 28, 29, 42, 48, 61, 64, 70]  # fmt: skip
    ovsam_novel = [5, 16, 19, 20, 25, 27, 36, 41, 43, 55, 57, 66, 71, 76, 4, 15, 31]
    assert [COCO_CLASSES[i] for i in sorted(ovsam_base)] == list(COCO_OV_BASE_CLASSES)
    assert [COCO_CLASSES[i] for i in sorted(ovsam_novel)] == list(COCO_OV_NOVEL_CLASSES)


def test_named_vocabularies():
    assert len(get_vocabulary("coco")) == 80 and get_vocabulary("coco_ov_novel")[0] == "airplane"
    assert get_vocabulary("shapes")[0] == "red circle" and len(get_vocabulary("shapes")) == 8
    with pytest.raises(KeyError, match="neither a vocabulary name"):
        get_vocabulary("coco_80")


def test_vocabulary_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("# my classes\ncat, kitty\n\ndog/puppy\ntraffic light\n", encoding="utf-8")
    assert read_vocabulary(path) == ["cat/kitty", "dog/puppy", "traffic light"]
    assert get_vocabulary(str(path)) == ["cat/kitty", "dog/puppy", "traffic light"]


@pytest.mark.parametrize(
    "content,message",
    [
        ("cat\ndog,,puppy\n", r"vocab\.txt, line 2: a synonym is empty"),
        ("cat\n# c\ndog\ncat\n", r"vocab\.txt, line 4: the class is already given on line 1"),
        ("# only a comment\n\n", r"vocab\.txt: no class names"),
    ],
)
def test_vocabulary_file_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "vocab.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_vocabulary(path)


def test_vocabulary_file_not_utf8_or_absent(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"vocab\.txt: not UTF-8"):
        read_vocabulary(path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_vocabulary(tmp_path / "missing.txt")


def test_class_list():
    assert parse_class_list("cat,dog/puppy, traffic light") == ["cat", "dog/puppy", "traffic light"]
    with pytest.raises(ValueError, match="empty class or synonym"):
        parse_class_list("cat,,dog")
    with pytest.raises(ValueError, match=r"names \['cat'\] more than once"):
        parse_class_list("cat,dog,cat")


def test_lvis_names_from_the_annotation_file(tmp_path):
    path = tmp_path / "lvis_tiny.json"
    categories = [
        {"id": 2, "name": "bow_(weapon)", "synonyms": ["bow_(weapon)", "longbow"]},
        {"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"]},
        {"id": 3, "name": "tux", "synonyms": ["tux", "tuxedo"]},
    ]
    path.write_text(json.dumps({"categories": categories}))
    assert lvis_v1_class_names(path) == ["aerosol can/spray can", "bow (weapon)/longbow", "tux/tuxedo"]
    assert lvis_v1_class_names(path, synonyms=False) == ["aerosol can", "bow (weapon)", "tux"]
    path.write_text(json.dumps({"categories": categories[::2]}))  # ids 2 and 3
    with pytest.raises(ValueError, match="ids are not 1..2"):
        lvis_v1_class_names(path)
    with pytest.raises(FileNotFoundError, match="no LVIS v1 annotation file"):
        lvis_v1_class_names(tmp_path / "absent.json")
