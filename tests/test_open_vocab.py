"""Open-vocabulary recognition as a system (issue 14, items 2-3): OpenVocabClassifier (text, reference
and fused probabilities), classify_by_probabilities (the prototype classifier's stages on class
probabilities), OpenVocabPromptedSegmenter (one prompt-decoder call per image, one mask/label/score
per prompt, what PromptedRecognitionEvaluator reads) and TrainingFreeSegmenter labelling its
proposals by words, and by words fused with references. Tiny random models throughout."""
from __future__ import annotations

import pytest
import torch

from samantics_d2.d2 import Instances
from samantics_d2.evaluation import PromptedRecognitionEvaluator
from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.meta_arch import OpenVocabPromptedSegmenter, TrainingFreeSegmenter, build_sam_proposer
from samantics_d2.modeling.meta_arch.open_vocab import fit_to_size
from samantics_d2.modeling.semantic import (
    CropRecognizer,
    OpenVocabClassifier,
    PrototypeClassifier,
    build_clip_text_encoder,
    classify_by_probabilities,
    compute_text_prototypes,
    fuse_class_probabilities,
    open_vocab_probabilities,
    probability_rows,
)

CLASSES = ["red circle", "green square/box", "blue triangle"]


@pytest.fixture(scope="module")
def clip_parts():
    torch.manual_seed(0)
    recognizer = CropRecognizer(clip=build_encoder("clip_vit_b16_openai", size="tiny").eval(), context=0.2)
    text = compute_text_prototypes(build_clip_text_encoder("clip_vit_b16_openai", size="tiny"), CLASSES,
                                   templates=("a photo of a {}.", "a {}."))
    return recognizer, text


@pytest.fixture(scope="module")
def segmenter(clip_parts):
    recognizer, text = clip_parts
    torch.manual_seed(1)
    proposer = build_sam_proposer(backbone=build_encoder("sam_vit_b", size="tiny", input_size=128).eval())
    return OpenVocabPromptedSegmenter(proposer=proposer, classifier=OpenVocabClassifier(
        recognizer=recognizer, text_prototypes=text, logit_scale=100.0)).eval()


def _image(height=96, width=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)


# ------------------------------------------------------------------ OpenVocabClassifier
def test_text_probabilities_are_the_best_synonym_softmax(clip_parts):
    recognizer, text = clip_parts
    classifier = OpenVocabClassifier(recognizer=recognizer, text_prototypes=text, logit_scale=50.0, background=0.3)
    embeddings = torch.nn.functional.normalize(torch.randn(5, text.embeddings.shape[1]), dim=-1)
    got = classifier.probabilities(embeddings)
    # by hand: cosine to every synonym, a class takes its best synonym, background = 50 x 0.3
    cosine = embeddings @ text.synonym_embeddings.T  # [5, S]
    per_class = torch.stack([cosine[:, text.synonym_class == k].amax(dim=1) for k in range(len(CLASSES))], dim=1)
    expected = torch.cat([50.0 * per_class, torch.full((5, 1), 50.0 * 0.3)], dim=1).softmax(dim=1)
    torch.testing.assert_close(got, expected)
    assert text.synonym_embeddings.shape[0] == 4  # "green square/box": two synonyms
    mean_only = OpenVocabClassifier(recognizer=recognizer, text_prototypes=text, best_synonym=False, logit_scale=50.0)
    torch.testing.assert_close(mean_only.probabilities(embeddings),
                               open_vocab_probabilities(embeddings, text.embeddings, logit_scale=50.0))


