"""The yacs plug-in path: build this project's models inside a Detectron2 codebase from a yacs config.

::

    from samantics_d2 import add_samantics_config
    from samantics_d2.d2 import DefaultPredictor, build_model, get_cfg

    cfg = get_cfg()
    add_samantics_config(cfg)               # our keys, under cfg.MODEL.SAMANTICS
    cfg.merge_from_file("configs/yacs/training_free_shapes.yaml")
    model = build_model(cfg)                # or DefaultPredictor(cfg), DefaultTrainer(cfg)
    prepare_references(model)               # samantics_d2.references: reference features, after loading weights

Every registered meta-architecture and backbone has Detectron2's ``@configurable`` ``__init__`` and
a ``from_config`` classmethod: called with a config it reads the keys below, otherwise it takes
keyword arguments as before (the LazyConfig path). ``from_config`` builds the sub-modules with the
builders the LazyConfig files call (``build_encoder``, ``build_sam_proposer``), loads the encoder
weights (``PRETRAINED``) and resolves the label space from the dataset metadata, at build time.

Each option node holds the keyword options of the class or builder it configures, upper-cased,
with that class's defaults (``CLASSIFIER.NMS_THRESH`` is ``PrototypeClassifier(nms_thresh=...)``):
the constructors' docstrings document the keys.

``cfg.MODEL.SAMANTICS``:
    BACKBONE: ``build_encoder`` options (TAG, SIZE, PRETRAINED, WEIGHTS, INPUT_SIZE, FIT, OUT_FEATURES)
        of the image encoder: SAM / HQ-SAM / SAM 2 for TrainingFreeSegmenter, RefSAM and
        PromptableSamTrainer (their prompt decoder comes from the same checkpoint), the probed
        encoder for LinearProbe; also what ``build_backbone`` builds when ``MODEL.BACKBONE.NAME`` is
        one of our backbones (architecture only: weights then come from ``MODEL.WEIGHTS``).
    SEMANTIC_ENCODER: ``build_encoder`` options of TrainingFreeSegmenter's semantic encoder (DINOv2).
    PROPOSALS: ``PointGridProposals`` options (the SAM point grid).
    TRAINING_FREE: ``TrainingFreeSegmenter`` options, the reference set (REFERENCES: a registered
        reference set; SHOTS; MEMORY_BANK_PATH: where its memory bank is stored, default the
        references store's cache), with CLASSIFIER (``PrototypeClassifier``) and MEMORY_BANK
        (``MemoryBankConfig``).
    REF_SAM: ``RefSAM`` options, its references (REFERENCES or EMBEDS_PATH, SHOTS) and D_MODEL, with
        FUSER, NECK, TRANSFORMER, HEAD, MATCHER and LOSS (``TokenFuser``, ``MultiLevelNeck``,
        ``DeformableTransformer``, ``RefDETRHead``, ``HungarianMatcher``, ``SetCriterion``); the sizes
        that must agree with the SAM (tokens, widths, levels) are taken from the built SAM
        (``ref_sam_heads``); the loss weights are LOSS.LOSS_WEIGHT.{LOSS_FOCAL, LOSS_BBOX, LOSS_GIOU}.
    LINEAR_PROBE: ``LinearProbe`` options. SAM_TRAINER: ``PromptableSamTrainer`` options (loss weights:
        SAM_TRAINER.LOSS_WEIGHT.{LOSS_MASK_FOCAL, LOSS_MASK_DICE, LOSS_IOU}).
    TINY_SEGMENTER: ``TinySegmenter`` options (pixel statistics: ``MODEL.PIXEL_MEAN/STD``).
    CLICK: ``ClickSegmenter`` options (MAX_CLICKS, CLICK_BOX, KEEP_ALL_CANDIDATES) with GRANULARITY
        (``MultiGranularityDecoder``) over the prompt decoder of the SAM of BACKBONE; LABELS: True
        labels the first click's candidates with the TrainingFreeSegmenter of this config
        (SEMANTIC_ENCODER, TRAINING_FREE: its reference set, classifier and memory bank), which shares
        the click model's SAM.
    OPEN_VOCAB: ``OpenVocabPromptedSegmenter`` options (the SAM of BACKBONE, prompted with the
        input's boxes or points), with CLIP (``build_encoder`` options of the CLIP image tower; its
        text tower is built from the same TAG, SIZE, WEIGHTS and PRETRAINED), RECOGNIZER (NAME: a
        class of ``MASK_RECOGNIZER_REGISTRY``, ``CropRecognizer`` or ``DensePoolRecognizer``; one
        node of options per registered class, named in upper snake case: CROP_RECOGNIZER...),
        TEXT_PROTOTYPES (``load_or_build_text_prototypes``: TEMPLATES, NAME, PATH...) and
        CLASSIFIER (``OpenVocabClassifier``; text prototypes only on this path).

Label spaces: TrainingFreeSegmenter and RefSAM output the ``thing_classes`` of
``DATASETS.TEST[0]`` (default: their reference classes), resolved with the reference set in
``from_config`` (:func:`yacs_reference_bank`); TinySegmenter (``thing_classes``) and
LinearProbe (``classes``) learn the classes of ``DATASETS.TRAIN[0]``, else ``DATASETS.TEST[0]``;
OpenVocabPromptedSegmenter's vocabulary is the ``thing_classes`` of ``DATASETS.TEST[0]``, its text
prototypes built (or read from the cache) in ``from_config``; ClickSegmenter's labels are its label
model's classes. These two take more than an image per input (ClickSegmenter: the GT segments to
click, ``samantics_d2.data.panoptic.ClickMapper``; OpenVocabPromptedSegmenter: the prompts,
``samantics_d2.data.prompted.PromptedRecognitionMapper``): build their test loader with that mapper;
``DefaultPredictor``'s image-only call is refused with a message naming it.
Every model takes RGB images: set ``INPUT.FORMAT: RGB``.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

from .d2 import CfgNode, DatasetCatalog
from .references import ReferenceBank, build_reference_bank, dataset_class_names

__all__ = [
    "check_yacs_config",
    "dataset_classes",
    "node_kwargs",
    "options_node",
    "registered_dataset",
    "registry_choice",
    "registry_node",
    "yacs_reference_bank",
]

_YACS_TYPES = (tuple, list, str, int, float, bool, type(None))


def options_node(target: Callable, *, exclude: Iterable[str] = (), **extra: Any) -> CfgNode:
    """A ``CfgNode`` of ``target``'s keyword options and their defaults, names upper-cased.

    Args:
        target: a class or function.
        exclude: options not in the node (built sub-modules, options resolved from other keys).
            An option whose default is a mapping becomes a sub-node of upper-cased keys (``loss_weight``
            -> ``LOSS_WEIGHT.LOSS_BBOX``); :func:`node_kwargs` leaves sub-nodes out, so the model's
            ``from_config`` passes ``node_kwargs(node.LOSS_WEIGHT)``.
        extra: more keys (upper-case) or values for options without a default.
    """
    node = CfgNode()
    skip = set(exclude)
    for name, param in inspect.signature(target).parameters.items():
        if name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is param.empty:
            assert name.upper() in extra, f"{target.__name__}: give {name.upper()}=... for {name!r} (no default)"
            continue
        if isinstance(param.default, Mapping):  # e.g. loss_weight: a sub-node, read back by node_kwargs(node.LOSS_WEIGHT)
            node[name.upper()] = CfgNode({key.upper(): value for key, value in param.default.items()})
            continue
        assert isinstance(param.default, _YACS_TYPES), (target.__name__, name, param.default)
        node[name.upper()] = param.default
    node.update(extra)
    return node


def node_kwargs(node: CfgNode) -> dict[str, Any]:
    """The keyword arguments a node of :func:`options_node` stands for (sub-nodes left out)."""
    return {key.lower(): value for key, value in node.items() if not isinstance(value, CfgNode)}


def _registry_key(name: str) -> str:
    """The node name of registered class ``name``: ``CropRecognizer`` -> ``CROP_RECOGNIZER``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def registry_node(registry: Iterable, *, default: str, exclude: Iterable[str] = ()) -> CfgNode:
    """A node that picks a class of ``registry`` by ``NAME`` (default ``default``), as Detectron2's
    ``MODEL.BACKBONE.NAME`` does, with one :func:`options_node` per registered class (``exclude``: the
    built sub-modules), named in upper snake case (``CropRecognizer`` -> ``CROP_RECOGNIZER``)."""
    node = CfgNode()
    node.NAME = default
    for name, cls in registry:
        node[_registry_key(name)] = options_node(cls, exclude=exclude)
    return node


