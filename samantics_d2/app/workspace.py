"""The web app's Python API: everything a user does in the browser is one call here.

A :class:`Workspace` holds one training-free model (a LazyConfig whose ``model`` is a
:class:`~samantics_d2.modeling.meta_arch.TrainingFreeSegmenter`), the user's classes
(:class:`~samantics_d2.app.classes.ClassBank`) and a working folder (reference images, memory
banks). The app's tabs call::

    ws = Workspace.from_config("configs/training_free/shapes_tiny.py", folder="output/app")
    mask = ws.mask_from_box(image, (x0, y0, x1, y1))   # Define classes: SAM turns a box into a mask
    ws.classes.add_reference("red circle", image, mask)
    ws.classes.add_words("blue square")                  # needs a config with a CLIP text tower
    result = ws.segment(image, score_threshold=0.3)      # Segment everything: labelled instances
    clicks = ws.click(image, points=[(40, 52)], labels=[1])  # Click: masks part to whole, labelled

The model's label space follows the class bank: before a segmentation, :meth:`Workspace.sync`
gives the model the bank's image references (:func:`~samantics_d2.references.build_reference_bank`
over dataset dicts, memory bank cached in ``folder`` by provenance) when the bank changed.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_util

from ..checkpoint import load_init_checkpoint
from ..config import check_weights_available, load_config
from ..d2 import BoxMode, instantiate
from ..data.mapper import segmentation_to_mask
from ..modeling.proposals import MaskProposals
from ..modeling.semantic.open_vocab_classifier import OpenVocabClassifier
from ..modeling.semantic.text_prototypes import load_or_build_text_prototypes
from ..references import build_reference_bank
from ..utils.image import read_image
from ..utils.visualization import draw_instances
from .classes import ClassBank

__all__ = ["ClickResult", "Segmentation", "Workspace", "WorkspaceError"]

logger = logging.getLogger(__name__)


class WorkspaceError(ValueError):
    """Something the user can fix (shown in the page as a message, not as a stack trace)."""


@dataclass
class Segmentation:
    """The labelled instances of one image (original size).

    Attributes:
        masks: ``[N, H, W]`` bool; boxes: ``[N, 4]`` XYXY; scores: ``[N]``; classes: ``[N]`` ids
        into ``class_names``; overlay: ``[H', W', 3]`` uint8 RGB, the instances scoring at least the
        threshold drawn (``draw_instances``).
    """

    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    class_names: list[str]
    overlay: np.ndarray

    def coco_results(self, image_id: int = 1, *, score_threshold: float = 0.0) -> list[dict]:
        """COCO results (category ids ``1..K`` in ``class_names`` order, RLE masks)."""
        keep = np.nonzero(self.scores >= score_threshold)[0]
        if not len(keep):
            return []
        rles = mask_util.encode(np.asfortranarray(self.masks[keep].transpose(1, 2, 0).astype(np.uint8)))
        return [{
            "image_id": image_id, "category_id": int(self.classes[i]) + 1, "score": float(self.scores[i]),
            "bbox": BoxMode.convert(self.boxes[i].tolist(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS),
            "segmentation": {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")},
        } for i, r in zip(keep, rles)]


@dataclass
class ClickResult:
    """The labelled masks of one click set, part to whole (small to large).

    Attributes:
        masks: ``[K, H, W]`` bool; iou_pred, stability: ``[K]``; classes: ``[K]`` ids into
        ``class_names`` (-1: no label); scores: ``[K]`` label scores; parents: ``[K]`` index of the
        smallest mask each is part of (-1: none); points, labels: the clicks.
    """

    masks: np.ndarray
    iou_pred: np.ndarray
    stability: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    parents: np.ndarray
    class_names: list[str]
    points: list
    labels: list

    def name(self, i: int) -> str:
        return self.class_names[int(self.classes[i])] if self.classes[i] >= 0 else "(no label)"

    def captions(self) -> list[str]:
        """``"<granularity>: <class> <score> (IoU <predicted>)"`` per mask (distinct, for the page)."""
        return [f"{i + 1}: {self.name(i)} {self.scores[i]:.2f} (IoU {self.iou_pred[i]:.2f})" for i in range(len(self.masks))]

    def coco_result(self, i: int, image_id: int = 1) -> dict:
        """Mask ``i`` as one COCO result (category id = class index + 1, 0 when unlabelled)."""
        rle = mask_util.encode(np.asfortranarray(self.masks[i].astype(np.uint8)))
        box = [float(v) for v in mask_util.toBbox(rle)]
        return {"image_id": image_id, "category_id": int(self.classes[i]) + 1, "score": float(self.scores[i]),
                "bbox": box, "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "class_name": self.name(i), "predicted_iou": float(self.iou_pred[i]), "granularity": i + 1}

    def to_json(self) -> dict:
        return {"points": self.points, "point_labels": self.labels, "categories": list(self.class_names),
                "masks": [dict(self.coco_result(i), part_of=int(self.parents[i]), stability=float(self.stability[i]))
                          for i in range(len(self.masks))]}


def _tensor(image: np.ndarray) -> torch.Tensor:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise WorkspaceError(f"Expected an RGB image [H, W, 3]; got an array of shape {image.shape}.")
    return torch.from_numpy(np.ascontiguousarray(image[..., :3].astype(np.uint8).transpose(2, 0, 1)))


class Workspace:
    """A model, the user's classes and a working folder (see the module docstring).

    Args:
        model: a :class:`TrainingFreeSegmenter` (weights loaded, eval mode).
        folder: where reference images and memory banks are written.
        predictor: the click predictor (:class:`samantics_d2.predictor.SamanticsPredictor`) over the
            same SAM; built from ``model`` when None.
        text_encoder: the CLIP text tower of ``model.open_vocab`` (classes named by words); None: the
            model labels by image prototypes only.
    """

    def __init__(self, *, model: torch.nn.Module, folder: str, predictor=None,
                 text_encoder: Optional[torch.nn.Module] = None) -> None:
        self.model = model.eval()
        self.folder = folder
        self.classes = ClassBank()
        self._synced: Optional[str] = None
        self._predictor = predictor
        self._predictor_key: Optional[str] = None
        self._sam = None
        self.text_encoder = text_encoder
        self._open_vocab = getattr(model, "open_vocab", None)  # the config's; rebuilt for the classes by words
        # the config's text weight for classes with words and examples
        self._fused_text_weight = float(self._open_vocab.text_weight.mean()) if self._open_vocab is not None else 0.5
        self._image_key: Optional[tuple] = None
        self.description = type(model).__name__
        self.lock = threading.Lock()  # one model call at a time (the app serves several events)
        os.makedirs(folder, exist_ok=True)

    @classmethod
    def from_config(cls, config_file: str, *, folder: str, overrides: Sequence[str] = (),
                    checkpoint: Optional[str] = None) -> "Workspace":
        """Build the model of a training-free LazyConfig (``overrides``: ``key=value``; ``checkpoint``:
        a tiny SAM trained with train_net.py, or ``train.init_checkpoint``)."""
        cfg = load_config(config_file, overrides, user_tool=True)
        check_weights_available(cfg, config_file)
        seed = cfg.train.get("seed", -1)
        torch.manual_seed(seed if seed >= 0 else 0)  # random (tiny) encoders: the same in every run
        model = instantiate(cfg.model)
        open_vocab = cfg.model.get("open_vocab")
        text_encoder = None
        if open_vocab is not None and open_vocab.get("text_prototypes") is not None:
            text_encoder = instantiate(open_vocab.text_prototypes.encoder).eval()  # the words of the app's classes
        checkpoint = checkpoint or cfg.train.get("init_checkpoint")
        if checkpoint:
            load_init_checkpoint(model, checkpoint, training=False)
        workspace = cls(model=model.to(cfg.train.get("device", "cpu")).eval(), folder=folder, text_encoder=text_encoder)
        workspace.description = f"{config_file}" + (f" + {checkpoint}" if checkpoint else " (random weights: no checkpoint)")
        return workspace

    # ------------------------------------------------------------------ classes

    def import_config_references(self, *, shots: Optional[int] = None) -> list[str]:
        """Add the reference set the config was built with (e.g. the shapes references) to the class
        bank: its first ``shots`` instances per class (None: the reference set's own shots, or all)."""
        bank = getattr(self.model, "reference_bank", None)
        if bank is None or not bank.dataset_dicts:
            raise WorkspaceError("This config has no reference set to import; define the classes yourself.")
        shots = shots if shots is not None else bank.shots
        added: dict[str, int] = {}
        for reference in bank.instances():
            name = bank.reference_classes[reference.class_id]
            if shots is not None and added.get(name, 0) >= shots:
                continue
            image = reference.read_image()
            mask = segmentation_to_mask(reference.annotation["segmentation"], *image.shape[:2])
            try:
                self.classes.add_reference(name, image, mask)
            except ValueError as e:  # an empty or duplicated mask in the set: leave it out
                logger.warning("Reference %s of %r not imported: %s", reference.file_name, name, e)
                continue
            added[name] = added.get(name, 0) + 1
        return list(added)

    def sync(self) -> list[str]:
        """Give the model the class bank (when it changed since the last call); returns the label space
        (the bank's class names, in order).

        Classes with references become image prototypes (the memory bank of the semantic encoder);
        with a model that labels by words (``open_vocab``: a CLIP text tower), every class also gets
        text prototypes from its words (from its name when it has none) and the two are fused with a
        per-class text weight: 1 for a class named by words only, 0 for a class defined by examples
        only, the config's weight for a class with both.

        Raises:
            WorkspaceError: no class is defined; classes by words on a model without a text tower;
                classes by examples on a model without a semantic encoder.
        """
        if not len(self.classes):
            raise WorkspaceError("No class is defined yet: add reference masks or class names in 'Define classes'.")
        key = self.classes.fingerprint()
        names = self.classes.names
        if key == self._synced:
            return names
        entries = [self.classes[n] for n in names]
        image_classes = self.classes.image_classes()
        open_vocab = self._open_vocab  # the config's classifier: its recognizer and options
        words = bool(self.classes.text_classes())
        if words and (open_vocab is None or self.text_encoder is None):
            raise WorkspaceError(
                "Classes named by words need a config with a CLIP text tower (configs/open_vocab/*, e.g. "
                "everything_shapes_tiny.py); this model has only image prototypes: define the classes by reference "
                "masks.")
        if image_classes and getattr(self.model, "semantic_encoder", None) is None:
            raise WorkspaceError("This config labels by words only (no semantic encoder for reference images); "
                                 f"remove the reference masks of {image_classes} or use a fused config.")
        if not words:  # examples only: the image pipeline as the config has it (DINOv2 cosines)
            self.model.open_vocab = None
        else:
            vocabulary = ["/".join(e.words or [e.name]) for e in entries]
            weights = [1.0 if not e.references else (0.0 if not e.words else self._fused_text_weight) for e in entries]
            text = load_or_build_text_prototypes(self.text_encoder, vocabulary, name="app")
            self.model.open_vocab = OpenVocabClassifier(
                recognizer=open_vocab.recognizer, text_prototypes=text, best_synonym=open_vocab.best_synonym,
                logit_scale=open_vocab.logit_scale, background=open_vocab.background, text_weight=weights,
                chunk_size=open_vocab.chunk_size,
            ).to(self.model.device)
        if image_classes:
            dicts = self.classes.reference_dicts(os.path.join(self.folder, "references"))
            bank = build_reference_bank(references=dicts, reference_classes=image_classes, class_names=names,
                                        cache_path=os.path.join(self.folder, f"memory_bank-{key}.safetensors"))
            self.model.set_reference_bank(bank)
            self.model.prepare_references()
        else:
            self.model.set_reference_bank(None)
        self._synced = key
        return names

    def _set_image(self, predictor, image: np.ndarray) -> None:
        """``predictor.set_image(image)`` unless it holds that image already (one encoder pass per image)."""
        key = (id(predictor), image.shape, hash(image.tobytes()))
        if key != self._image_key:
            predictor.set_image(image)
            self._image_key = key

    def _prompt_predictor(self):
        """An unlabelled predictor over the model's SAM (mask prompts of 'Define classes')."""
        from ..predictor import SamanticsPredictor

        if self._sam is None:
            self._sam = SamanticsPredictor(backbone=self.model.proposer.backbone,
                                           decoder=self.model.proposer.proposals.decoder)
        return self._sam

    @torch.no_grad()
    def mask_from_prompt(self, image: np.ndarray, *, box: Optional[Sequence[float]] = None,
                         point: Optional[Sequence[float]] = None) -> np.ndarray:
        """SAM's mask ``[H, W]`` bool for a box (XYXY pixels) or a click (x, y) on ``image``: of
        SAM's answers, the one with the highest predicted IoU.

        Raises:
            WorkspaceError: an empty box, or SAM's mask is empty.
        """
        if box is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (x1 > x0 and y1 > y0):
                raise WorkspaceError(f"The box {tuple(box)} is empty; draw a box around the object.")
        image = np.ascontiguousarray(np.asarray(image)[..., :3].astype(np.uint8))
        with self.lock:
            sam = self._prompt_predictor()
            self._set_image(sam, image)
            out = sam.predict(points=None if point is None else [point], box=box, multi_granularity=False,
                              multimask_output=box is None, labels=False)
        mask = np.asarray(out.masks[int(np.argmax(out.iou_pred))], bool)
        if not mask.any():
            raise WorkspaceError("SAM's mask for this prompt is empty: paint the object with the brush instead, or "
                                 "try another prompt.")
        return mask

    def mask_from_box(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """SAM's mask ``[H, W]`` bool for a box prompt (XYXY pixels of ``image``)."""
        return self.mask_from_prompt(image, box=box)

    # ------------------------------------------------------------------ segment everything

    @torch.no_grad()
    def segment(self, image: np.ndarray, *, score_threshold: float = 0.3) -> Segmentation:
        """Every instance of the defined classes in ``image`` (``[H, W, 3]`` uint8 RGB)."""
        names = self.sync()
        tensor = _tensor(image)
        with self.lock:
            instances = self.model([{"image": tensor.to(self.model.device), "height": tensor.shape[1],
                                     "width": tensor.shape[2]}])[0]["instances"].to("cpu")
        masks, boxes = instances.pred_masks.numpy(), instances.pred_boxes.tensor.numpy()
        scores, classes = instances.scores.numpy(), instances.pred_classes.numpy()
        keep = scores >= score_threshold
        overlay = draw_instances(np.asarray(image)[..., :3], masks=masks[keep], boxes=boxes[keep], classes=classes[keep],
                                 scores=scores[keep], class_names=names)
        return Segmentation(masks, boxes, scores, classes, list(names), overlay)

    def segment_files(
        self, files: Iterable[str], *, score_threshold: float = 0.3,
        progress: Optional[Callable[[int, int, str], None]] = None,
        cancelled: Optional[Callable[[], bool]] = None,
    ) -> tuple[dict[str, Segmentation], dict[str, str]]:
        """Segment image files; an unreadable file is skipped and reported (``{file: reason}``).
        ``progress(done, total, file)`` is called before each file; ``cancelled()`` stops the loop."""
        files = list(files)
        done: dict[str, Segmentation] = {}
        skipped: dict[str, str] = {}
        for i, path in enumerate(files):
            if cancelled is not None and cancelled():
                break
            if progress is not None:
                progress(i, len(files), path)
            try:
                image = read_image(path)
            except (OSError, ValueError) as e:
                logger.error("Skipping %s: %s", path, e)
                skipped[path] = str(e)
                continue
            done[path] = self.segment(image, score_threshold=score_threshold)
        return done, skipped

    # ------------------------------------------------------------------ click

    @torch.no_grad()
    def click(self, image: np.ndarray, *, points: Sequence[Sequence[float]], labels: Sequence[int]) -> ClickResult:
        """Masks at every granularity for a click set (``points`` (x, y) pixels, ``labels`` 1/0)
        (:class:`~samantics_d2.predictor.SamanticsPredictor`), labelled by the defined classes: the
        image prototypes' best match, or, with a model that labels by words, the class of highest
        text / fused probability (:meth:`TrainingFreeSegmenter.open_vocab_probabilities`)."""
        from ..predictor import SamanticsPredictor

        names = self.sync()
        image = np.ascontiguousarray(np.asarray(image)[..., :3].astype(np.uint8))
        open_vocab = getattr(self.model, "open_vocab", None)
        with self.lock:
            if open_vocab is not None:  # labels from the model's own open-vocabulary path, below
                predictor = self._prompt_predictor()
            else:
                if self._predictor is None or self._predictor_key != self._synced:
                    self._predictor = SamanticsPredictor.from_model(self.model)
                    self._predictor_key = self._synced
                predictor = self._predictor
            self._set_image(predictor, image)
            out = predictor.predict(points=np.asarray(points, np.float32), point_labels=np.asarray(labels),
                                    labels=open_vocab is None)
            count = len(out.masks)
            if open_vocab is not None and count:
                classes, scores = self._open_vocab_labels(image, out.granularity)
            elif "image" in out.labels:
                classes, scores = out.labels["image"].classes, out.labels["image"].scores
            else:
                classes, scores = np.full(count, -1), np.zeros(count, np.float32)
        return ClickResult(
            masks=np.asarray(out.masks, bool), iou_pred=np.asarray(out.iou_pred, np.float32),
            stability=np.asarray(out.stability, np.float32), classes=np.asarray(classes),
            scores=np.asarray(scores, np.float32), parents=np.asarray(out.parents), class_names=list(names),
            points=[list(map(float, p)) for p in points], labels=[int(v) for v in labels],
        )

    def _open_vocab_labels(self, image: np.ndarray, masks) -> tuple[np.ndarray, np.ndarray]:
        """Best class and its probability of each mask (``GranularityMasks``) by the model's text /
        fused probabilities (background excluded)."""
        proposals = MaskProposals(mask_logits=masks.mask_logits, iou_pred=masks.iou_pred, stability=masks.stability,
                                  points=masks.iou_pred.new_zeros((len(masks.iou_pred), 2)), fit=masks.fit)
        prototypes = self.model.prepared_prototypes() if self.model.reference_bank is not None else (None, None)
        probabilities = self.model.open_vocab_probabilities(_tensor(image).to(self.model.device), proposals, *prototypes)
        scores, classes = probabilities[:, :-1].max(dim=1)
        return classes.cpu().numpy(), scores.float().cpu().numpy()
