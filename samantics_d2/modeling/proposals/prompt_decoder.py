"""The promptable half of SAM: the upstream prompt encoder + mask decoder, beside our image encoders.

One module per family, built to match an encoder backbone of :mod:`samantics_d2.modeling.backbone`
(same embedding width and input size) and loaded from the same official checkpoint:

- :class:`SAMPromptDecoder`: ``segment_anything`` ``PromptEncoder`` + ``MaskDecoder``;
- :class:`HQSAMPromptDecoder`: ``segment_anything_hq`` ``PromptEncoder`` + ``MaskDecoderHQ``, which
  also reads the output of the encoder's first global-attention block;
- :class:`SAM2PromptDecoder`: ``sam2`` ``sam_prompt_encoder`` + ``sam_mask_decoder`` (with its
  high-resolution ``conv_s0``/``conv_s1``) and ``no_mem_embed``, used as ``SAM2ImagePredictor`` does
  (``predictor_steps=True``) or as a bare mask-decoder call on the backbone features, as "No Time
  to Train" calls it (``predictor_steps=False``).

Common interface (:meth:`PromptDecoder.decode`), for ONE image::

    feats = backbone(x)                                   # batched backbone outputs
    one = {k: v[i] for k, v in feats.items()}             # image i
    logits, iou = decoder.decode(one, points=p, point_labels=l, multimask_output=True)
    # logits [P, M, Hm, Wm] low-res in the input frame, iou [P, M]

All prompts are embedded in one prompt-encoder call, then decoded in chunks of ``points_per_batch``.
The upstream decoders copy the image embedding once per prompt inside the call (their two-way
transformer updates the image tokens per prompt), so the chunk size bounds memory: about
``points_per_batch * C * h * w`` floats per copy (256 prompts x 256 x 64 x 64 = 1 GiB in float32
for the full models). With ``shared_image_decoding`` (default; SAM and SAM 2) the same outputs, to
float rounding, come from :func:`.shared_image_decoding.decode_shared_image`: the image side is
computed once per image where it is shared, the per-prompt products are folded to the prompt's
few tokens, and only the kept masks are upscaled. The chunk loop has no host-device
synchronisation unless ``mask_iou_floor`` asks to skip masks (one per chunk).

``decode_embeddings(..., return_mask_tokens=True)`` also returns each mask's SAM mask embedding (the two-way
transformer's output of the mask token that made it) from the same call, on either path; without
the option the outputs are those of the plain call, bit for bit.

The prompt encoder always stays in float32 (its upstream code builds float32 padding points and
coordinate encodings); the mask decoder follows ``.to(dtype)`` and its outputs are in its dtype.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..catalog import FamilyView, get_family
from ..weights import convert_prompt_decoder_state_dict, load_prompt_decoder_weights
from .shared_image_decoding import decode_shared_image, supports_shared_image

if TYPE_CHECKING:  # pragma: no cover
    from ..backbone.base import EncoderBackbone

__all__ = [
    "PROMPT_DECODER_CLASSES",
    "HQSAMPromptDecoder",
    "PromptDecoder",
    "SAM2PromptDecoder",
    "SAMPromptDecoder",
    "build_prompt_decoder",
    "convert_prompt_decoder_state_dict",
    "load_prompt_decoder_weights",
]

logger = logging.getLogger(__name__)

# Architecture of the prompt encoder and mask decoder, identical in every official SAM, HQ-SAM and
# SAM 2 checkpoint (segment_anything.build_sam._build_sam, SAM2Base._build_sam_heads); only the
# embedding width and the input size follow the image encoder (tiny backbones: 32 channels).
_MASK_IN_CHANS = 16
_DECODER = dict(depth=2, mlp_dim=2048, num_heads=8, iou_head_depth=3, iou_head_hidden_dim=256, num_multimask_outputs=3)


class PromptDecoder(nn.Module):
    """Base class: prompt embedding, chunked decoding, dtype handling.

    Subclasses build ``self.prompt_encoder`` and ``self.mask_decoder`` and implement
    :meth:`prepare_image` and :meth:`_decode_chunk`.

    Attributes:
        weight_family: family of the official checkpoints (``"sam"``, ``"hq_sam"``, ``"sam2"``).
        variant: the encoder variant whose checkpoint these weights come from (checked when
            loading by tag), or None.
        image_size: side ``S`` of the (square) encoder input; prompts are in its pixel frame.
        embedding_size: side of the image embedding (``S / 16``).
        mask_size: side of the low-resolution masks (``4 * embedding_size``: 256 at 1024 px).
        predictor_steps: apply the steps the family's upstream image predictor adds around the mask
            decoder (SAM 2: ``no_mem_embed`` and the logit clamp, see :class:`SAM2PromptDecoder`;
            segment_anything's ``SamPredictor`` adds none, so SAM and HQ-SAM read it as nothing to
            do). False: the bare mask decoder on the backbone features ("No Time to Train").
        shared_image_decoding: decode with :func:`.shared_image_decoding.decode_shared_image` (the
            upstream decoder's function, reordered: same outputs to float rounding, several times
            less work per prompt) at inference (autograd off) where the family's decoder allows
            it; False, with autograd on (training) or with forward hooks on the mask decoder's
            modules: the upstream mask-decoder call on each chunk.
    """

    weight_family: ClassVar[str] = ""

    def __init__(
        self,
        *,
        variant: Optional[str] = None,
        embed_dim: int = 256,
        image_size: int = 1024,
        patch_size: int = 16,
        predictor_steps: bool = True,
        shared_image_decoding: bool = True,
    ) -> None:
        super().__init__()
        self.predictor_steps = bool(predictor_steps)
        self.shared_image_decoding = bool(shared_image_decoding)
        if image_size % patch_size:
            raise ValueError(
                f"{type(self).__name__}: image_size={image_size} must be a multiple of patch_size={patch_size}."
            )
        self.variant = variant
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.embedding_size = image_size // patch_size
        self.mask_size = 4 * self.embedding_size

    # ------------------------------------------------------------------ per family

    @classmethod
    def options_for_backbone(cls, backbone: "EncoderBackbone") -> dict[str, Any]:
        """The constructor arguments that match ``backbone`` (variant, widths, input size)."""
        return {"variant": backbone.variant, "image_size": backbone.preprocess.input_size}

    @property
    def required_features(self) -> list[str]:
        """Backbone outputs :meth:`decode` reads (build the backbone with these ``out_features``)."""
        raise NotImplementedError

    def num_masks(self, multimask_output: bool) -> int:
        """``M``, the number of masks per prompt that :meth:`decode` returns."""
        return _DECODER["num_multimask_outputs"] if multimask_output else 1

    def prepare_image(self, image_features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-image decoder inputs from the backbone outputs of one image (computed once per image)."""
        raise NotImplementedError

    def _decode_chunk(
        self, image: Mapping[str, torch.Tensor], sparse: torch.Tensor, dense: torch.Tensor, multimask_output: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One upstream mask-decoder call: ``[B, T, C]``, ``[B, C, h, w]`` -> ``[B, M, Hm, Wm]``, ``[B, M]``."""
        return self._mask_decoder_call(image, sparse, dense, multimask_output)

    def _high_res_features(self, image: Mapping[str, torch.Tensor]) -> Optional[list[torch.Tensor]]:
        """The mask decoder's ``high_res_features`` for :meth:`prepare_image`'s output (SAM 2), or None."""
        return None

    def _postprocess_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's step on the decoder's logits (SAM 2 with ``predictor_steps``: clamp)."""
        return logits

    def _decode_chunk_selected(
        self,
        image: Mapping[str, torch.Tensor],
        sparse: torch.Tensor,
        dense: torch.Tensor,
        *,
        multimask_output: bool,
        best_only: bool,
        mask_iou_floor: Optional[float],
        return_mask_tokens: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """One chunk: ``[B, M, Hm, Wm]`` logits (``-inf`` where skipped by ``mask_iou_floor``), ``[B, M]`` IoU
        and, with ``return_mask_tokens``, the ``[B, M, C]`` mask tokens of those masks (else None)."""
        shared_dense = dense.shape[0] == 1 or dense.stride(0) == 0
        rows, tokens = None, None
        # inference only: training keeps the upstream modules' calls (autograd through them), and so do
        # decoders whose modules have forward hooks (they must see the calls they hook)
        shared = self.shared_image_decoding and shared_dense and not torch.is_grad_enabled()
        shared = shared and not _has_forward_hooks(self.mask_decoder)
        if shared and supports_shared_image(self.mask_decoder):
            logits, iou, rows, *extra = decode_shared_image(
                self.mask_decoder,
                image_embedding=image["embedding"],
                image_pe=image["pe"],
                dense_embedding=dense[:1],
                sparse_embeddings=sparse,
                multimask_output=multimask_output,
                high_res_features=self._high_res_features(image),
                best_only=best_only,
                mask_iou_floor=mask_iou_floor,
                return_mask_tokens=return_mask_tokens,
            )
            tokens = extra[0] if extra else None
            logits = self._postprocess_logits(logits)
        else:
            if return_mask_tokens:
                logits, iou, tokens = self._decode_chunk_with_tokens(image, sparse, dense, multimask_output)
            else:
                logits, iou = self._decode_chunk(image, sparse, dense, multimask_output)
            if best_only and iou.shape[1] > 1:
                best = iou.argmax(dim=1, keepdim=True)  # [B, 1]
                iou = iou.gather(1, best)
                logits = logits.gather(1, best[:, :, None, None].expand(-1, -1, *logits.shape[-2:]))
                if tokens is not None:
                    tokens = tokens.gather(1, best[:, :, None].expand(-1, -1, tokens.shape[-1]))
        if mask_iou_floor is not None:
            if rows is not None:
                full = logits.new_full((iou.shape[0], *logits.shape[1:]), float("-inf"))
                full[rows] = logits
                logits = full
            logits = logits.masked_fill((iou <= mask_iou_floor)[:, :, None, None], float("-inf"))
        return logits, iou, tokens

    def _decode_chunk_with_tokens(
        self, image: Mapping[str, torch.Tensor], sparse: torch.Tensor, dense: torch.Tensor, multimask_output: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_decode_chunk` plus the mask tokens of its masks ``[B, M, C]``, read from the upstream
        two-way transformer's output (``hs``) by forward hooks held for this one call."""
        decoder = self.mask_decoder
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            decoder.transformer.register_forward_hook(lambda m, i, out: captured.__setitem__("hs", out[0])),
            decoder.iou_prediction_head.register_forward_hook(lambda m, i, out: captured.__setitem__("iou", out)),
        ]
        try:
            logits, iou = self._decode_chunk(image, sparse, dense, multimask_output)
        finally:
            for hook in hooks:
                hook.remove()
        first = 2 if getattr(decoder, "pred_obj_scores", False) else 1  # after the IoU (and object score) token
        mask_tokens = captured["hs"][:, first : first + decoder.num_mask_tokens]
        return logits, iou, self._select_mask_tokens(mask_tokens, captured["iou"], multimask_output)

    def _select_mask_tokens(
        self, mask_tokens: torch.Tensor, iou_all: torch.Tensor, multimask_output: bool
    ) -> torch.Tensor:
        """The mask tokens of the masks the upstream forward returns: every mask token's transformer output
        ``[B, T, C]`` and the IoU head's output ``[B, T]`` -> ``[B, M, C]`` (SAM, SAM 2: tokens 1..3, or
        token 0 for a single mask; sam2 reports token 0 even where its stability fallback returns another
        mask, and so do we)."""
        if multimask_output:
            return mask_tokens[:, 1 : 1 + _DECODER["num_multimask_outputs"]]
        return mask_tokens[:, :1]

    def _mask_decoder_call(self, image, sparse, dense, multimask_output, **family_options) -> tuple:
        """The upstream ``mask_decoder(...)`` on one chunk, with the family's extra options."""
        return self.mask_decoder(
            image_embeddings=image["embedding"],
            image_pe=image["pe"],
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            **family_options,
        )

    def _embed(
        self, points: Optional[tuple[torch.Tensor, torch.Tensor]], boxes: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upstream prompt encoder on all prompts: ``(sparse [P, T, C], dense [P, C, h, w])``."""
        return self.prompt_encoder(points=points, boxes=boxes, masks=None)

    # ------------------------------------------------------------------ common

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the mask decoder (the outputs' dtype)."""
        return self.mask_decoder.iou_token.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mask_decoder.iou_token.weight.device

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to(dtype) / .half() convert the mask decoder; the prompt encoder stays float32 (see module doc).
        super()._apply(fn, recurse)
        self.prompt_encoder.float()
        return self

    def _feature(self, image_features: Mapping[str, torch.Tensor], name: str, channels: Optional[int]) -> torch.Tensor:
        """``image_features[name]`` as ``[1, C, h, w]`` in the decoder's dtype, validated."""
        if name not in image_features:
            raise KeyError(
                f"{type(self).__name__}.decode needs the backbone output {name!r}; got {sorted(image_features)}. "
                f"Build the backbone with out_features including {self.required_features}."
            )
        x = image_features[name]
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[0] != 1 or (channels is not None and x.shape[1] != channels):
            raise ValueError(
                f"{type(self).__name__}.decode expects the features of ONE image: {name!r} of shape [C, h, w] or "
                f"[1, C, h, w]{f' with C={channels}' if channels is not None else ''}; got {tuple(x.shape)}. "
                "Index the batched backbone outputs per image: {k: v[i] for k, v in feats.items()}."
            )
        return x.to(device=self.device, dtype=self.dtype)

    def _check_embedding(self, embedding: torch.Tensor) -> None:
        size = (self.embedding_size, self.embedding_size)
        if tuple(embedding.shape[-2:]) != size:
            raise ValueError(
                f"{type(self).__name__} was built for {self.image_size} px inputs ({size[0]}x{size[1]} image "
                f"embeddings); got a {tuple(embedding.shape[-2:])} embedding. Build it for the backbone's input "
                "size (build_prompt_decoder(backbone) does)."
            )

    def _check_prompts(
        self,
        points: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor],
    ) -> int:
        name = type(self).__name__
        if points is None and boxes is None:
            raise ValueError(f"{name}.decode got neither points nor boxes; give at least one prompt type.")
        if (points is None) != (point_labels is None):
            raise ValueError(f"{name}.decode: points and point_labels go together; got only one of them.")
        count = None
        if points is not None:
            if points.ndim != 3 or points.shape[-1] != 2 or tuple(point_labels.shape) != tuple(points.shape[:2]):
                raise ValueError(
                    f"{name}.decode expects points [P, N, 2] (x, y in input pixels) and point_labels [P, N]; got "
                    f"{tuple(points.shape)} and {tuple(point_labels.shape)}."
                )
            count = points.shape[0]
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[-1] != 4 or (count is not None and boxes.shape[0] != count):
                raise ValueError(
                    f"{name}.decode expects boxes [P, 4] (XYXY input pixels, P = number of point prompts when both "
                    f"are given); got {tuple(boxes.shape)}" + (f" with {count} point prompts." if count is not None else ".")
                )
            count = boxes.shape[0]
        return int(count)

    def embed_prompts(
        self,
        *,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed all prompts of an image at once (see :meth:`decode` for the arguments).

        Returns:
            ``sparse [P, T, C]`` and ``dense [P, C, h, w]`` (an expanded view, no copy), in the
            decoder's dtype.
        """
        self._check_prompts(points, point_labels, boxes)
        device = self.prompt_encoder.no_mask_embed.weight.device
        coords = None
        if points is not None:
            coords = (points.to(device=device, dtype=torch.float32), point_labels.to(device=device, dtype=torch.int64))
        box_input = boxes.to(device=device, dtype=torch.float32) if boxes is not None else None
        sparse, dense = self._embed(coords, box_input)
        if dense.shape[0] > 1 and dense.stride(0) == 0:  # one map for every prompt (no mask input): keep it a view
            return sparse.to(self.dtype), dense[:1].to(self.dtype).expand(dense.shape)
        return sparse.to(self.dtype), dense.to(self.dtype)

    def decode_embeddings(
        self,
        image: Mapping[str, torch.Tensor],
        sparse: torch.Tensor,
        dense: torch.Tensor,
        *,
        multimask_output: bool,
        points_per_batch: int = 256,
        best_only: bool = False,
        mask_iou_floor: Optional[float] = None,
        return_mask_tokens: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Masks for ``P`` embedded prompts on one prepared image, in chunks of ``points_per_batch``.

        Args:
            image: :meth:`prepare_image` of one image.
            sparse, dense: :meth:`embed_prompts` of the ``P`` prompts.
            multimask_output, points_per_batch, best_only: as in :meth:`decode`.
            mask_iou_floor: masks whose predicted IoU is ``<= mask_iou_floor`` are returned as
                ``-inf`` logits, and with ``shared_image_decoding`` not computed (for callers that
                drop them anyway; one host-device synchronisation per chunk). None: all masks.
            return_mask_tokens: also return each mask's SAM mask embedding: the two-way
                transformer's output of the mask token that made the mask (the decoder's
                hypernetwork input), from the same decoder call as the masks (off by default:
                the two outputs below are then unchanged).

        Returns:
            ``mask_logits [P, M, Hm, Wm]`` and ``iou_pred [P, M]`` as :meth:`decode`; with
            ``return_mask_tokens``, third: ``mask_tokens [P, M, C]`` (``C = embed_dim``).
        """
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch={points_per_batch} must be >= 1.")
        count = sparse.shape[0]
        m = 1 if best_only else self.num_masks(multimask_output)
        if count == 0:
            empty = sparse.new_zeros((0, m, self.mask_size, self.mask_size))
            no_tokens = (sparse.new_zeros((0, m, self.embed_dim)),) if return_mask_tokens else ()
            return (empty, sparse.new_zeros((0, m)), *no_tokens)
        logits, scores, tokens = [], [], []
        for start in range(0, count, points_per_batch):
            chunk = slice(start, start + points_per_batch)
            chunk_logits, chunk_iou, chunk_tokens = self._decode_chunk_selected(
                image,
                sparse[chunk],
                dense[chunk],
                multimask_output=multimask_output,
                best_only=best_only,
                mask_iou_floor=mask_iou_floor,
                return_mask_tokens=return_mask_tokens,
            )
            logits.append(chunk_logits)
            scores.append(chunk_iou)
            tokens.append(chunk_tokens)
        if return_mask_tokens:
            return torch.cat(logits), torch.cat(scores), torch.cat(tokens)
        return torch.cat(logits), torch.cat(scores)

    def decode(
        self,
        image_features: Mapping[str, torch.Tensor],
        *,
        points: Optional[torch.Tensor] = None,
        point_labels: Optional[torch.Tensor] = None,
        boxes: Optional[torch.Tensor] = None,
        multimask_output: bool,
        points_per_batch: int = 256,
        best_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for ``P`` prompts on one image.

        Args:
            image_features: backbone outputs of ONE image (``[C, h, w]`` or ``[1, C, h, w]`` each),
                holding :attr:`required_features`.
            points: ``[P, N, 2]`` (x, y) in input pixels (the ``S x S`` encoder-input frame;
                ``ImageFit.points_to_input`` maps original pixels there), or None.
            point_labels: ``[P, N]``: 1 foreground, 0 background, -1 padding.
            boxes: ``[P, 4]`` XYXY in input pixels, or None (one box per prompt, with the points of
                the same prompt when both are given).
            multimask_output: SAM's three masks per prompt (``M = 3``; HQ-SAM: 1, its best SAM mask
                plus its HQ mask) instead of one.
            points_per_batch: prompts per mask-decoder call (memory bound, see the module doc).
            best_only: keep only the mask with the highest predicted IoU per prompt (``M = 1``),
                selected chunk by chunk.

        Returns:
            ``mask_logits [P, M, Hm, Wm]`` (``Hm = Wm = 4 * S / 16``, covering the whole input
            square) and ``iou_pred [P, M]``, in the decoder's dtype and device.

        To decode many prompt sets on one image, to skip masks below an IoU floor or to get the
        mask tokens too, call :meth:`prepare_image` and :meth:`embed_prompts` once and
        :meth:`decode_embeddings` (this method is those three calls).
        """
        sparse, dense = self.embed_prompts(points=points, point_labels=point_labels, boxes=boxes)
        logits, iou = self.decode_embeddings(
            self.prepare_image(image_features), sparse, dense, multimask_output=multimask_output,
            points_per_batch=points_per_batch, best_only=best_only,
        )
        return logits, iou

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, "
            f"predictor_steps={self.predictor_steps}, shared_image_decoding={self.shared_image_decoding}"
        )


def _has_forward_hooks(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` (or every module, globally) has a forward (pre-)hook."""
    from torch.nn.modules import module as module_lib

    if module_lib._global_forward_hooks or module_lib._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _upstream_modules(
    decoder: PromptDecoder, prompt_encoder_cls: type, mask_decoder_cls: type, transformer_cls: type, **decoder_kwargs
) -> tuple:
    """The upstream ``PromptEncoder`` and mask decoder for ``decoder``'s sizes, as segment_anything's
    ``_build_sam`` and sam2's ``SAM2Base._build_sam_heads`` build them."""
    embed_dim, image_size, embedding_size = decoder.embed_dim, decoder.image_size, decoder.embedding_size
    prompt_encoder = prompt_encoder_cls(
        embed_dim=embed_dim,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=_MASK_IN_CHANS,
    )
    mask_decoder = mask_decoder_cls(
        num_multimask_outputs=_DECODER["num_multimask_outputs"],
        transformer=transformer_cls(
            depth=_DECODER["depth"], embedding_dim=embed_dim, mlp_dim=_DECODER["mlp_dim"], num_heads=_DECODER["num_heads"]
        ),
        transformer_dim=embed_dim,
        iou_head_depth=_DECODER["iou_head_depth"],
        iou_head_hidden_dim=_DECODER["iou_head_hidden_dim"],
        **decoder_kwargs,
    )
    return prompt_encoder, mask_decoder


class SAMPromptDecoder(PromptDecoder):
    """segment_anything's ``PromptEncoder`` + ``MaskDecoder`` over :class:`SAMBackbone` features.

    Reads ``"neck"`` (``[C, S/16, S/16]``). Official weights: the ``prompt_encoder.*`` and
    ``mask_decoder.*`` keys of the segment-anything ``.pth`` (the same for every ViT size).

    Args:
        variant: the encoder variant whose checkpoint is loaded (``"vit_b"``...; checked for tags).
        embed_dim: image-embedding width (256; tiny backbones 32).
        image_size: encoder input side (1024; tiny 64).
        patch_size: encoder stride (16).
    """

    weight_family = "sam"

    def __init__(self, **sizes: Any) -> None:
        super().__init__(**sizes)
        from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

        self.prompt_encoder, self.mask_decoder = _upstream_modules(self, PromptEncoder, MaskDecoder, TwoWayTransformer)

    @classmethod
    def options_for_backbone(cls, backbone: "EncoderBackbone") -> dict[str, Any]:
        return {**super().options_for_backbone(backbone), **_vit_sizes(backbone)}

    @property
    def required_features(self) -> list[str]:
        return ["neck"]

    def prepare_image(self, image_features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        embedding = self._feature(image_features, "neck", self.embed_dim)
        self._check_embedding(embedding)
        return {"embedding": embedding, "pe": self.prompt_encoder.get_dense_pe().to(self.dtype)}



def _vit_sizes(backbone: "EncoderBackbone") -> dict[str, Any]:
    """Decoder sizes of a SAM / HQ-SAM ViT backbone: its neck width and patch size."""
    return {"embed_dim": backbone.encoder.neck[0].out_channels, "patch_size": backbone.patch_size}


class HQSAMPromptDecoder(PromptDecoder):
    """segment_anything_hq's ``PromptEncoder`` + ``MaskDecoderHQ`` over :class:`HQSAMBackbone` features.

    Reads ``"neck"`` and the output of the encoder's first global-attention block
    (``interm_feature``, e.g. ``"block2"`` for ViT-B: ``HQSAMBackbone.global_attn_features[0]``).
    With ``multimask_output=True`` HQ-SAM returns ONE mask per prompt (its best SAM mask by
    predicted IoU, plus the HQ mask), so ``M = 1``. (Its upstream multimask path indexes with a CPU
    ``arange``: one host-to-device copy per chunk.)

    Args:
        variant, embed_dim, image_size, patch_size: see :class:`SAMPromptDecoder`.
        vit_dim: width of the ViT blocks (768 ViT-B, 1024 ViT-L, 1280 ViT-H; tiny 32).
        interm_feature: backbone output name of the first global-attention block.
        hq_token_only: return only the HQ mask instead of SAM mask + HQ mask (upstream default False).
    """

    weight_family = "hq_sam"

    def __init__(
        self, *, vit_dim: int = 768, interm_feature: str = "block2", hq_token_only: bool = False, **sizes: Any
    ) -> None:
        super().__init__(**sizes)
        from segment_anything_hq.modeling import MaskDecoderHQ, PromptEncoder, TwoWayTransformer

        self.vit_dim = vit_dim
        self.interm_feature = interm_feature
        self.hq_token_only = hq_token_only
        self.prompt_encoder, self.mask_decoder = _upstream_modules(
            self, PromptEncoder, MaskDecoderHQ, TwoWayTransformer, vit_dim=vit_dim
        )

    @classmethod
    def options_for_backbone(cls, backbone: "EncoderBackbone") -> dict[str, Any]:
        vit = {"vit_dim": backbone.encoder.patch_embed.proj.out_channels, "interm_feature": backbone.global_attn_features[0]}
        return {**super().options_for_backbone(backbone), **_vit_sizes(backbone), **vit}

    @property
    def required_features(self) -> list[str]:
        return ["neck", self.interm_feature]

    def num_masks(self, multimask_output: bool) -> int:
        return 1

    def prepare_image(self, image_features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        embedding = self._feature(image_features, "neck", self.embed_dim)
        self._check_embedding(embedding)
        interm = self._feature(image_features, self.interm_feature, self.vit_dim)
        return {
            "embedding": embedding,
            "pe": self.prompt_encoder.get_dense_pe().to(self.dtype),
            "interm": interm.permute(0, 2, 3, 1),  # upstream layout: [1, h, w, C]
        }

    def _decode_chunk(self, image, sparse, dense, multimask_output):
        return self._mask_decoder_call(
            image, sparse, dense, multimask_output, hq_token_only=self.hq_token_only, interm_embeddings=[image["interm"]]
        )

    def _select_mask_tokens(self, mask_tokens, iou_all, multimask_output):
        # MaskDecoderHQ.forward: the HQ token alone (hq_token_only), else the SAM token of its SAM mask
        # (the best of tokens 1..3 by predicted IoU, or token 0) that it adds the HQ mask to
        if self.hq_token_only:
            return mask_tokens[:, -1:]
        if not multimask_output:
            return mask_tokens[:, :1]
        best = iou_all[:, 1 : mask_tokens.shape[1] - 1].argmax(dim=1) + 1  # [B]
        return mask_tokens.gather(1, best[:, None, None].expand(-1, 1, mask_tokens.shape[-1]))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", vit_dim={self.vit_dim}, interm_feature={self.interm_feature!r}"


class SAM2PromptDecoder(PromptDecoder):
    """sam2's ``sam_prompt_encoder`` + ``sam_mask_decoder`` over :class:`SAM2Backbone` features.

    Reads ``"p2"``, ``"p3"`` (through the decoder's ``conv_s0``/``conv_s1``, as
    ``SAM2Base.forward_image``) and ``"p4"`` (plus ``no_mem_embed``, as ``SAM2ImagePredictor``, with
    ``predictor_steps``). Low-resolution logits are clamped to [-32, 32] as the predictor does (with
    ``predictor_steps``). Box prompts are encoded
    as two corner points (labels 2, 3) before the point prompts, as the predictor does.

    Official weights: ``sam_prompt_encoder.*``, ``sam_mask_decoder.*`` and ``no_mem_embed`` of the
    SAM 2 / 2.1 ``.pt`` (``{"model": ...}``), the same architecture for every Hiera size.

    Args:
        variant: encoder variant (``"hiera_l"``...; checked for tags).
        embed_dim: FPN width ``d_model`` (256; tiny 32).
        image_size: encoder input side (1024; tiny 128).
        patch_size: stride of ``"p4"`` (16).
        dynamic_multimask_via_stability: single-mask outputs fall back to the best multimask output
            when unstable, as ``build_sam2`` sets up image prediction (default True).
        predictor_steps: the two steps ``SAM2ImagePredictor`` adds around the mask decoder: add
            ``no_mem_embed`` to the ``"p4"`` embedding (``set_image``, as ``directly_add_no_mem_embed``)
            and clamp the low-resolution logits to [-32, 32] (``_predict``). False: the bare
            ``sam_mask_decoder`` on the backbone features, as "No Time to Train" calls it
            (``Sam2MatchingBaselineNoAMG._forward_sam``: ``_prepare_backbone_features`` output
            straight into ``sam_mask_decoder``, logits unclamped).
    """

    weight_family = "sam2"

    def __init__(self, *, dynamic_multimask_via_stability: bool = True, **options: Any) -> None:
        super().__init__(**options)
        from sam2.modeling.sam.mask_decoder import MaskDecoder
        from sam2.modeling.sam.prompt_encoder import PromptEncoder
        from sam2.modeling.sam.transformer import TwoWayTransformer

        # SAM2Base._build_sam_heads with the options of every official config (sam2{,.1}_hiera_*.yaml)
        # and build_sam2's image-prediction overrides.
        self.prompt_encoder, self.mask_decoder = _upstream_modules(
            self,
            PromptEncoder,
            MaskDecoder,
            TwoWayTransformer,
            use_high_res_features=True,
            iou_prediction_use_sigmoid=True,
            pred_obj_scores=True,
            pred_obj_scores_mlp=True,
            use_multimask_token_for_obj_ptr=True,
            dynamic_multimask_via_stability=dynamic_multimask_via_stability,
            dynamic_multimask_stability_delta=0.05,
            dynamic_multimask_stability_thresh=0.98,
        )
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, self.embed_dim))

    @classmethod
    def options_for_backbone(cls, backbone: "EncoderBackbone") -> dict[str, Any]:
        return {**super().options_for_backbone(backbone), "embed_dim": backbone.encoder.neck.d_model}

    @property
    def required_features(self) -> list[str]:
        return ["p2", "p3", "p4"]

    def prepare_image(self, image_features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        embedding = self._feature(image_features, "p4", self.embed_dim)
        self._check_embedding(embedding)
        s0 = self.mask_decoder.conv_s0(self._feature(image_features, "p2", self.embed_dim))
        s1 = self.mask_decoder.conv_s1(self._feature(image_features, "p3", self.embed_dim))
        if self.predictor_steps:
            embedding = embedding + self.no_mem_embed.reshape(1, -1, 1, 1)
        return {
            "embedding": embedding,
            "pe": self.prompt_encoder.get_dense_pe().to(self.dtype),
            "s0": s0,
            "s1": s1,
        }

    def _embed(self, points, boxes):
        if boxes is not None:  # SAM2ImagePredictor._predict: box corners first, labels 2 and 3
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.tensor([[2, 3]], dtype=torch.int64, device=boxes.device).expand(boxes.shape[0], 2)
            if points is not None:
                points = (torch.cat([corners, points[0]], dim=1), torch.cat([corner_labels, points[1]], dim=1))
            else:
                points = (corners, corner_labels)
        return self.prompt_encoder(points=points, boxes=None, masks=None)

    def _high_res_features(self, image):
        return [image["s0"], image["s1"]]

    def _postprocess_logits(self, logits):
        return logits.clamp(-32.0, 32.0) if self.predictor_steps else logits

    def _decode_chunk(self, image, sparse, dense, multimask_output):
        logits, iou_pred, _, _ = self._mask_decoder_call(
            image, sparse, dense, multimask_output, repeat_image=True, high_res_features=self._high_res_features(image)
        )
        return self._postprocess_logits(logits), iou_pred


#: weight family -> prompt-decoder class (a live view of the catalog's ``prompt_decoder`` fields)
PROMPT_DECODER_CLASSES: Mapping[str, type[PromptDecoder]] = FamilyView("prompt_decoder")


def build_prompt_decoder(
    backbone: "EncoderBackbone",
    *,
    weights: Optional[Union[str, os.PathLike]] = None,
    **options,
) -> PromptDecoder:
    """The prompt decoder matching ``backbone`` (family, variant, width, input size), on its
    device and dtype, optionally with official weights.

    Args:
        backbone: a :class:`SAMBackbone`, :class:`HQSAMBackbone` or :class:`SAM2Backbone` (full or tiny).
        weights: a weight tag, a path, or a file name under ``$SAMANTICS_WEIGHTS`` (the same
            checkpoint as the backbone's); None: random initialisation.
        options: ``predictor_steps`` and family options (``hq_token_only``,
            ``dynamic_multimask_via_stability``).
    """
    family = getattr(backbone, "weight_family", None)
    if family not in PROMPT_DECODER_CLASSES:
        raise ValueError(
            f"build_prompt_decoder got a {type(backbone).__name__} (family {family!r}); expected a SAM, HQ-SAM or "
            f"SAM 2 backbone (families {sorted(PROMPT_DECODER_CLASSES)}): only those have a promptable decoder."
        )
    cls = get_family(family).prompt_decoder_class()
    decoder = cls(**{**cls.options_for_backbone(backbone), **options})
    missing = [name for name in decoder.required_features if name not in backbone.output_shape()]
    if missing:
        raise ValueError(
            f"{type(backbone).__name__} (out_features {list(backbone.output_shape())}) does not output {missing}, "
            f"which {cls.__name__} reads; build the backbone with out_features including {decoder.required_features}."
        )
    if weights is not None:  # the checkpoint's decoder part, from the backbone's read of it when there is one
        load_prompt_decoder_weights(decoder, weights, read_with=backbone)
    reference = next((p for p in backbone.parameters() if p.is_floating_point()), None)
    if reference is not None and reference.device.type != "meta":
        decoder = decoder.to(device=reference.device, dtype=reference.dtype)
    return decoder.eval()
