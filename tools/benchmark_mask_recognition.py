#!/usr/bin/env python
"""Masks/s of the batched CLIP mask recognisers against a per-mask loop (issue 14, item 2).

For each path the same masks are embedded (random-weight towers at their full published size):

- ``crop``: :class:`CropRecognizer` on a CLIP ViT, all crops of an image in chunks, against one crop and one
  CLIP forward per mask (``recognizer(image, [mask[None]])`` for each mask);
- ``dense``: :class:`DensePoolRecognizer` on a convolutional CLIP; the tower runs once per image on both
  sides (``encode``), then all masks at once against one ``embed`` call per mask.

The two sides run interleaved (``--repeats`` rounds, median time), and their embeddings are compared.

    python tools/benchmark_mask_recognition.py --path crop --tag clip_vit_b16_openai --masks 32
    python tools/benchmark_mask_recognition.py --path dense --tag clip_rn50x16_openai --input-size 512 --masks 32
"""
from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

from samantics_d2.modeling.backbone import build_encoder
from samantics_d2.modeling.semantic.clip_recognition import CropRecognizer, DensePoolRecognizer

logger = logging.getLogger("benchmark_mask_recognition")


def _masks(count: int, height: int, width: int, seed: int) -> torch.Tensor:
    """``[count, H, W]`` bool: random discs of various sizes."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.arange(height)[:, None].float(), torch.arange(width)[None, :].float()
    centres = torch.rand(count, 2, generator=g) * torch.tensor([height, width])
    radii = 4 + torch.rand(count, generator=g) * min(height, width) / 4
    return ((ys - centres[:, 0, None, None]) ** 2 + (xs - centres[:, 1, None, None]) ** 2) < radii[:, None, None] ** 2


def _timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


@torch.no_grad()
def benchmark_mask_recognition(
    *, path: str, tag: str, masks: int, image_size: int, input_size: Optional[int], repeats: int, device: torch.device
) -> dict:
    """Seconds (median of ``repeats``) and masks/s of the batched path and of the per-mask loop."""
    clip = build_encoder(tag).eval().to(device)
    image = torch.randint(0, 256, (1, 3, image_size, image_size), dtype=torch.uint8, device=device)
    mask_set = _masks(masks, image_size, image_size, seed=0).to(device)
    if path == "crop":
        recognizer = CropRecognizer(clip=clip)
        batched = lambda: recognizer(image, [mask_set])[0]
        loop = lambda: torch.cat([recognizer(image, [m[None]])[0] for m in mask_set])
    else:
        recognizer = DensePoolRecognizer(clip=clip, input_size=input_size)

        def batched() -> torch.Tensor:
            features, fit = recognizer.encode(image)
            return recognizer.embed(features, fit, [mask_set])[0]

        def loop() -> torch.Tensor:
            features, fit = recognizer.encode(image)
            return torch.cat([recognizer.embed(features, fit, [m[None]])[0] for m in mask_set])

    batched(), loop()  # warm-up
    times: dict[str, list[float]] = {"batched": [], "loop": []}
    for _ in range(repeats):  # interleaved
        t, a = _timed(batched, device)
        times["batched"].append(t)
        t, b = _timed(loop, device)
        times["loop"].append(t)
    seconds = {k: statistics.median(v) for k, v in times.items()}
    return {
        "path": path,
        "tag": tag,
        "masks": masks,
        "seconds": seconds,
        "masks_per_s": {k: masks / v for k, v in seconds.items()},
        "max_abs_difference": float((a - b).abs().max()),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=("crop", "dense"), required=True)
    parser.add_argument("--tag", required=True, help="a CLIP weight tag (random weights at its full size)")
    parser.add_argument("--masks", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=512, help="side of the square test image (pixels)")
    parser.add_argument("--input-size", type=int, default=None, help="dense: the tower's longer input side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(0)
    device = torch.device(args.device)
    result = benchmark_mask_recognition(
        path=args.path, tag=args.tag, masks=args.masks, image_size=args.image_size, input_size=args.input_size,
        repeats=args.repeats, device=device,
    )
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    s, r = result["seconds"], result["masks_per_s"]
    print(
        f"{args.path} {args.tag}: {args.masks} masks on {args.image_size}x{args.image_size} ({machine}): "
        f"batched {s['batched']:.3f} s ({r['batched']:.1f} masks/s), per-mask loop {s['loop']:.3f} s "
        f"({r['loop']:.1f} masks/s), {s['loop'] / s['batched']:.1f}x; max |difference| {result['max_abs_difference']:.2e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
