"""Training-free reference-based instance segmentation: SAM proposals + a DINOv2 semantic classifier.

For each target image (DESIGN.md, "Data flow of the training-free pipeline"):
one SAM / SAM 2 encoder forward -> point-grid prompts through the prompt decoder in batched chunks
-> low-resolution candidate masks filtered by predicted IoU -> one semantic-encoder (DINOv2)
forward -> every mask pooled on the patch grid at low resolution -> cosine similarity to class
prototypes -> per-class NMS and soft merge -> top-K masks upsampled to the original image.

The label space and the reference set come resolved, as a
:class:`~samantics_d2.references.ReferenceBank` built with the config
(:func:`~samantics_d2.references.build_reference_bank`). The prototypes come from its references through a
:class:`~samantics_d2.modeling.semantic.MemoryBank` ("compute_embeds"), computed by
:meth:`TrainingFreeSegmenter.prepare_references` once the weights are loaded and stored with their
provenance by the references store, then reused while the references, encoder and weights are the
same. ``forward`` only does math: it never prepares them. One step prepares them, after the model is
built and its weights loaded: :func:`samantics_d2.references.prepare_references` (``train_net.py``
calls it before evaluating, the tools before the first image). With Detectron2's yacs path::

    predictor = DefaultPredictor(cfg)           # build_model + DetectionCheckpointer(...).load(MODEL.WEIGHTS)
    prepare_references(predictor.model)         # from samantics_d2.references
    outputs = predictor(bgr_image)

Loading weights into the semantic encoder afterwards (``load_state_dict``, ``DetectionCheckpointer``)
discards the prepared features, and ``forward`` raises until they are prepared again.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn

from ...d2 import META_ARCH_REGISTRY, Boxes, Instances, configurable
from ...references import ReferenceBank, check_prepared, watch_weight_loads, weight_loads
from ...yacs_config import check_yacs_config, node_kwargs, yacs_reference_bank
from ..backbone import EncoderBackbone, build_encoder
from ..proposals import MaskProposals, PointGridProposals, build_prompt_decoder
from ..semantic import MemoryBank, MemoryBankConfig, PrototypeClassifier, mask_pooling, masks_to_boxes, masks_to_original
from ..semantic.clip_recognition import open_vocab_probabilities
from ..semantic.open_vocab_classifier import OpenVocabClassifier, classify_by_probabilities
from ..weights import module_fingerprint

__all__ = ["SamProposer", "TrainingFreeSegmenter", "build_sam_proposer", "module_fingerprint", "sam_proposer_from_config"]

logger = logging.getLogger(__name__)

PROMPT_MODES = ("points", "gt_boxes")


class SamProposer(nn.Module):
    """A SAM / HQ-SAM / SAM 2 image encoder and its point-grid proposal generator, sharing one encoder."""

    def __init__(self, *, backbone: EncoderBackbone, proposals: PointGridProposals):
        super().__init__()
        self.backbone = backbone
        self.proposals = proposals

    def forward(self, image: torch.Tensor, *, boxes: Optional[torch.Tensor] = None) -> MaskProposals:
        """Proposals of one image (uint8 ``[3, H, W]`` RGB); ``boxes`` ``[B, 4]`` XYXY prompts instead of points."""
        x, fits = self.backbone.prepare_with_fits([image])
        features = {name: value[0] for name, value in self.backbone(x).items()}
        return self.proposals(features, fits[0], boxes=boxes)


def build_sam_proposer(
    *,
    backbone: EncoderBackbone,
    decoder_weights: Optional[str] = None,
    decoder_options: Optional[Mapping[str, Any]] = None,
    **grid_options,
) -> SamProposer:
    """The proposer over ``backbone``: its prompt decoder (same family, variant and size) with
    ``decoder_weights`` (the backbone's own checkpoint: a weight tag or path; None for random
    initialisation) and ``decoder_options`` (:func:`build_prompt_decoder`, e.g.
    ``{"predictor_steps": False}``), and :class:`PointGridProposals` with ``grid_options``."""
    decoder = build_prompt_decoder(backbone, weights=decoder_weights, **dict(decoder_options or {}))
    return SamProposer(backbone=backbone, proposals=PointGridProposals(decoder=decoder, **grid_options))


def sam_proposer_from_config(cfg) -> SamProposer:
    """The proposer of a yacs config: ``cfg.MODEL.SAMANTICS.BACKBONE`` (``build_encoder`` options) and
    ``.PROPOSALS``; with ``PRETRAINED``, the prompt decoder reads the encoder's checkpoint."""
    encoder = cfg.MODEL.SAMANTICS.BACKBONE
    decoder_weights = (encoder.WEIGHTS or encoder.TAG) if encoder.PRETRAINED else None
    return build_sam_proposer(
        backbone=build_encoder(**node_kwargs(encoder)),
        decoder_weights=decoder_weights,
        **node_kwargs(cfg.MODEL.SAMANTICS.PROPOSALS),
    )


