"""Class vocabularies for open-vocabulary recognition: lists of class names, read by configs and tools.

A vocabulary is a list of class names; a name may hold synonyms (``"sofa/couch"``), which
:func:`~samantics_d2.modeling.semantic.text_prototypes.split_synonyms` splits when the text
prototypes are computed. The modeling side takes the list; it never imports this module.

- ``coco``: the 80 COCO classes (COCO category-id order);
- ``coco_ov`` / ``coco_ov_base`` / ``coco_ov_novel``: the COCO open-vocabulary split of OVR-CNN
  (Zareian et al., CVPR 2021), used by ViLD, Detic and OVSAM: 65 classes, 48 base and 17 novel;
  the other 15 COCO classes have no WordNet synset and are left out. OVSAM's code gives the same
  split as 0-based COCO indices (``ext/class_names/coco_4817_ids.py``); the tests check it;
- ``lvis_v1``: the 1203 LVIS v1 classes, read from the LVIS v1 annotation file's ``categories``
  (names in id order, with LVIS's own synonyms joined by ``"/"``): the names are not copied here;
- ``shapes``: the synthetic shapes classes (``"red circle"``...);
- a file: one class per line, its synonyms separated by ``"/"`` or ``","``; blank lines and lines
  starting with ``#`` are skipped (:func:`read_vocabulary`);
- a command-line list: ``"cat,dog,traffic light"``, classes separated by ``","``, synonyms of one
  class by ``"/"`` (:func:`parse_class_list`).
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

from ..d2 import MetadataCatalog
from ..modeling.semantic.text_prototypes import split_synonyms
from .reference_sets import COCO_CLASSES
from .shapes import SHAPES_CLASSES

__all__ = [
    "COCO_OV_BASE_CLASSES",
    "COCO_OV_CLASSES",
    "COCO_OV_NOVEL_CLASSES",
    "LVIS_V1_NUM_CLASSES",
    "VOCABULARIES",
    "get_vocabulary",
    "lvis_v1_class_names",
    "parse_class_list",
    "read_vocabulary",
]

# The 17 novel classes of the COCO open-vocabulary split (OVR-CNN), COCO order.
COCO_OV_NOVEL_CLASSES: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
    "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)  # fmt: skip
# The 15 COCO classes outside the split (no WordNet synset in OVR-CNN's protocol).
_COCO_OV_UNUSED: tuple[str, ...] = (
    "traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball", "baseball bat",
    "baseball glove", "tennis racket", "wine glass", "hot dog", "potted plant", "dining table",
    "cell phone", "teddy bear", "hair drier",
)  # fmt: skip
# The 48 base classes: the rest of COCO, COCO order.
COCO_OV_BASE_CLASSES: tuple[str, ...] = tuple(
    c for c in COCO_CLASSES if c not in COCO_OV_NOVEL_CLASSES and c not in _COCO_OV_UNUSED
)
# The 65 classes of the split, COCO order.
COCO_OV_CLASSES: tuple[str, ...] = tuple(c for c in COCO_CLASSES if c not in _COCO_OV_UNUSED)

LVIS_V1_NUM_CLASSES = 1203
_LVIS_V1_DATASET = "lvis_v1_val"  # registered by samantics_d2.data.builtin; its json holds the categories


def _vocabulary_error(path: str, line: int, text: str, why: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {why} (got {text!r}). Expected one class per line, synonyms separated by '/' or ','.")


def read_vocabulary(path: Union[str, os.PathLike]) -> list[str]:
    """The class names of a vocabulary file (module docstring), synonyms joined by ``"/"``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming the file and line: not UTF-8, an empty synonym, a class given twice, or
            no class at all.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such vocabulary file; expected one class name per line. Check the path.")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save the vocabulary as UTF-8.") from e
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            name = "/".join(split_synonyms(text))
        except ValueError:
            raise _vocabulary_error(path, number, text, "a synonym is empty") from None
        if name in first_line:
            raise _vocabulary_error(path, number, text, f"the class is already given on line {first_line[name]}")
        first_line[name] = number
        names.append(name)
    if not names:
        raise ValueError(f"{path}: no class names (only blank or '#' lines); write one class per line.")
    return names