def test_reference_prototypes_fuse_per_class_and_classes_without_examples_use_words(clip_parts):
    recognizer, text = clip_parts
    D = text.embeddings.shape[1]
    references = torch.nn.functional.normalize(torch.randn(3, D), dim=-1)
    reference_classes = torch.tensor([0, 0, 2])  # class 1 has no example
    fused = OpenVocabClassifier(recognizer=recognizer, text_prototypes=text, reference_prototypes=references,
                                reference_classes=reference_classes, logit_scale=30.0, text_weight=0.25)
    embeddings = torch.nn.functional.normalize(torch.randn(4, D), dim=-1)
    text_probs = open_vocab_probabilities(embeddings, text.synonym_embeddings, logit_scale=30.0,
                                          prototype_classes=text.synonym_class, num_classes=3)
    image_probs = open_vocab_probabilities(embeddings, references, logit_scale=30.0,
                                           prototype_classes=reference_classes, num_classes=3)
    assert (image_probs[:, 1] == 0).all()  # no example: no image probability
    expected = fuse_class_probabilities(text_probs, image_probs, text_weight=torch.tensor([0.25, 1.0, 0.25]))
    torch.testing.assert_close(fused.probabilities(embeddings), expected)
    assert (expected[:, 1] > 0).all()  # the words-only class keeps its text probability
    only_examples = OpenVocabClassifier(recognizer=recognizer, class_names=CLASSES, reference_prototypes=references,
                                        reference_classes=reference_classes, logit_scale=30.0)
    torch.testing.assert_close(only_examples.probabilities(embeddings), image_probs)


def test_classifier_arguments_are_checked(clip_parts):
    recognizer, text = clip_parts
    with pytest.raises(ValueError, match="text_prototypes .* or, with"):
        OpenVocabClassifier(recognizer=recognizer, text_prototypes=text, class_names=CLASSES)
    with pytest.raises(ValueError, match="go together"):
        OpenVocabClassifier(recognizer=recognizer, text_prototypes=text, reference_prototypes=torch.zeros(1, 32))
    with pytest.raises(ValueError, match=r"ids in \[0, 3\)"):
        OpenVocabClassifier(recognizer=recognizer, text_prototypes=text, reference_prototypes=torch.zeros(1, 32),
                            reference_classes=torch.tensor([3]))
    with pytest.raises(ValueError, match="text_weight"):
        OpenVocabClassifier(recognizer=recognizer, text_prototypes=text, text_weight=[0.5, 0.5])


# ------------------------------------------------------------------ classify_by_probabilities
def test_probability_rows_give_the_probability_as_cosine():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1.0, 0.0, 0.0]])
    rows = probability_rows(probs)
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(rows[:, :2], probs[:, :2])  # cosine with e_k (unit rows) = p_k


def test_classify_by_probabilities_labels_scores_nms_and_topk():
    # masks 0 and 1 overlap heavily (same class 0), mask 2 apart (class 1); mask 3 is background-heavy
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[0, 2:10, 2:10] = masks[1, 2:10, 3:10] = masks[2, 11:15, 11:15] = masks[3, 0:3, 12:16] = True
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.04, 0.03, 0.93]])
    no_nms = PrototypeClassifier(nms_thresh=1.0, merge="none", topk=10, score_floor=0.0)
    kept = classify_by_probabilities(no_nms, probs, masks)
    assert kept.indices.tolist() == [1, 2, 0, 3]  # by score, background never a label
    torch.testing.assert_close(kept.scores, torch.tensor([0.9, 0.7, 0.6, 0.04]))
    assert kept.classes.tolist() == [0, 1, 0, 0]
    nms = PrototypeClassifier(nms_thresh=0.5, merge="none", topk=2, score_floor=0.05)
    kept = classify_by_probabilities(nms, probs, masks)
    assert kept.indices.tolist() == [1, 2]  # 0 suppressed by 1 (same class), 3 under the floor, top 2


# ------------------------------------------------------------------ OpenVocabPromptedSegmenter
def _inputs(prompts, image=None, height=192, width=256):
    image = _image() if image is None else image
    return {"image": image, "height": height, "width": width, "prompts": prompts, "file_name": "x.png"}


