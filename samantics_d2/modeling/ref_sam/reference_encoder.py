"""Reference instances -> SAM mask-token outputs, and the file that caches them ("compute_embeds").

RefSAM describes a class by a reference instance of it: SAM's prompt encoder embeds the
instance's box, SAM's two-way transformer attends between those prompt tokens, SAM's output
tokens and the reference image's embedding, and the outputs of the MASK tokens (4 for SAM: the
single-mask token and the 3 multimask tokens; 5 for HQ-SAM, which adds its HQ token; never the
IoU token) are the reference's description. :func:`mask_token_outputs` runs exactly that part of
the upstream ``MaskDecoder.predict_masks`` (``mask_tokens_out = hs[:, 1 : 1 + num_mask_tokens]``)
for a batch of box prompts, each on its own image embedding.

:func:`encode_references` does it for every instance of a reference set (one encoder forward per
batch of reference images) and returns :class:`ReferenceTokens`: the tokens of every reference
with its class, its shot rank and where it came from, in the one reference order of
:mod:`samantics_d2.references` (category, shot rank, annotation id). They are stored by the
references store (:mod:`samantics_d2.references.store`: safetensors + JSON provenance, atomic; no
pickles). :meth:`ReferenceTokens.class_tokens` averages the first ``n`` shots of each class (any
``n`` up to the cached count), which the token fuser turns into class prompts.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ...references.ordering import order_references
from ...references.store import StoredFeatures, load_features, save_features
from ..catalog import FAMILIES

__all__ = ["ReferenceTokens", "encode_references", "mask_token_outputs", "num_mask_tokens"]

logger = logging.getLogger(__name__)


def _families() -> tuple[str, ...]:
    """The families whose mask-token outputs describe a reference (catalog ``mask_tokens``)."""
    return tuple(name for name, spec in FAMILIES.items() if spec.mask_tokens is not None)


def _check_family(decoder: Any) -> None:
    family = getattr(decoder, "weight_family", None)
    families = _families()
    if family not in families:
        raise ValueError(
            f"RefSAM reference tokens need a SAM or HQ-SAM prompt decoder (families {families}); got "
            f"{type(decoder).__name__} (family {family!r}). Build the proposer over a SAMBackbone or HQSAMBackbone."
        )


def num_mask_tokens(decoder: Any) -> int:
    """Number of mask tokens of a SAM (4) or HQ-SAM (5) prompt decoder."""
    _check_family(decoder)
    return int(decoder.mask_decoder.num_mask_tokens)


def mask_token_outputs(decoder: Any, image_embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mask-token outputs of SAM's two-way transformer for box prompts.

    Args:
        decoder: a :class:`SAMPromptDecoder` or :class:`HQSAMPromptDecoder`.
        image_embeddings: ``[R, C, h, w]`` (one embedding per box: the backbone's ``"neck"`` of
            each box's image) or ``[1, C, h, w]`` (all boxes on one image).
        boxes: ``[R, 4]`` XYXY in the decoder's input pixel frame (``ImageFit.boxes_to_input``).

    Returns:
        ``[R, T, C]`` in the decoder's dtype, ``T = num_mask_tokens(decoder)`` (4 SAM, 5 HQ-SAM):
        ``hs[:, 1 : 1 + T]`` of the upstream ``predict_masks`` on the same inputs.
    """
    _check_family(decoder)
    count = boxes.shape[0]
    if image_embeddings.ndim != 4 or image_embeddings.shape[0] not in (1, count):
        raise ValueError(
            f"mask_token_outputs got image_embeddings of shape {tuple(image_embeddings.shape)} for {count} boxes; "
            f"expected [{count} or 1, C, h, w]."
        )
    expected = (decoder.embed_dim, decoder.embedding_size, decoder.embedding_size)
    if tuple(image_embeddings.shape[1:]) != expected:
        raise ValueError(
            f"mask_token_outputs got image embeddings {tuple(image_embeddings.shape[1:])}; the decoder was built for "
            f"{expected}. Build it for the backbone (build_prompt_decoder(backbone))."
        )
    mask_decoder = decoder.mask_decoder
    sparse, dense = decoder.embed_prompts(boxes=boxes)  # [R, 2, C], [R, C, h, w]
    weights = [mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight]
    if hasattr(mask_decoder, "hf_token"):  # HQ-SAM's HQ output token comes after SAM's mask tokens
        weights.append(mask_decoder.hf_token.weight)
    output_tokens = torch.cat(weights, dim=0)[None].expand(count, -1, -1)
    tokens = torch.cat([output_tokens, sparse], dim=1)
    src = image_embeddings.to(decoder.dtype).expand(count, -1, -1, -1) + dense
    pos = decoder.prompt_encoder.get_dense_pe().to(decoder.dtype).expand(count, -1, -1, -1)
    hs, _ = mask_decoder.transformer(src, pos, tokens)
    return hs[:, 1 : 1 + mask_decoder.num_mask_tokens]


