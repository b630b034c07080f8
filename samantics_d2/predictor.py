"""The interactive predictor: encode an image once, then answer clicks with labelled masks.

In the spirit of segment_anything's ``SamPredictor`` and Detectron2's ``DefaultPredictor``::

    predictor = SamanticsPredictor.from_tag("sam2.1_hiera_t", pretrained=True)          # or
    predictor = SamanticsPredictor.from_config("configs/training_free/shapes_tiny_random.py")
    predictor.set_image(image)                       # HxWx3 uint8 RGB: the SAM encoder runs once
    out = predictor.predict(points=[[x, y]], point_labels=[1])
    out.masks, out.iou_pred, out.stability, out.part_of, out.labels["image"].names

- ``set_image`` runs the SAM / HQ-SAM / SAM 2 image encoder once and keeps its features and the
  prompt decoder's per-image inputs; each :class:`PrototypeLabeller`'s semantic encoder (DINOv2,
  CLIP...) runs on the image the first time a prediction needs labels, once per encoder.
- ``predict(multi_granularity=True)``: the click's candidates from
  :class:`~samantics_d2.modeling.proposals.granularity.MultiGranularityDecoder` (up to K masks, small
  to large, deduplicated, with stability and part-of), each labelled by every labeller.
- ``predict(multi_granularity=False, multimask_output=True)``: the prompt decoder's outputs for the
  click as they are, in the decoder's order: the same masks, predicted IoUs and low-resolution logits
  as ``segment_anything.SamPredictor.predict`` and ``sam2.SAM2ImagePredictor.predict`` for the same
  weights, image and click (tests/test_predictor.py; masks are the low-resolution logits resampled
  once onto the image by :func:`~samantics_d2.modeling.semantic.masks_to_original`, where
  segment_anything resamples twice, to the input square then to the image: identical when the image
  is at the encoder's input size, as in the test, and within a pixel at mask borders otherwise).

Labels: a :class:`PrototypeLabeller` (:mod:`samantics_d2.modeling.semantic.labeller`, re-exported
here) pools its encoder's dense features inside every mask
(:func:`~samantics_d2.modeling.semantic.mask_grid_weights` + ``mask_pooling``, as the training-free
pipeline) and compares them with class prototypes: image prototypes from a
:class:`~samantics_d2.modeling.semantic.MemoryBank` score ``max(cosine, 0)`` of the best class
(:func:`~samantics_d2.modeling.semantic.prototype_scores`, as ``PrototypeClassifier``); text
prototypes (:class:`~samantics_d2.modeling.semantic.TextPrototypes`) score the softmax probability of
the best class over CLIP's zero-shot logits (:func:`~samantics_d2.modeling.semantic.zero_shot_logits`,
``logit_scale`` 100), after an optional linear projection of the pooled features into the text space
(CLIP's ``proj`` for CLIP patch tokens).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .modeling.backbone import EncoderBackbone, build_encoder
from .modeling.catalog import get_weight_spec
from .modeling.preprocess import ImageFit
from .modeling.proposals import PromptDecoder, build_prompt_decoder
from .modeling.proposals.granularity import ClickSet, GranularityMasks, MultiGranularityDecoder
from .modeling.semantic.labeller import PrototypeLabeller, dense_features

__all__ = ["ClickPrediction", "MaskLabels", "PrototypeLabeller", "SamanticsPredictor", "DEFAULT_BOX_SCALES",
           "prompt_decoder_features"]

logger = logging.getLogger(__name__)

# Extra prompts of the multi-granularity path when none are configured: the click with square boxes
# of 1/8, 1/4, 1/2 and all of the image's longer side around it (plus the click's own 3 masks).
DEFAULT_BOX_SCALES = (0.125, 0.25, 0.5, 1.0)


@dataclass
class MaskLabels:
    """The labels one :class:`PrototypeLabeller` gives the masks of a prediction.

    Attributes:
        classes: ``[K]`` int64 class ids (-1: no label: the mask covers no feature or no class matched).
        scores: ``[K]`` float32 (see :class:`PrototypeLabeller`).
        names: ``K`` class names (``""`` for -1).
    """

    classes: np.ndarray
    scores: np.ndarray
    names: list[str]


@dataclass
class ClickPrediction:
    """The answer to one click set (numpy arrays, as ``SamPredictor.predict`` returns).

    Attributes:
        masks: ``[K, H, W]`` bool on the original image.
        iou_pred: ``[K]`` float32 predicted IoU.
        low_res_logits: ``[K, Hm, Wm]`` float32 decoder logits over the encoder input square.
        stability: ``[K]`` float32 stability score.
        part_of: ``[K, K]`` bool, ``[i, j]``: mask ``i`` is part of mask ``j``
            (:mod:`samantics_d2.modeling.proposals.granularity`).
        parents: ``[K]`` int64: the smallest mask each is part of (-1: none).
        labels: labeller name -> :class:`MaskLabels`.
        granularity: the underlying :class:`GranularityMasks` (tensors, fit).
    """

    masks: np.ndarray
    iou_pred: np.ndarray
    low_res_logits: np.ndarray
    stability: np.ndarray
    part_of: np.ndarray
    parents: np.ndarray
    labels: dict[str, MaskLabels] = field(default_factory=dict)
    granularity: Optional[GranularityMasks] = None

    def __len__(self) -> int:
        return int(self.masks.shape[0])


def prompt_decoder_features(tag: str, size: str) -> list[str]:
    """The backbone outputs the prompt decoder of ``tag`` reads, from a probe backbone built on the meta
    device (no memory, no init), or on the CPU where the upstream constructor reads tensor values
    (sam2's Hiera computes its drop-path schedule with ``.item()``)."""
    decoder_cls = get_weight_spec(tag).family_spec.prompt_decoder_class()
    if decoder_cls is None:
        raise ValueError(f"Weight tag {tag!r} ({get_weight_spec(tag).family}) has no promptable decoder; give a "
                         "SAM, HQ-SAM or SAM 2 tag (e.g. 'sam_vit_b', 'sam2.1_hiera_t').")
    try:
        with torch.device("meta"):
            probe = build_encoder(tag, size=size)
    except (RuntimeError, NotImplementedError):  # a constructor that reads values: build it for real
        probe = build_encoder(tag, size=size)
    with torch.device("meta"):
        return decoder_cls(**decoder_cls.options_for_backbone(probe)).required_features


class SamanticsPredictor:
    """Encode an image once (:meth:`set_image`), then masks and labels per click (:meth:`predict`).

    Args:
        backbone: the SAM / HQ-SAM / SAM 2 image encoder (its outputs hold ``decoder.required_features``).
        decoder: its prompt decoder (``build_prompt_decoder(backbone)``).
        granularity: the multi-granularity selection (default: ``MultiGranularityDecoder(decoder=decoder,
            box_scales=DEFAULT_BOX_SCALES)``); its ``decoder`` must be ``decoder``.
        labellers: the active prototype banks (image and/or text); none: masks come unlabelled.
    """

    def __init__(
        self,
        *,
        backbone: EncoderBackbone,
        decoder: PromptDecoder,
        granularity: Optional[MultiGranularityDecoder] = None,
        labellers: Sequence[PrototypeLabeller] = (),
    ) -> None:
        if granularity is None:
            granularity = MultiGranularityDecoder(decoder=decoder, box_scales=DEFAULT_BOX_SCALES)
        if granularity.decoder is not decoder:
            raise ValueError("SamanticsPredictor: granularity.decoder must be the predictor's decoder (one decoder "
                             "per image encoder); build MultiGranularityDecoder(decoder=decoder, ...).")
        missing = [n for n in decoder.required_features if n not in backbone.output_shape()]
        if missing:
            raise ValueError(f"SamanticsPredictor: the backbone does not output {missing}, which the decoder reads; "
                             f"build it with out_features={decoder.required_features}.")
        names = [labeller.name for labeller in labellers]
        if len(set(names)) != len(names):
            raise ValueError(f"SamanticsPredictor: labeller names must be distinct; got {names}.")
        self.backbone = backbone.eval()
        self.decoder = decoder.eval()
        self.granularity = granularity.eval()
        self.labellers = list(labellers)
        self.reset_image()

    # ------------------------------------------------------------------ building

    @classmethod
    def from_tag(
        cls,
        tag: str,
        *,
        size: str = "full",
        pretrained: bool = False,
        weights: Optional[Union[str, os.PathLike]] = None,
        labellers: Sequence[PrototypeLabeller] = (),
        decoder_options: Optional[Mapping[str, Any]] = None,
        **granularity_options: Any,
    ) -> "SamanticsPredictor":
        """A predictor over the encoder and prompt decoder of weight tag ``tag`` (``"sam_vit_b"``,
        ``"sam2.1_hiera_t"``, ``"hq_sam_vit_h"``...; ``size="tiny"``: the tiny random variant).

        Args:
            pretrained: load the official weights (``weights``: another location of the file).
            decoder_options: :func:`build_prompt_decoder` options (``predictor_steps``...).
            granularity_options: :class:`MultiGranularityDecoder` options (default ``box_scales``:
                :data:`DEFAULT_BOX_SCALES`).
        """
        backbone = build_encoder(tag, size=size, pretrained=pretrained, weights=weights,
                                 out_features=prompt_decoder_features(tag, size))
        source = (weights if weights is not None else tag) if pretrained else None
        decoder = build_prompt_decoder(backbone, weights=source, **dict(decoder_options or {}))
        granularity = MultiGranularityDecoder(decoder=decoder, **{"box_scales": DEFAULT_BOX_SCALES, **granularity_options})
        return cls(backbone=backbone.eval(), decoder=decoder, granularity=granularity, labellers=labellers)

    @classmethod
    def from_model(cls, model: Any, **granularity_options: Any) -> "SamanticsPredictor":
        """A predictor over a built training-free model (``TrainingFreeSegmenter``: its SAM encoder and
        decoder, its semantic encoder and its image prototypes, prepared from its reference set)."""
        try:
            backbone, decoder = model.proposer.backbone, model.proposer.proposals.decoder
            _ = model.semantic_encoder  # what the labeller reads (checked here for the message below)
        except AttributeError as e:
            raise TypeError(
                f"SamanticsPredictor.from_model takes a training-free model (proposer.backbone, proposer.proposals."
                f"decoder, semantic_encoder, prepare_prototypes()); got a {type(model).__name__} ({e})."
            ) from e
        labeller = PrototypeLabeller.from_training_free(model)
        granularity = MultiGranularityDecoder(decoder=decoder, **{"box_scales": DEFAULT_BOX_SCALES, **granularity_options})
        return cls(backbone=backbone, decoder=decoder, granularity=granularity, labellers=[labeller])

    @classmethod
    def from_config(
        cls, config_file: str, overrides: Sequence[str] = (), **granularity_options: Any
    ) -> "SamanticsPredictor":
        """The predictor of a training-free LazyConfig (``configs/training_free/*.py``), with
        ``key=value`` overrides; its ``train.init_checkpoint`` is loaded when set, and the references'
        prototypes are prepared (the memory bank is read from the store or computed)."""
        from .checkpoint import load_init_checkpoint
        from .config import check_weights_available, load_config
        from .d2 import instantiate

        cfg = load_config(config_file, overrides)
        check_weights_available(cfg, config_file)
        seed = cfg.train.get("seed", -1) if "train" in cfg else -1
        torch.manual_seed(seed if seed >= 0 else 0)  # randomly initialised (tiny) encoders: the same every run
        model = instantiate(cfg.model)
        if "train" in cfg and cfg.train.get("init_checkpoint"):
            load_init_checkpoint(model, cfg.train.init_checkpoint, training=False)
        model.to(cfg.train.device if "train" in cfg else "cpu").eval()
        return cls.from_model(model, **granularity_options)

    # ------------------------------------------------------------------ image

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    def reset_image(self) -> None:
        """Forget the current image and its features."""
        self._image: Optional[np.ndarray] = None
        self._fit: Optional[ImageFit] = None
        self._prepared: Optional[dict[str, torch.Tensor]] = None
        self._semantic: dict[int, tuple[torch.Tensor, ImageFit]] = {}

    @property
    def is_image_set(self) -> bool:
        return self._prepared is not None

    @property
    def fit(self) -> ImageFit:
        """How the current image was fitted into the SAM encoder's input."""
        self._require_image()
        return self._fit

    @torch.inference_mode()
    def set_image(self, image: np.ndarray) -> None:
        """Encode ``image`` (``[H, W, 3]`` uint8 RGB) with the SAM encoder once; the semantic
        encoders run on it when labels are first asked for."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            described = (f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}").strip()
            raise ValueError(f"set_image expects an [H, W, 3] uint8 RGB numpy array; got {described}. Read files "
                             "with samantics_d2.utils.image.read_image(path) (RGB).")
        self.reset_image()
        x, fits = self.backbone.prepare_with_fits([image])
        features = {name: value[0] for name, value in self.backbone(x).items()}
        self._prepared = self.granularity.prepare_image(features)
        self._fit = fits[0]
        self._image = image

    def _require_image(self) -> None:
        if self._prepared is None:
            raise RuntimeError("No image is set: call predictor.set_image(image) before predict().")

    def semantic_features(self, encoder: EncoderBackbone) -> tuple[torch.Tensor, ImageFit]:
        """``(dense features [C, h, w], fit)`` of the current image for ``encoder`` (computed once per image)."""
        self._require_image()
        key = id(encoder)
        if key not in self._semantic:
            with torch.inference_mode():
                self._semantic[key] = dense_features(encoder, self._image)
        return self._semantic[key]

    # ------------------------------------------------------------------ clicks

    def _prompts(self, points, point_labels, box) -> ClickSet:
        """Original-pixel prompts -> their :class:`ClickSet` in encoder-input pixels
        (``[N, 2]``, ``[N]``, ``[4]`` or None)."""
        fit = self._fit
        coords = torch.as_tensor(np.asarray(points if points is not None else np.zeros((0, 2)), dtype=np.float32))
        if coords.ndim != 2 or coords.shape[-1] != 2:
            raise ValueError(f"predict expects points [N, 2] (x, y in image pixels); got shape {tuple(coords.shape)}.")
        if point_labels is None:
            labels = torch.ones(coords.shape[0], dtype=torch.int64)
        else:
            labels = torch.as_tensor(np.asarray(point_labels, dtype=np.int64)).reshape(-1)
        if labels.shape[0] != coords.shape[0]:
            raise ValueError(f"predict got {coords.shape[0]} points and {labels.shape[0]} point_labels; give one label "
                             "(1 foreground, 0 background) per point.")
        if box is not None:
            box = torch.as_tensor(np.asarray(box, dtype=np.float32)).reshape(-1)
            if box.numel() != 4:
                raise ValueError(f"predict expects box [4] XYXY in image pixels; got {box.numel()} values.")
            box = fit.boxes_to_input(box.to(self.device))
        if coords.shape[0] == 0 and box is None:
            raise ValueError("predict got neither points nor a box: give at least one click or a box.")
        return ClickSet(points=fit.points_to_input(coords.to(self.device)), point_labels=labels.to(self.device), box=box)

    @torch.inference_mode()
    def predict_masks(
        self,
        points: Optional[Union[np.ndarray, Sequence]] = None,
        point_labels: Optional[Union[np.ndarray, Sequence]] = None,
        box: Optional[Union[np.ndarray, Sequence]] = None,
        *,
        multi_granularity: bool = True,
        multimask_output: bool = True,
    ) -> GranularityMasks:
        """The masks of :meth:`predict` as :class:`GranularityMasks` (tensors, no labels)."""
        self._require_image()
        clicks = self._prompts(points, point_labels, box)
        if multi_granularity:
            return self.granularity.decode_prepared(self._prepared, self._fit, clicks)
        has_points = clicks.points.shape[0] > 0
        sparse, dense = self.decoder.embed_prompts(
            points=clicks.points[None] if has_points else None,
            point_labels=clicks.point_labels[None] if has_points else None,
            boxes=clicks.box[None] if clicks.box is not None else None,
        )
        logits, iou = self.decoder.decode_embeddings(self._prepared, sparse, dense, multimask_output=multimask_output)
        return self.granularity.describe(logits[0], iou[0], self._fit)

    def label_masks(self, masks: GranularityMasks) -> dict[str, MaskLabels]:
        """Every labeller's labels for ``masks`` of the current image."""
        out = {}
        for labeller in self.labellers:
            features, feature_fit = self.semantic_features(labeller.encoder)
            classes, scores = labeller.label(masks.mask_logits, mask_fit=masks.fit, features=features,
                                             feature_fit=feature_fit)
            classes, scores = classes.cpu().numpy(), scores.float().cpu().numpy()
            names = [labeller.class_names[c] if c >= 0 else "" for c in classes.tolist()]
            out[labeller.name] = MaskLabels(classes=classes, scores=scores, names=names)
        return out

    @torch.inference_mode()
    def predict(
        self,
        points: Optional[Union[np.ndarray, Sequence]] = None,
        point_labels: Optional[Union[np.ndarray, Sequence]] = None,
        box: Optional[Union[np.ndarray, Sequence]] = None,
        *,
        multi_granularity: bool = True,
        multimask_output: bool = True,
        labels: bool = True,
    ) -> ClickPrediction:
        """Masks (and labels) for one click set on the current image.

        Args:
            points: ``[N, 2]`` (x, y) in image pixels.
            point_labels: ``[N]``: 1 foreground, 0 background (default: all 1).
            box: ``[4]`` XYXY in image pixels, or None.
            multi_granularity: up to K deduplicated masks, small to large (module docstring);
                False: the decoder's outputs for the click as they are (upstream predictor's).
            multimask_output: with ``multi_granularity=False``: SAM's three masks instead of one.
            labels: run the labellers (their semantic encoders run once per image).

        Returns:
            :class:`ClickPrediction`.
        """
        masks = self.predict_masks(points, point_labels, box, multi_granularity=multi_granularity,
                                   multimask_output=multimask_output)
        return ClickPrediction(
            masks=masks.original_masks().cpu().numpy(),
            iou_pred=masks.iou_pred.float().cpu().numpy(),
            low_res_logits=masks.mask_logits.float().cpu().numpy(),
            stability=masks.stability.float().cpu().numpy(),
            part_of=masks.part_of.cpu().numpy(),
            parents=masks.parents().cpu().numpy(),
            labels=self.label_masks(masks) if labels else {},
            granularity=masks,
        )
