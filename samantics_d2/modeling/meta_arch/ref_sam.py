"""RefSAM: find every instance of a class given reference instances of it, on top of a frozen SAM.

Data flow (DESIGN.md, "RefSAM as published", without its two defects):

- reference: its image through SAM's encoder, its box through SAM's prompt encoder and two-way
  transformer -> mask-token outputs ``[T, C]`` (T = 4 SAM, 5 HQ-SAM;
  :func:`~samantics_d2.modeling.ref_sam.reference_encoder.mask_token_outputs`) -> :class:`TokenFuser`
  -> one class prompt ``[d]``;
- target: SAM's encoder once per image; its global-attention block outputs through
  :class:`MultiLevelNeck` -> :class:`RefDETRHead` (Deformable DETR, box refinement) whose queries
  all carry the class prompt -> per query a box and one "matches the reference" logit;
- masks: SAM's frozen decoder prompted with the top boxes.

SAM (``proposer``: encoder + prompt decoder) is frozen and stays in eval mode; the fuser, neck and
head train. Training pairs each target image with the references its mapper drew
(:class:`~samantics_d2.data.ref_sam_mapper.RefSAMMapper`); each pair's targets are the target's
GT boxes of the reference's class, found through the reference's own ``category_id`` (one source
of truth, so references and GT cannot be paired out of order). Losses: Hungarian matching and
focal / L1 / GIoU on every decoder layer (:class:`SetCriterion`).

Evaluation asks about every class of the output label space (``query_classes="all"``; one head
pass per class and image, classes batched), or, as the published n-shot evaluation did, only about
the classes present in the image (``"present"``, an oracle), or, as the published "standard test"
did, about the references the test mapper drew for each image (``"image_references"``: one random
test-set reference per present class, encoded with the image; also an oracle of the present classes).
Detections kept: the ``topk`` best per image over all queried classes (``topk_scope="image"``) or
per (image, queried class) as published (``"class"``; COCO's evaluation also keeps 100 per
(image, category)). Class prompts come from cached reference
tokens (a features file written by ``tools/ref_sam_embeds.py compute``) or from a reference set
encoded once the weights are loaded (:meth:`RefSAM.prepare_references`, through the references
store); both come as a :class:`~samantics_d2.references.ReferenceBank` resolved with the config
(label space, reference set, shots), and both average the first ``shots`` references of a
class (:meth:`ReferenceTokens.class_tokens`) and give the same results. ``box_source="gt"``
prompts SAM with the GT boxes instead (the mask-quality upper bound).

The class prompts' tokens are prepared in one step after the model is built and its weights loaded,
never in ``forward`` (:func:`samantics_d2.references.prepare_references`: ``train_net.py`` before
evaluating, ``tools/ref_sam_embeds.py`` before its first image, ``DefaultPredictor`` users on
``predictor.model``); loading SAM's weights afterwards (``DetectionCheckpointer``,
``load_state_dict``) discards them and ``forward`` raises until they are prepared again. Training
needs none: its class prompts come from the references the mapper drew.

The checkpoint keys of the frozen SAM are ``proposer.backbone.*`` and
``proposer.proposals.decoder.*``, those of :class:`PromptableSamTrainer`, so a SAM trained by it
initialises RefSAM through ``train.init_checkpoint``.
"""
from __future__ import annotations

import pydoc
from functools import partial
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...d2 import META_ARCH_REGISTRY, Boxes, Instances, configurable
from ...references import (
    ReferenceBank,
    ReferenceInstance,
    check_prepared,
    order_references,
    reference_provenance,
    watch_weight_loads,
    weight_loads,
)
from ...utils.checks import raise_if_problems
from ...yacs_config import check_yacs_config, node_kwargs, yacs_reference_bank
from ..ref_sam import (
    DeformableTransformer,
    HungarianMatcher,
    MultiLevelNeck,
    RefDETRHead,
    SetCriterion,
    TokenFuser,
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
)
from ..ref_sam.reference_encoder import ReferenceTokens, encode_references, mask_token_outputs, num_mask_tokens
from ..semantic import masks_to_original
from .training_free import SamProposer, module_fingerprint, sam_proposer_from_config

