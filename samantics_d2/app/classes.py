"""The user's classes in the web app: defined by reference images with masks, by words, or both.

:class:`ClassBank` is plain data (no model): class name -> reference instances (an image and a
binary mask each) and/or words (synonyms). It is saved to and loaded from one JSON file
(``samantics_d2.class_bank/1``: images as base64 PNG, masks as COCO RLE), written atomically, so a
bank defined in the app can be reused in Python or in a later session::

    bank = ClassBank()
    bank.add_reference("cat", image, mask)      # image [H, W, 3] uint8 RGB, mask [H, W] bool
    bank.add_words("dog/puppy")                 # a class named by words ("/" separates synonyms)
    bank.save("my_classes.json"); ClassBank.load("my_classes.json")

:meth:`ClassBank.reference_dicts` writes the reference images as PNG files into a folder and returns
Detectron2 dataset dicts (contiguous ``category_id``) for
:func:`samantics_d2.references.build_reference_bank`.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from ..d2 import BoxMode
from ..utils.io import atomic_path, read_json

__all__ = ["BANK_FORMAT", "ClassBank", "ClassEntry", "ReferenceMask"]

BANK_FORMAT = "samantics_d2.class_bank/1"


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_image_mask(image: np.ndarray, mask: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    image, mask = np.asarray(image), np.asarray(mask)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{where}: the image must be [H, W, 3] uint8 RGB; got {image.shape} {image.dtype}.")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{where}: the mask is {mask.shape[1] if mask.ndim > 1 else '?'}x{mask.shape[0]} but the image is "
                         f"{image.shape[1]}x{image.shape[0]}; draw the mask on the same image.")
    mask = mask.astype(bool)
    if not mask.any():
        raise ValueError(f"{where}: the mask is empty; mark the object (brush, or a box that SAM turns into a mask).")
    return np.ascontiguousarray(image), mask


@dataclass(frozen=True)
class ReferenceMask:
    """One reference instance: ``image`` ``[H, W, 3]`` uint8 RGB and ``mask`` ``[H, W]`` bool."""

    image: np.ndarray = field(repr=False)
    mask: np.ndarray = field(repr=False)

    def key(self) -> str:
        """A content hash (image and mask), naming its image file and identifying the reference."""
        digest = hashlib.sha256(self.image.tobytes())
        digest.update(repr(self.image.shape).encode())
        digest.update(np.packbits(self.mask).tobytes())
        return digest.hexdigest()[:16]

    def rle(self) -> dict:
        rle = mask_util.encode(np.asfortranarray(self.mask.astype(np.uint8)))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass
class ClassEntry:
    """A class: its name, its reference instances, and its words (synonyms; empty: not named by words)."""

    name: str
    references: list[ReferenceMask] = field(default_factory=list)
    words: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        """``"image"``, ``"text"`` or ``"image+text"``."""
        return "+".join(s for s, on in (("image", self.references), ("text", self.words)) if on)


def _split_words(text: str) -> list[str]:
    words = [w.strip() for w in text.replace("_or_", "/").split("/")]
    if not words or any(not w for w in words):
        raise ValueError(f"Class {text!r}: an empty name or synonym; write synonyms as 'sofa/couch'.")
    return words


class ClassBank:
    """The app's classes, in the order they were defined (that order is the label space)."""

    def __init__(self) -> None:
        self._classes: dict[str, ClassEntry] = {}

    # ------------------------------------------------------------------ editing

    def _entry(self, name: str) -> ClassEntry:
        name = name.strip()
        if not name:
            raise ValueError("A class needs a name; type it in the 'class name' box.")
        return self._classes.setdefault(name, ClassEntry(name))

    def add_reference(self, name: str, image: np.ndarray, mask: np.ndarray) -> ReferenceMask:
        """Add one reference instance of class ``name`` (created if new)."""
        image, mask = _check_image_mask(image, mask, f"Reference of class {name!r}")
        reference = ReferenceMask(image=image, mask=mask)
        entry = self._entry(name)
        if any(r.key() == reference.key() for r in entry.references):
            raise ValueError(f"Class {name!r} already has this reference (same image and mask).")
        entry.references.append(reference)
        return reference

    def add_words(self, text: str) -> list[str]:
        """Add classes named by words: ``"cat, dog/puppy"`` (``,`` or new lines between classes, ``/``
        between synonyms; the first synonym names the class). Returns the class names."""
        names = []
        for item in (t.strip() for t in text.replace("\n", ",").split(",")):
            if not item:
                continue
            words = _split_words(item)
            entry = self._entry(words[0])
            entry.words = list(dict.fromkeys(entry.words + words))
            names.append(entry.name)
        if not names:
            raise ValueError(f"No class name in {text!r}; write e.g. 'cat, dog/puppy'.")
        return names

    def remove(self, name: str) -> None:
        if name not in self._classes:
            raise KeyError(f"No class {name!r}; the classes are {self.names}.")
        del self._classes[name]

    def clear(self) -> None:
        self._classes.clear()

    # ------------------------------------------------------------------ reading

    @property
    def names(self) -> list[str]:
        return list(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __getitem__(self, name: str) -> ClassEntry:
        return self._classes[name]

    def table(self) -> list[list]:
        """One row per class: ``[class, shots, source]`` (the app's table)."""
        return [[e.name, len(e.references), e.source] for e in self._classes.values()]

    def image_classes(self) -> list[str]:
        return [e.name for e in self._classes.values() if e.references]

    def text_classes(self) -> list[str]:
        """The classes with words, as vocabulary entries (synonyms joined by ``/``)."""
        return ["/".join(e.words) for e in self._classes.values() if e.words]

    def reference_dicts(self, folder: str) -> list[dict]:
        """Detectron2 dataset dicts of the image references (``category_id``: index among
        :meth:`image_classes`); their images are written as ``folder/<key>.png`` (once)."""
        os.makedirs(folder, exist_ok=True)
        dicts = []
        for cid, name in enumerate(self.image_classes()):
            for reference in self._classes[name].references:
                key = reference.key()
                path = os.path.join(folder, f"{key}.png")
                if not os.path.exists(path):
                    with atomic_path(path) as tmp, open(tmp, "wb") as f:
                        f.write(_png(reference.image))
                rle = reference.rle()
                height, width = reference.mask.shape
                dicts.append({
                    "file_name": path, "image_id": key, "height": height, "width": width,
                    "annotations": [{
                        "category_id": cid, "iscrowd": 0, "segmentation": rle, "bbox_mode": BoxMode.XYWH_ABS,
                        "bbox": [float(v) for v in mask_util.toBbox(dict(rle, counts=rle["counts"].encode()))],
                    }],
                })
        return dicts

    # ------------------------------------------------------------------ file

    def to_json(self) -> dict:
        return {"format": BANK_FORMAT, "classes": [{
            "name": e.name, "words": e.words,
            "references": [{"image_png": base64.b64encode(_png(r.image)).decode("ascii"), "mask": r.rle()}
                           for r in e.references],
        } for e in self._classes.values()]}

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write the bank to ``path`` (JSON, atomically); returns the path."""
        path = os.fspath(path)
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ClassBank":
        """Read a bank written by :meth:`save`; errors name the file and what is wrong in it."""
        data = read_json(path, what="a class bank saved by the app (ClassBank.save)")
        if not isinstance(data, dict) or data.get("format") != BANK_FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{os.fspath(path)} is not a class bank: expected format {BANK_FORMAT!r}, found {found!r}.")
        bank = cls()
        for i, item in enumerate(data.get("classes", [])):
            where = f"{os.fspath(path)}: class {i} ({item.get('name', '?')!r})"
            try:
                if item.get("words"):
                    bank.add_words("/".join(item["words"]))
                    if item["words"][0] != item["name"]:
                        raise ValueError(f"its first word {item['words'][0]!r} differs from its name")
                for ref in item.get("references", []):
                    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(ref["image_png"]))).convert("RGB"))
                    rle = dict(ref["mask"], counts=ref["mask"]["counts"].encode("ascii"))
                    bank.add_reference(item["name"], image, mask_util.decode(rle).astype(bool))
            except (KeyError, TypeError, ValueError, OSError) as e:
                raise ValueError(f"{where} is malformed: {e}") from e
        return bank

    def merge(self, other: "ClassBank") -> None:
        """Add ``other``'s classes and references to this bank (same names merge)."""
        for entry in other._classes.values():
            for reference in entry.references:
                if all(r.key() != reference.key() for r in self._entry(entry.name).references):
                    self._entry(entry.name).references.append(reference)
            if entry.words:
                self._entry(entry.name).words = list(dict.fromkeys(self._entry(entry.name).words + entry.words))

    def fingerprint(self) -> str:
        """Identifies the bank's content (names, words, references, order)."""
        digest = hashlib.sha256()
        for e in self._classes.values():
            digest.update(json.dumps([e.name, e.words, [r.key() for r in e.references]]).encode())
        return digest.hexdigest()[:16]


def mask_bounding_box(mask: np.ndarray) -> Optional[tuple[float, float, float, float]]:
    """XYXY box (exclusive right/bottom) of a binary mask; None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
