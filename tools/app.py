#!/usr/bin/env python
"""The local web app: define classes, click on objects, segment everything (``make app``).

    python tools/app.py [--config-file CFG] [--checkpoint SAM.pth] [--host 127.0.0.1] [--port 7860]
                        [--classes classes.json] [--import-config-references] [key=value ...]

Default model: the demo's tiny models on the synthetic shapes (configs/app/shapes_tiny.py: the
training-free pipeline of configs/training_free/shapes_tiny.py plus a tiny random CLIP for classes named by words)
with the tiny SAM that `make demo` trains (output/demo/tiny_sam/model_final.pth) when it exists,
else random weights (the page says which). Any training-free config works when its weights are under
$SAMANTICS_WEIGHTS. The app listens on 127.0.0.1 only unless --host says otherwise. Uploads larger
than --max-upload-mb are refused with a message in the page.

Every button calls samantics_d2.app.Workspace (the same calls work in Python), see docs/app.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

# tools/click.py has the name of the `click` package, which Gradio's server imports: a script run
# from this folder would import the tool instead. Take this folder off the import path first.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/app/shapes_tiny.py"
DEMO_CHECKPOINT = "output/demo/tiny_sam/model_final.pth"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help=f"training-free LazyConfig (default {DEFAULT_CONFIG})")
    parser.add_argument("--checkpoint", default=None,
                        help=f"SAM weights trained with train_net.py (default: {DEMO_CHECKPOINT} with the default "
                             "config when it exists, else the config's train.init_checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--output", default="output/app", help="working folder (references, memory banks, exports)")
    parser.add_argument("--classes", default=None, help="a classes file saved by the app, loaded at start")
    parser.add_argument("--import-config-references", action="store_true",
                        help="start with the config's reference set as the classes (the shapes classes by default)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (MB)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides")
    return parser.parse_args(argv)


def build(args: argparse.Namespace):
    """The Gradio Blocks of ``args`` (no server started)."""
    from samantics_d2.app import ClassBank, Workspace
    from samantics_d2.app.ui import build_app

    from samantics_d2.config import resolve_config_file

    config = resolve_config_file(args.config_file, example=DEFAULT_CONFIG)
    checkpoint = args.checkpoint
    demo_checkpoint = os.path.join(ROOT, DEMO_CHECKPOINT)
    if checkpoint is None and args.config_file == DEFAULT_CONFIG and os.path.isfile(demo_checkpoint):
        checkpoint = demo_checkpoint
    if checkpoint is None and args.config_file == DEFAULT_CONFIG:
        logging.getLogger("samantics_d2.tools.app").warning(
            "No %s: the tiny SAM has random weights (its masks are noise); run `make demo` first to train it.",
            DEMO_CHECKPOINT)
    workspace = Workspace.from_config(config, folder=args.output, overrides=args.opts, checkpoint=checkpoint)
    if args.classes:
        workspace.classes.merge(ClassBank.load(args.classes))
    if args.import_config_references:
        workspace.import_config_references()
    return build_app(workspace, output_dir=args.output)


def main(argv=None) -> int:
    args = parse_args(argv)
    from samantics_d2.d2 import setup_logger

    setup_logger(name="samantics_d2")
    blocks = build(args)
    blocks.queue(default_concurrency_limit=1).launch(
        server_name=args.host, server_port=args.port, max_file_size=int(args.max_upload_mb * 1024 * 1024),
        footer_links=["api"], show_error=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
