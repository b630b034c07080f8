"""Dataset registration: a reference set (or a category subset) of any registered COCO-format dataset
as a lazily computed dataset of its own, cached under ``$SAMANTICS_CACHE``, and the standard names."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ...utils.io import cache_root
from .coco import CategorySpec, PathManager, load_coco_dict, resolve_categories
from .files import write_reference_json
from .selection import _FORMAT_VERSION, ReferenceSelection, select_references

__all__ = [
    "reference_cache_dir",
    "register_all_reference_sets",
    "register_category_subset",
    "register_reference_set",
]

logger = logging.getLogger(__name__)

def reference_cache_dir() -> Path:
    """``$SAMANTICS_CACHE/reference_sets`` (default ``~/.cache/samantics_d2/reference_sets``)."""
    return Path(cache_root()) / "reference_sets"


def _source_json(source: str) -> tuple[str, str]:
    """``(json_file, image_root)`` of a registered COCO-format dataset, without loading it when
    possible: from its metadata (the builtin COCO/LVIS names get theirs when registered, by us or by
    Detectron2), else by loading it once (datasets generated on first use, like the shapes)."""
    from samantics_d2.d2 import DatasetCatalog, MetadataCatalog

    from ..builtin import BUILTIN_COCO, BUILTIN_LVIS

    if source not in DatasetCatalog:
        raise KeyError(
            f"Reference-set source dataset {source!r} is not registered; register it (e.g. with "
            "register_coco_instances) first. Registered: " + ", ".join(sorted(DatasetCatalog.keys()))
        )
    meta = MetadataCatalog.get(source)
    json_file, image_root = meta.get("json_file"), meta.get("image_root")
    builtin = source in BUILTIN_COCO or source in BUILTIN_LVIS  # a missing file is reported below
    if not builtin and (json_file is None or not PathManager.exists(os.fspath(json_file))):
        DatasetCatalog.get(source)  # generated datasets write their json on first use
        json_file, image_root = meta.get("json_file"), meta.get("image_root")
    if json_file is None or image_root is None:
        raise ValueError(
            f"Dataset {source!r} has no json_file / image_root in its metadata; reference sets need a COCO-format "
            "dataset registered with register_coco_instances."
        )
    json_file = os.fspath(json_file)
    if not PathManager.exists(json_file):
        raise FileNotFoundError(
            f"The json of dataset {source!r}, {json_file!r}, does not exist; set DETECTRON2_DATASETS to the folder "
            "holding the datasets (datasets/README.md)."
        )
    return json_file, os.fspath(image_root)


def _reference_json_path(
    name: str, json_file: str, selection: ReferenceSelection, categories: CategorySpec, output_dir: Optional[Path]
) -> Path:
    """Where the reference json of ``name`` lives; its file name hashes everything it depends on."""
    local = PathManager.get_local_path(json_file)
    stat = os.stat(local)
    key = json.dumps(
        {
            "source": os.path.abspath(local),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "selection": selection.to_dict(),
            "categories": categories if categories is None or isinstance(categories, str) else list(categories),
            "format_version": _FORMAT_VERSION,
        },
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:10]
    return (output_dir or reference_cache_dir()) / f"{name}-{digest}.json"


def register_reference_set(
    name: str,
    *,
    source: str,
    selection: ReferenceSelection,
    categories: CategorySpec = None,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    metadata: Optional[Mapping[str, Any]] = None,
) -> None:
    """Register ``name`` as the reference set of the registered COCO-format dataset ``source``.

    Registering computes and reads nothing. On the first ``DatasetCatalog.get(name)`` the source's
    json is read, the references selected and written to
    ``<output_dir or reference_cache_dir()>/<name>-<hash>.json`` (the hash covers the source file
    and the selection, so a changed source or selection makes a new file); later calls reuse it.
    Concurrent processes may both write it: the writes are atomic and byte-identical.

    The dataset dicts are loaded with ``load_coco_json`` (contiguous ids of the selected categories)
    and keep ``"id"``, ``"area"`` and ``"reference_rank"`` per annotation (see :func:`take_k_shot`).
    Metadata: ``evaluator_type="coco"``, ``reference_source``, ``reference_selection`` and
    ``metadata`` at once; ``json_file``, ``image_root``, ``thing_classes`` on first load.
    """
    from samantics_d2.d2 import DatasetCatalog, MetadataCatalog, load_coco_json

    from ..builtin import set_paths_if_missing

    if not isinstance(selection, ReferenceSelection):
        raise TypeError(f"register_reference_set({name!r}) got selection={selection!r}; expected a ReferenceSelection.")
    out_dir = Path(os.path.expanduser(os.fspath(output_dir))) if output_dir is not None else None

    def load() -> list[dict]:
        json_file, image_root = _source_json(source)
        path = _reference_json_path(name, json_file, selection, categories, out_dir)
        if not path.exists():
            logger.info("Creating reference set %r from %s into %s.", name, json_file, path)
            write_reference_json(select_references(json_file, selection, categories=categories), path)
        set_paths_if_missing(name, json_file=str(path), image_root=image_root)
        return load_coco_json(str(path), image_root, name, extra_annotation_keys=["id", "area", "reference_rank"])

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        evaluator_type="coco",
        reference_source=source,
        reference_selection=selection.to_dict(),
        **dict(metadata or {}),
    )



def register_category_subset(name: str, *, source: str, categories: CategorySpec) -> None:
    """Register ``name``: the COCO-format dataset ``source`` (every image) restricted to ``categories``
    (e.g. ``coco_2017_val_novel``, the COCO-FSOD novel-class evaluation set).

    Lazy like :func:`register_reference_set`: the filtered json is written on first use to
    ``reference_cache_dir()/../splits/<name>-<hash of the source file>.json`` and reused; contiguous ids
    follow the kept categories, so they match reference sets of the same ``categories``.
    """
    from samantics_d2.d2 import DatasetCatalog, MetadataCatalog, load_coco_json

    from ..builtin import set_paths_if_missing
    from ..shapes import write_split_json

    def load() -> list[dict]:
        json_file, image_root = _source_json(source)
        stat = os.stat(json_file)
        key = hashlib.sha256(f"{os.path.abspath(json_file)}:{stat.st_size}:{stat.st_mtime_ns}:{categories}".encode())
        path = reference_cache_dir().parent / "splits" / f"{name}-{key.hexdigest()[:10]}.json"
        if not path.exists():
            coco_categories = load_coco_dict(json_file)["categories"]
            ids = set(resolve_categories(categories, coco_categories))
            names = [c["name"] for c in coco_categories if c["id"] in ids]
            path.parent.mkdir(parents=True, exist_ok=True)
            logger.info("Writing %s: %s restricted to %d categories.", path, json_file, len(names))
            write_split_json(json_file, names, str(path))
        set_paths_if_missing(name, json_file=str(path), image_root=image_root)
        return load_coco_json(str(path), image_root, name)

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(evaluator_type="coco", subset_of=source)

# Standard names: n references per category, seeds 0..9 (the seed study of "No Time to Train").
COCO_REFERENCE_SHOTS: tuple[int, ...] = (1, 2, 3, 5, 10, 30)
COCO_REFERENCE_SEEDS: tuple[int, ...] = tuple(range(10))
LVIS_REFERENCE_SHOTS: tuple[int, ...] = (1, 5, 10)
# shapes_train has 64 images: 8 classes x 5 distinct images fit, 8 x 10 would not.
SHAPES_REFERENCE_SHOTS: tuple[int, ...] = (1, 3, 5)
SHAPES_REFERENCE_SEEDS: tuple[int, ...] = (0, 1, 2)
# The synthetic shapes are small images: no absolute area floor, the share of the image decides.
SHAPES_SELECTION = ReferenceSelection(min_area=None, min_area_fraction=0.002, border_frame=2)


def register_all_reference_sets(*, output_dir: Optional[Union[str, os.PathLike]] = None) -> list[str]:
    """Register the standard reference sets not registered yet (lazily; see :func:`register_reference_set`).

    - ``coco_2017_train_ref{n}_seed{s}``: all 80 classes, from ``coco_2017_train``;
    - ``coco_2017_train_novel_ref{n}_seed{s}``: the 20 COCO-FSOD novel classes;
    - ``shapes_train_ref{n}_seed{s}``: from ``shapes_train`` with :data:`SHAPES_SELECTION`;
    - ``shapes_train_novel_ref{n}_seed{s}``: its novel classes (``SHAPES_SPLITS["novel"]``);
    - ``lvis_v1_train_ref{n}_seed0``: all LVIS v1 classes, from ``lvis_v1_train``;
    - ``coco_2017_val_novel`` / ``coco_2017_val_base``: COCO val restricted to the COCO-FSOD splits.

    for ``n`` in :data:`COCO_REFERENCE_SHOTS` / :data:`SHAPES_REFERENCE_SHOTS` and ``s`` in the
    matching seeds. Returns the names registered by this call.
    """
    from samantics_d2.d2 import DatasetCatalog

    from ..shapes import SHAPES_SPLITS

    table: list[tuple[str, str, ReferenceSelection, CategorySpec]] = []
    for n in COCO_REFERENCE_SHOTS:
        for s in COCO_REFERENCE_SEEDS:
            selection = ReferenceSelection(n_ref=n, seed=s)
            table.append((f"coco_2017_train_ref{n}_seed{s}", "coco_2017_train", selection, None))
            table.append((f"coco_2017_train_novel_ref{n}_seed{s}", "coco_2017_train", selection, "novel"))
    for n in LVIS_REFERENCE_SHOTS:
        table.append((f"lvis_v1_train_ref{n}_seed0", "lvis_v1_train", ReferenceSelection(n_ref=n, seed=0), None))
    for n in SHAPES_REFERENCE_SHOTS:
        for s in SHAPES_REFERENCE_SEEDS:
            selection = dataclasses.replace(SHAPES_SELECTION, n_ref=n, seed=s)
            table.append((f"shapes_train_ref{n}_seed{s}", "shapes_train", selection, None))
            novel = list(SHAPES_SPLITS["novel"])
            table.append((f"shapes_train_novel_ref{n}_seed{s}", "shapes_train", selection, novel))
    names = []
    for name, source, categories in (("coco_2017_val_novel", "coco_2017_val", "novel"),
                                     ("coco_2017_val_base", "coco_2017_val", "base")):
        if name not in DatasetCatalog.list():
            register_category_subset(name, source=source, categories=categories)
            names.append(name)
    for name, source, selection, categories in table:
        if name not in DatasetCatalog.list():
            register_reference_set(
                name, source=source, selection=selection, categories=categories, output_dir=output_dir
            )
            names.append(name)
    return names
