"""Reading a reference set given as a COCO instances json (bring your own references).

The reference *annotations* are data: this module turns a COCO json into Detectron2 dataset dicts
with contiguous class ids; :mod:`samantics_d2.references` orders them and stores their features.
Registered reference sets (``shapes_train_ref5_seed0``...) are made by
:mod:`samantics_d2.data.reference_sets` and read through ``DatasetCatalog``.
"""
from __future__ import annotations

from ..d2 import load_coco_json
from ..utils.io import read_json

__all__ = ["load_reference_json"]


def load_reference_json(json_file: str, image_root: str) -> tuple[list[dict], list[str]]:
    """Read a COCO-format reference json as dataset dicts.

    Category ids become contiguous ``0..K-1`` in id order (Detectron2's convention); annotations
    keep ``"id"`` and ``"reference_rank"`` (when present). No metadata is registered.

    Returns:
        ``(dataset_dicts, class_names)``; ``K = len(class_names)`` (categories without references
        included).
    """
    content = read_json(json_file, what="a COCO instances json of reference instances")
    categories = content.get("categories") if isinstance(content, dict) else None
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{json_file!r} has no 'categories' list; a COCO instances json needs one.")
    ordered = sorted(categories, key=lambda c: c["id"])
    id_map = {c["id"]: i for i, c in enumerate(ordered)}
    dicts = load_coco_json(json_file, image_root, extra_annotation_keys=["id", "reference_rank"])
    for record in dicts:
        for ann in record["annotations"]:
            if ann["category_id"] not in id_map:
                raise ValueError(
                    f"Annotation {ann.get('id')} in {json_file!r} has category_id {ann['category_id']}, not among "
                    f"the file's categories {sorted(id_map)}."
                )
            ann["category_id"] = id_map[ann["category_id"]]
    return dicts, [str(c["name"]) for c in ordered]
