#!/usr/bin/env python
"""Pick reference instances per category from a COCO instances json and write them as a COCO json.

    python tools/create_reference_json.py --input instances_train2017.json --output ref10_seed0.json \\
        --n-ref 10 --seed 0 [--categories novel|base|all|"name,name"] [--order random|largest] \\
        [--min-area 1024 --max-box-iou 0.5 ...] [--contact-sheets DIR --image-root DIR]

    # the RefSAM authors' evaluation references (create_eval_jsons.py), exactly:
    python tools/create_reference_json.py --input instances_train2017.json --output refsam_eval_seed42.json \\
        --preset refsam_eval --seed 42      # 10 per class (their n_ref); seeds 42, 123, 33

The selection (see ``samantics_d2/data/reference_sets.py``) is reproducible from its parameters:
the same input and options give byte-identical output. The parameters and the categories left
short of ``--n-ref`` go into the json's ``info`` and into ``<output stem>.selection.json``.
Every filter of ``ReferenceSelection`` is an option (``--max-area none`` removes a bound).
``--preset NAME`` uses a preset rule of ``samantics_d2/data/reference_presets.py`` instead (its own
filters, which the filter options do not change; ``--n-ref`` and ``--seed`` default to the preset's).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, Callable, Optional, Sequence, Union

from samantics_d2.data.reference_presets import REFERENCE_PRESETS
from samantics_d2.data.reference_sets import (
    ReferenceSelection,
    select_references,
    sidecar_path,
    write_contact_sheets,
    write_reference_json,
)

logger = logging.getLogger("samantics_d2.tools.create_reference_json")

_SPLITS = ("all", "novel", "base")


def _number_or_none(kind: type) -> Callable[[str], Optional[Union[int, float]]]:
    def parse(text: str) -> Optional[Union[int, float]]:
        if text.strip().lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Select n_ref reference instances per category from a COCO instances json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", required=True, help="COCO instances json to pick from.")
    parser.add_argument("--output", required=True, help="reference-set json to write (COCO format).")
    parser.add_argument(
        "--categories",
        default="all",
        help="'all', 'novel' / 'base' (the COCO-FSOD split of the 80 COCO classes) or comma-separated names.",
    )
    defaults = ReferenceSelection()
    parser.add_argument(
        "--preset", choices=sorted(REFERENCE_PRESETS), default=None,
        help="a published rule instead of ReferenceSelection (refsam_eval: the RefSAM authors' evaluation "
        "references, create_eval_jsons.py; seeds 42, 123, 33).",
    )
    parser.add_argument("--n-ref", type=int, default=None,
                        help=f"references per category (default {defaults.n_ref}, or the preset's).")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"seed of the random order (default {defaults.seed}, or the preset's).")
    parser.add_argument("--order", choices=("random", "largest"), default=defaults.order, help="candidate order.")
    filters = parser.add_argument_group("filters (ReferenceSelection fields; 'none' removes an optional bound)")
    for f in dataclasses.fields(ReferenceSelection):
        if f.name in ("n_ref", "seed", "order"):
            continue
        kind = int if isinstance(f.default, int) and not isinstance(f.default, bool) else float
        flag = f"--{f.name.replace('_', '-')}"
        filters.add_argument(flag, dest=f.name, type=_number_or_none(kind), default=f.default)
    parser.add_argument("--contact-sheets", metavar="DIR", help="write one PNG of the references per category here.")
    parser.add_argument("--image-root", metavar="DIR", help="folder of the images (needed by --contact-sheets).")
    parser.add_argument("--quiet", action="store_true", help="no progress bars and only warnings in the log.")
    return parser


def _categories(text: str) -> Union[str, list[str]]:
    text = text.strip()
    if text in _SPLITS:
        return text
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(
            f"--categories {text!r} names no category; expected one of {_SPLITS} or comma-separated names."
        )
    return names


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.contact_sheets and not args.image_root:
        parser.error("--contact-sheets needs --image-root (the folder the json's file_name are relative to).")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="[%(asctime)s %(name)s %(levelname)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    progress = not args.quiet and sys.stderr.isatty()
    params: dict[str, Any] = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(ReferenceSelection) if f.name not in ("n_ref", "seed")
    }
    shots = {k: v for k, v in (("n_ref", args.n_ref), ("seed", args.seed)) if v is not None}
    if args.preset is not None:
        changed = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(ReferenceSelection)
                   if f.name in params and params[f.name] != f.default]
        if changed:
            parser.error(f"{', '.join(changed)} do not apply to --preset {args.preset} (it has its own filters); "
                         "drop them, or drop --preset to use ReferenceSelection.")
    try:
        if args.preset is not None:
            reference_set = REFERENCE_PRESETS[args.preset](**shots).select(
                args.input, categories=_categories(args.categories), progress=progress
            )
        else:
            selection = ReferenceSelection(**params, **shots)
            reference_set = select_references(
                args.input, selection, categories=_categories(args.categories), progress=progress
            )
        output = write_reference_json(reference_set, args.output)
        sheets = []
        if args.contact_sheets:
            sheets = write_contact_sheets(
                reference_set, args.contact_sheets, image_root=args.image_root, progress=progress
            )
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"create_reference_json.py: error: {e}", file=sys.stderr)
        return 2

    # What the user asked for: where the files are and which categories fell short.
    names = reference_set.category_names
    total = sum(len(ids) for ids in reference_set.picks.values())
    print(f"Wrote {total} references for {len(reference_set.category_ids)} categories to {output}")
    print(f"Selection parameters: {sidecar_path(output)}")
    if sheets:
        print(f"Contact sheets: {len(sheets)} PNG files in {args.contact_sheets}")
    for c, missing in reference_set.shortfall.items():
        picked = len(reference_set.picks[c])
        print(f"SHORT: {names[c]!r} (id {c}) has {picked} of {reference_set.shots} references ({missing} missing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
