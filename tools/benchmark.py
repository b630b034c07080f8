#!/usr/bin/env python
"""Speed benchmarks of the project's components, one subcommand per benchmark.

    python tools/benchmark.py encoders                      # default set for the device
    python tools/benchmark.py encoders --encoders sam_vit_b dinov2_vitl14@518 clip_vit_b32_openai/tiny \\
        --dtype bf16 --channels-last --compile --batch-size 8 --markdown docs/benchmarks.md
    python tools/benchmark.py training_free --config-file configs/training_free/shapes_tiny_random.py --images 8 \\
        model.proposer.point_layout=cell_centres model.proposer.backbone.fit=longest_side_pad \\
        model.memory_bank.crop=square_context model.memory_bank.mask_weights=area model.memory_bank.crop_interpolation=null
    python tools/benchmark.py linear_probe --config-file configs/linear_probe/tiny_shapes.py --markdown docs/benchmarks.md
    python tools/benchmark.py predictor --tags sam_vit_b sam2.1_hiera_t --size full --repeats 2 --clicks 5
    python tools/benchmark.py mask_recognition --path crop --tag clip_vit_b16_openai --masks 16 --image-size 512
    python tools/benchmark.py app --checkpoint output/demo/tiny_sam/model_final.pth --repeats 7

``encoders``: images/s, peak memory and GFLOPs per image of each encoder backbone, with random
weights (speed does not depend on the weights). An entry is ``TAG[/tiny][@SIZE]``: a weight tag,
optionally its tiny variant, optionally another input size (SAM and CLIP then get a position
embedding of that size; DINOv2 and SAM 2 interpolate theirs). Timing: warm-up passes, device
synchronisation around every pass, median of ``--runs`` passes. GFLOPs come from
``torch.utils.flop_counter`` (multiply-add = 2 FLOPs) on one image. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` (weights + activations, allocator view); on CPU the weights plus
the peak of live tensor storages during one pass (:class:`PeakTensorMemory`; the process's RSS is
useless here because freed memory stays mapped). The Markdown table is printed; ``--markdown FILE`` also writes it, with the machine, into
that file's section for the device and setting (``encoders-cpu-fp32``...), atomically.

``training_free`` and ``linear_probe`` build everything from a LazyConfig file, as Detectron2's
``tools/benchmark.py`` and ``train_net.py`` do: ``--config-file`` plus ``KEY=VALUE`` overrides (checked
by :func:`samantics_d2.config.check_override_keys` before anything runs), ``train.device``, and
``train.seed`` (>= 0: torch is seeded with it before the model is built, so random weights are the
ones train_net builds; < 0: not seeded, and random weights then depend on every random draw made
before, imports included).

``training_free``: images/s, peak memory and COCO box/mask AP of the config's
:class:`TrainingFreeSegmenter` (``model``, its weights from ``train.init_checkpoint``, the first
``--images`` images of ``dataloader.test``, ``dataloader.evaluator``) against a baseline over the
same modules, memory bank and images, and the share of detections both make: ``--baseline
stage_order`` (default), "No Time to Train"'s ``forward_test`` stage by stage (the upstream mask
decoder per chunk of prompts, all masks upscaled, features upsampled to the mask grid; see
:class:`StageOrderBaseline`), which should give the same detections; or ``--baseline amg``,
upstream ``segment_anything.SamAutomaticMaskGenerator``, then one DINOv2 forward per mask crop (see
:class:`NaiveBaseline`). Each names the overrides a config needs for the two pipelines to compute
the same stages.

``linear_probe``: wall time of the cached linear probe of the config's ``job`` (extract features
once, then the grid of probes of ``job.config`` trained together on the cache) against re-running
the frozen encoder every epoch, both measured in the same run, in units of one encoder pass over the
data (target: the cached grid of 8 probes below 1.2x one pass).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import itertools
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

# tools/click.py has the name of the `click` package, which Gradio's server imports: a script run
# from this folder would import the tool instead. Take this folder off the import path first.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np
import torch

logger = logging.getLogger("samantics_d2.tools.benchmark")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# On a CPU: every family tiny, plus small full-size encoders at native or reduced resolution.
CPU_DEFAULT = (
    "sam_vit_b/tiny",
    "hq_sam_vit_b/tiny",
    "sam2.1_hiera_t/tiny",
    "dinov2_vits14/tiny",
    "dinov2_vitg14_reg/tiny",
    "clip_vit_b16_openai/tiny",
    "sam_vit_b@256",
    "sam2.1_hiera_t@256",
    "dinov2_vits14",
    "clip_vit_b32_openai",
)


@dataclass(frozen=True)
class EncoderEntry:
    """One row to measure: ``TAG[/tiny][@SIZE]``."""

    tag: str
    size: str  # "full" or "tiny"
    input_size: Optional[int]

    @classmethod
    def parse(cls, text: str) -> "EncoderEntry":
        from samantics_d2.modeling.weights import WEIGHTS

        match = re.fullmatch(r"([^/@]+)(/tiny)?(@\d+)?", text)
        if match is None or match.group(1) not in WEIGHTS:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not TAG[/tiny][@SIZE] with a known weight tag; known tags: {', '.join(WEIGHTS)}."
            )
        return cls(match.group(1), "tiny" if match.group(2) else "full", int(match.group(3)[1:]) if match.group(3) else None)

    def label(self) -> str:
        return self.tag + ("/tiny" if self.size == "tiny" else "")


def build_backbone(entry: EncoderEntry) -> torch.nn.Module:
    """The entry's backbone with random weights, at its input size."""
    from samantics_d2.modeling.backbone import build_encoder

    return build_encoder(entry.tag, size=entry.size, input_size=entry.input_size)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakTensorMemory:
    """Peak bytes of the tensor storages that ops create while active (any device).

    A ``TorchDispatchMode`` sees every op's outputs; each new storage is counted until it is freed
    (a ``weakref.finalize`` on the storage, whose Python object lives as long as the storage).
    Allocator caching and fragmentation are not included.
    """

    def __init__(self, existing: Sequence[torch.Tensor] = ()) -> None:
        """``existing``: tensors alive before (weights, inputs); views of them are not counted."""
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out)
                return out

        self._mode = _Mode()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}
        self._existing = {t.untyped_storage().data_ptr() for t in existing}

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _record(self, out) -> None:
        import weakref

        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self._live and key not in self._existing:
                    self._live[key] = nbytes
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, key)

    def __enter__(self) -> "PeakTensorMemory":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def count_gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """GFLOPs of one forward pass on ``x`` (multiply-add = 2 FLOPs), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # With autograd on and an input that requires grad, nn.MultiheadAttention (CLIP) skips its
    # fused inference kernel, which the flop counter cannot see into.
    with counter, torch.enable_grad():
        model(x.detach().clone().requires_grad_(True))
    return counter.get_total_flops() / 1e9 / x.shape[0]


def measure(
    entry: EncoderEntry,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    channels_last: bool,
    compile_model: bool,
    warmup: int,
    runs: int,
) -> dict:
    """Build one encoder and time it; returns a result row."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_backbone(entry).eval()
    size = model.preprocess.input_size
    params = sum(p.numel() for p in model.parameters())
    model = model.to(device=device, dtype=dtype)
    x = torch.randn(batch_size, 3, size, size, device=device, dtype=dtype)
    gflops = count_gflops(model, x[:1])  # FLOPs do not depend on dtype or device
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    forward: Callable = torch.compile(model) if compile_model else model
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            _synchronize(device)
            start = time.perf_counter()
            forward(x)
            _synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    median = statistics.median(times)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # weights + the peak of live activations of one (uncompiled) pass
        weights = list(model.parameters()) + list(model.buffers())
        weight_bytes = sum(t.numel() * t.element_size() for t in weights)
        with torch.no_grad(), PeakTensorMemory(existing=weights + [x]) as tracker:
            model(x)
        peak_mib = (weight_bytes + tracker.peak) / 2**20
    del model, forward, x
    from samantics_d2.modeling.preprocess import preprocess_spec

    native = preprocess_spec(entry.tag).input_size
    return {
        "encoder": entry.label(),
        "input": size,
        "note": _note(entry, size, native),
        "batch": batch_size,
        "params_m": params / 1e6,
        "gflops": gflops,
        "images_per_s": batch_size / median,
        "ms_per_batch": median * 1000,
        "peak_mib": peak_mib,
    }


def _note(entry: EncoderEntry, size: int, native: int) -> str:
    if entry.size == "tiny":
        return "tiny variant (random, depth 2 / width 32)"
    if size != native:
        return f"reduced resolution (native {native})"
    return "native resolution"


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    parts = [f"CPU {cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()})"]
    if device.type == "cuda":
        parts.insert(0, f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)


