#!/usr/bin/env python
"""Latency of the interactive predictor: per image encode (``set_image``) and per click after it.

    python tools/benchmark_predictor.py [--tags sam_vit_b sam2.1_hiera_t] [--size full|tiny] [--repeats 3] [--clicks 10]

Random weights (no file needed; latency does not depend on the values). The image is scikit-learn's
sample ``china.jpg`` (427 x 640), fitted to each encoder's input (1024 px for the full models).
Clicks are random points of the image, the same for every model; each is timed for the
multi-granularity answer (default box scales: 1 + 4 candidate prompts) and for the plain multimask
answer (SamPredictor's), interleaved; labels off (no semantic encoder). Median and min in ms.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from samantics_d2.predictor import SamanticsPredictor


def _ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.1f} (min {min(seconds) * 1000:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", nargs="+", default=["sam_vit_b", "sam2.1_hiera_t"])
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--repeats", type=int, default=3, help="set_image timings per model")
    parser.add_argument("--clicks", type=int, default=10, help="clicks timed per model and mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    from sklearn.datasets import load_sample_images

    image = load_sample_images().images[0]
    rng = np.random.default_rng(0)
    clicks = rng.uniform([0, 0], [image.shape[1], image.shape[0]], size=(args.clicks, 2)).astype(np.float32)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.1f}, image {image.shape[1]}x{image.shape[0]}")
    print("| model | input | set_image ms | click, multi-granularity ms | click, multimask ms | masks/click |")
    print("|---|---|---|---|---|---|")
    for tag in args.tags:
        torch.manual_seed(0)
        predictor = SamanticsPredictor.from_tag(tag, size=args.size)
        predictor.backbone.to(args.device)
        predictor.decoder.to(args.device)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
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
        print(f"| {tag} ({args.size}) | {size} | {_ms(encode)} | {_ms(multi)} | {_ms(plain)} | {np.mean(counts):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