def registry_choice(node: CfgNode, registry: Any, key: str) -> tuple[Callable, dict[str, Any]]:
    """``(class, keyword options)`` of a :func:`registry_node` (``key``: where it is, for messages)."""
    names = sorted(name for name, _ in registry)
    if node.NAME not in names:
        raise KeyError(f"cfg.{key}.NAME = {node.NAME!r} is not registered; expected one of {names} (or register the "
                       "class first).")
    options = _registry_key(node.NAME)
    if options not in node:
        raise KeyError(f"cfg.{key} has no {options} node for {node.NAME!r} (registered after add_samantics_config was "
                       "called?); register the class before calling add_samantics_config.")
    return registry.get(node.NAME), node_kwargs(node[options])


def check_yacs_config(cfg: CfgNode, owner: str) -> None:
    """A config ``owner.from_config`` can read: with our keys, and ``INPUT.FORMAT`` RGB (our models take RGB)."""
    if "SAMANTICS" not in cfg.MODEL:
        raise KeyError(
            f"{owner} reads cfg.MODEL.SAMANTICS, which this config lacks: call samantics_d2.add_samantics_config(cfg) "
            "on get_cfg()'s config before merge_from_file."
        )
    if cfg.INPUT.FORMAT != "RGB":
        raise ValueError(
            f"{owner} takes RGB images, but cfg.INPUT.FORMAT is {cfg.INPUT.FORMAT!r}. Set INPUT.FORMAT: RGB in the "
            "config (DefaultPredictor then converts its BGR input, and the data loaders read RGB)."
        )


