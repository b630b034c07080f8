"""Reference sets: a few annotated instances per category, picked reproducibly from a COCO json.

The training-free pipeline builds class prototypes from ``n_ref`` reference instances per category
(and RefSAM averages the tokens of its references). This package picks them:

- :class:`ReferenceSelection` holds every choice (``n_ref``, seed, order, filters) with documented
  defaults; it is written into the output json, so a reference set says how it was made.
- :func:`select_references` is a pure function from a COCO dict (or json path) to a
  :class:`ReferenceSet`: the picked annotation ids per category, and the categories left short.
- :func:`write_reference_json` writes the picks as a COCO json (atomically), the selection in its
  ``"info"`` and in a sidecar ``<name>.selection.json``.
- :func:`register_reference_set` registers a reference set of any registered COCO-format dataset
  as a dataset of its own; nothing is computed until ``DatasetCatalog.get`` (the json is then made
  once into ``$SAMANTICS_CACHE``). :func:`register_all_reference_sets`, called at import (nothing
  is read or computed then), registers the standard names (``coco_2017_train_ref{n}_seed{s}``,
  ``coco_2017_train_novel_ref{n}_seed{s}``, ``shapes_train_ref{n}_seed{s}``,
  ``shapes_train_novel_ref{n}_seed{s}``).
- Picking is greedy (rounds, below), not an optimal assignment of images to categories: when
  images are scarce a category may fall short although a different assignment would have filled it.

Guarantees:

- Same source, selection and categories -> the same picks and byte-identical json.
- Every picked instance comes from a different image (over all categories), and is not a crowd.
- **k-shot is a prefix**: the picks of a category are sorted by area, largest first (ties: smaller
  annotation id first), and the k-shot subset of a reference set is its first k picks per
  category (:meth:`ReferenceSet.k_shot`, :func:`take_k_shot`; each annotation of the json carries
  its ``"reference_rank"`` 0..n-1).
- **Nested sets**: picking is done in rounds (each category picks one instance per round, the
  categories with the fewest candidates first), and each category's candidate order depends only
  on the seed and its category id. Hence the picks made with ``n_ref=k`` are a subset of the picks
  made with ``n_ref=n >= k`` (same seed, filters and categories): the first k rounds are the same.

Modules (every name below is importable from ``samantics_d2.data.reference_sets`` itself):

- :mod:`.coco`: the COCO class lists and FSOD splits, :func:`load_coco_dict`,
  :func:`resolve_categories`, annotations as columns and RLE masks;
- :mod:`.selection`: :class:`ReferenceSelection`, :func:`select_references`, :class:`ReferenceSet`,
  :func:`take_k_shot`;
- :mod:`.files`: :func:`write_reference_json`, :func:`sidecar_path`, :func:`write_contact_sheets`;
- :mod:`.registration`: :func:`register_reference_set`, :func:`register_category_subset`, the
  standard names (:func:`register_all_reference_sets`, called at import).
"""
from __future__ import annotations

from .coco import (
    COCO_BASE_CLASSES,
    COCO_CLASSES,
    COCO_NOVEL_CLASSES,
    CategorySpec,
    load_coco_dict,
    resolve_categories,
)
from .files import sidecar_path, write_contact_sheets, write_reference_json
from .registration import (
    COCO_REFERENCE_SEEDS,
    COCO_REFERENCE_SHOTS,
    LVIS_REFERENCE_SHOTS,
    SHAPES_REFERENCE_SEEDS,
    SHAPES_REFERENCE_SHOTS,
    SHAPES_SELECTION,
    reference_cache_dir,
    register_all_reference_sets,
    register_category_subset,
    register_reference_set,
)
from .selection import ReferenceSelection, ReferenceSet, select_references, take_k_shot

# Internal helpers that tests (and code written against the single module) import from here.
from .coco import _annotation_arrays, _annotation_rle  # noqa: F401  isort: skip
from .selection import _BorderOverlap, _max_box_iou  # noqa: F401  isort: skip

__all__ = [
    "COCO_BASE_CLASSES",
    "COCO_REFERENCE_SEEDS",
    "COCO_REFERENCE_SHOTS",
    "COCO_CLASSES",
    "COCO_NOVEL_CLASSES",
    "CategorySpec",
    "LVIS_REFERENCE_SHOTS",
    "ReferenceSelection",
    "ReferenceSet",
    "SHAPES_REFERENCE_SEEDS",
    "SHAPES_REFERENCE_SHOTS",
    "SHAPES_SELECTION",
    "load_coco_dict",
    "reference_cache_dir",
    "register_all_reference_sets",
    "register_category_subset",
    "register_reference_set",
    "resolve_categories",
    "select_references",
    "sidecar_path",
    "take_k_shot",
    "write_contact_sheets",
    "write_reference_json",
]

register_all_reference_sets()