@pytest.mark.parametrize("kind", ["boxes", "points"])
def test_prompted_segmenter_one_decoder_call_per_image_equals_prompt_by_prompt(segmenter, kind, monkeypatch):
    prompts = {"boxes": torch.tensor([[4.0, 6.0, 60.0, 50.0], [30.0, 20.0, 120.0, 90.0], [0.0, 0.0, 127.0, 95.0]]),
               "points": torch.tensor([[20.0, 30.0], [100.0, 60.0], [64.0, 10.0]])}[kind]
    decoder = segmenter.proposer.proposals.decoder
    calls = []
    original = decoder.decode
    monkeypatch.setattr(decoder, "decode", lambda *a, **k: calls.append(k) or original(*a, **k))
    with torch.no_grad():
        other = _inputs({kind: prompts[:2] / 2}, image=_image(48, 64, seed=1), height=48, width=64)  # another size
        batch = segmenter([_inputs({kind: prompts}), other])
        assert len(calls) == 2  # one call per image, all of its prompts
        single = [segmenter([_inputs({kind: prompts[i : i + 1]})])[0]["instances"] for i in range(len(prompts))]
        other_alone = segmenter([other])[0]["instances"]
    out = batch[0]["instances"]
    assert isinstance(out, Instances) and out.image_size == (192, 256) and len(out) == 3
    assert out.pred_masks.shape == (3, 192, 256) and out.pred_masks.dtype == torch.bool
    assert torch.equal(out.get(f"prompt_{kind}"), prompts)
    for i, one in enumerate(single):
        assert torch.equal(out.pred_masks[i], one.pred_masks[0])
        assert out.pred_classes[i] == one.pred_classes[0]
        torch.testing.assert_close(out.scores[i], one.scores[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(batch[1]["instances"].pred_masks, other_alone.pred_masks)  # each image its own fit
    torch.testing.assert_close(batch[1]["instances"].scores, other_alone.scores, rtol=1e-4, atol=1e-5)


def test_prompted_segmenter_labels_are_the_classifier_argmax(segmenter):
    prompts = {"boxes": torch.tensor([[4.0, 6.0, 60.0, 50.0], [30.0, 20.0, 120.0, 90.0]])}
    image = _image()
    with torch.no_grad():
        out = segmenter([_inputs(prompts, image=image, height=96, width=128)])[0]["instances"]
        # the masks CLIP saw are the output masks here (no resize): classify them by hand
        probs = segmenter.classifier([image], [out.pred_masks])[0]
    assert (probs[:, -1] == 0).all()  # background=None: no background column mass
    torch.testing.assert_close(out.scores, probs[:, :3].max(dim=1).values)
    assert out.pred_classes.tolist() == probs[:, :3].argmax(dim=1).tolist()


def test_prompted_segmenter_output_is_what_the_evaluator_reads(segmenter):
    from samantics_d2.d2 import BitMasks

    prompts = {"points": torch.tensor([[20.0, 30.0], [100.0, 60.0]])}
    x = _inputs(prompts, height=96, width=128)
    with torch.no_grad():
        out = segmenter([x])
    gt = Instances((96, 128))
    gt.gt_masks = BitMasks(out[0]["instances"].pred_masks.clone())
    gt.gt_classes = out[0]["instances"].pred_classes.clone()
    x["instances"] = gt
    evaluator = PromptedRecognitionEvaluator(num_classes=3)
    evaluator.process([x], out)
    results = evaluator.evaluate()["prompted_recognition"]
    assert results["Acc"] == 100.0 and results["num_prompts"] == 2
    assert results["IoU"] == 100.0 or not out[0]["instances"].pred_masks.any()


def test_prompted_segmenter_image_without_prompts_and_wrong_inputs(segmenter):
    with torch.no_grad():
        out = segmenter([_inputs({"boxes": torch.zeros(0, 4)})])[0]["instances"]
    assert len(out) == 0 and out.pred_masks.shape == (0, 192, 256)
    with pytest.raises(ValueError, match="exactly one of"):
        segmenter([_inputs({"boxes": torch.zeros(1, 4), "points": torch.zeros(1, 2)})])
    with pytest.raises(ValueError, match="PromptedRecognitionMapper"):
        segmenter([{"image": _image()}])


def test_fit_to_size_maps_masks_to_the_original_size_in_one_resampling():
    backbone = build_encoder("sam_vit_b", size="tiny", input_size=128)
    _, fits = backbone.prepare_with_fits([_image(48, 64)])
    fit = fits[0]
    logits = torch.randn(2, 32, 32)
    direct = fit_to_size(fit, (96, 128)).mask_to_original(logits)
    # the same as sampling the 48 x 64 image's grid at the 96 x 128 pixel centres
    assert direct.shape == (2, 96, 128)
    torch.testing.assert_close(fit_to_size(fit, (48, 64)).mask_to_original(logits), fit.mask_to_original(logits))


# ------------------------------------------------------------------ segment everything with labels
@pytest.fixture(scope="module")
def everything_parts(clip_parts):
    recognizer, text = clip_parts
    torch.manual_seed(2)
    proposer = build_sam_proposer(backbone=build_encoder("sam_vit_b", size="tiny", input_size=64).eval(),
                                  points_per_side=4, pred_iou_thresh=-100.0)
    return proposer, OpenVocabClassifier(recognizer=recognizer, text_prototypes=text, logit_scale=100.0)


def test_training_free_segmenter_labels_proposals_by_words(everything_parts):
    proposer, open_vocab = everything_parts
    model = TrainingFreeSegmenter(proposer=proposer, classifier=PrototypeClassifier(nms_thresh=1.0, merge="none"),
                                  open_vocab=open_vocab).eval()
    assert model.class_names() == CLASSES
    model.prepare_references()  # nothing to prepare: words only
    image = _image(64, 64)
    with torch.no_grad():
        out = model([{"image": image}])[0]["instances"]
        proposals = proposer(image)
        probs = open_vocab([image], [proposals.original_masks()])[0]
    assert len(out) == len(proposals) > 0  # no NMS, no merge, floor 0: every proposal, best first
    expected = probs[:, :3].max(dim=1)
    torch.testing.assert_close(out.scores.sort(descending=True).values, expected.values.sort(descending=True).values)
    assert sorted(out.pred_classes.tolist()) == sorted(expected.indices.tolist())


def test_training_free_segmenter_fuses_words_and_references(everything_parts, clip_parts, tmp_path, monkeypatch):
    from samantics_d2.data.shapes import SHAPES_CLASSES
    from samantics_d2.references import build_reference_bank

    monkeypatch.setenv("SAMANTICS_CACHE", str(tmp_path))
    proposer, words_only = everything_parts
    dinov2 = build_encoder("dinov2_vits14", size="tiny").eval()
    with pytest.raises(ValueError, match="needs a reference_bank .* or both"):
        TrainingFreeSegmenter(proposer=proposer, classifier=PrototypeClassifier())
    bank = build_reference_bank(references="shapes_train_ref5_seed0", class_names=["tree", *SHAPES_CLASSES])
    with pytest.raises(ValueError, match="fused label spaces differ"):
        TrainingFreeSegmenter(proposer=proposer, semantic_encoder=dinov2, classifier=PrototypeClassifier(),
                              reference_bank=bank, open_vocab=words_only)
    # the label space of tools/segment.py: a word without examples ("tree"), then the reference classes
    text = compute_text_prototypes(build_clip_text_encoder("clip_vit_b16_openai", size="tiny"), bank.class_names,
                                   templates=("a photo of a {}.",))
    open_vocab = OpenVocabClassifier(recognizer=clip_parts[0], text_prototypes=text, logit_scale=100.0)
    model = TrainingFreeSegmenter(proposer=proposer, semantic_encoder=dinov2, reference_bank=bank,
                                  classifier=PrototypeClassifier(nms_thresh=1.0, merge="none"), open_vocab=open_vocab,
                                  image_logit_scale=20.0).eval()
    model.prepare_references()
    prototypes, valid = model.prepare_prototypes()
    assert not valid[0].any() and valid[1:].any(dim=1).all()  # "tree": words only
    image = _image(64, 64)
    seen = []
    original = open_vocab.probabilities
    monkeypatch.setattr(open_vocab, "probabilities", lambda e, **k: seen.append(k) or original(e, **k))
    with torch.no_grad():
        out = model([{"image": image}])[0]["instances"]
        # the DINOv2 side handed to the fusion: [P, 9 + 1] probabilities, none for "tree" nor background
        image_probs, has_image_side = seen[0]["image_probabilities"], seen[0]["has_image_side"]
        assert has_image_side.tolist() == [False] + [True] * 8
        assert (image_probs[:, 0] == 0).all() and (image_probs[:, -1] == 0).all()
        torch.testing.assert_close(image_probs.sum(dim=1), torch.ones(len(image_probs)))
        fused_scores = out.scores.sort(descending=True).values
        model.image_logit_scale = 0.0  # a flat image side: the fusion reorders nothing but the scores
        flat = model([{"image": image}])[0]["instances"]
    assert len(out) == len(flat) > 0 and set(out.pred_classes.tolist()) <= set(range(9))
    assert ((out.scores > 0) & (out.scores <= 1)).all()
    assert not torch.allclose(fused_scores, flat.scores.sort(descending=True).values)  # the references count


@pytest.mark.parametrize("tag, out_features", [("hq_sam_vit_b", ["neck", "block1"]),
                                                ("sam2.1_hiera_t", ["p2", "p3", "p4"])])
def test_prompted_segmenter_with_hq_sam_and_sam2(clip_parts, tag, out_features):
    recognizer, text = clip_parts
    torch.manual_seed(3)
    proposer = build_sam_proposer(backbone=build_encoder(tag, size="tiny", out_features=out_features).eval())
    model = OpenVocabPromptedSegmenter(proposer=proposer, classifier=OpenVocabClassifier(
        recognizer=recognizer, text_prototypes=text)).eval()
    with torch.no_grad():
        for prompts in ({"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 79.0, 63.0]])},
                        {"points": torch.tensor([[10.0, 12.0], [50.0, 40.0]])}):
            out = model([{"image": _image(64, 80), "prompts": prompts}])[0]["instances"]
            assert out.pred_masks.shape == (2, 64, 80) and out.pred_classes.tolist() == out.pred_classes.clamp(0, 2).tolist()


@pytest.mark.parametrize("dense", [False, True])
def test_chunked_masks_give_the_embeddings_of_all_masks_at_once(clip_parts, dense):
    from samantics_d2.modeling.semantic import DensePoolRecognizer

    recognizer, text = clip_parts
    if dense:  # encode once, then every chunk
        recognizer = DensePoolRecognizer(clip=build_encoder("clip_rn50x16_openai", size="tiny").eval())
        text = compute_text_prototypes(build_clip_text_encoder("clip_rn50x16_openai", size="tiny"), CLASSES,
                                       templates=("a {}.",))
    classifier = OpenVocabClassifier(recognizer=recognizer, text_prototypes=text, chunk_size=2)
    image = _image(64, 80)
    masks = torch.rand(5, 64, 80) > 0.6
    with torch.no_grad():
        whole = classifier.embed(image, masks)
        chunked = classifier.embed(image, (masks[i : i + 2] for i in range(0, 5, 2)))
        assert classifier.embed(image, iter(())).shape == (0, whole.shape[1])
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_training_free_segmenter_by_words_without_proposals(everything_parts):
    proposer, open_vocab = everything_parts
    strict = build_sam_proposer(backbone=proposer.backbone, points_per_side=4, pred_iou_thresh=100.0)
    model = TrainingFreeSegmenter(proposer=strict, classifier=PrototypeClassifier(), open_vocab=open_vocab).eval()
    with torch.no_grad():
        out = model([{"image": _image(64, 64)}])[0]["instances"]
    assert len(out) == 0 and out.pred_masks.shape == (0, 64, 64)