def markdown_table(rows: Sequence[dict], *, dtype: str, channels_last: bool, compiled: bool) -> str:
    header = (
        "| encoder | input | setting | batch | params (M) | GFLOPs/img | img/s | ms/batch | peak mem (MiB) |\n"
        "|---|---:|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for r in rows:
        peak = f"{r['peak_mib']:.1f}"
        lines.append(
            f"| {r['encoder']} | {r['input']} | {r['note']} | {r['batch']} | {r['params_m']:.2f} | {r['gflops']:.3f} | "
            f"{r['images_per_s']:.2f} | {r['ms_per_batch']:.1f} | {peak} |"
        )
    options = f"dtype {dtype}, channels-last {'on' if channels_last else 'off'}, torch.compile {'on' if compiled else 'off'}"
    return "\n".join(lines) + f"\n\n{options}; images/s and ms/batch: median of the timed passes.\n"


def write_section(path: str, section: str, body: str) -> None:
    """Replace ``<!-- section:begin -->...<!-- section:end -->`` in ``path`` (appended if absent), atomically."""
    from samantics_d2.utils.io import atomic_path

    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def resolve_device(name: str) -> torch.device:
    """``--device auto|cpu|cuda`` -> a device; ``cuda`` without CUDA exits with the fix."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name.replace("auto", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu.")
    return device


def run_encoders(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.encoders:
        entries = args.encoders
    elif device.type == "cuda":
        from samantics_d2.modeling.weights import WEIGHTS

        entries = [EncoderEntry(tag, "full", None) for tag in WEIGHTS]
    else:
        entries = [EncoderEntry.parse(text) for text in CPU_DEFAULT]
    dtype = DTYPES[args.dtype]
    rows = []
    for entry in entries:
        logger.info("Measuring %s on %s ...", entry.label(), device)
        rows.append(
            measure(
                entry,
                device=device,
                dtype=dtype,
                batch_size=args.batch_size,
                channels_last=args.channels_last,
                compile_model=args.compile,
                warmup=args.warmup,
                runs=args.runs,
            )
        )
        logger.info("%s: %.2f img/s", entry.label(), rows[-1]["images_per_s"])
    table = markdown_table(rows, dtype=args.dtype, channels_last=args.channels_last, compiled=args.compile)
    section = f"encoders-{device.type}-{args.dtype}" + ("-channels-last" if args.channels_last else "")
    publish(args, device, section + ("-compile" if args.compile else ""), table)
    return 0


# ----------------------------------------------------------------------------- configs


def load_config(config_file: str, opts: Sequence[str] = ()):
    """``config_file`` with the ``opts`` (``KEY=VALUE``) overrides, loaded as train_net loads it: the
    overrides are checked first (a misspelt key or a wrong type fails here, naming it), the weight
    files the config needs must exist, and torch is seeded with ``train.seed`` when it is >= 0."""
    import samantics_d2  # noqa: F401  (registers datasets and components)
    from samantics_d2.config import check_weights_available
    from samantics_d2.config import load_config as load_checked_config

    flags = [o for o in opts if o.startswith("--")]
    if flags:
        raise SystemExit(f"{flags} came after the KEY=VALUE overrides; give the tool's options before them.")
    cfg = load_checked_config(config_file, opts)
    check_weights_available(cfg, config_file)
    if cfg.train.seed >= 0:
        torch.manual_seed(cfg.train.seed)
    return cfg


def build_segmenter(cfg, config_file: str = "the config"):
    """The config's :class:`TrainingFreeSegmenter` with ``train.init_checkpoint`` loaded (as train_net
    --eval-only loads it), in eval mode on ``train.device``, its reference features prepared."""
    from samantics_d2.checkpoint import load_init_checkpoint
    from samantics_d2.d2 import instantiate
    from samantics_d2.modeling.meta_arch import TrainingFreeSegmenter
    from samantics_d2.references import prepare_references

    segmenter = instantiate(cfg.model)
    if not isinstance(segmenter, TrainingFreeSegmenter):
        raise SystemExit(f"{config_file} builds a {type(segmenter).__name__}; the training_free benchmark measures a "
                         "TrainingFreeSegmenter (configs/training_free/*.py).")
    if cfg.train.init_checkpoint:
        load_init_checkpoint(segmenter, cfg.train.init_checkpoint, training=False)
    segmenter = segmenter.to(cfg.train.device).eval()
    with torch.no_grad():
        prepare_references(segmenter)  # the memory bank and prototypes, built once, shared by both pipelines
    return segmenter


def add_config_arguments(parser: argparse.ArgumentParser, *, example: str) -> None:
    """``--config-file``, ``--runs``, the output options and the ``KEY=VALUE`` overrides (last)."""
    parser.add_argument("--config-file", required=True, metavar="FILE", help=f"LazyConfig file, e.g. {example}")
    parser.add_argument("--runs", type=int, default=3, help="timed passes; the median is reported")
    parser.add_argument("--output-dir", default=None, help="evaluation / cache files (default: a new temporary folder)")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the table into FILE (e.g. docs/benchmarks.md)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="KEY=VALUE config overrides, last, as for train_net.py (e.g. train.device=cpu)")


def publish(args: argparse.Namespace, device: torch.device, section: str, body: str) -> None:
    """Print the report (machine, date, command, ``body``) and, with ``--markdown``, write it into
    that file's ``section``."""
    report = (f"Machine: {machine_description(device)}. Date: {datetime.date.today().isoformat()}.\n\n"
              f"Command: `python tools/benchmark.py {' '.join(args.argv)}`\n\n{body}")
    print(report)  # the table is this command's output
    if args.markdown:
        write_section(args.markdown, section, report)
        logger.info("Wrote the table into %s", args.markdown)


# ----------------------------------------------------------------------------- training_free


def upstream_sam(proposer) -> torch.nn.Module:
    """A ``segment_anything`` ``Sam`` over the SAME modules (not copies) as ``proposer``: our SAM
    backbone's upstream ``ImageEncoderViT`` and our prompt decoder's upstream ``PromptEncoder`` /
    ``MaskDecoder``, with the backbone's pixel statistics."""
    from segment_anything.modeling import Sam

    backbone, decoder = proposer.backbone, proposer.proposals.decoder
    spec = backbone.preprocess
    sam = Sam(
        image_encoder=backbone.encoder,
        prompt_encoder=decoder.prompt_encoder,
        mask_decoder=decoder.mask_decoder,
        pixel_mean=list(spec.pixel_mean),
        pixel_std=list(spec.pixel_std),
    )
    return sam.to(decoder.device).eval()


def classify_pooled(
    classifier,
    *,
    pooled: torch.Tensor,
    valid: torch.Tensor,
    masks: torch.Tensor,
    prototypes: torch.Tensor,
    prototype_valid: torch.Tensor,
    iou_pred: Optional[torch.Tensor] = None,
):
    """Run ``classifier`` (a :class:`PrototypeClassifier`) on already pooled features, one per mask.

    The features become a ``[D, 1, P]`` "map" and each mask a one-hot weight ``[1, P]`` on it, so
    the classifier's own pooling returns them unchanged and its scoring, NMS, merge and top-K are
    the ones of the pipeline. Masks with ``valid`` False get zero weight (dropped, as the pipeline
    drops masks that cover no patch).

    Args:
        pooled: ``[P, D]``; valid: ``[P]`` bool; masks: ``[P, H, W]`` bool (boxes and overlaps);
        iou_pred: ``[P]`` SAM's predicted IoU (for a classifier that ranks its NMS by it).

    Returns:
        :class:`ClassifiedProposals`.
    """
    count = pooled.shape[0]
    weights = torch.eye(count, device=pooled.device, dtype=torch.float32) * valid[:, None].float()
    return classifier(
        features=pooled.float().T[:, None, :],
        weights=weights[:, None, :],
        masks=masks,
        prototypes=prototypes,
        prototype_valid=prototype_valid,
        iou_pred=iou_pred,
    )


def _instances(
    masks: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, height: int, width: int, *, convention: str = "exclusive"
):
    """``Instances`` at ``height x width`` from bool masks ``[K, h, w]`` (resized when the input was),
    boxes in the box ``convention`` of :func:`samantics_d2.modeling.semantic.masks_to_boxes`."""
    from samantics_d2.d2 import Boxes, Instances
    from samantics_d2.modeling.semantic import masks_to_boxes

    if masks.shape[-2:] != (height, width) and len(masks):
        masks = torch.nn.functional.interpolate(masks[None].float(), size=(height, width), mode="nearest")[0] > 0.5
    elif masks.shape[-2:] != (height, width):
        masks = masks.new_zeros((0, height, width))
    result = Instances((height, width))
    result.pred_masks = masks
    result.pred_boxes = Boxes(masks_to_boxes(masks, convention=convention))
    result.scores = scores
    result.pred_classes = classes
    return result


