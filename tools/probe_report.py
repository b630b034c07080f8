#!/usr/bin/env python
"""Gather linear-probe runs into the table of "There is no SAMantics!" (encoder, top-1, top-5).

    python tools/probe_report.py output/linear_probe/ [more run folders ...] --output-dir output/report
    python tools/probe_report.py output/ --compare-paper

Every ``linear_probe_results.json`` under the given folders (searched recursively) is one row: the
val top-1/top-5 of the probe chosen by that run. Writes ``probe_report.md`` (Markdown table),
``probe_report.csv`` (one row per run, with pooling, learning rate and the results file) and
``probe_report.png`` (bar plot) into ``--output-dir``, and prints the Markdown table.
Rows follow the paper's order (SAM, SAM 2, CLIP, DINOv2), then other encoders alphabetically.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from typing import Optional, Sequence

logger = logging.getLogger("samantics_d2.tools.probe_report")

RESULTS_FILE = "linear_probe_results.json"  # samantics_d2.evaluation.linear_probe.RESULTS_FILE
RESULTS_FORMAT = "samantics_d2.linear_probe/1"  # samantics_d2.evaluation.linear_probe.RESULTS_FORMAT
# The encoders and numbers of the paper (ImageNet-1K val, percent), by weight tag, in its table order.
PAPER = {
    "sam_vit_b": ("SAM ViT-B", 11.06, 25.37),
    "sam2.1_hiera_t": ("SAM 2.1 Hiera-T", 23.16, 44.44),
    "clip_vit_b32_openai": ("CLIP ViT-B/32", 73.92, 92.89),
    "dinov2_vits14": ("DINOv2 ViT-S/14", 77.43, 93.78),
}


def find_results(folders: Sequence[str]) -> list[str]:
    """Paths of every results file under ``folders``, sorted; an error for a folder that does not exist."""
    paths = []
    for folder in folders:
        if os.path.isfile(folder) and folder.endswith(".json"):
            paths.append(folder)
            continue
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder!r} is neither a folder nor a results file; pass run output folders.")
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            if RESULTS_FILE in filenames:
                paths.append(os.path.join(dirpath, RESULTS_FILE))
    return sorted(dict.fromkeys(paths))


def load_rows(paths: Sequence[str]) -> list[dict]:
    """One row per results file: encoder, display name, pooling, lr, top-1, top-5, path."""
    rows = []
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        if results.get("format") != RESULTS_FORMAT:
            raise ValueError(f"{path} is not a linear-probe results file (format {results.get('format')!r}, "
                             f"expected {RESULTS_FORMAT!r}).")
        chosen = results["chosen"]
        encoder = results.get("encoder") or results.get("run", {}).get("encoder_tag") or "unknown"
        rows.append({
            "encoder": encoder,
            "name": PAPER.get(encoder, (encoder,))[0],
            "pooling": chosen["pooling"],
            "lr": chosen["lr"],
            "top1": float(chosen["val"]["top1"]),
            "top5": float(chosen["val"].get("top5", float("nan"))),
            "path": path,
        })
    order = list(PAPER)
    rows.sort(key=lambda r: (order.index(r["encoder"]) if r["encoder"] in order else len(order), r["encoder"], r["path"]))
    names = [r["name"] for r in rows]
    for r in rows:  # several runs of one encoder: tell them apart by their folder
        if names.count(r["name"]) > 1:
            r["name"] = f"{r['name']} ({os.path.basename(os.path.dirname(os.path.abspath(r['path'])))})"
    return rows


def markdown_table(rows: Sequence[dict], *, compare_paper: bool = False) -> str:
    header = ["Encoder", "Top-1 (%)", "Top-5 (%)"] + (["Paper top-1 (%)", "Paper top-5 (%)"] if compare_paper else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in rows:
        cells = [r["name"], f"{r['top1']:.2f}", f"{r['top5']:.2f}"]
        if compare_paper:
            paper = PAPER.get(r["encoder"])
            cells += [f"{paper[1]:.2f}", f"{paper[2]:.2f}"] if paper else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["encoder", "name", "pooling", "lr", "top1", "top5", "results_file"])
    for r in rows:
        writer.writerow([r["encoder"], r["name"], r["pooling"], r["lr"], f"{r['top1']:.4f}", f"{r['top5']:.4f}", r["path"]])
    return buffer.getvalue()


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it into place."""
    from samantics_d2.utils.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def bar_plot(rows: Sequence[dict], path: str) -> None:
    """Grouped bars: top-1 and top-5 per encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 3.5))
    for offset, key, label in ((-0.2, "top1", "Top-1"), (0.2, "top5", "Top-5")):
        values = [r[key] for r in rows]
        bars = ax.bar(x + offset, values, width=0.4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [r["name"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("ImageNet val accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Linear probes on frozen encoders")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    _atomic_write(path, buffer.getvalue())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", help=f"run output folders (searched for {RESULTS_FILE}) or results files")
    parser.add_argument("--output-dir", default=None, help="where to write probe_report.{md,csv,png} (default: the first folder)")
    parser.add_argument("--compare-paper", action="store_true", help="add the paper's numbers as two more columns")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    paths = find_results(args.folders)
    if not paths:
        parser.error(f"no {RESULTS_FILE} under {args.folders}; run the linear probe first.")
    rows = load_rows(paths)
    output_dir = args.output_dir or (args.folders[0] if os.path.isdir(args.folders[0]) else os.path.dirname(args.folders[0]))
    os.makedirs(output_dir, exist_ok=True)
    table = markdown_table(rows, compare_paper=args.compare_paper)
    _atomic_write(os.path.join(output_dir, "probe_report.md"), table.encode())
    _atomic_write(os.path.join(output_dir, "probe_report.csv"), csv_table(rows).encode())
    bar_plot(rows, os.path.join(output_dir, "probe_report.png"))
    logger.info("%d runs; wrote probe_report.md, .csv and .png in %s", len(rows), output_dir)
    sys.stdout.write(table)  # the table is the tool's output for the user
    return 0


if __name__ == "__main__":
    sys.exit(main())