@META_ARCH_REGISTRY.register()
class TrainingFreeSegmenter(nn.Module):
    """Segment and label every instance of the reference classes, with no training.

    Input: a list of dataset dicts with ``image`` (uint8 ``[3, H, W]`` RGB), ``height``, ``width``
    (the original size) and, with ``prompt_mode="gt_boxes"``, ``instances.gt_boxes`` (in image
    coordinates). Output: per image ``{"instances": Instances}`` at ``height`` x ``width`` with
    ``pred_masks`` (bool ``[N, H, W]``), ``pred_boxes``, ``scores`` and ``pred_classes`` (ids of
    ``class_names``). Inference only: calling it in training mode is an error.

    Args:
        proposer: the SAM encoder + point-grid proposals (:func:`build_sam_proposer`).
        semantic_encoder: the encoder of the prototypes and of the target's dense features (DINOv2).
        classifier: cosine matching, per-class NMS, soft merge, top-K.
        reference_bank: the output label space and the reference set, resolved
            (:func:`~samantics_d2.references.build_reference_bank`: a registered reference set such
            as ``coco_2017_train_novel_ref10_seed0``, a COCO json or dataset dicts; the evaluated
            dataset's classes; ``shots``: the first ``shots`` references of every class, None: all;
            the bank is computed once for all of them; ``cache_path``: where it is stored, default
            the store's cache folder). Each reference class is matched to the output classes by name.
        aggregation: ``"mean"``, ``"kmeans"`` or ``"all"`` (:meth:`MemoryBank.prototypes`).
        num_centres: centres per class with ``"kmeans"``.
        memory_bank: how references are cropped and pooled.
        prompt_mode: ``"points"`` (the point grid) or ``"gt_boxes"`` (prompt SAM with the
            ground-truth boxes: the mask-quality oracle).
        open_vocab: label the proposals by class probabilities of CLIP mask embeddings
            (:class:`~samantics_d2.modeling.semantic.OpenVocabClassifier`: text prototypes of a
            vocabulary) instead of the DINOv2 cosine: "segment everything with labels". Which
            prototype bank labels the masks follows from what is given:
            ``reference_bank`` only: image prototypes (DINOv2 cosine, the default pipeline);
            ``open_vocab`` only: text prototypes (no ``semantic_encoder`` needed);
            both: fused, the DINOv2 cosines (a class: its best prototype) as a softmax at
            ``image_logit_scale`` without background (classes without references: text only); the
            two label spaces must be equal.
        image_logit_scale: the logit scale of the image side's softmax in the fused mode.
        drop_empty_masks: drop the detections whose mask is empty at the output size (``height`` x
            ``width``): a thin proposal can vanish when the mask grid is resized down, and COCO's
            evaluation counts it as a false positive (box and mask). Dropped after the top K, so
            an image may get fewer than ``classifier.topk``. False keeps them, as No Time to
            Train's code does.
    """

    @configurable
    def __init__(
        self,
        *,
        proposer: SamProposer,
        semantic_encoder: Optional[EncoderBackbone] = None,
        classifier: PrototypeClassifier,
        reference_bank: Optional[ReferenceBank] = None,
        aggregation: str = "mean",
        num_centres: int = 4,
        memory_bank: Optional[MemoryBankConfig] = None,
        prompt_mode: str = "points",
        open_vocab: Optional[OpenVocabClassifier] = None,
        image_logit_scale: float = 100.0,
        drop_empty_masks: bool = False,
    ):
        super().__init__()
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode={prompt_mode!r}; expected one of {PROMPT_MODES}.")
        self._check_prototype_banks(reference_bank, semantic_encoder, open_vocab)
        self.open_vocab = open_vocab
        self.image_logit_scale = float(image_logit_scale)
        if not isinstance(drop_empty_masks, bool):
            raise ValueError(f"TrainingFreeSegmenter got drop_empty_masks={drop_empty_masks!r}; expected True or False.")
        self.drop_empty_masks = drop_empty_masks
        self.proposer = proposer
        self.semantic_encoder = semantic_encoder
        self.classifier = classifier
        self.aggregation = aggregation
        self.num_centres = num_centres
        self.memory_bank_config = memory_bank if memory_bank is not None else MemoryBankConfig()
        self.prompt_mode = prompt_mode
        self.reference_bank: Optional[ReferenceBank] = None
        self._prototypes: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._prepared_weight_loads = 0
        if reference_bank is not None:
            self.set_reference_bank(reference_bank)
        if semantic_encoder is not None:  # its weights loaded later: the prepared features are stale
            watch_weight_loads(semantic_encoder)
        for p in self.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Yacs path (:mod:`samantics_d2.yacs_config`): ``MODEL.SAMANTICS.BACKBONE``, ``.PROPOSALS``,
        ``.SEMANTIC_ENCODER`` and ``.TRAINING_FREE``; the reference set (``REFERENCES``, ``SHOTS``,
        ``MEMORY_BANK_PATH``) and the output classes (``DATASETS.TEST[0]``'s) are resolved here."""
        check_yacs_config(cfg, cls.__name__)
        opts = cfg.MODEL.SAMANTICS
        options = node_kwargs(opts.TRAINING_FREE)
        if not options["references"]:
            raise ValueError("TrainingFreeSegmenter needs a reference set: set MODEL.SAMANTICS.TRAINING_FREE.REFERENCES "
                             "to a registered reference dataset (e.g. shapes_train_ref5_seed0).")
        bank = yacs_reference_bank(cfg, "MODEL.SAMANTICS.TRAINING_FREE", references=options.pop("references"),
                                   shots=options.pop("shots"), cache_path=options.pop("memory_bank_path"))
        return {
            **options,
            "proposer": sam_proposer_from_config(cfg),
            "semantic_encoder": build_encoder(**node_kwargs(opts.SEMANTIC_ENCODER)),
            "classifier": PrototypeClassifier(**node_kwargs(opts.TRAINING_FREE.CLASSIFIER)),
            "memory_bank": MemoryBankConfig(**node_kwargs(opts.TRAINING_FREE.MEMORY_BANK)),
            "reference_bank": bank,
        }

    @staticmethod
    def _check_prototype_banks(reference_bank, semantic_encoder, open_vocab) -> None:
        """Image (``reference_bank`` + ``semantic_encoder``), text (``open_vocab``) or both, same classes."""
        if reference_bank is None and open_vocab is None:
            raise ValueError("TrainingFreeSegmenter needs a reference_bank (image prototypes), an open_vocab classifier "
                             "(text prototypes), or both (fused).")
        if reference_bank is not None and semantic_encoder is None:
            raise ValueError("TrainingFreeSegmenter: a reference_bank needs the semantic_encoder of its prototypes.")
        if reference_bank is not None and open_vocab is not None and list(reference_bank.class_names) != open_vocab.class_names:
            raise ValueError(
                f"TrainingFreeSegmenter: the fused label spaces differ: references {list(reference_bank.class_names)[:5]}"
                f"... vs words {open_vocab.class_names[:5]}...; build both for the same class names."
            )

    @property
    def device(self) -> torch.device:
        return next(self.proposer.parameters()).device

    # ------------------------------------------------------------------ references

    def set_reference_bank(self, reference_bank: Optional[ReferenceBank]) -> None:
        """Use another label space / reference set (:func:`~samantics_d2.references.build_reference_bank`);
        the prototypes are computed again (or loaded from the store) by :meth:`prepare_references`.
        None: no image prototypes (words only: needs ``open_vocab``)."""
        if reference_bank is None:
            if self.open_vocab is None:
                raise ValueError("TrainingFreeSegmenter.set_reference_bank(None): without references the model needs an "
                                 "open_vocab classifier (classes named by words).")
            self.reference_bank, self.bank, self._prototypes = None, None, None
            return
        self._output_index = reference_bank.output_index(require_all=True)  # checked now, at build time
        self.reference_bank = reference_bank
        self.bank: Optional[MemoryBank] = None
        self._prototypes: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def class_names(self) -> list[str]:
        """The output label space."""
        if self.reference_bank is None:
            return list(self.open_vocab.class_names)
        return list(self.reference_bank.class_names)

    def prepare_references(self) -> None:
        """Build or load the memory bank of the references with the current encoder weights (the
        main process first, the others then load it) and the prototypes in the order of
        :meth:`class_names`. Call it after loading the weights and before the first image."""
        references = self.reference_bank
        if references is None:  # text prototypes only: built with the config
            return
        inputs = dict(
            references=references.dataset_dicts,
            backbone=self.semantic_encoder,
            config=self.memory_bank_config,
            weights_id=module_fingerprint(self.semantic_encoder),
            num_classes=len(references.reference_classes),
            source=references.source,
            class_names=references.reference_classes,
        )
        stored = references.load_or_build(
            name="memory_bank", provenance=MemoryBank.describe(**inputs),
            build=lambda: MemoryBank.build(**inputs).to_stored(), what="memory bank",
        )
        self.bank = MemoryBank.from_stored(stored)
        prototypes, valid = self.bank.prototypes(
            shots=references.shots, aggregation=self.aggregation, num_centres=self.num_centres, device=self.device
        )
        # Reference class i -> output class j by name; output classes without references stay invalid.
        names = self.class_names()
        order = torch.tensor(self._output_index, device=self.device)
        out = prototypes.new_zeros((len(names), *prototypes.shape[1:]))
        out_valid = valid.new_zeros((len(names), valid.shape[1]))
        out[order], out_valid[order] = prototypes, valid
        missing = [names[j] for j in range(len(names)) if not bool(out_valid[j].any())]
        if missing:
            logger.warning("No usable reference for %d of %d classes (never predicted): %s", len(missing), len(names),
                           ", ".join(missing))
        self._prototypes = (out, out_valid)
        self._prepared_weight_loads = weight_loads(self.semantic_encoder)

    def prepare_prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prototypes ``[K, M, D]`` and validity ``[K, M]`` in the order of :meth:`class_names`
        (prepared by :meth:`prepare_references` when not yet: for callers outside ``forward``)."""
        if self._prototypes is None:
            self.prepare_references()
        return self._prototypes

    def prepared_prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`prepare_prototypes` as ``forward`` reads them: prepared already, or a ``RuntimeError``."""
        return check_prepared(self._prototypes, model="TrainingFreeSegmenter", weights="semantic encoder's",
                              module=self.semantic_encoder, loads_when_prepared=self._prepared_weight_loads)

    # ------------------------------------------------------------------ inference

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        if self.training:
            raise RuntimeError("TrainingFreeSegmenter has nothing to train: use it in eval mode (--eval-only).")
        prototypes, valid = self.prepared_prototypes() if self.reference_bank is not None else (None, None)
        return [{"instances": self._segment(x, prototypes, valid)} for x in batched_inputs]

    def _segment(self, x: dict, prototypes: torch.Tensor, valid: torch.Tensor) -> Instances:
        image = x["image"]
        height, width = int(x.get("height", image.shape[-2])), int(x.get("width", image.shape[-1]))
        boxes = None
        if self.prompt_mode == "gt_boxes":
            if "instances" not in x:
                raise ValueError("prompt_mode='gt_boxes' needs ground-truth instances in the inputs: build the test "
                                 "loader with DetectionMapper(is_train=True, augmentations=[]).")
            boxes = x["instances"].gt_boxes.tensor
        proposals = self.proposer(image, boxes=boxes)  # low-res, SAM input frame
        if self.open_vocab is not None:
            return self._instances(self._classify_open_vocab(image, proposals, prototypes, valid), height, width)

        dense_input, fits = self.semantic_encoder.prepare_with_fits([image])
        features = self.semantic_encoder(dense_input)[self.semantic_encoder.dense_feature][0]  # [C, h, w]
        kept = self.classifier(
            features=features.float(),
            mask_logits=proposals.mask_logits.float(),
            iou_pred=proposals.iou_pred,
            mask_fit=proposals.fit,
            feature_fit=fits[0],
            patch_size=self.semantic_encoder.preprocess.patch_size,
            prototypes=prototypes,
            prototype_valid=valid,
        )
        return self._instances(kept, height, width)

    def _classify_open_vocab(self, image: torch.Tensor, proposals, prototypes: Optional[torch.Tensor],
                             valid: Optional[torch.Tensor]):
        """The proposals labelled by the open-vocabulary classifier (text prototypes, fused with the
        DINOv2 prototypes' softmax when there are references): :func:`classify_by_probabilities`."""
        probabilities = self.open_vocab_probabilities(image, proposals, prototypes, valid)
        kept = classify_by_probabilities(self.classifier, probabilities, proposals.mask_logits > 0,
                                         iou_pred=proposals.iou_pred)
        final = masks_to_original(proposals.mask_logits[kept.indices].float(), proposals.fit, antialias=True)
        return kept._replace(masks=final, boxes=masks_to_boxes(final, convention=self.classifier.box_convention))

    def open_vocab_probabilities(self, image: torch.Tensor, proposals, prototypes: Optional[torch.Tensor] = None,
                                 valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[P, K + 1]`` class probabilities (last: background) of the masks of ``proposals``
        (:class:`MaskProposals` of ``image``, uint8 ``[3, H, W]``) from the open-vocabulary classifier,
        fused with the DINOv2 prototypes' softmax when ``prototypes [K, M, D]`` / ``valid [K, M]`` are
        given (the prepared references: :meth:`prepared_prototypes`)."""
        image_probabilities = has_image_side = None
        if prototypes is not None:  # fused: the DINOv2 side as [P, K + 1] probabilities
            dense_input, fits = self.semantic_encoder.prepare_with_fits([image])
            features = self.semantic_encoder(dense_input)[self.semantic_encoder.dense_feature][0].float()
            weights = self.classifier.mask_weights(
                proposals.mask_logits.float(), mask_fit=proposals.fit, feature_fit=fits[0],
                grid_size=tuple(features.shape[-2:]), patch_size=self.semantic_encoder.preprocess.patch_size,
            )
            pooled, _ = mask_pooling(features, weights)  # [P, C]
            rows = valid.nonzero()  # [R, 2]: (class, prototype) of every valid prototype
            image_probabilities = [open_vocab_probabilities(  # a class scores by its best prototype; no background
                pooled, torch.nn.functional.normalize(prototypes[rows[:, 0], rows[:, 1]].float(), dim=-1),
                logit_scale=self.image_logit_scale, prototype_classes=rows[:, 0], num_classes=len(valid),
            )]
            has_image_side = valid.any(dim=1)
        chunk = self.open_vocab.chunk_size  # full-size masks made chunk by chunk (low-res until then)
        masks = (proposals[i : i + chunk].original_masks() for i in range(0, len(proposals), chunk))
        return self.open_vocab([image], [masks], image_probabilities=image_probabilities,
                               has_image_side=has_image_side)[0]

    def _instances(self, kept, height: int, width: int) -> Instances:
        """``kept`` (ClassifiedProposals with masks on the original grid) as Instances at ``height`` x ``width``."""
        masks = kept.masks  # [K, h0, w0] bool, the original image grid
        if masks.shape[-2:] != (height, width):  # the input was resized by the mapper
            if len(masks):
                masks = torch.nn.functional.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0] > 0.5
            else:  # interpolate cannot resize zero masks
                masks = masks.new_zeros((0, height, width))
        scores, classes = kept.scores, kept.classes
        if self.drop_empty_masks:
            non_empty = masks.flatten(1).any(dim=1)
            masks, scores, classes = masks[non_empty], scores[non_empty], classes[non_empty]
        result = Instances((height, width))
        result.pred_masks = masks
        result.pred_boxes = Boxes(masks_to_boxes(masks, convention=self.classifier.box_convention))
        result.scores = scores
        result.pred_classes = classes
        return result

