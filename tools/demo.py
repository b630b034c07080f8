#!/usr/bin/env python
"""The demo `make demo` runs: the training-free pipeline on the synthetic shapes dataset, on CPU.

1. trains a tiny SAM on shapes (configs/quick/tiny_sam_shapes.py; skipped when its final checkpoint exists);
2. evaluates the training-free pipeline with it (configs/training_free/shapes_tiny.py --eval-only):
   COCOEvaluator's box and mask AP table;
3. segments the shapes_val images with tools/segment.py from the same references and writes overlays.

Everything goes to --output (default output/demo). No pretrained weights are involved: the DINOv2
is a tiny random network, and the SAM is the tiny one trained in step 1.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAM_CONFIG = "configs/quick/tiny_sam_shapes.py"
PIPELINE_CONFIG = "configs/training_free/shapes_tiny.py"
REFERENCES = "shapes_train_ref5_seed0"


def step(title: str, args: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/demo")
    args = parser.parse_args()
    out = args.output
    sam_dir = os.path.join(out, "tiny_sam")
    checkpoint = os.path.join(sam_dir, "model_final.pth")
    if os.path.exists(checkpoint):
        print(f"Using the tiny SAM trained earlier: {checkpoint} (delete it to train again).")
    else:
        step("1/3 train a tiny SAM on shapes", ["train_net.py", "--config-file", SAM_CONFIG, "--resume",
                                                f"train.output_dir={sam_dir}"])
    step("2/3 training-free pipeline on shapes_val: COCO box and mask AP",
         ["train_net.py", "--config-file", PIPELINE_CONFIG, "--eval-only", f"train.init_checkpoint={checkpoint}",
          f"train.output_dir={os.path.join(out, 'eval')}"])

    import samantics_d2  # noqa: F401  (registers the datasets)
    from samantics_d2.d2 import DatasetCatalog, MetadataCatalog

    DatasetCatalog.get(REFERENCES)  # creates the reference json on first use
    DatasetCatalog.get("shapes_val")
    refs, val = MetadataCatalog.get(REFERENCES), MetadataCatalog.get("shapes_val")
    step("3/3 tools/segment.py on the shapes_val images, from the same references",
         ["tools/segment.py", "--config-file", PIPELINE_CONFIG, "--references", refs.json_file, "--image-root",
          refs.image_root, "--images", val.image_root, "--output", os.path.join(out, "segment"),
          f"train.init_checkpoint={checkpoint}"])
    print(f"\nDone. AP table above; overlays in {os.path.join(out, 'segment', 'overlays')}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