@dataclass
class ReferenceTokens:
    """The mask-token outputs of every reference instance, with classes, shot ranks and provenance.

    Attributes:
        tokens: ``[R, T, C]`` float32 (CPU), the references' mask-token outputs (before the fuser).
        labels: ``[R]`` int64, index of each reference's class in :attr:`class_names`.
        ranks: ``[R]`` int64, the shot rank of each reference within its class (0 = first shot;
            the reference set's ``reference_rank``, else the order of appearance).
        class_names: the reference classes.
        references: one record per reference (``image_id``, ``file_name``, ``annotation_id``,
            ``bbox`` XYXY in original pixels, ``class_name``, ``rank``).
        provenance: how the tokens were made (source, model, weights fingerprint, format).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    ranks: torch.Tensor
    class_names: list[str]
    references: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        r = self.tokens.shape[0]
        if self.tokens.ndim != 3 or self.labels.shape != (r,) or self.ranks.shape != (r,):
            raise ValueError(
                f"ReferenceTokens: tokens {tuple(self.tokens.shape)}, labels {tuple(self.labels.shape)}, ranks "
                f"{tuple(self.ranks.shape)}; expected [R, T, C], [R], [R]."
            )
        if r and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise ValueError(
                f"ReferenceTokens: labels in [{int(self.labels.min())}, {int(self.labels.max())}] but only "
                f"{len(self.class_names)} class names."
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def shots_per_class(self) -> dict[str, int]:
        """Number of cached references of each class, by name."""
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return dict(zip(self.class_names, counts))

    def class_tokens(
        self, class_names: Sequence[str], *, shots: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per output class, the mean tokens of its first ``shots`` references (by rank).

        Args:
            class_names: the output classes; reference classes are matched to them by name.
            shots: references per class (None: all cached). A class with fewer cached references
                uses those it has (logged); more than any class has is an error.

        Returns:
            ``tokens [K, T, C]`` float32 (zeros for classes without references) and ``valid [K]`` bool.
        """
        counts = self.shots_per_class()
        most = max(counts.values(), default=0)
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
            raise ValueError(f"shots={shots!r}; expected a positive int, or None for all cached references.")
        if shots is not None and shots > most:
            raise ValueError(
                f"shots={shots} but at most {most} reference(s) per class are cached ({counts}); compute the "
                "embeddings from a reference set with more shots, or ask for fewer."
            )
        index = {name: k for k, name in enumerate(self.class_names)}
        out = torch.zeros((len(class_names), *self.tokens.shape[1:]), dtype=torch.float32)
        valid = torch.zeros(len(class_names), dtype=torch.bool)
        short = []
        for k, name in enumerate(class_names):
            if name not in index:
                continue
            chosen = (self.labels == index[name]) & (self.ranks < shots if shots is not None else True)
            if not bool(chosen.any()):
                continue
            if shots is not None and int(chosen.sum()) < shots:
                short.append(f"{name} ({int(chosen.sum())})")
            out[k] = self.tokens[chosen].float().mean(dim=0)
            valid[k] = True
        if short:
            logger.warning("Fewer than %s cached references for: %s; using those.", shots, ", ".join(short))
        missing = [name for k, name in enumerate(class_names) if not bool(valid[k])]
        if missing:
            logger.warning("No reference for %d of %d classes (never queried): %s", len(missing), len(class_names),
                           ", ".join(missing))
        return out, valid

    # ------------------------------------------------------------------ files (the references store)

    def to_stored(self) -> StoredFeatures:
        """The tokens as the references store holds them."""
        return StoredFeatures(
            tensors={
                "tokens": self.tokens.detach().float().cpu(),
                "labels": self.labels.detach().long().cpu(),
                "ranks": self.ranks.detach().long().cpu(),
            },
            provenance={"kind": "reference_tokens", **self.provenance},
            class_names=list(self.class_names),
            records=self.references,
        )

    @classmethod
    def from_stored(cls, stored: StoredFeatures) -> "ReferenceTokens":
        """The tokens of a store file (:meth:`to_stored`)."""
        try:
            return cls(
                tokens=stored.tensors["tokens"],
                labels=stored.tensors["labels"],
                ranks=stored.tensors["ranks"],
                class_names=list(stored.class_names),
                references=list(stored.records),
                provenance=dict(stored.provenance),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(
                f"the stored features are not reference tokens (no {e}); kind {stored.provenance.get('kind')!r}."
            ) from e

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``path`` (safetensors) and its ``.json`` metadata sidecar, each atomically."""
        save_features(path, self.to_stored())
        logger.info("Saved the tokens of %d reference(s) to %s.", len(self), path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ReferenceTokens":
        """Read a file written by :meth:`save` (tensors on the CPU)."""
        try:
            return cls.from_stored(load_features(path))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"No reference tokens at {str(path)!r}; compute them with `tools/ref_sam_embeds.py compute`."
            ) from None
        except ValueError as e:
            raise ValueError(
                f"{str(path)!r} is not a reference-tokens file written by ReferenceTokens.save ({e}); compute it "
                "again with `tools/ref_sam_embeds.py compute`."
            ) from e


@torch.no_grad()
def encode_references(
    *,
    backbone: Any,
    decoder: Any,
    dataset_dicts: Sequence[dict],
    class_names: Sequence[str],
    batch_size: int = 8,
    provenance: Optional[Mapping[str, Any]] = None,
) -> ReferenceTokens:
    """The mask-token outputs of every (non-crowd) annotation of ``dataset_dicts``.

    Args:
        backbone: the SAM / HQ-SAM encoder (outputs ``"neck"``).
        decoder: its prompt decoder.
        dataset_dicts: reference images with ``annotations`` (contiguous ``category_id``;
            ``reference_rank`` gives the shot order when present).
        class_names: names of the contiguous ids.
        batch_size: reference images per encoder forward.
        provenance: stored with the tokens (source, weights fingerprint...).

    Returns:
        :class:`ReferenceTokens` sorted by class, then rank.
    """
    if batch_size < 1:
        raise ValueError(f"encode_references: batch_size={batch_size} must be >= 1.")
    items = order_references(dataset_dicts, len(class_names), class_names=class_names)
    files = list(dict.fromkeys(item.file_name for item in items))
    reader = {item.file_name: item for item in items}
    start = time.perf_counter()
    tokens_of_file: dict[str, torch.Tensor] = {}
    for b in range(math.ceil(len(files) / batch_size)):
        batch_files = files[b * batch_size : (b + 1) * batch_size]
        x, fits = backbone.prepare_with_fits([reader[name].read_image() for name in batch_files])
        embeddings = backbone(x)["neck"]
        embedding_list, box_list, owners = [], [], []
        for i, (name, fit) in enumerate(zip(batch_files, fits)):
            boxes = torch.tensor([item.box_xyxy() for item in items if item.file_name == name], dtype=torch.float32)
            box_list.append(fit.boxes_to_input(boxes))
            embedding_list.append(embeddings[i : i + 1].expand(len(boxes), -1, -1, -1))
            owners.extend([name] * len(boxes))
        out = mask_token_outputs(decoder, torch.cat(embedding_list), torch.cat(box_list).to(embeddings.device))
        out = out.float().cpu()
        for name in batch_files:
            tokens_of_file[name] = out[[j for j, owner in enumerate(owners) if owner == name]]
    # Back to the item order (class, rank); within a file, items keep their order.
    position: dict[str, int] = {}
    rows = []
    for item in items:
        j = position.get(item.file_name, 0)
        position[item.file_name] = j + 1
        rows.append(tokens_of_file[item.file_name][j])
    num_tokens = num_mask_tokens(decoder)
    tokens = torch.stack(rows) if rows else torch.zeros((0, num_tokens, decoder.embed_dim))
    logger.info(
        "Encoded %d reference(s) of %d image(s) in %.1f s.", len(items), len(files), time.perf_counter() - start
    )
    return ReferenceTokens(
        tokens=tokens,
        labels=torch.tensor([item.class_id for item in items], dtype=torch.int64),
        ranks=torch.tensor([item.shot_rank for item in items], dtype=torch.int64),
        class_names=list(class_names),
        references=[
            {"file_name": item.file_name, "image_id": item.image_id, "annotation_id": item.annotation_id,
             "class_name": class_names[item.class_id], "rank": item.shot_rank, "bbox": item.box_xyxy()}
            for item in items
        ],
        provenance={"num_tokens": num_tokens, **dict(provenance or {})},
    )