class NaiveBaseline:
    """The naive way research code does it, over the segmenter's own SAM modules and prototypes.

    Per image: ``SamAutomaticMaskGenerator`` with the segmenter's settings (points per side, points
    per batch, predicted-IoU threshold, small-region cleanup at the proposals' ``min_region_area``;
    stability filter off, box NMS off (threshold 1.0), no crops). The generator keeps all 3 masks
    of every point (full resolution, RLE round trip); to propose what the pipeline proposes, the best mask per point by predicted IoU is
    kept, empty masks dropped. Then, for every mask, a square crop around its box with the memory
    bank's context, one semantic-encoder forward per crop, mask-weighted pooling of the crop's
    patch features (the memory bank's own crop and pooling code, so a reference instance gets its
    bank feature), and the pipeline's scoring, NMS, soft merge and top-K (:func:`classify_pooled`).
    """

    def __init__(self, segmenter) -> None:
        from segment_anything import SamAutomaticMaskGenerator
        from segment_anything.modeling import ImageEncoderViT

        proposals = segmenter.proposer.proposals
        encoder = getattr(segmenter.proposer.backbone, "encoder", None)
        if not isinstance(encoder, ImageEncoderViT):
            raise SystemExit(
                f"The baseline is segment_anything's SamAutomaticMaskGenerator, which needs a SAM ViT image encoder; "
                f"the config's proposer has a {type(encoder).__name__}: set model.proposer.backbone.tag=sam_vit_b (or l, h)."
            )
        bank = segmenter.memory_bank_config
        settings = {  # override: (the config's value, the value the baseline reproduces)
            **{f"model.proposer.{k}": (getattr(proposals, k), None)
               for k in ("stability_score_thresh", "box_nms_thresh", "max_proposals")},
            "model.proposer.multimask_output": (proposals.multimask_output, True),
            "model.proposer.point_layout": (getattr(proposals, "point_layout", "cell_centres"), "cell_centres"),
            "model.proposer.backbone.fit": (segmenter.proposer.backbone.preprocess.fit, "longest_side_pad"),
            "model.memory_bank.crop": (bank.crop, "square_context"),
            "model.memory_bank.mask_weights": (getattr(bank, "mask_weights", "area"), "area"),
            "model.memory_bank.crop_interpolation": (getattr(bank, "crop_interpolation", None), None),
        }
        unmatched = {k: v for k, (v, wanted) in settings.items() if v != wanted}
        if unmatched:
            fix = " ".join(f"{k}={'null' if settings[k][1] is None else str(settings[k][1]).lower()}" for k in unmatched)
            raise SystemExit(
                "The baseline is upstream SamAutomaticMaskGenerator (its point grid, longest-side resize and pad, best of "
                "3 masks per point, no stability filter, box NMS or cap) and the memory bank's padded square crops, so "
                f"that both pipelines classify the same proposals the same way; the config sets {unmatched}: override "
                f"them: {fix}"
            )
        self.segmenter = segmenter
        self.generator = SamAutomaticMaskGenerator(
            upstream_sam(segmenter.proposer),
            points_per_side=proposals.points_per_side,
            points_per_batch=proposals.points_per_batch,
            pred_iou_thresh=max(proposals.pred_iou_thresh or 0.0, 0.0),
            stability_score_thresh=0.0,
            box_nms_thresh=1.0,
            crop_n_layers=0,
            min_mask_region_area=int(round(proposals.min_region_area)),  # its OpenCV loop over masks
            output_mode="binary_mask",
        )

    def propose(self, image: np.ndarray) -> list[dict]:
        """``SamAutomaticMaskGenerator`` records of ``image`` (``[H, W, 3]`` uint8 RGB), best per point, non-empty."""
        threshold = self.segmenter.proposer.proposals.pred_iou_thresh
        best: dict[tuple[float, float], dict] = {}
        for record in self.generator.generate(image):
            # upstream skips its IoU filter for thresholds <= 0; the pipeline applies any threshold
            if record["area"] == 0 or (threshold is not None and record["predicted_iou"] <= threshold):
                continue
            point = tuple(record["point_coords"][0])
            if point not in best or record["predicted_iou"] > best[point]["predicted_iou"]:
                best[point] = record
        return list(best.values())

    def crop_features(self, image: np.ndarray, masks: Sequence[np.ndarray], boxes: Sequence[Sequence[float]]):
        """One semantic-encoder forward per mask crop: ``(pooled [P, D], valid [P])``.

        Args:
            image: ``[H, W, 3]`` uint8 RGB; masks: ``[H, W]`` bool each; boxes: XYWH per mask.
        """
        from samantics_d2.modeling.preprocess import prepare_batch
        from samantics_d2.modeling.semantic import (
            crop_mask_weights, crop_padded, mask_pooling, reference_preprocess, square_context_window,
        )

        encoder, config = self.segmenter.semantic_encoder, self.segmenter.memory_bank_config
        spec = reference_preprocess(encoder, config)
        fill = np.round(np.asarray(spec.pixel_mean)).astype(np.uint8)
        device, dtype = encoder._param_device_dtype()
        pooled, valid = [], []
        for mask, box in zip(masks, boxes):
            window = square_context_window(tuple(float(v) for v in box), config.context)
            x, _ = prepare_batch([crop_padded(image, window, fill)], spec, device=device, dtype=dtype)
            dense = encoder(x)[encoder.dense_feature]  # [1, C, h, w]
            weights = crop_mask_weights([crop_padded(mask.astype(np.uint8), window, 0)], tuple(dense.shape[-2:]))
            feature, ok = mask_pooling(dense, weights.to(dense.device, dense.dtype))
            pooled.append(feature.float())
            valid.append(ok)
        if not pooled:
            channels = encoder.output_shape()[encoder.dense_feature].channels
            return torch.zeros((0, channels), device=device), torch.zeros((0,), dtype=torch.bool, device=device)
        return torch.cat(pooled), torch.cat(valid)

    def __call__(self, batched_inputs: list[dict]) -> list[dict]:
        prototypes, prototype_valid = self.segmenter.prepared_prototypes()
        device = prototypes.device
        outputs = []
        for x in batched_inputs:
            image = x["image"].permute(1, 2, 0).cpu().numpy()
            height, width = int(x.get("height", image.shape[0])), int(x.get("width", image.shape[1]))
            records = self.propose(image)
            masks_np = [r["segmentation"] for r in records]
            pooled, valid = self.crop_features(image, masks_np, [r["bbox"] for r in records])
            masks = (
                torch.from_numpy(np.stack(masks_np)).to(device)
                if records
                else torch.zeros((0, *image.shape[:2]), dtype=torch.bool, device=device)
            )
            kept = classify_pooled(
                self.segmenter.classifier, pooled=pooled, valid=valid, masks=masks,
                prototypes=prototypes, prototype_valid=prototype_valid,
                iou_pred=torch.tensor([float(r["predicted_iou"]) for r in records], device=device),
            )
            outputs.append({"instances": _instances(masks[kept.indices], kept.scores, kept.classes, height, width)})
        return outputs


