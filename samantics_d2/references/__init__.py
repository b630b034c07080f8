"""Reference sets and their cached features: one store, one ordering, one resolved label space.

- :mod:`.ordering`: the one order of reference instances (category id, shot rank, annotation id)
  and their shot ranks (:func:`order_references`);
- :mod:`.store`: the one store of computed reference features (safetensors + JSON provenance,
  atomic writes under ``cache_root()``, a hit only on an exactly equal provenance);
- :mod:`.preparation`: the one step that prepares a model's reference features after its weights
  are loaded (:func:`prepare_references`), and the guard that keeps ``forward`` from using features
  prepared with other weights (:func:`check_prepared`);
- :mod:`.bank`: :class:`ReferenceBank`, a model's label space and reference set resolved when the
  config is built (:func:`build_reference_bank`), passed into the meta-architectures.

The selection of reference annotations from a dataset lives in :mod:`samantics_d2.data`
(``reference_sets``, ``reference_json``); the math on the features (prototypes, token fusion) in
:mod:`samantics_d2.modeling`. docs/references.md describes the store.
"""
from .bank import ReferenceBank, build_reference_bank, dataset_class_names
from .ordering import ORDERING, ReferenceInstance, order_references, references_digest
from .preparation import check_prepared, prepare_references, watch_weight_loads, weight_loads
from .store import (
    StoredFeatures,
    default_store_path,
    load_features,
    load_or_build_features,
    provenance_source,
    reference_provenance,
    save_features,
)

__all__ = [
    "ORDERING",
    "ReferenceBank",
    "ReferenceInstance",
    "StoredFeatures",
    "build_reference_bank",
    "check_prepared",
    "dataset_class_names",
    "default_store_path",
    "load_features",
    "load_or_build_features",
    "order_references",
    "prepare_references",
    "provenance_source",
    "reference_provenance",
    "references_digest",
    "save_features",
    "watch_weight_loads",
    "weight_loads",
]