__all__ = [
    "RefSAM",
    "build_optimizer_with_grad_clip",
    "build_ref_sam",
    "ref_sam_heads",
    "ref_sam_lr_factor",
    "ref_sam_lr_factor_func",
]

QUERY_CLASSES = ("all", "present", "image_references")
BOX_SOURCES = ("predicted", "gt")
TOPK_SCOPES = ("image", "class")
REFERENCE_PAIRINGS = ("category_id", "sorted_position")


def ref_sam_lr_factor(
    name: str, *, names: Sequence[str] = ("sampling_offsets", "reference_points"), factor: float = 0.1
) -> float:
    """Learning-rate factor of parameter ``name`` (for ``get_default_optimizer_params(lr_factor_func=...)``):
    ``factor`` for Deformable DETR's sampling offsets and reference-point predictor (as Deformable
    DETR trains them), 1 otherwise."""
    parts = name.split(".")
    return factor if any(n in parts for n in names) else 1.0


def ref_sam_lr_factor_func(
    *, names: Sequence[str] = ("sampling_offsets", "reference_points"), factor: float = 0.1
) -> Callable[[str], float]:
    """:func:`ref_sam_lr_factor` with its options bound: a LazyConfig-friendly ``lr_factor_func``
    (``L(ref_sam_lr_factor_func)(factor=0.1)`` saves to YAML, a ``partial`` object does not)."""
    return partial(ref_sam_lr_factor, names=tuple(names), factor=float(factor))


def build_optimizer_with_grad_clip(
    *,
    optimizer_class: Union[str, Callable[..., torch.optim.Optimizer]],
    params: Iterable,
    max_norm: float,
    norm_type: float = 2.0,
    **optimizer_options: Any,
) -> torch.optim.Optimizer:
    """``optimizer_class(params, **optimizer_options)`` (a class or its dotted name, e.g.
    ``"torch.optim.AdamW"``, which keeps the config YAML-serialisable) that clips the global gradient norm of its
    parameters to ``max_norm`` before every step.

    The clipping is a step pre-hook (``torch.optim.Optimizer.register_step_pre_hook``): it runs
    inside ``optimizer.step()``, after ``SimpleTrainer``'s backward pass and, under ``AMPTrainer``,
    after ``GradScaler.step`` has unscaled the gradients. The optimizer is the plain torch object
    (same class, state dict and checkpoints).
    """
    if max_norm <= 0:
        raise ValueError(f"build_optimizer_with_grad_clip: max_norm={max_norm} must be > 0.")
    if isinstance(optimizer_class, str):
        name, optimizer_class = optimizer_class, pydoc.locate(optimizer_class)
        if not callable(optimizer_class):
            raise ValueError(
                f"build_optimizer_with_grad_clip: optimizer_class={name!r} names no class; e.g. 'torch.optim.AdamW'."
            )
    optimizer = optimizer_class(params, **optimizer_options)

    def clip_before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, max_norm=max_norm, norm_type=norm_type)

    optimizer.register_step_pre_hook(clip_before_step)
    return optimizer