def dataset_classes(cfg: CfgNode, *, key: str, splits: Iterable[str]) -> Optional[list[str]]:
    """Metadata ``key`` (class names) of the first dataset of the first non-empty ``cfg.DATASETS.<split>``.

    Returns None when every split named is empty. Metadata that is set when the dataset is loaded
    (``register_coco_instances``) is obtained by loading it.
    """
    for split in splits:
        names = cfg.DATASETS[split]
        if not len(names):
            continue
        return dataset_class_names(names[0], key=key, where=f"cfg.DATASETS.{split}[0]")
    return None


def registered_dataset(name: Optional[str], key: str) -> Optional[str]:
    """``name`` after checking it is a registered dataset (None and "" pass through as None)."""
    if not name:
        return None
    if name not in DatasetCatalog.list():
        raise KeyError(f"cfg.{key} = {name!r} is not a registered dataset; register it first (DatasetCatalog).")
    return name


def yacs_reference_bank(
    cfg: CfgNode,
    key: str,
    *,
    references: Optional[str],
    shots: Optional[int],
    cache_path: Optional[str] = None,
    features_path: Optional[str] = None,
) -> ReferenceBank:
    """The :class:`~samantics_d2.references.ReferenceBank` of a yacs config, resolved at build time:
    the reference set ``references`` (a registered dataset, named at ``cfg.<key>.REFERENCES``) or
    ``features_path``, and the label space of ``DATASETS.TEST[0]`` (none: the reference classes)."""
    test = list(cfg.DATASETS.TEST)
    return build_reference_bank(
        references=registered_dataset(references, f"{key}.REFERENCES"),
        features_path=features_path or None,
        dataset_name=test[0] if test else None,
        shots=shots,
        cache_path=cache_path or None,
    )
