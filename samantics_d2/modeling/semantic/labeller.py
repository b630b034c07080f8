"""Labelling the masks of one image with class prototypes: an encoder's dense features pooled inside
each mask, compared with the prototypes of every class.

:class:`PrototypeLabeller` is one such source: image prototypes of a
:class:`~samantics_d2.modeling.semantic.MemoryBank` (or of a training-free model) score
``max(cosine, 0)`` of the best class (:func:`~samantics_d2.modeling.semantic.prototype_scores`, as
``PrototypeClassifier``); CLIP text prototypes (:class:`~samantics_d2.modeling.semantic.TextPrototypes`)
score the softmax probability of the best class over CLIP's zero-shot logits
(:func:`~samantics_d2.modeling.semantic.zero_shot_logits`), after an optional linear projection of the
pooled features into the text space. Used by :class:`samantics_d2.predictor.SamanticsPredictor` (every
labeller, per click) and :class:`~samantics_d2.modeling.meta_arch.click.ClickSegmenter` (the first
click's candidates)::

    features, feature_fit = dense_features(labeller.encoder, image)     # once per image and encoder
    classes, scores = labeller.label(mask_logits, mask_fit=fit, features=features, feature_fit=feature_fit)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..backbone.base import EncoderBackbone
from ..preprocess import ImageFit
from .classifier import prototype_scores
from .mask_ops import mask_grid_weights, mask_pooling
from .memory_bank import MemoryBank
from .text_prototypes import TextPrototypes, zero_shot_logits

__all__ = ["PrototypeLabeller", "dense_features", "mask_grid_pooling"]

#: ``(mask_logits [P, Hm, Wm], *, mask_fit, feature_fit, grid_size, patch_size) -> [P, h, w]`` pooling
#: weights on the feature grid: :func:`mask_grid_pooling`, or a ``PrototypeClassifier.mask_weights``.
MaskWeights = Callable[..., torch.Tensor]


def mask_grid_pooling(
    mask_logits: torch.Tensor, *, mask_fit: ImageFit, feature_fit: ImageFit, grid_size: tuple[int, int], patch_size: int
) -> torch.Tensor:
    """:func:`~.mask_ops.mask_grid_weights` (the training-free pipeline's default pooling) with the
    arguments of ``PrototypeClassifier.mask_weights``: ``[P, h, w]`` weights of ``mask_logits [P, Hm, Wm]``."""
    return mask_grid_weights(mask_logits, src_fit=mask_fit, dst_fit=feature_fit, grid_size=grid_size,
                             patch_size=patch_size)


def dense_features(
    encoder: EncoderBackbone, image: Union[np.ndarray, torch.Tensor]
) -> tuple[torch.Tensor, ImageFit]:
    """``(features [C, h, w] float32, fit)``: ``encoder``'s ``dense_feature`` of one image (``[H, W, 3]``
    uint8 numpy or ``[3, H, W]`` tensor, RGB) and how the image was fitted into its input. The caller
    chooses the autograd mode (``torch.no_grad`` / ``inference_mode``)."""
    x, fits = encoder.prepare_with_fits([image])
    return encoder(x)[encoder.dense_feature][0].float(), fits[0]


@dataclass
class PrototypeLabeller:
    """One labelling source: an encoder's dense features pooled in each mask, against class prototypes.

    Attributes:
        name: the key of its labels (``"image"``, ``"text"``: ``ClickPrediction.labels``).
        encoder: the semantic encoder whose ``dense_feature`` is pooled.
        prototypes: ``[K, M, D]`` class prototypes (``M`` per class).
        valid: ``[K, M]`` bool (classes without prototypes never match).
        class_names: ``K`` names.
        projection: ``[C, D]`` applied to the pooled ``C``-channel features first (None: ``C == D``).
        logit_scale: None: score = ``max(cosine, 0)`` of the best class (image prototypes);
            a number: the softmax probability of the best class over ``logit_scale * cosine`` with
            ``M = 1`` (CLIP text prototypes).
        mask_weights: how a mask pools the feature grid (:data:`MaskWeights`; default
            :func:`mask_grid_pooling`).
    """

    name: str
    encoder: EncoderBackbone
    prototypes: torch.Tensor
    valid: torch.Tensor
    class_names: Sequence[str]
    projection: Optional[torch.Tensor] = None
    logit_scale: Optional[float] = None
    mask_weights: MaskWeights = mask_grid_pooling

    def __post_init__(self) -> None:
        K = len(self.class_names)
        if self.prototypes.ndim != 3 or tuple(self.valid.shape) != tuple(self.prototypes.shape[:2]) or self.prototypes.shape[0] != K:
            raise ValueError(
                f"PrototypeLabeller {self.name!r} got prototypes {tuple(self.prototypes.shape)}, valid "
                f"{tuple(self.valid.shape)} and {K} class names; expected [K, M, D], [K, M] and K names."
            )
        if self.logit_scale is not None and self.prototypes.shape[1] != 1:
            raise ValueError(f"PrototypeLabeller {self.name!r}: logit_scale (text prototypes) needs M = 1 prototype "
                             f"per class; got {self.prototypes.shape[1]}.")
        channels = self.encoder.output_shape()[self.encoder.dense_feature].channels
        expected = self.projection.shape[0] if self.projection is not None else self.prototypes.shape[-1]
        width = self.projection.shape[1] if self.projection is not None else channels
        if channels != expected or width != self.prototypes.shape[-1]:
            raise ValueError(
                f"PrototypeLabeller {self.name!r}: the encoder's {self.encoder.dense_feature!r} has {channels} channels, "
                f"the projection is {None if self.projection is None else tuple(self.projection.shape)} and the "
                f"prototypes have D={self.prototypes.shape[-1]}; pooled features (after the projection) must have D "
                "channels. Use the encoder the prototypes were computed with."
            )

    @classmethod
    def from_memory_bank(
        cls,
        bank: MemoryBank,
        *,
        encoder: EncoderBackbone,
        class_names: Sequence[str],
        shots: Optional[int] = None,
        aggregation: str = "mean",
        num_centres: int = 4,
        name: str = "image",
    ) -> "PrototypeLabeller":
        """Image prototypes of a memory bank built with ``encoder`` (:meth:`MemoryBank.prototypes`)."""
        prototypes, valid = bank.prototypes(shots=shots, aggregation=aggregation, num_centres=num_centres)
        return cls(name=name, encoder=encoder, prototypes=prototypes, valid=valid, class_names=list(class_names))

    @classmethod
    def from_text(
        cls,
        text: TextPrototypes,
        *,
        encoder: EncoderBackbone,
        projection: Optional[torch.Tensor] = None,
        logit_scale: float = 100.0,
        name: str = "text",
    ) -> "PrototypeLabeller":
        """Text prototypes (one per class) compared with ``encoder``'s pooled, projected features."""
        prototypes = text.embeddings[:, None]
        valid = torch.ones(prototypes.shape[:2], dtype=torch.bool)
        return cls(name=name, encoder=encoder, prototypes=prototypes, valid=valid, class_names=list(text.class_names),
                   projection=projection, logit_scale=float(logit_scale))

    @classmethod
    def from_training_free(
        cls, model: Any, *, name: str = "image", mask_weights: MaskWeights = mask_grid_pooling
    ) -> "PrototypeLabeller":
        """The image prototypes of a built training-free model (``TrainingFreeSegmenter``: its
        ``semantic_encoder``, ``prepare_prototypes()`` (computed from its reference set on the first
        call) and ``class_names()``)."""
        prototypes, valid = model.prepare_prototypes()
        return cls(name=name, encoder=model.semantic_encoder, prototypes=prototypes, valid=valid,
                   class_names=model.class_names(), mask_weights=mask_weights)

    def score(self, pooled: torch.Tensor, has_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(classes [P] int64, scores [P] float32)`` of pooled mask features ``[P, C]``; masks
        that cover no feature (``has_weight`` False) get class -1 and score 0."""
        features = pooled.float()
        if self.projection is not None:
            features = features @ self.projection.to(features)
        if self.logit_scale is None:
            cosine, classes, matched = prototype_scores(features, self.prototypes.to(features), self.valid)
            scores = torch.where(matched, cosine.clamp_min(0.0), torch.zeros_like(cosine))
            ok = has_weight & matched
        else:
            probs = zero_shot_logits(features, self.prototypes[:, 0].to(features), logit_scale=self.logit_scale).softmax(-1)
            scores, classes = probs.max(dim=1)
            ok = has_weight
        return torch.where(ok, classes, torch.full_like(classes, -1)), torch.where(ok, scores, torch.zeros_like(scores))

    def label(
        self, mask_logits: torch.Tensor, *, mask_fit: ImageFit, features: torch.Tensor, feature_fit: ImageFit
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(classes [P] int64, scores [P] float32)`` (:meth:`score`) of the masks of one image.

        Args:
            mask_logits: ``[P, Hm, Wm]`` mask logits over the mask encoder's input square (SAM's
                low-resolution logits, e.g. ``GranularityMasks.mask_logits``).
            mask_fit: how the image was fitted into the mask encoder's input.
            features: ``[C, h, w]`` dense features of ``self.encoder`` on the image (:func:`dense_features`).
            feature_fit: how the image was fitted into ``self.encoder``'s input.
        """
        weights = self.mask_weights(
            mask_logits.float(), mask_fit=mask_fit, feature_fit=feature_fit, grid_size=tuple(features.shape[-2:]),
            patch_size=self.encoder.preprocess.patch_size,
        )
        pooled, has_weight = mask_pooling(features, weights)
        return self.score(pooled, has_weight)