def parse_class_list(text: str) -> list[str]:
    """``"cat,dog/puppy,traffic light"`` -> ``["cat", "dog/puppy", "traffic light"]``.

    Raises:
        ValueError: an empty class or synonym, or a class given twice (the message names it).
    """
    names = []
    for item in text.split(","):
        try:
            names.append("/".join(split_synonyms(item)))
        except ValueError:
            raise ValueError(
                f"Class list {text!r} has an empty class or synonym ({item!r}); separate classes by ',' and the "
                "synonyms of one class by '/', e.g. 'cat,dog/puppy,traffic light'."
            ) from None
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"Class list {text!r} names {repeated} more than once; name each class once.")
    return names


def lvis_v1_class_names(json_file: Optional[Union[str, os.PathLike]] = None, *, synonyms: bool = True) -> list[str]:
    """The LVIS v1 class names in category-id order, read from an LVIS v1 annotation file.

    Args:
        json_file: default: the file registered for ``lvis_v1_val`` (``$DETECTRON2_DATASETS/lvis/lvis_v1_val.json``).
        synonyms: join each category's ``synonyms`` to its name with ``"/"`` (the name first).

    Raises:
        FileNotFoundError: the file is absent (naming it and where it comes from).
        ValueError: the file has no ``categories``, or their ids are not ``1..K``; a builtin file
            must have 1203.
    """
    builtin = json_file is None
    path = os.fspath(MetadataCatalog.get(_LVIS_V1_DATASET).json_file if builtin else json_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no LVIS v1 annotation file; the LVIS vocabulary is read from its 'categories'. Download "
            "lvis_v1_val.json (https://www.lvisdataset.org/dataset) into $DETECTRON2_DATASETS/lvis/ as in "
            "datasets/README.md, or pass json_file."
        )
    with open(path, encoding="utf-8") as f:
        categories = json.load(f).get("categories")
    if not categories:
        raise ValueError(f"{path}: no 'categories' list; expected an LVIS v1 annotation file.")
    categories = sorted(categories, key=lambda c: c["id"])
    if [c["id"] for c in categories] != list(range(1, len(categories) + 1)):
        raise ValueError(f"{path}: category ids are not 1..{len(categories)}; expected an LVIS v1 annotation file.")
    if builtin and len(categories) != LVIS_V1_NUM_CLASSES:
        raise ValueError(f"{path}: {len(categories)} categories, LVIS v1 has {LVIS_V1_NUM_CLASSES}; is it LVIS v0.5?")
    names = []
    for c in categories:
        parts = [c["name"], *c.get("synonyms", [])] if synonyms else [c["name"]]
        names.append("/".join(dict.fromkeys(s for p in parts for s in split_synonyms(p))))
    return names


VOCABULARIES = {
    "coco": lambda: list(COCO_CLASSES),
    "coco_ov": lambda: list(COCO_OV_CLASSES),
    "coco_ov_base": lambda: list(COCO_OV_BASE_CLASSES),
    "coco_ov_novel": lambda: list(COCO_OV_NOVEL_CLASSES),
    "lvis_v1": lvis_v1_class_names,
    "shapes": lambda: list(SHAPES_CLASSES),
}


def get_vocabulary(name_or_path: Union[str, os.PathLike]) -> list[str]:
    """A named vocabulary (:data:`VOCABULARIES`) or a vocabulary file (:func:`read_vocabulary`).

    Raises:
        KeyError: neither a known name nor an existing file (the known names listed).
    """
    text = os.fspath(name_or_path)
    if text in VOCABULARIES:
        return VOCABULARIES[text]()
    if os.path.isfile(text):
        return read_vocabulary(text)
    raise KeyError(f"{text!r} is neither a vocabulary name ({sorted(VOCABULARIES)}) nor an existing vocabulary file.")