def ref_sam_heads(
    proposer: SamProposer,
    *,
    feature_names: Optional[Sequence[str]] = None,
    d_model: int = 256,
    fuser: Optional[Mapping[str, Any]] = None,
    neck: Optional[Mapping[str, Any]] = None,
    transformer: Optional[Mapping[str, Any]] = None,
    head: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """RefSAM's trainable parts over the built ``proposer``, sized from it as ViTDet's feature pyramid
    is from ``net.output_shape()``: the neck's inputs are ``backbone.output_shape()`` of
    ``feature_names`` (default: the backbone's global-attention blocks), the fuser takes the SAM
    decoder's mask tokens (4 SAM, 5 HQ-SAM) and width, and every part works at ``d_model``, with
    one level per feature name. ``fuser``, ``neck``, ``transformer`` and ``head`` hold the other
    options of :class:`TokenFuser`, :class:`MultiLevelNeck`, :class:`DeformableTransformer` and
    :class:`RefDETRHead`. Returns RefSAM's ``feature_names``, ``fuser``, ``neck`` and ``head``.
    """
    backbone, decoder = proposer.backbone, proposer.proposals.decoder
    feature_names = list(feature_names) if feature_names is not None else list(backbone.global_attn_features)
    shapes = backbone.output_shape()
    missing = [name for name in feature_names if name not in shapes]
    if missing:
        raise ValueError(
            f"RefSAM feature_names {feature_names}: the backbone does not output {missing} (out_features "
            f"{list(shapes)}); add them to its out_features."
        )
    # Built in this order (fuser, neck, transformer, head): the same random initialisation for a seed.
    fuser = TokenFuser(
        num_tokens=num_mask_tokens(decoder), token_dim=decoder.embed_dim, out_dim=d_model, **(fuser or {})
    )
    neck = MultiLevelNeck(input_shapes=[shapes[name] for name in feature_names], out_channels=d_model, **(neck or {}))
    transformer = DeformableTransformer(d_model=d_model, n_levels=len(feature_names), **(transformer or {}))
    head = RefDETRHead(transformer=transformer, **(head or {}))
    return {"feature_names": feature_names, "fuser": fuser, "neck": neck, "head": head}


_SIZING_OPTIONS = ("feature_names", "d_model", "fuser", "neck", "transformer", "head")  # ref_sam_heads'


def build_ref_sam(*, proposer: SamProposer, **options: Any) -> "RefSAM":
    """:class:`RefSAM` over the built ``proposer``, its fuser, neck and head sized from it by
    :func:`ref_sam_heads` (the LazyConfig entry: any SAM / HQ-SAM variant or size gets parts of its
    own sizes). ``options``: those of :func:`ref_sam_heads` and RefSAM's other arguments."""
    sizing = {name: options.pop(name) for name in _SIZING_OPTIONS if name in options}
    return RefSAM(proposer=proposer, **ref_sam_heads(proposer, **sizing), **options)


@META_ARCH_REGISTRY.register()
class RefSAM(nn.Module):
    """Reference-prompted SAM (see the module docstring).

    Input: a list of model-input dicts (``image`` uint8 ``[3, H, W]`` RGB, ``height``, ``width``);
    in training also ``instances`` (``gt_boxes``, ``gt_classes``) and ``references``: a list of
    ``{"image": uint8 [3, h, w], "box": [4] XYXY in that image, "category_id": int}``.
    Training returns the loss dict of :class:`SetCriterion`. Eval returns per image
    ``{"instances": Instances}`` at ``height`` x ``width`` with ``pred_boxes``, ``scores``,
    ``pred_classes`` (ids of :meth:`class_names`) and ``pred_masks`` (bool ``[N, H, W]``).

    Args:
        proposer: the frozen SAM / HQ-SAM encoder + prompt decoder (:func:`build_sam_proposer`;
            its point-grid options are unused); the encoder outputs ``"neck"`` and ``feature_names``.
        fuser: mask tokens ``[T, C]`` -> class prompt ``[d_model]``.
        neck: ``feature_names`` block outputs -> the head's feature levels.
        head: the Deformable DETR head.
        criterion: matcher + losses.
        feature_names: backbone outputs fed to the neck, one per level (names may repeat; default:
            the backbone's global-attention blocks).
        reference_bank: eval: the output label space and the class prompts' references, resolved
            (:func:`~samantics_d2.references.build_reference_bank`): a reference set encoded by
            :meth:`prepare_references` (stored by the references store), or cached tokens
            (``features_path``, ``tools/ref_sam_embeds.py compute``); ``shots``: average the first
            ``shots`` references per class (None: all). None: a model for training only.
        query_classes: ``"all"`` (every class with references), ``"present"`` (the oracle: only
            the GT classes of each image; needs ``instances`` in the inputs) or ``"image_references"``
            (the published standard test: each input's own ``references``, drawn by
            :class:`~samantics_d2.data.ref_sam_mapper.RefSAMMapper` with ``seed`` set; no reference bank).
        box_source: ``"predicted"`` or ``"gt"`` (prompt SAM with the GT boxes, score 1).
        classes_per_batch: classes per head pass at eval (memory bound).
        topk: detections kept per image (``topk_scope="image"``: over all queried classes and queries)
            or per (image, queried class) (``"class"``: the published protocol).
        reference_batch_size: reference images per encoder forward when encoding ``references``.
        reference_pairing: which GT boxes (training) or label (standard test) a reference of an image
            gets: ``"category_id"`` (its own category: our fix) or ``"sorted_position"`` (the published
            defect: the j-th reference of an image gets the j-th of its references' categories in
            sorted order, while the mapper lists them in ``set`` order).
    """

    @configurable
    def __init__(
        self,
        *,
        proposer: SamProposer,
        fuser: TokenFuser,
        neck: MultiLevelNeck,
        head: RefDETRHead,
        criterion: SetCriterion,
        feature_names: Optional[Sequence[str]] = None,
        reference_bank: Optional[ReferenceBank] = None,
        query_classes: str = "all",
        box_source: str = "predicted",
        classes_per_batch: int = 16,
        topk: int = 100,
        topk_scope: str = "image",
        reference_batch_size: int = 8,
        reference_pairing: str = "category_id",
    ):
        super().__init__()
        backbone, decoder = proposer.backbone, proposer.proposals.decoder
        feature_names = list(feature_names) if feature_names is not None else list(backbone.global_attn_features)
        problems = []
        if query_classes not in QUERY_CLASSES:
            problems.append(f"query_classes={query_classes!r} is not one of {QUERY_CLASSES}")
        if box_source not in BOX_SOURCES:
            problems.append(f"box_source={box_source!r} is not one of {BOX_SOURCES}")
        if topk_scope not in TOPK_SCOPES:
            problems.append(f"topk_scope={topk_scope!r} is not one of {TOPK_SCOPES}")
        if reference_pairing not in REFERENCE_PAIRINGS:
            problems.append(f"reference_pairing={reference_pairing!r} is not one of {REFERENCE_PAIRINGS}")
        if fuser.num_tokens != num_mask_tokens(decoder):
            problems.append(
                f"the fuser takes {fuser.num_tokens} tokens but {type(decoder).__name__} has "
                f"{num_mask_tokens(decoder)} mask tokens (4 SAM, 5 HQ-SAM)"
            )
        if fuser.token_dim != decoder.embed_dim:
            problems.append(f"fuser token_dim={fuser.token_dim} but the SAM decoder's width is {decoder.embed_dim}")
        fused_dim = fuser.mlp[-1].out_features
        if fused_dim != head.d_model or neck.out_channels != head.d_model:
            problems.append(
                f"fuser out_dim={fused_dim} and neck out_channels={neck.out_channels} must equal head "
                f"d_model={head.d_model}"
            )
        if not (len(feature_names) == len(neck.strides) == head.n_levels):
            problems.append(
                f"{len(feature_names)} feature_names {feature_names}, {len(neck.strides)} neck levels and "
                f"{head.n_levels} head levels must agree"
            )
        outputs = backbone.output_shape()
        missing = [n for n in dict.fromkeys(["neck", *decoder.required_features, *feature_names]) if n not in outputs]
        if missing:
            problems.append(f"the backbone does not output {missing} (out_features {list(outputs)}); add them")
        if classes_per_batch < 1 or topk < 1:
            problems.append(f"classes_per_batch={classes_per_batch} and topk={topk} must be >= 1")
        raise_if_problems("RefSAM", problems)
        self.proposer = proposer
        self.fuser = fuser
        self.neck = neck
        self.head = head
        self.criterion = criterion
        self.feature_names = feature_names
        self.query_classes = query_classes
        self.box_source = box_source
        self.classes_per_batch = classes_per_batch
        self.topk = topk
        self.topk_scope = topk_scope
        self.reference_batch_size = reference_batch_size
        self.reference_pairing = reference_pairing
        self._prepared_weight_loads = 0
        self.set_reference_bank(reference_bank)
        watch_weight_loads(proposer)  # SAM's weights loaded later: the prepared tokens are stale
        for p in self.proposer.parameters():
            p.requires_grad_(False)
        self.proposer.eval()

    @classmethod
    def from_config(cls, cfg) -> dict:
        """Yacs path (:mod:`samantics_d2.yacs_config`): the SAM of ``MODEL.SAMANTICS.BACKBONE``, the
        rest from ``MODEL.SAMANTICS.REF_SAM``, sized from the built SAM by :func:`ref_sam_heads` (``D_MODEL``,
        ``FEATURE_NAMES`` and the FUSER / NECK / TRANSFORMER / HEAD nodes); output classes: ``DATASETS.TEST[0]``'s."""
        check_yacs_config(cfg, cls.__name__)
        opts = cfg.MODEL.SAMANTICS.REF_SAM
        options = node_kwargs(opts)
        reference_bank = yacs_reference_bank(
            cfg, "MODEL.SAMANTICS.REF_SAM", references=options.pop("references"), shots=options.pop("shots"),
            features_path=options.pop("embeds_path"),
        )
        proposer = sam_proposer_from_config(cfg)
        parts = ref_sam_heads(
            proposer,
            feature_names=options.pop("feature_names") or None,
            d_model=options.pop("d_model"),
            **{name.lower(): node_kwargs(opts[name]) for name in ("FUSER", "NECK", "TRANSFORMER", "HEAD")},
        )
        return {
            **options,
            **parts,
            "proposer": proposer,
            "criterion": SetCriterion(
                matcher=HungarianMatcher(**node_kwargs(opts.MATCHER)), loss_weight=node_kwargs(opts.LOSS.LOSS_WEIGHT)
            ),
            "reference_bank": reference_bank,
        }

    # ------------------------------------------------------------------ plumbing

    @property
    def backbone(self) -> nn.Module:
        return self.proposer.backbone

    @property
    def decoder(self) -> nn.Module:
        return self.proposer.proposals.decoder

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    def train(self, mode: bool = True) -> "RefSAM":
        super().train(mode)
        self.proposer.eval()  # SAM is frozen: always in eval mode
        return self

    @torch.no_grad()
    def _encode_images(self, images: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
        """Frozen encoder on a batch: ``({name: [N, C, h, w]}, fits)``."""
        x, fits = self.backbone.prepare_with_fits(list(images))
        return self.backbone(x), fits

    def _levels(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The head's feature levels ``[N, d_model, H_l, W_l]`` from the block outputs."""
        return self.neck([features[name].float() for name in self.feature_names])

    def _input_size(self) -> float:
        return float(self.decoder.image_size)

    # ------------------------------------------------------------------ training

    def forward(self, batched_inputs: list[dict]):
        if self.training:
            return self.losses(batched_inputs)
        return self.inference(batched_inputs)

    def losses(self, batched_inputs: list[dict]) -> dict[str, torch.Tensor]:
        """Loss dict of a batch of targets with their references (see the class docstring)."""
        pairs: list[tuple[int, dict]] = []
        for i, x in enumerate(batched_inputs):
            if "instances" not in x or "references" not in x:
                raise ValueError(
                    f"RefSAM training needs 'instances' and 'references' in every input; {x.get('file_name')!r} has "
                    f"{sorted(x)}. Use RefSAMMapper for the training loader."
                )
            pairs.extend((i, ref) for ref in x["references"])
        if not pairs:  # no reference in the batch: zero losses that still reach every trainable parameter (DDP)
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return {"loss_focal": zero, "loss_bbox": zero, "loss_giou": zero}
        features, fits, prompts = self._encode_with_references(batched_inputs, [ref for _, ref in pairs])
        size = self._input_size()
        image_index = torch.tensor([i for i, _ in pairs], device=self.device)
        target_features = {k: v[: len(batched_inputs)] for k, v in features.items()}
        levels = [level.index_select(0, image_index) for level in self._levels(target_features)]
        outputs = self.head(levels, prompts)

        targets = []
        for (i, _), category in zip(pairs, self._paired_categories(batched_inputs)):
            instances = batched_inputs[i]["instances"]
            keep = instances.gt_classes == category
            boxes = fits[i].boxes_to_input(instances.gt_boxes.tensor[keep].float()) / size
            targets.append({"boxes": box_xyxy_to_cxcywh(boxes.clamp(0.0, 1.0)).to(self.device)})
        return self.criterion(outputs, targets)

    def _encode_with_references(
        self, batched_inputs: list[dict], references: list[dict]
    ) -> tuple[dict[str, torch.Tensor], list, torch.Tensor]:
        """The frozen encoder on the targets then the ``references`` (one batch), and the references'
        class prompts: ``(features {name: [N + P, C, h, w]}, fits, prompts [P, d_model])``."""
        num_targets = len(batched_inputs)
        features, fits = self._encode_images([x["image"] for x in batched_inputs] + [r["image"] for r in references])
        with torch.no_grad():
            ref_boxes = torch.stack(
                [fits[num_targets + j].boxes_to_input(torch.as_tensor(ref["box"], dtype=torch.float32).reshape(4))
                 for j, ref in enumerate(references)]
            ).to(self.device)
            tokens = mask_token_outputs(self.decoder, features["neck"][num_targets:], ref_boxes)  # [P, T, C]
        return features, fits, self.fuser(tokens.float())

    def _paired_categories(self, batched_inputs: list[dict]) -> list[int]:
        """The category each reference stands for, references of all inputs in order: its own
        ``category_id``, or with ``reference_pairing="sorted_position"`` (the published defect) the
        j-th of the sorted categories of its image's references."""
        categories = []
        for x in batched_inputs:
            own = [int(ref["category_id"]) for ref in x.get("references", [])]
            categories.extend(sorted(own) if self.reference_pairing == "sorted_position" else own)
        return categories

    # ------------------------------------------------------------------ class prompts

    def sam_fingerprint(self) -> str:
        """SHA-256 of the frozen SAM's weights (encoder + prompt decoder): ties cached tokens to them."""
        return module_fingerprint(self.proposer)

    def _tokens_provenance(
        self, items: Sequence[ReferenceInstance], class_names: Sequence[str], *, source: str
    ) -> dict[str, Any]:
        """The provenance of the tokens of ``items`` (keys: :mod:`samantics_d2.references.store`)."""
        backbone = self.backbone
        encoder = {
            "model": f"{type(backbone).__name__}:{backbone.variant}:{backbone.size}",
            "input_size": int(self.decoder.image_size),
            "sam_fingerprint": self.sam_fingerprint(),
        }
        return reference_provenance(kind="reference_tokens", source=source, num_classes=len(class_names),
                                    class_names=class_names, items=items, encoder=encoder,
                                    options={"num_tokens": num_mask_tokens(self.decoder)})

    def encode_reference_set(
        self, dataset_dicts: Sequence[dict], class_names: Sequence[str], *, source: str
    ) -> ReferenceTokens:
        """Tokens of every reference of ``dataset_dicts`` (what ``compute_embeds`` saves)."""
        return encode_references(
            backbone=self.backbone,
            decoder=self.decoder,
            dataset_dicts=dataset_dicts,
            class_names=class_names,
            batch_size=self.reference_batch_size,
            provenance=self._tokens_provenance(
                order_references(dataset_dicts, len(class_names), class_names=class_names), class_names, source=source
            ),
        )

    def set_reference_bank(self, reference_bank: Optional[ReferenceBank]) -> None:
        """Switch the eval-time label space and class prompts (a reference set or cached tokens, and
        the shots: :func:`~samantics_d2.references.build_reference_bank`); the tokens are read or
        encoded again by :meth:`prepare_references`."""
        self.reference_bank = reference_bank
        self._reference_tokens: Optional[ReferenceTokens] = None

    def prepare_references(self) -> None:
        """Read the cached tokens, or encode the reference set with the current SAM weights through
        the references store (the main process first). Call it after loading the weights, before the
        first image (:func:`samantics_d2.references.prepare_references`); ``forward`` never does, and
        raises when they are not prepared or SAM's weights were loaded since."""
        bank = self.reference_bank
        if self.box_source == "gt" or self.query_classes == "image_references":  # no class prompt from a bank
            return
        if bank is None:
            raise ValueError(
                "RefSAM in eval mode needs class prompts: set model.reference_bank (build_reference_bank with a "
                "reference set, or features_path: cached tokens)."
            )
        if bank.features_path is not None:
            tokens = ReferenceTokens.load(bank.features_path)
            expected, found = self.sam_fingerprint(), _sam_fingerprint(tokens.provenance)
            if found != expected:
                raise ValueError(
                    f"{bank.features_path!r} was computed with other SAM weights (fingerprint {found!r}, this model "
                    f"{expected!r}); compute the embeddings with the same config and checkpoint "
                    "(`tools/ref_sam_embeds.py compute`)."
                )
        else:
            classes = bank.reference_classes
            stored = bank.load_or_build(
                name="reference_tokens",
                provenance=self._tokens_provenance(bank.instances(), classes, source=bank.source),
                build=lambda: self.encode_reference_set(bank.dataset_dicts, classes, source=bank.source).to_stored(),
                what="reference tokens",
            )
            tokens = ReferenceTokens.from_stored(stored)
        self._reference_tokens = tokens
        self._prepared_weight_loads = weight_loads(self.proposer)

    def reference_tokens(self) -> ReferenceTokens:
        """The tokens of the reference bank (prepared by :meth:`prepare_references` when not yet:
        for callers outside ``forward``)."""
        if self._reference_tokens is None:
            self.prepare_references()
        return self._reference_tokens

    def prepared_reference_tokens(self) -> ReferenceTokens:
        """:meth:`reference_tokens` as ``forward`` reads them: prepared already, or a ``RuntimeError``."""
        return check_prepared(self._reference_tokens, model="RefSAM", weights="frozen SAM's", module=self.proposer,
                              loads_when_prepared=self._prepared_weight_loads)

    def class_names(self) -> list[str]:
        """The output label space."""
        if self.reference_bank is None:
            raise ValueError("RefSAM has no label space: set model.reference_bank (build_reference_bank).")
        return list(self.reference_bank.class_names)

    def class_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``prompts [K, d_model]`` of the output classes (fused from the averaged prepared tokens:
        :meth:`prepared_reference_tokens`) and ``valid [K]``."""
        tokens, valid = self.prepared_reference_tokens().class_tokens(self.class_names(), shots=self.reference_bank.shots)
        return self.fuser(tokens.to(self.device)), valid.to(self.device)

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def inference(self, batched_inputs: list[dict]) -> list[dict]:
        """Per image ``{"instances": Instances}`` (see the class docstring)."""
        if self.query_classes == "image_references" and self.box_source == "predicted":
            return self._inference_with_image_references(batched_inputs)
        features, fits = self._encode_images([x["image"] for x in batched_inputs])
        if self.box_source == "gt":
            return [{"instances": self._gt_box_instances(x, {k: v[i] for k, v in features.items()}, fits[i])}
                    for i, x in enumerate(batched_inputs)]
        prompts, valid = self.class_prompts()
        levels = self._levels(features)
        results = []
        for i, x in enumerate(batched_inputs):
            classes = torch.nonzero(valid).squeeze(1)
            if self.query_classes == "present":
                present = torch.unique(self._gt_instances(x).gt_classes.to(self.device))
                classes = classes[torch.isin(classes, present)]
            scores, labels, boxes = self._detect([level[i : i + 1] for level in levels], prompts, classes)
            results.append({"instances": self._instances(x, {k: v[i] for k, v in features.items()}, fits[i],
                                                         boxes * self._input_size(), scores, labels)})
        return results

    def _inference_with_image_references(self, batched_inputs: list[dict]) -> list[dict]:
        """The published standard test: each image queried with its own ``references`` (one per
        drawn class), encoded in one batch with the images."""
        for x in batched_inputs:
            if "references" not in x:
                raise ValueError(
                    f"RefSAM(query_classes='image_references') needs 'references' in every input; "
                    f"{x.get('file_name')!r} has {sorted(x)}. Build the test loader with RefSAMMapper(seed=...)."
                )
        references = [ref for x in batched_inputs for ref in x["references"]]
        if references:
            features, fits, prompts = self._encode_with_references(batched_inputs, references)
        else:
            features, fits = self._encode_images([x["image"] for x in batched_inputs])
        categories = torch.tensor(self._paired_categories(batched_inputs), dtype=torch.long, device=self.device)
        levels = self._levels({k: v[: len(batched_inputs)] for k, v in features.items()})
        results, start = [], 0
        for i, x in enumerate(batched_inputs):
            count = len(x["references"])
            index = torch.arange(start, start + count, device=self.device)
            start += count
            scores, rows, boxes = self._detect([level[i : i + 1] for level in levels], prompts if count else None, index)
            labels = categories[rows] if count else rows
            results.append({"instances": self._instances(x, {k: v[i] for k, v in features.items()}, fits[i],
                                                         boxes * self._input_size(), scores, labels)})
        return results

    def _detect(
        self, levels: list[torch.Tensor], prompts: Optional[torch.Tensor], classes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The best detections of one image for the prompts ``prompts[classes]``: the top ``topk`` over
        all (class, query) pairs (``topk_scope="image"``) or over the queries of each class (``"class"``).
        Returns ``scores [k]``, ``labels [k]`` (entries of ``classes``), ``boxes [k, 4]`` XYXY in [0, 1]."""
        all_scores, all_boxes = [], []
        for start in range(0, len(classes), self.classes_per_batch):
            chunk = classes[start : start + self.classes_per_batch]
            out = self.head([level.expand(len(chunk), -1, -1, -1) for level in levels], prompts[chunk])
            all_scores.append(out["pred_logits"][..., 0].sigmoid())  # [k, Q]
            all_boxes.append(out["pred_boxes"])  # [k, Q, 4]
        if not all_scores:
            empty = torch.zeros(0, device=self.device)
            return empty, empty.long(), empty.reshape(0, 4)
        scores, boxes = torch.cat(all_scores), torch.cat(all_boxes)
        num_queries = scores.shape[1]
        if self.topk_scope == "class":  # the best topk queries of each class, classes in order
            per_class = scores.topk(min(self.topk, num_queries), dim=1)
            rows = torch.arange(len(classes), device=scores.device)[:, None].expand_as(per_class.indices)
            values, indices = per_class.values.flatten(), (rows * num_queries + per_class.indices).flatten()
        else:
            values, indices = scores.flatten().topk(min(self.topk, scores.numel()))
        labels = classes[indices // num_queries]
        return values, labels, box_cxcywh_to_xyxy(boxes.flatten(0, 1)[indices]).clamp(0.0, 1.0)

    def _gt_instances(self, x: dict) -> Instances:
        if "instances" not in x:
            raise ValueError(
                f"RefSAM with query_classes='present' or box_source='gt' needs GT instances in the inputs "
                f"({x.get('file_name')!r} has none): build the test loader with DetectionMapper(is_train=True, "
                "augmentations=[])."
            )
        return x["instances"]

    def _gt_box_instances(self, x: dict, features: dict[str, torch.Tensor], fit: Any) -> Instances:
        gt = self._gt_instances(x)
        boxes = fit.boxes_to_input(gt.gt_boxes.tensor.float().to(self.device))
        scores = torch.ones(len(boxes), device=self.device)
        return self._instances(x, features, fit, boxes, scores, gt.gt_classes.to(self.device))

    def _instances(
        self, x: dict, features: dict[str, torch.Tensor], fit: Any, boxes: torch.Tensor, scores: torch.Tensor,
        labels: torch.Tensor,
    ) -> Instances:
        """Instances at the output size from boxes ``[k, 4]`` XYXY in input pixels: masks from SAM."""
        image = x["image"]
        height, width = int(x.get("height", image.shape[-2])), int(x.get("width", image.shape[-1]))
        image_h, image_w = fit.original_size
        if len(boxes):
            logits, _ = self.decoder.decode(features, boxes=boxes, multimask_output=False)
            masks = masks_to_original(logits[:, 0], fit)  # [k, h, w] on the input image's grid
        else:
            masks = torch.zeros((0, image_h, image_w), dtype=torch.bool, device=self.device)
        original_boxes = fit.boxes_to_original(boxes.float())
        if (height, width) != (image_h, image_w):  # the mapper resized the image
            masks = F.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0] > 0.5
            original_boxes = original_boxes * original_boxes.new_tensor(
                [width / image_w, height / image_h, width / image_w, height / image_h]
            )
        result = Instances((height, width))
        result.pred_boxes = Boxes(original_boxes)
        result.pred_boxes.clip((height, width))
        result.scores = scores.float()
        result.pred_classes = labels.long()
        result.pred_masks = masks
        return result


def _sam_fingerprint(provenance: Mapping[str, Any]) -> Optional[str]:
    """The SAM weights fingerprint of a tokens provenance (store files: under ``encoder``; files
    written before the store: at the top)."""
    encoder = provenance.get("encoder")
    if isinstance(encoder, Mapping) and "sam_fingerprint" in encoder:
        return encoder["sam_fingerprint"]
    return provenance.get("sam_fingerprint")
