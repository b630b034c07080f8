"""Training-free reference-based instance segmentation: SAM proposals + a DINOv2 semantic classifier.

For each target image (DESIGN.md, "Data flow of the training-free pipeline"):
one SAM / SAM 2 encoder forward -> point-grid prompts through the prompt decoder in batched chunks
-> low-resolution candidate masks filtered by predicted IoU -> one semantic-encoder (DINOv2)
forward -> every mask pooled on the patch grid at low resolution -> cosine similarity to class
prototypes -> per-class NMS and soft merge -> top-K masks upsampled to the original image.

The prototypes come from a reference set (a registered COCO-format dataset) through a
:class:`~samantics_d2.modeling.semantic.MemoryBank` ("compute_embeds"), built at the first forward
and saved with its provenance, then reused while the references, encoder and weights are the same.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ...d2 import META_ARCH_REGISTRY, BitMasks, Boxes, DatasetCatalog, Instances, MetadataCatalog, comm, configurable
from ...yacs_config import check_yacs_config, dataset_classes, node_kwargs, registered_dataset
from ..backbone import EncoderBackbone, build_encoder
from ..proposals import MaskProposals, PointGridProposals, build_prompt_decoder
from ..semantic import MemoryBank, MemoryBankConfig, PrototypeClassifier, masks_to_original, resample_masks
from ..weights import module_fingerprint
from ...utils.io import cache_root

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
    **grid_options,
) -> SamProposer:
    """The proposer over ``backbone``: its prompt decoder (same family, variant and size) with
    ``decoder_weights`` (the backbone's own checkpoint: a weight tag or path; None for random
    initialisation) and :class:`PointGridProposals` with ``grid_options``."""
    decoder = build_prompt_decoder(backbone, weights=decoder_weights)
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


def _default_bank_dir() -> str:
    return os.path.join(cache_root(), "memory_banks")


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
        references: name of a registered COCO-format reference dataset (e.g. from
            ``tools/create_reference_json.py`` or ``coco_2017_train_novel_ref10_seed0``), or a list of
            dataset dicts (then ``reference_classes`` names their contiguous ids).
        reference_classes: class names of the reference ids; default: the reference dataset's
            ``thing_classes``.
        class_names: the output label space (e.g. the evaluation dataset's ``thing_classes``); each
            reference class is matched to it by name. Default: the reference classes.
        dataset_name: alternatively, take ``class_names`` from this registered dataset's metadata.
        shots: use the first ``shots`` references of every class (None: all); the bank is computed
            once for all of them.
        aggregation: ``"mean"``, ``"kmeans"`` or ``"all"`` (:meth:`MemoryBank.prototypes`).
        num_centres: centres per class with ``"kmeans"``.
        memory_bank: how references are cropped and pooled.
        memory_bank_path: where the bank is saved; default ``$SAMANTICS_CACHE/memory_banks/<name>.safetensors``.
        prompt_mode: ``"points"`` (the point grid) or ``"gt_boxes"`` (prompt SAM with the
            ground-truth boxes: the mask-quality oracle).
    """

    @configurable
    def __init__(
        self,
        *,
        proposer: SamProposer,
        semantic_encoder: EncoderBackbone,
        classifier: PrototypeClassifier,
        references: Union[str, Sequence[dict]],
        reference_classes: Optional[Sequence[str]] = None,
        class_names: Optional[Sequence[str]] = None,
        dataset_name: Optional[str] = None,
        shots: Optional[int] = None,
        aggregation: str = "mean",
        num_centres: int = 4,
        memory_bank: Optional[MemoryBankConfig] = None,
        memory_bank_path: Optional[str] = None,
        prompt_mode: str = "points",
    ):
        super().__init__()
        if prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode={prompt_mode!r}; expected one of {PROMPT_MODES}.")
        if shots is not None and shots < 1:
            raise ValueError(f"shots={shots}; expected a positive number of references per class, or None for all.")
        if class_names is not None and dataset_name is not None:
            raise ValueError("Give class_names or dataset_name, not both.")
        self.proposer = proposer
        self.semantic_encoder = semantic_encoder
        self.classifier = classifier
        self.references = references
        self._reference_classes = list(reference_classes) if reference_classes is not None else None
        self._class_names = list(class_names) if class_names is not None else None
        self.dataset_name = dataset_name
        self.shots = shots
        self.aggregation = aggregation
        self.num_centres = num_centres
        self.memory_bank_config = memory_bank if memory_bank is not None else MemoryBankConfig()
        self.memory_bank_path = memory_bank_path
        self.prompt_mode = prompt_mode
        self.bank: Optional[MemoryBank] = None
        self._prototypes: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        for p in self.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Yacs path (:mod:`samantics_d2.yacs_config`): ``MODEL.SAMANTICS.BACKBONE``, ``.PROPOSALS``,
        ``.SEMANTIC_ENCODER`` and ``.TRAINING_FREE``; output classes: ``DATASETS.TEST[0]``'s."""
        check_yacs_config(cfg, cls.__name__)
        opts = cfg.MODEL.SAMANTICS
        options = node_kwargs(opts.TRAINING_FREE)
        if registered_dataset(options["references"], "MODEL.SAMANTICS.TRAINING_FREE.REFERENCES") is None:
            raise ValueError("TrainingFreeSegmenter needs a reference set: set MODEL.SAMANTICS.TRAINING_FREE.REFERENCES "
                             "to a registered reference dataset (e.g. shapes_train_ref5_seed0).")
        return {
            **options,
            "proposer": sam_proposer_from_config(cfg),
            "semantic_encoder": build_encoder(**node_kwargs(opts.SEMANTIC_ENCODER)),
            "classifier": PrototypeClassifier(**node_kwargs(opts.TRAINING_FREE.CLASSIFIER)),
            "memory_bank": MemoryBankConfig(**node_kwargs(opts.TRAINING_FREE.MEMORY_BANK)),
            "class_names": dataset_classes(cfg, key="thing_classes", splits=["TEST"]),
        }

    @property
    def device(self) -> torch.device:
        return next(self.semantic_encoder.parameters()).device

    # ------------------------------------------------------------------ references

    def set_references(self, references: Union[str, Sequence[dict]], reference_classes: Optional[Sequence[str]] = None):
        """Use another reference set (a registered name, or dataset dicts with their class names);
        the prototypes are recomputed (or loaded from the memory bank file) at the next forward."""
        self.references = references if isinstance(references, str) else list(references)
        self._reference_classes = list(reference_classes) if reference_classes is not None else None
        self.bank, self._prototypes = None, None

    def _reference_dicts(self) -> tuple[list[dict], list[str]]:
        if isinstance(self.references, str):
            dicts = DatasetCatalog.get(self.references)
            classes = self._reference_classes or list(MetadataCatalog.get(self.references).thing_classes)
            return dicts, classes
        if self._reference_classes is None:
            raise ValueError("references given as dataset dicts need reference_classes (their class names).")
        return list(self.references), self._reference_classes

    def class_names(self) -> list[str]:
        if self._class_names is not None:
            return self._class_names
        if self.dataset_name is not None:
            return list(MetadataCatalog.get(self.dataset_name).thing_classes)
        return self._reference_dicts()[1]

    def _bank_path(self, reference_classes: Sequence[str]) -> str:
        if self.memory_bank_path:
            return self.memory_bank_path
        name = self.references if isinstance(self.references, str) else "references-" + hashlib.sha256(
            repr(sorted(reference_classes)).encode()).hexdigest()[:12]
        enc = self.semantic_encoder
        return os.path.join(_default_bank_dir(), f"{name}-{type(enc).__name__}-{enc.variant}-{enc.size}.safetensors")

    def prepare_prototypes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Build or load the memory bank (rank 0 first, the others then load it) and the prototypes,
        in the order of :meth:`class_names`; ``[K, M, D]`` and validity ``[K, M]``."""
        if self._prototypes is not None:
            return self._prototypes
        dicts, reference_classes = self._reference_dicts()
        path = self._bank_path(reference_classes)
        kwargs = dict(
            references=dicts,
            backbone=self.semantic_encoder,
            config=self.memory_bank_config,
            weights_id=module_fingerprint(self.semantic_encoder),
            num_classes=len(reference_classes),
        )
        if comm.is_main_process():
            self.bank = MemoryBank.load_or_build(path, **kwargs)
        comm.synchronize()
        if not comm.is_main_process():
            self.bank = MemoryBank.load_or_build(path, **kwargs)
        prototypes, valid = self.bank.prototypes(
            shots=self.shots, aggregation=self.aggregation, num_centres=self.num_centres, device=self.device
        )
        # Reference class i -> output class j by name; output classes without references stay invalid.
        names = self.class_names()
        index = {name: j for j, name in enumerate(names)}
        unknown = [name for name in reference_classes if name not in index]
        if unknown:
            raise ValueError(
                f"Reference classes {unknown} are not among the output classes {names}; "
                "use references of the evaluated classes (or set class_names)."
            )
        order = torch.tensor([index[name] for name in reference_classes], device=self.device)
        out = prototypes.new_zeros((len(names), *prototypes.shape[1:]))
        out_valid = valid.new_zeros((len(names), valid.shape[1]))
        out[order], out_valid[order] = prototypes, valid
        missing = [names[j] for j in range(len(names)) if not bool(out_valid[j].any())]
        if missing:
            logger.warning("No usable reference for %d of %d classes (never predicted): %s", len(missing), len(names),
                           ", ".join(missing))
        self._prototypes = (out, out_valid)
        return self._prototypes

    # ------------------------------------------------------------------ inference

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        if self.training:
            raise RuntimeError("TrainingFreeSegmenter has nothing to train: use it in eval mode (--eval-only).")
        prototypes, valid = self.prepare_prototypes()
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

        dense_input, fits = self.semantic_encoder.prepare_with_fits([image])
        features = self.semantic_encoder(dense_input)[self.semantic_encoder.dense_feature][0]  # [C, h, w]
        weights = resample_masks(
            proposals.mask_logits.float(),
            src_fit=proposals.fit,
            dst_fit=fits[0],
            grid_size=tuple(features.shape[-2:]),
            patch_size=self.semantic_encoder.preprocess.patch_size,
        )
        kept = self.classifier(
            features=features.float(),
            weights=weights,
            masks=proposals.mask_logits > 0,
            prototypes=prototypes,
            prototype_valid=valid,
        )
        masks = masks_to_original(proposals.mask_logits[kept.indices], proposals.fit)  # [K, h0, w0] bool
        if masks.shape[-2:] != (height, width):  # the input was resized by the mapper
            if len(masks):
                masks = torch.nn.functional.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0] > 0.5
            else:  # interpolate cannot resize zero masks
                masks = masks.new_zeros((0, height, width))
        result = Instances((height, width))
        result.pred_masks = masks
        result.pred_boxes = BitMasks(masks).get_bounding_boxes() if len(masks) else Boxes(masks.new_zeros((0, 4)).float())
        result.scores = kept.scores
        result.pred_classes = kept.classes
        return result
