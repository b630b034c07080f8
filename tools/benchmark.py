#!/usr/bin/env python
"""Speed benchmarks of the project's components, one subcommand per benchmark.

    python tools/benchmark.py encoders                      # default set for the device
    python tools/benchmark.py encoders --encoders sam_vit_b dinov2_vitl14@518 clip_vit_b32_openai/tiny \\
        --dtype bf16 --channels-last --compile --batch-size 8 --markdown docs/benchmarks.md

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

Later benchmarks (``training_free``, ``linear_probe``) add their own subcommands.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

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
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".benchmark.", suffix=".md")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run_encoders(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available; use --device cpu.")
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
    machine = machine_description(device)
    command = "python tools/benchmark.py " + " ".join(sys.argv[1:])
    stamp = datetime.date.today().isoformat()
    body = f"Machine: {machine}. Date: {stamp}.\n\nCommand: `{command}`\n\n{table}"
    print(body)  # the table is this command's output
    if args.markdown:
        section = f"encoders-{device.type}-{args.dtype}" + ("-channels-last" if args.channels_last else "")
        write_section(args.markdown, section + ("-compile" if args.compile else ""), body)
        logger.info("Wrote the table into %s", args.markdown)
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1 or getattr(args, "runs", 1) < 1 or getattr(args, "warmup", 0) < 0:
        raise SystemExit("--batch-size and --runs must be >= 1 and --warmup >= 0.")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