@contextlib.contextmanager
def explicit_attention(module: torch.nn.Module):
    """Inside the block, every timm attention layer of ``module`` computes ``softmax(q k^T * scale) v``
    step by step instead of with PyTorch's fused ``scaled_dot_product_attention``: what DINOv2's own
    ``Attention`` runs when xFormers is absent (always on a CPU). No Time to Train builds its encoder
    from the DINOv2 repository (``dinov2.models.vision_transformer``), so this is their attention on
    a CPU; the outputs are the same to float rounding. Yields the number of layers switched."""
    layers = [m for m in module.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    saved = [m.fused_attn for m in layers]
    for m in layers:
        m.fused_attn = False
    try:
        yield len(layers)
    finally:
        for m, fused in zip(layers, saved):
            m.fused_attn = fused


#: --baseline-attention: how the baselines' semantic encoder computes attention
BASELINE_ATTENTION = ("explicit", "fused")


def _baseline_attention(encoder: torch.nn.Module, attention: str):
    if attention not in BASELINE_ATTENTION:
        raise ValueError(f"attention={attention!r}; expected one of {BASELINE_ATTENTION}.")
    return explicit_attention(encoder) if attention == "explicit" else contextlib.nullcontext()


class StageOrderBaseline:
    """"No Time to Train"'s ``forward_test``, stage by stage, over the segmenter's own modules and prototypes.

    Their order (no-time-to-train, ``no_time_to_train/models/Sam2MatchingBaseline_noAMG.py`` at
    020ce4d9: ``_forward_sam``, ``_compute_masks``, ``_forward_sam_decoder``, ``forward_test``,
    ``_compute_sim_global_avg``, ``_compute_semantic_ios``), per image:

    1. the SAM encoder once; the grid of the proposer's ``point_layout`` (theirs: ``input_linspace``)
       through the upstream mask decoder in chunks of ``points_per_batch`` prompts, the image
       embedding copied to every prompt of the chunk and all masks upscaled (the decoder's
       ``_decode_chunk``: the upstream call, what ``shared_image_decoding=False`` runs); per prompt
       the mask of highest predicted IoU among the multimask outputs; predicted IoU > threshold;
    2. the semantic encoder once on the whole image; its features upsampled (bilinear) to the mask
       grid and averaged where each mask's logit is > 0 (one ``[P, Hm*Wm] x [Hm*Wm, C]`` product);
    3. cosine to the prototypes floored at 0, best class; per-class NMS of the mask-grid boxes
       (inclusive) ranked by predicted IoU; at most ``nms_cap_factor x topk`` survivors, score > 0;
       masks resized (bilinear, antialiased) to the image; soft merge in NMS order; top-K.

    Masks empty on the mask grid are dropped before step 2 (theirs would average over no pixel:
    NaN scores); the pipeline drops them too. Everything else is the pipeline's modules and
    prototypes, so both should give the same detections up to float rounding
    (:func:`detection_agreement` measures it).
    """

    #: the config values this order reproduces: attribute path -> (where it is read, the value it must have)
    REQUIRED = {
        "model.proposer.multimask_output": ("proposals", "multimask_output", True),
        "model.proposer.stability_score_thresh": ("proposals", "stability_score_thresh", None),
        "model.proposer.box_nms_thresh": ("proposals", "box_nms_thresh", None),
        "model.proposer.max_proposals": ("proposals", "max_proposals", None),
        "model.proposer.min_region_area": ("proposals", "min_region_area", 0.0),
        "model.classifier.pooling": ("classifier", "pooling", "mask_grid"),
        "model.classifier.nms_rank": ("classifier", "nms_rank", "predicted_iou"),
        "model.classifier.merge": ("classifier", "merge", "soft"),
        "model.classifier.merge_order": ("classifier", "merge_order", "nms"),
        "model.classifier.merge_resolution": ("classifier", "merge_resolution", "original"),
        "model.classifier.box_convention": ("classifier", "box_convention", "inclusive"),
        "model.aggregation": ("segmenter", "aggregation", "mean"),
        "model.prompt_mode": ("segmenter", "prompt_mode", "points"),
    }

    def __init__(self, segmenter, *, attention: str = "explicit") -> None:
        self.segmenter = segmenter
        self.attention = attention  # the semantic encoder's attention (explicit: theirs on a CPU, see explicit_attention)
        self.proposals = segmenter.proposer.proposals
        self.classifier = segmenter.classifier
        owners = {"proposals": self.proposals, "classifier": self.classifier, "segmenter": segmenter}
        unmatched = {
            key: (getattr(owners[owner], name, None), wanted)
            for key, (owner, name, wanted) in self.REQUIRED.items()
            if getattr(owners[owner], name, None) != wanted
        }
        if unmatched:
            fix = " ".join(f"{k}={'null' if w is None else repr(w) if isinstance(w, str) else str(w).lower()}"
                           for k, (_, w) in unmatched.items())
            raise SystemExit(
                f"The stage-order baseline is No Time to Train's forward_test; the config sets {unmatched} (value, "
                f"theirs). Override them to compare: {fix}"
            )

    def propose(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Step 1: ``(logits [P, Hm, Wm], iou [P], fit)`` of the grid prompts above the IoU threshold, grid order."""
        from samantics_d2.modeling.proposals.point_grid import input_linspace_grid, point_grid

        proposals, backbone = self.proposals, self.segmenter.proposer.backbone
        decoder = proposals.decoder
        x, fits = backbone.prepare_with_fits([image])
        fit = fits[0]
        features = {k: v[0] for k, v in backbone(x).items()}
        if proposals.point_layout == "input_linspace":
            points = input_linspace_grid(proposals.points_per_side, fit.valid_box, device=decoder.device)
        else:
            points = fit.points_to_input(point_grid(proposals.points_per_side, fit.original_size, device=decoder.device))
        prepared = decoder.prepare_image(features)
        labels = torch.ones(points.shape[0], 1, dtype=torch.int64, device=decoder.device)
        sparse, dense = decoder.embed_prompts(points=points[:, None], point_labels=labels)
        logits, ious = [], []
        for start in range(0, points.shape[0], proposals.points_per_batch):
            chunk = slice(start, start + proposals.points_per_batch)
            # the upstream mask-decoder call: the image embedding copied to each prompt, every mask upscaled
            masks, iou = decoder._decode_chunk(prepared, sparse[chunk], dense[chunk], True)
            best = iou.argmax(dim=1)
            rows = torch.arange(best.shape[0], device=best.device)
            logits.append(masks[rows, best])
            ious.append(iou[rows, best])
        logits, iou = torch.cat(logits).float(), torch.cat(ious).float()
        keep = iou > proposals.pred_iou_thresh if proposals.pred_iou_thresh is not None else torch.ones_like(iou, dtype=torch.bool)
        keep &= (logits > 0).flatten(1).any(dim=1)
        return logits[keep], iou[keep], fit

    def pooled_features(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Step 2: ``[P, C]``, the semantic features upsampled to the mask grid, averaged where the logit > 0."""
        encoder = self.segmenter.semantic_encoder
        x, _ = encoder.prepare_with_fits([image])
        with _baseline_attention(encoder, self.attention):
            features = encoder(x)[encoder.dense_feature].float()  # [1, C, h, w]
        grid = torch.nn.functional.interpolate(
            features, size=tuple(logits.shape[-2:]), mode="bilinear", align_corners=False, antialias=True
        ).flatten(2)[0].T  # [Hm * Wm, C]
        masks = (logits > 0).flatten(1).float()
        return (masks @ grid) / masks.sum(dim=1, keepdim=True)

    def classify(self, logits, iou, pooled, fit, prototypes, prototype_valid):
        """Step 3: ``(masks [K, H, W], scores [K], classes [K])``."""
        from torchvision.ops import batched_nms

        from samantics_d2.modeling.semantic import masks_to_original, soft_merge_scores
        from samantics_d2.modeling.semantic.mask_ops import masks_to_boxes

        classifier = self.classifier
        protos = torch.nn.functional.normalize(prototypes[:, 0].float(), dim=-1) * prototype_valid[:, :1].float()
        cosine = torch.nn.functional.normalize(pooled, dim=-1) @ protos.T  # [P, K]
        scores, classes = cosine.clamp(min=0.0).max(dim=1)
        boxes = masks_to_boxes(logits > 0, convention="inclusive")
        keep = batched_nms(boxes, iou, classes, classifier.nms_thresh)
        if classifier.nms_cap_factor is not None:
            keep = keep[: classifier.nms_cap_factor * classifier.topk]
        keep = keep[scores[keep] > classifier.score_floor]
        masks = masks_to_original(logits[keep], fit, antialias=True)
        merged = soft_merge_scores(scores[keep], classes[keep], masks, pooled[keep], in_given_order=True)
        order = torch.argsort(merged, descending=True)[: classifier.topk]
        return masks[order], merged[order], classes[keep][order]

    def __call__(self, batched_inputs: list[dict]) -> list[dict]:
        prototypes, prototype_valid = self.segmenter.prepared_prototypes()
        outputs = []
        for x in batched_inputs:
            image = x["image"]
            height, width = int(x.get("height", image.shape[-2])), int(x.get("width", image.shape[-1]))
            logits, iou, fit = self.propose(image)
            pooled = self.pooled_features(image, logits)
            masks, scores, classes = self.classify(logits, iou, pooled, fit, prototypes, prototype_valid)
            outputs.append({"instances": _instances(masks, scores, classes, height, width,
                                                    convention=self.classifier.box_convention)})
        return outputs


class StageOrderMemoryBank:
    """"No Time to Train"'s memory fill, stage by stage, over the segmenter's semantic encoder and memory-bank options.

    Their order (``Sam2MatchingBaseline_noAMG.forward_fill_memory`` + ``postprocess_memory``, fed by
    ``COCOMemoryFillCropDataset`` one reference per batch): for every reference, its image read and
    cropped, one encoder forward on that crop alone, its full ``[h * w, C]`` feature map and
    ``[h * w]`` mask weights stored in ``[K, L, h * w, C]`` / ``[K, L, h * w]`` buffers (their
    ``mem_feats`` / ``mem_masks``); then per reference the mask-weighted mean of its map, per class
    the mean of its references, L2-normalised (``mem_feats_avg``), and the rest of their
    ``postprocess_memory`` (:func:`their_memory_statistics`). The crops, mask weights and
    pooling are the memory bank's own functions (:mod:`samantics_d2.modeling.semantic.memory_bank`),
    so the prototypes must equal :meth:`MemoryBank.prototypes` with ``aggregation="mean"`` up to
    float rounding; ours batches references (``memory_bank.batch_size``, automatic by default) and keeps only
    the pooled features.
    """

    def __init__(self, segmenter, *, attention: str = "explicit") -> None:
        config = segmenter.memory_bank_config
        if config.crop == "full" or segmenter.aggregation != "mean":
            raise SystemExit("The memory-bank stage order is their crop per reference and class means: it needs "
                             "model.memory_bank.crop=square_clipped (or square_context) and model.aggregation=mean.")
        self.segmenter = segmenter
        self.attention = attention  # the encoder's attention (explicit: theirs on a CPU, see explicit_attention)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prototypes [K, D], valid [K])`` in the reference classes' order."""
        from samantics_d2.modeling.preprocess import prepare_batch
        from samantics_d2.modeling.semantic.memory_bank import (
            _xywh_box,
            clipped_context_window,
            crop_mask_weights,
            crop_padded,
            reference_preprocess,
            square_context_window,
        )
        from samantics_d2.references.ordering import order_references

        segmenter, references = self.segmenter, self.segmenter.reference_bank
        encoder, config = segmenter.semantic_encoder, segmenter.memory_bank_config
        num_classes = len(references.reference_classes)
        shots = references.shots
        items = [r for r in order_references(references.dataset_dicts, num_classes) if shots is None or r.shot_rank < shots]
        spec = reference_preprocess(encoder, config)
        fill = np.round(np.asarray(spec.pixel_mean)).astype(np.uint8)
        device = next(encoder.parameters()).device
        slots = torch.bincount(torch.tensor([r.class_id for r in items], dtype=torch.long), minlength=num_classes)
        grid = spec.input_size // spec.patch_size
        channels = encoder.output_shape()[encoder.dense_feature].channels
        length = max(1, int(slots.max())) if len(items) else 1
        mem_feats = torch.zeros(num_classes, length, grid * grid, channels)
        mem_masks = torch.zeros(num_classes, length, grid * grid)
        filled = torch.zeros(num_classes, dtype=torch.long)
        with torch.inference_mode(), _baseline_attention(encoder, self.attention):
            for r in items:  # one reference per forward, its image read each time
                image, mask = r.read_image(), r.mask()
                box = _xywh_box(r.annotation, mask)
                window = (clipped_context_window(box, config.context, image.shape[:2]) if config.crop == "square_clipped"
                          else square_context_window(box, config.context))
                x, _ = prepare_batch([crop_padded(image, window, fill)], spec, device=device)
                dense = encoder(x)[encoder.dense_feature][0]  # [C, h, w]
                weights = crop_mask_weights([crop_padded(mask, window, 0)], tuple(dense.shape[-2:]),
                                            mode=config.mask_weights, input_size=spec.input_size)[0]
                c, slot = r.class_id, int(filled[r.class_id])
                mem_feats[c, slot] = dense.flatten(1).t().float().cpu()
                mem_masks[c, slot] = weights.flatten().float()
                filled[c] += 1
            area = mem_masks.sum(dim=-1)  # [K, L]
            instance = (mem_feats * mem_masks[..., None]).sum(dim=-2) / area.clamp_min(1e-12)[..., None]  # [K, L, C]
            used = area > 0
            counts = used.sum(dim=1)
            mean = (instance * used[..., None]).sum(dim=1) / counts.clamp_min(1)[:, None]
            self.statistics = their_memory_statistics(mem_feats, mem_masks, instance, filled)
        return torch.nn.functional.normalize(mean, dim=-1), counts > 0


def their_memory_statistics(mem_feats: torch.Tensor, mem_masks: torch.Tensor, instance: torch.Tensor, filled: torch.Tensor,
                            *, kmeans_k: int = 4, kmeans_iterations: int = 100, pca_components: int = 3) -> dict:
    """The rest of No Time to Train's ``postprocess_memory`` (at 020ce4d9), which their memory build
    computes whatever the recipe then uses: per class the covariance of the instance means, the
    leave-one-out similarity of each reference to the others' foreground tokens, K-means of the
    foreground tokens (``kmeans_k`` 4, 100 iterations in their configs) and a PCA (3 components, with
    scikit-learn as theirs). The mean-prototype recipe reads none of it; the stage-order baseline
    computes it so that its time is their build's. Our :func:`kmeans` stands in for theirs (same
    cost order). ``mem_feats [K, L, N, C]``, ``mem_masks [K, L, N]``, ``instance [K, L, C]``,
    ``filled [K]`` (references per class)."""
    from sklearn.decomposition import PCA

    from samantics_d2.modeling.semantic.memory_bank import kmeans

    out: dict[str, list] = {"covariance": [], "leave_one_out": [], "centres": [], "pca": []}
    for c in range(mem_feats.shape[0]):
        n = int(filled[c])
        if n == 0:
            continue
        centred = instance[c, :n] - instance[c, :n].mean(dim=0, keepdim=True)
        out["covariance"].append(centred.T @ centred / n)
        sims = []
        for j in range(n):
            own = mem_feats[c, j][mem_masks[c, j] > 0]
            rest = torch.cat((mem_feats[c, :j], mem_feats[c, j + 1 : n]))
            rest_masks = torch.cat((mem_masks[c, :j], mem_masks[c, j + 1 : n]))
            if len(own) and bool((rest_masks > 0).any()):
                a = torch.nn.functional.normalize(own.mean(dim=0), dim=0)
                b = torch.nn.functional.normalize(rest[rest_masks > 0].mean(dim=0), dim=0)
                sims.append((a @ b + 1) * 0.5)
        out["leave_one_out"].append(torch.stack(sims).mean() if sims else torch.tensor(float("nan")))
        foreground = mem_feats[c, :n].reshape(-1, mem_feats.shape[-1])[mem_masks[c, :n].reshape(-1) > 0]
        if foreground.shape[0] > max(kmeans_k, pca_components):
            out["centres"].append(kmeans(foreground, kmeans_k, iterations=kmeans_iterations))
            pca = PCA(n_components=pca_components).fit(foreground.numpy())
            out["pca"].append((pca.mean_, pca.components_))
    return out


def measure_memory_banks(segmenter, *, runs: int, attention: str = "explicit") -> dict:
    """Build the segmenter's memory bank ``runs`` times our way (:meth:`MemoryBank.build` + mean
    prototypes) and their way (:class:`StageOrderMemoryBank` with the encoder's ``attention``),
    taking turns; the median seconds of each and the largest difference between the two sets of
    prototypes."""
    from samantics_d2.modeling.semantic import MemoryBank
    from samantics_d2.modeling.weights import module_fingerprint

    references, encoder = segmenter.reference_bank, segmenter.semantic_encoder
    inputs = dict(references=references.dataset_dicts, backbone=encoder, config=segmenter.memory_bank_config,
                  weights_id=module_fingerprint(encoder), num_classes=len(references.reference_classes))
    theirs_fn = StageOrderMemoryBank(segmenter, attention=attention)
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(runs):
        logger.info("Building the memory bank our way ...")
        start = time.perf_counter()
        ours, ours_valid = MemoryBank.build(**inputs).prototypes(shots=references.shots, aggregation="mean")
        times["ours"].append(time.perf_counter() - start)
        logger.info("Building the memory bank in their stage order ...")
        start = time.perf_counter()
        theirs, theirs_valid = theirs_fn()
        times["theirs"].append(time.perf_counter() - start)
    ours, ours_valid = ours[:, 0], ours_valid[:, 0]
    same = bool(torch.equal(ours_valid, theirs_valid))
    diff = float((ours - theirs)[ours_valid].abs().max()) if same and bool(ours_valid.any()) else float("nan")
    return {"ours_s": statistics.median(times["ours"]), "theirs_s": statistics.median(times["theirs"]),
            "references": sum(len(d["annotations"]) for d in references.dataset_dicts), "same_classes": same,
            "max_prototype_diff": diff}


def resize_inputs(inputs: Sequence[dict], size: int) -> list[dict]:
    """The images resized to ``size x size`` (bilinear, antialiased, uint8), ``height`` / ``width``
    kept: the pipelines see ``size``-px source images and return outputs at the original size, as
    after Detectron2's test-time resize, so the evaluation is unchanged."""
    resized = []
    for x in inputs:
        image = torch.nn.functional.interpolate(x["image"][None].float(), size=(size, size), mode="bilinear",
                                                antialias=True, align_corners=False)[0]
        resized.append({**x, "image": image.round().clamp(0, 255).to(x["image"].dtype)})
    return resized


def detection_agreement(ours: Sequence[dict], theirs: Sequence[dict], *, mask_iou: float = 0.9) -> dict:
    """Share of detections two pipelines agree on, over the same images: a detection agrees when the
    other pipeline has one of the same class with mask IoU > ``mask_iou`` (matched one to one, in
    decreasing score; two empty masks are the same mask: IoU 1). Returns ``{"agree": share of the
    larger list, "max_score_diff": over matches}``."""
    from samantics_d2.modeling.semantic import mask_iou_matrix

    matched, total, score_diff = 0, 0, 0.0
    for a, b in zip(ours, theirs):
        a, b = a["instances"].to("cpu"), b["instances"].to("cpu")
        total += max(len(a), len(b))
        if not len(a) or not len(b):
            continue
        ious = mask_iou_matrix(a.pred_masks, b.pred_masks)
        empty_a, empty_b = (~m.pred_masks.flatten(1).any(dim=1) for m in (a, b))
        ious[empty_a[:, None] & empty_b[None]] = 1.0  # 0 / 0 otherwise
        ious[a.pred_classes[:, None] != b.pred_classes[None]] = 0
        taken = torch.zeros(len(b), dtype=torch.bool)
        for i in torch.argsort(a.scores, descending=True).tolist():
            candidates = (ious[i] > mask_iou) & ~taken
            if candidates.any():
                j = int(torch.where(candidates, ious[i], -1.0).argmax())
                taken[j] = True
                matched += 1
                score_diff = max(score_diff, abs(float(a.scores[i]) - float(b.scores[j])))
    return {"agree": matched / total if total else 1.0, "max_score_diff": score_diff}


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def measure_pipelines(
    pipelines: Sequence[tuple[str, Callable[[list[dict]], list[dict]]]],
    inputs: Sequence[dict],
    *,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    runs: int,
    existing: Sequence[torch.Tensor],
    weight_bytes: int,
    evaluator: Any,
    output_dir: str,
) -> dict:
    """Time each ``(name, pipeline)`` image by image over ``inputs`` (median over ``runs`` passes after
    ``warmup`` single-image passes; the pipelines take turns within each pass, so a machine whose load
    changes slows them alike), measure their peak memory and evaluate the last pass's outputs with the
    config's ``evaluator`` (a COCOEvaluator node, instantiated with its output in ``output_dir/name``),
    on these images only. Returns one row per pipeline, in order."""
    times: dict[str, list[float]] = {name: [] for name, _ in pipelines}
    outputs: dict[str, list[dict]] = {}
    with torch.no_grad(), _autocast(device, dtype):
        for name, pipeline in pipelines:
            for i in range(warmup):
                pipeline([inputs[i % len(inputs)]])
        for _ in range(runs):
            for name, pipeline in pipelines:
                logger.info("Timing %s on %d image(s) ...", name, len(inputs))
                outputs[name] = []
                _synchronize(device)
                start = time.perf_counter()
                for x in inputs:
                    outputs[name].extend(pipeline([x]))
                _synchronize(device)
                times[name].append(time.perf_counter() - start)
    return [
        _pipeline_row(name, pipeline, inputs, times[name], outputs[name], device=device, dtype=dtype, existing=existing,
                      weight_bytes=weight_bytes, evaluator=evaluator, output_dir=output_dir)
        for name, pipeline in pipelines
    ]


def _pipeline_row(name: str, pipeline, inputs, times, outputs, *, device, dtype, existing, weight_bytes, evaluator,
                  output_dir) -> dict:
    """One table row: the timed passes, the peak memory of one more image, and the evaluation."""
    import io

    from samantics_d2.d2 import instantiate

    evaluator.output_dir = os.path.join(output_dir, name)
    evaluator = instantiate(evaluator)
    if "img_ids" not in inspect.signature(evaluator.evaluate).parameters:
        raise SystemExit(f"{type(evaluator).__name__} cannot evaluate a subset of the images (no img_ids); the "
                         "benchmark needs a COCOEvaluator in dataloader.evaluator.")
    with torch.no_grad(), _autocast(device, dtype):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            pipeline([inputs[0]])
            peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
        else:  # weights + the peak of live tensor storages during one image (numpy arrays not counted)
            with PeakTensorMemory(existing=existing) as tracker:
                pipeline([inputs[0]])
            peak_mib = (weight_bytes + tracker.peak) / 2**20
    evaluator.reset()
    for x, y in zip(inputs, outputs):
        evaluator.process([x], [{"instances": y["instances"].to("cpu")}])
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # COCOeval prints its summary
        results = evaluator.evaluate(img_ids=[x["image_id"] for x in inputs]) or {}
    logger.debug("COCOeval output of %s:\n%s", name, printed.getvalue())
    median = statistics.median(times)
    return {
        "pipeline": name,
        "images_per_s": len(inputs) / median,
        "ms_per_image": median * 1000 / len(inputs),
        "peak_mib": peak_mib,
        "box_ap": results.get("bbox", {}).get("AP", float("nan")),
        "mask_ap": results.get("segm", {}).get("AP", float("nan")),
        "detections": sum(len(y["instances"]) for y in outputs) / len(inputs),
        "outputs": outputs,
    }


#: --baseline -> (the table's name of the baseline row, its class name in this module)
BASELINES = {
    "stage_order": ("their stage order: No Time to Train's forward_test", "StageOrderBaseline"),
    "amg": ("naive: SamAutomaticMaskGenerator + DINOv2 per crop", "NaiveBaseline"),
}


def training_free_table(rows: Sequence[dict], *, baseline_name: str) -> str:
    """Markdown table; the speed-up is relative to the last row (the baseline); "agree": the share of
    detections both pipelines make (:func:`detection_agreement`), and the largest score difference
    between the matched ones."""
    baseline = rows[-1]["images_per_s"]
    names = {"ours": "ours: TrainingFreeSegmenter", "baseline": baseline_name}
    lines = [
        "| pipeline | img/s | ms/img | peak mem (MiB) | box AP | mask AP | detections/img | agree | max score diff | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {names.get(r['pipeline'], r['pipeline'])} | {r['images_per_s']:.3f} | {r['ms_per_image']:.1f} | {r['peak_mib']:.1f} | "
            f"{r['box_ap']:.2f} | {r['mask_ap']:.2f} | {r['detections']:.1f} | {100 * r['agree']:.1f} % | "
            f"{r['max_score_diff']:.2g} | {r['images_per_s'] / baseline:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def run_training_free(args: argparse.Namespace) -> int:
    from samantics_d2.d2 import instantiate

    if args.images < 0 or (args.images == 0 and not args.memory_bank_runs):
        raise SystemExit(f"--images {args.images} must be >= 1 (or 0 with --memory-bank-runs R: the memory banks only).")
    cfg = load_config(args.config_file, args.opts)
    device, dtype = torch.device(cfg.train.device), DTYPES[args.dtype]
    segmenter = build_segmenter(cfg, args.config_file)
    attention = args.baseline_attention
    bank_note = ""
    if args.memory_bank_runs:
        bank_row = measure_memory_banks(segmenter, runs=args.memory_bank_runs, attention=attention)
        bank_note = (
            f"\nMemory bank ({bank_row['references']} references, median of {args.memory_bank_runs} build(s), taking "
            f"turns; their encoder's attention: {attention}): ours {bank_row['ours_s']:.1f} s, their stage order "
            f"(StageOrderMemoryBank) {bank_row['theirs_s']:.1f} s: **{bank_row['theirs_s'] / bank_row['ours_s']:.2f}x**; "
            f"same classes with prototypes: {bank_row['same_classes']}, largest prototype difference "
            f"{bank_row['max_prototype_diff']:.2g}.\n"
        )
        if not args.images:
            print(bank_note.strip())
            return 0
    baseline_name, baseline_class = BASELINES[args.baseline]
    # checks that it can reproduce the config's stages
    baseline = (StageOrderBaseline(segmenter, attention=attention) if baseline_class == "StageOrderBaseline"
                else globals()[baseline_class](segmenter))
    prototypes, prototype_valid = segmenter.prepared_prototypes()
    inputs = list(itertools.islice((x for batch in instantiate(cfg.dataloader.test) for x in batch), args.images))
    if args.image_size:
        inputs = resize_inputs(inputs, args.image_size)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="benchmark_training_free.")
    tensors = list(segmenter.parameters()) + list(segmenter.buffers()) + [prototypes, prototype_valid]
    if isinstance(baseline, NaiveBaseline):
        tensors += list(baseline.generator.predictor.model.buffers())
    tensors += [x["image"] for x in inputs]
    common = dict(
        inputs=inputs, device=device, dtype=dtype, warmup=args.warmup, runs=args.runs, existing=tensors,
        weight_bytes=sum(t.numel() * t.element_size() for t in segmenter.parameters()),
        evaluator=cfg.dataloader.evaluator, output_dir=output_dir,
    )
    rows = measure_pipelines([("ours", segmenter), ("baseline", baseline)], **common)
    agreement = detection_agreement(rows[0].pop("outputs"), rows[1].pop("outputs"))
    for row in rows:
        row.update(agree=agreement["agree"], max_score_diff=agreement["max_score_diff"])
    sam, semantic, proposals = segmenter.proposer.backbone, segmenter.semantic_encoder, segmenter.proposer.proposals
    encoders = [f"{type(e).__name__} {e.variant} ({e.size}, {e.preprocess.input_size} px, "
                f"{sum(p.numel() for p in e.parameters()) / 1e6:.2f} M parameters)" for e in (sam, semantic)]
    dataset, bank = cfg.dataloader.test.dataset.names, segmenter.reference_bank
    memory = ("torch.cuda.max_memory_allocated over one image" if device.type == "cuda" else
              "weights + peak of live torch tensor storages over one image (numpy arrays not counted)")
    settings = (
        f"{encoders[0]} with the weights of train.init_checkpoint ({cfg.train.init_checkpoint or 'empty: as built'}); "
        f"{encoders[1]}; {proposals.points_per_side}x{proposals.points_per_side} points, points_per_batch "
        f"{proposals.points_per_batch}, pred_iou_thresh {proposals.pred_iou_thresh}, min_region_area "
        f"{proposals.min_region_area:g}; {len(inputs)} image(s) of {dataset}"
        f"{f' resized to {args.image_size} x {args.image_size} px' if args.image_size else ''}; references {bank.source} (shots {bank.shots}); "
        f"seed {cfg.train.seed}; dtype {args.dtype}; {args.warmup} warm-up image(s), median of {args.runs} pass(es). "
        f"{f'Their semantic encoder attention: {attention}. ' if args.baseline == 'stage_order' else ''}"
        f"Peak memory: {memory}. AP: dataloader.evaluator on the same images (percent). Agree: share of the detections "
        f"(same class, mask IoU > 0.9, one to one) both pipelines make on these images."
    )
    section = (f"training-free-{device.type}-{args.dtype}-{os.path.splitext(os.path.basename(args.config_file))[0]}-"
               f"{sam.size}-{sam.preprocess.input_size}px-pps{proposals.points_per_side}-"
               f"semantic-{semantic.size}-{semantic.preprocess.input_size}px")
    if args.image_size:
        section += f"-source{args.image_size}px"
    if args.baseline != "stage_order":
        section += f"-{args.baseline}"
    if args.baseline == "stage_order" and attention != "explicit":
        section += f"-{attention}-attention"
    body = f"Settings: {settings}\n\n{training_free_table(rows, baseline_name=baseline_name)}{bank_note}"
    publish(args, device, section, body)
    return 0


# ------------------------------------------------------------------------------------------------
# linear_probe: cached probe grid against re-running the encoder every epoch


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_linear_probe(args: argparse.Namespace) -> int:
    import dataclasses

    from omegaconf import OmegaConf

    from samantics_d2.d2 import DatasetCatalog, MetadataCatalog, instantiate
    from samantics_d2.data.io import read_image
    from samantics_d2.evaluation import train_probe_grid
    from samantics_d2.modeling.linear_probe import PooledEncoder, build_feature_cache
    from samantics_d2.modeling.linear_probe.feature_cache import module_fingerprint
    from samantics_d2.modeling.linear_probe.probe import CachedFeatures, EncoderFeatures, ProbeTrainingConfig

    cfg = load_config(args.config_file, args.opts)
    if "job" not in cfg or "encoder" not in cfg:
        raise SystemExit(f"{args.config_file} has no 'encoder' and 'job' nodes; the linear_probe benchmark runs a linear-probe "
                         "config (configs/linear_probe/*.py).")
    job, device = cfg.job, torch.device(cfg.train.device)
    if job.train_dataset == job.val_dataset:
        raise SystemExit("job.train_dataset and job.val_dataset must differ: the cached run would reuse the train cache for val.")
    encoder = instantiate(cfg.encoder).to(device).eval()
    poolings, tag, batch = list(job.poolings), job.encoder_tag, job.batch_size
    pooled = PooledEncoder(encoder=encoder, poolings=poolings, normalization=job.normalization)
    train_dicts, val_dicts = DatasetCatalog.get(job.train_dataset), DatasetCatalog.get(job.val_dataset)
    if args.max_images:
        train_dicts, val_dicts = train_dicts[: args.max_images], val_dicts[: args.max_images]
    classes = MetadataCatalog.get(job.train_dataset).get("classes")
    grid = ProbeTrainingConfig(**OmegaConf.to_container(job.config, resolve=True))
    single = dataclasses.replace(grid, learning_rates=grid.learning_rates[:1], holdout_fraction=0.0)
    work = args.output_dir or tempfile.mkdtemp(prefix="benchmark_linear_probe.")

    def encoder_pass() -> None:  # read, preprocess and encode every image once (train + val)
        with torch.no_grad():
            for dicts in (train_dicts, val_dicts):
                for i in range(0, len(dicts), batch):
                    pooled(pooled.prepare([read_image(d["file_name"]) for d in dicts[i: i + batch]]).to(device))

    encoder_pass()  # warm-up
    t_pass = statistics.median(_timed(encoder_pass)[0] for _ in range(args.runs))

    def cached() -> None:  # the config's job (run_linear_probe) on these images, in a fresh cache
        root = tempfile.mkdtemp(dir=work, prefix="cache.")
        weights_hash = module_fingerprint(encoder)  # once for both splits, as the job does
        caches = [build_feature_cache(d, encoder=pooled, encoder_tag=tag, dataset_name=n, cache_root=root,
                                      weights_hash=weights_hash, batch_size=batch, num_workers=job.num_workers, device=device)
                  for d, n in ((train_dicts, job.train_dataset), (val_dicts, job.val_dataset))]
        train_probe_grid(train=CachedFeatures(caches[0], poolings=poolings, device=device),
                         val=CachedFeatures(caches[1], poolings=poolings, device=device),
                         poolings=poolings, num_classes=len(classes), config=grid, device=device)

    def encoder_in_the_loop() -> None:  # one probe, the encoder re-run on every batch of every epoch
        train_probe_grid(train=EncoderFeatures(train_dicts, encoder=pooled, device=device),
                         val=EncoderFeatures(val_dicts, encoder=pooled, device=device),
                         poolings=poolings[:1], num_classes=len(classes), config=single, device=device)

    t_cached = statistics.median(_timed(cached)[0] for _ in range(args.runs))
    t_loop = _timed(encoder_in_the_loop)[0]
    n_probes, ratio = len(grid.learning_rates) * len(poolings), t_cached / t_pass
    rows = [
        ("one encoder pass over train + val", t_pass, "1.00"),
        (f"cached: extract once + {n_probes} probes x {grid.epochs} epochs", t_cached, f"{ratio:.2f}"),
        (f"encoder in the loop: 1 probe x {grid.epochs} epochs", t_loop, f"{t_loop / t_pass:.2f}"),
    ]
    table = "| run | wall time (s) | x one encoder pass |\n|---|---:|---:|\n" + "".join(
        f"| {name} | {sec:.2f} | {x} |\n" for name, sec, x in rows)
    body = (
        f"Settings: encoder {tag} ({encoder.size}), poolings {poolings}, learning rates {list(grid.learning_rates)}, "
        f"{grid.epochs} epochs, batch {grid.batch_size}; {len(train_dicts)} train / {len(val_dicts)} val images "
        f"({job.train_dataset}, {job.val_dataset}); encoder pass and cached run: median of {args.runs}; the loop run once.\n\n"
        f"{table}\nTarget (cached grid of {n_probes} probes < 1.2x one encoder pass): "
        f"{'met' if ratio < 1.2 else 'NOT met'} ({ratio:.2f}x). "
        f"Re-running the encoder every epoch costs {t_loop / t_cached:.1f}x the cached grid for one probe.\n"
    )
    publish(args, device, f"linear-probe-{device.type}-{tag}-{encoder.size}", body)
    return 0



# ---------------------------------------------------------------------- predictor (issue 15)


def _median_ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.1f} (min {min(seconds) * 1000:.1f})"


def run_predictor(args: argparse.Namespace) -> int:
    """Latency of the interactive predictor: per image encode (``set_image``) and per click after it.

    Random weights (latency does not depend on the values). The image is scikit-learn's sample
    ``china.jpg`` (427 x 640), fitted to each encoder's input (1024 px for the full models). Clicks
    are random points of the image, the same for every model; each is timed for the
    multi-granularity answer (default box scales: 1 + 4 candidate prompts) and for the plain
    multimask answer (SamPredictor's), interleaved; labels off. Median and min in ms."""
    from sklearn.datasets import load_sample_images

    from samantics_d2.predictor import SamanticsPredictor

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    image = load_sample_images().images[0]
    rng = np.random.default_rng(0)
    clicks = rng.uniform([0, 0], [image.shape[1], image.shape[0]], size=(args.clicks, 2)).astype(np.float32)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}, image {image.shape[1]}x{image.shape[0]}")
    print("| model | input | set_image ms | click, multi-granularity ms | click, multimask ms | masks/click |")
    print("|---|---|---|---|---|---|")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for tag in args.tags:
        torch.manual_seed(0)
        predictor = SamanticsPredictor.from_tag(tag, size=args.size)
        predictor.backbone.to(device)
        predictor.decoder.to(device)
        encode = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            predictor.set_image(image)
            sync()
            encode.append(time.perf_counter() - start)
        multi, plain, counts = [], [], []
        for point in clicks:
            for mode, times in ((True, multi), (False, plain)):
                start = time.perf_counter()
                out = predictor.predict(points=point[None], point_labels=[1], multi_granularity=mode, labels=False)
                sync()
                times.append(time.perf_counter() - start)
                if mode:
                    counts.append(len(out))
        size = predictor.backbone.preprocess.input_size
        print(f"| {tag} ({args.size}) | {size} | {_median_ms(encode)} | {_median_ms(multi)} | {_median_ms(plain)} | "
              f"{np.mean(counts):.1f} |", flush=True)
    return 0


