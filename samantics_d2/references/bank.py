"""The label space and the reference set of a model, resolved once, when the config is built.

A :class:`ReferenceBank` is what a reference-prompted meta-architecture (TrainingFreeSegmenter,
RefSAM) needs to know about its classes and references, as plain data:

- the **label space**: the output class names (an evaluation dataset's ``thing_classes``, or given);
- the **reference set**: its dataset dicts (contiguous ``category_id``), its class names, where it
  came from, and how many shots per class to use; or a file of features computed earlier
  (``features_path``: RefSAM's cached tokens) whose class names are read from it;
- where the features computed from it are stored (``cache_path``; default: the store's cache
  folder, one file per provenance).

:func:`build_reference_bank` does every dataset-catalog look-up and file read; LazyConfig files call
it (``reference_bank=L(build_reference_bank)(references=..., dataset_name=..., shots=...)``) and the
yacs ``from_config`` of the meta-architectures does too, so a model never looks a dataset up. The
features themselves depend on the model's encoder weights (loaded after the config is built), so the
model computes them in ``prepare_references()`` through :meth:`ReferenceBank.load_or_build`, before
its first forward (train_net's evaluation and the tools call it).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from ..d2 import DatasetCatalog, MetadataCatalog
from ..data.reference_json import load_reference_json
from .ordering import ReferenceInstance, order_references
from .store import StoredFeatures, default_store_path, load_features, load_or_build_features, provenance_source

__all__ = ["ReferenceBank", "build_reference_bank", "dataset_class_names"]

logger = logging.getLogger(__name__)


def dataset_class_names(name: str, *, key: str = "thing_classes", where: str = "dataset_name") -> list[str]:
    """Metadata ``key`` (class names) of the registered dataset ``name``; metadata that is set when
    the dataset is loaded (``register_coco_instances``) is obtained by loading it."""
    if name not in DatasetCatalog.list():
        raise KeyError(f"{where} = {name!r} is not a registered dataset; register it first (DatasetCatalog).")
    if MetadataCatalog.get(name).get(key) is None:
        DatasetCatalog.get(name)
    classes = MetadataCatalog.get(name).get(key)
    if classes is None:
        raise ValueError(f"{where} = {name!r} has no {key!r} metadata; expected its class names there.")
    return list(classes)


@dataclass
class ReferenceBank:
    """A model's label space and reference set, resolved (see the module docstring).

    Attributes:
        class_names: the output label space (``K`` names).
        reference_classes: names of the reference set's contiguous class ids (with ``features_path``:
            those stored in the file, read when the features are; empty until then when the label
            space is given).
        dataset_dicts: the reference annotations (empty with ``features_path``).
        source: where they came from (a registered name, a json path, ``"<dataset dicts>"``).
        shots: use the first ``shots`` references of every class (None: all).
        features_path: a features file computed earlier instead of ``dataset_dicts``.
        cache_path: where computed features are stored (None: the store's default).
    """

    class_names: list[str]
    reference_classes: list[str]
    dataset_dicts: list[dict] = field(default_factory=list, repr=False)
    source: str = "<dataset dicts>"
    shots: Optional[int] = None
    features_path: Optional[str] = None
    cache_path: Optional[str] = None

    def __post_init__(self) -> None:
        shots = self.shots
        if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
            raise ValueError(f"ReferenceBank got shots={self.shots!r}; expected a positive int, or None for all.")
        if not self.class_names:
            raise ValueError("ReferenceBank got an empty label space (class_names); expected at least one class.")
        if not self.reference_classes and self.features_path is None:
            raise ValueError(f"ReferenceBank: the reference set {self.source!r} names no class.")

    def replace(self, **changes: Any) -> "ReferenceBank":
        """A copy with ``changes`` (e.g. ``shots=3``)."""
        return dataclasses.replace(self, **changes)

    def instances(self) -> list[ReferenceInstance]:
        """The reference instances in the one order (:func:`order_references`)."""
        return order_references(self.dataset_dicts, len(self.reference_classes), class_names=self.reference_classes)

    def output_index(self, *, require_all: bool) -> list[Optional[int]]:
        """For every reference class, its index in :attr:`class_names` (matched by name; None when
        absent). ``require_all``: a reference class absent from the label space is an error."""
        index = {name: j for j, name in enumerate(self.class_names)}
        unknown = [name for name in self.reference_classes if name not in index]
        if unknown and require_all:
            raise ValueError(
                f"Reference classes {unknown} of {self.source!r} are not among the output classes {self.class_names}; "
                "use references of the evaluated classes (or set class_names)."
            )
        return [index.get(name) for name in self.reference_classes]

    def load_or_build(
        self, *, name: str, provenance: dict[str, Any], build: Callable[[], StoredFeatures], what: str
    ) -> StoredFeatures:
        """Features of the reference set through the store: ``features_path`` when set (read as is:
        the caller checks its provenance), else the stored file whose provenance equals
        ``provenance`` or ``build()`` stored at ``cache_path`` (default: the store's cache folder)."""
        if self.features_path is not None:
            return load_features(self.features_path)
        path = self.cache_path or default_store_path(provenance, name=f"{name}-{self.source}")
        return load_or_build_features(path, provenance=provenance, build=build, what=what)


def build_reference_bank(
    *,
    references: Union[str, Sequence[dict], None] = None,
    reference_classes: Optional[Sequence[str]] = None,
    image_root: Optional[str] = None,
    features_path: Optional[str] = None,
    dataset_name: Optional[str] = None,
    class_names: Optional[Sequence[str]] = None,
    shots: Optional[int] = None,
    cache_path: Optional[str] = None,
) -> ReferenceBank:
    """Resolve a label space and a reference set (the one place that looks them up).

    Args:
        references: a registered reference-set dataset (``shapes_train_ref5_seed0``,
            ``coco_2017_train_novel_ref30_seed0``...), a COCO json of references (with ``image_root``),
            or dataset dicts with contiguous ``category_id`` (then ``reference_classes`` names them).
        reference_classes: class names of the reference ids (default: the dataset's ``thing_classes``).
        image_root: the image folder of a reference json (default: the json's folder).
        features_path: instead of ``references``: a features file computed earlier (RefSAM tokens,
            ``tools/ref_sam_embeds.py compute``), read by the model's ``prepare_references`` (now only
            when the label space is its classes: no ``dataset_name`` nor ``class_names``).
        dataset_name: the output label space is this registered dataset's ``thing_classes``.
        class_names: or the output classes given (default, with neither: the reference classes).
        shots: references per class to use (None: all).
        cache_path: where computed features are stored (default: the store's cache folder).
    """
    if (references is None) == (features_path is None):
        raise ValueError(
            "build_reference_bank: give exactly one of references (a reference set) and features_path (cached "
            f"features); got references={references!r:.80} and features_path={features_path!r}."
        )
    if class_names is not None and dataset_name is not None:
        raise ValueError(f"build_reference_bank: give class_names or dataset_name ({dataset_name!r}), not both.")
    dicts: list[dict] = []
    if features_path is not None:
        classes, source = [], os.fspath(features_path)
        if dataset_name is None and class_names is None:  # the label space is the file's classes: read them now
            stored = load_features(features_path)
            if stored.class_names is None:
                raise ValueError(f"{features_path!r} stores no class names: it is not a reference-tokens file.")
            classes, source = list(stored.class_names), str(provenance_source(stored.provenance) or features_path)
    elif isinstance(references, str) and references in DatasetCatalog.list():
        dicts = DatasetCatalog.get(references)
        classes = list(reference_classes) if reference_classes is not None else dataset_class_names(
            references, where="references")
        source = references
    elif isinstance(references, (str, os.PathLike)):
        if not os.path.isfile(references):
            raise KeyError(
                f"references = {references!r} is neither a registered reference set (e.g. shapes_train_ref5_seed0) "
                "nor a COCO json file; register it first (DatasetCatalog) or give the path of a json."
            )
        root = image_root if image_root is not None else os.path.dirname(os.path.abspath(references))
        dicts, classes = load_reference_json(os.fspath(references), root)
        source = os.path.abspath(references)
    else:
        if reference_classes is None:
            raise ValueError("build_reference_bank: references given as dataset dicts need reference_classes "
                             "(the names of their contiguous category ids).")
        dicts, classes, source = list(references), list(reference_classes), "<dataset dicts>"
    if dataset_name is not None:
        output = dataset_class_names(dataset_name)
    else:
        output = list(class_names) if class_names is not None else list(classes)
    return ReferenceBank(class_names=output, reference_classes=classes, dataset_dicts=dicts, source=source,
                         shots=shots, features_path=features_path, cache_path=cache_path)