# ---------------------------------------------------------------------- mask recognition (issue 14)


def _disc_masks(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """``[count, H, W]`` bool: random discs of various sizes."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.arange(height)[:, None].float(), torch.arange(width)[None, :].float()
    centres = torch.rand(count, 2, generator=g) * torch.tensor([height, width])
    radii = 4 + torch.rand(count, generator=g) * min(height, width) / 4
    return ((ys - centres[:, 0, None, None]) ** 2 + (xs - centres[:, 1, None, None]) ** 2) < radii[:, None, None] ** 2


@torch.no_grad()
def run_mask_recognition(args: argparse.Namespace) -> int:
    """Masks/s of the batched CLIP mask recognisers against a per-mask loop, same masks, random-weight
    towers at full size: ``crop`` (CropRecognizer on a CLIP ViT, all crops in chunks, against one crop
    and one CLIP forward per mask) or ``dense`` (DensePoolRecognizer on a convolutional CLIP: the tower
    once per image on both sides, then all masks at once against one ``embed`` per mask). The two
    sides take turns (``--repeats`` rounds, median); their embeddings are compared."""
    from samantics_d2.modeling.backbone import build_encoder
    from samantics_d2.modeling.semantic.clip_recognition import CropRecognizer, DensePoolRecognizer

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    clip = build_encoder(args.tag).eval().to(device)
    image = torch.randint(0, 256, (1, 3, args.image_size, args.image_size), dtype=torch.uint8, device=device)
    masks = _disc_masks(args.masks, args.image_size, args.image_size, seed=0).to(device)
    if args.path == "crop":
        recognizer = CropRecognizer(clip=clip)
        batched = lambda: recognizer(image, [masks])[0]  # noqa: E731
        loop = lambda: torch.cat([recognizer(image, [m[None]])[0] for m in masks])  # noqa: E731
    else:
        recognizer = DensePoolRecognizer(clip=clip, input_size=args.input_size)

        def batched() -> torch.Tensor:
            features, fit = recognizer.encode(image)
            return recognizer.embed(features, fit, [masks])[0]

        def loop() -> torch.Tensor:
            features, fit = recognizer.encode(image)
            return torch.cat([recognizer.embed(features, fit, [m[None]])[0] for m in masks])

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    batched(), loop()  # warm-up
    times: dict[str, list[float]] = {"batched": [], "loop": []}
    for _ in range(args.repeats):  # taking turns
        for name, fn in (("batched", batched), ("loop", loop)):
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            times[name].append(time.perf_counter() - start)
            if name == "batched":
                a = out
            else:
                b = out
    seconds = {k: statistics.median(v) for k, v in times.items()}
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"{args.path} {args.tag}: {args.masks} masks on {args.image_size}x{args.image_size} ({machine}): "
          f"batched {seconds['batched']:.3f} s ({args.masks / seconds['batched']:.1f} masks/s), per-mask loop "
          f"{seconds['loop']:.3f} s ({args.masks / seconds['loop']:.1f} masks/s), "
          f"{seconds['loop'] / seconds['batched']:.1f}x; max |difference| {float((a - b).abs().max()):.2e}")
    return 0


# ---------------------------------------------------------------------- web app (issue 17)


def run_app(args: argparse.Namespace) -> int:
    """Seconds from a click on the app's Click tab to the masks' captions on screen, in headless
    Chromium: the app's default model (tools/app.py), the config's references, the first shapes_val
    image, one click on its first instance, ``--repeats`` times (clicks cleared in between; the first
    click also encodes the image)."""
    import importlib.util

    from samantics_d2.app.browser import click_latency, open_page, serve
    from samantics_d2.d2 import DatasetCatalog
    from samantics_d2.data.mapper import segmentation_to_mask

    spec = importlib.util.spec_from_file_location(
        "samantics_app_tool", os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = ["--output", tempfile.mkdtemp(prefix="app-benchmark-"), "--import-config-references"]
    argv += ["--checkpoint", args.checkpoint] if args.checkpoint else []
    blocks = tool.build(tool.parse_args(argv))
    d = DatasetCatalog.get("shapes_val")[0]
    ys, xs = np.nonzero(segmentation_to_mask(d["annotations"][0]["segmentation"], d["height"], d["width"]))
    load = os.getloadavg()[0]
    with serve(blocks) as url, open_page(url) as page:
        times = click_latency(page, image_file=d["file_name"], point=(float(np.median(xs)), float(np.median(ys))),
                              image_size=(d["width"], d["height"]), repeats=args.repeats)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load {load:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; click to masks on screen (s): " + ", ".join(f"{t:.3f}" for t in times))
    if len(times) > 1:
        later = times[1:]
        print(f"first {times[0]:.2f} s; next {len(later)}: median {statistics.median(later):.2f} s, "
              f"range {min(later):.2f}-{max(later):.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    enc = sub.add_parser("encoders", help="images/s, peak memory and GFLOPs of the encoder backbones")
    enc.add_argument(
        "--encoders", nargs="+", type=EncoderEntry.parse, default=None, metavar="TAG[/tiny][@SIZE]",
        help="encoders to measure (default: every tag at full size on CUDA; a small set on CPU)",
    )
    enc.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    enc.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    enc.add_argument("--batch-size", type=int, default=1)
    enc.add_argument("--channels-last", action="store_true", help="channels-last memory format for model and input")
    enc.add_argument("--compile", action="store_true", help="torch.compile the model (warm-up includes compilation)")
    enc.add_argument("--warmup", type=int, default=2, help="untimed passes first")
    enc.add_argument("--runs", type=int, default=5, help="timed passes; the median is reported")
    enc.add_argument("--markdown", default=None, metavar="FILE", help="also write the table into FILE (e.g. docs/benchmarks.md)")
    enc.set_defaults(func=run_encoders)

    tf = sub.add_parser("training_free", help="the training-free pipeline against No Time to Train's stage order (or a naive "
                                              "AMG + per-crop DINOv2 baseline)")
    add_config_arguments(tf, example="configs/training_free/shapes_tiny.py")
    tf.add_argument("--baseline", default="stage_order", choices=sorted(BASELINES),
                    help="stage_order: No Time to Train's forward_test over the same modules (StageOrderBaseline); amg: "
                         "SamAutomaticMaskGenerator + one DINOv2 forward per mask crop (NaiveBaseline, SAM ViT only)")
    tf.add_argument("--images", type=int, default=4, help="the first N images of dataloader.test")
    tf.add_argument("--warmup", type=int, default=1, help="untimed images first")
    tf.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="fp32, or autocast to bf16/fp16 for both pipelines")
    tf.add_argument("--image-size", type=int, default=None, metavar="N",
                    help="resize the test images to N x N px first (outputs at the original size, so AP is unchanged)")
    tf.add_argument("--memory-bank-runs", type=int, default=0, metavar="R",
                    help="also build the memory bank R times our way and in their stage order, taking turns (0: off; "
                         "with --images 0 only the memory banks are measured)")
    tf.add_argument("--baseline-attention", default="explicit", choices=BASELINE_ATTENTION,
                    help="the stage-order baselines' DINOv2 attention: explicit (theirs on a CPU: the DINOv2 repository's "
                         "Attention without xFormers) or fused (ours: PyTorch's scaled_dot_product_attention)")
    tf.set_defaults(func=run_training_free)

    lp = sub.add_parser("linear_probe", help="cached probe grid against re-running the encoder every epoch")
    add_config_arguments(lp, example="configs/linear_probe/tiny_shapes.py")
    lp.add_argument("--max-images", type=int, default=None, help="first N images of train and of val")
    lp.set_defaults(func=run_linear_probe)

    pr = sub.add_parser("predictor", help="interactive predictor: per image encode and per click after it")
    pr.add_argument("--tags", nargs="+", default=["sam_vit_b", "sam2.1_hiera_t"])
    pr.add_argument("--size", default="full", choices=("full", "tiny"))
    pr.add_argument("--repeats", type=int, default=3, help="set_image timings per model")
    pr.add_argument("--clicks", type=int, default=10, help="clicks timed per model and mode")
    pr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pr.set_defaults(func=run_predictor)

    mr = sub.add_parser("mask_recognition", help="masks/s of the batched CLIP mask recognisers vs a per-mask loop")
    mr.add_argument("--path", choices=("crop", "dense"), required=True)
    mr.add_argument("--tag", required=True, help="a CLIP weight tag (random weights at its full size)")
    mr.add_argument("--masks", type=int, default=32)
    mr.add_argument("--image-size", type=int, default=512, help="side of the square test image (pixels)")
    mr.add_argument("--input-size", type=int, default=None, help="dense: the tower's longer input side")
    mr.add_argument("--repeats", type=int, default=3)
    mr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    mr.set_defaults(func=run_mask_recognition)

    ap = sub.add_parser("app", help="web app: seconds from a click to the masks on screen (headless Chromium)")
    ap.add_argument("--checkpoint", default=None, help="the tiny SAM (default: the app's, output/demo/tiny_sam)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.set_defaults(func=run_app)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line the report shows
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "runs", 1) < 1 or getattr(args, "warmup", 0) < 0:
        raise SystemExit("--batch-size and --runs must be >= 1 and --warmup >= 0.")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
