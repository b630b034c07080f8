#!/usr/bin/env python
"""RefSAM's cached reference tokens: compute them once, evaluate with any number of shots.

    # compute_embeds: the mask-token outputs of every reference of a reference set (before the fuser)
    python tools/ref_sam_embeds.py compute --config-file configs/ref_sam/tiny_shapes.py \\
        --references shapes_train_ref5_seed0 --output embeds.safetensors \\
        train.init_checkpoint=output/ref_sam/tiny_shapes/model_final.pth
    #   (or --reference-json refs.json --image-root DIR: a COCO json of your own references)

    # eval_embeds: average the first --shots references per class, detect on the config's test set
    python tools/ref_sam_embeds.py eval --config-file configs/ref_sam/tiny_shapes.py \\
        --embeds embeds.safetensors --shots 3 [--oracle] [--gt-boxes] \\
        train.init_checkpoint=output/ref_sam/tiny_shapes/model_final.pth

The tokens file is safetensors (tokens, labels, shot ranks; class names, per-reference provenance
and the SAM weights' fingerprint as JSON in its header) plus the same metadata as a readable
``.json``; no pickles. Evaluation refuses a tokens file computed with other SAM weights.
``--oracle`` asks only about the classes present in each image (the published protocol);
``--gt-boxes`` prompts SAM with the GT boxes (mask-quality upper bound). Analysis:

    # t-SNE of the references: tokens before and after the fuser, next to DINOv2 / CLIP features
    python tools/ref_sam_embeds.py tsne --config-file ... --embeds embeds.safetensors --output tsne.png \
        [--encoders dinov2_vits14 clip_vit_b32_openai] [--encoder-size tiny] [--novel-classes "a,b"]
    # AP against shots over seeds: one tokens file per seed
    python tools/ref_sam_embeds.py shots --config-file ... --embeds-template embeds_seed{seed}.safetensors \
        --seeds 0 1 2 --shots 1 3 5 --output ap_vs_shots      # -> ap_vs_shots.csv, ap_vs_shots.png

The same evaluation runs
in ``train_net.py --eval-only model.reference_bank.features_path=embeds.safetensors
model.reference_bank.references=null model.reference_bank.shots=3`` (also on several GPUs); this
tool runs in one process.
Trailing ``key=value`` arguments override the config, as in ``train_net.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Optional, Sequence

import samantics_d2  # noqa: F401  (registers datasets and components)
from samantics_d2.checkpoint import load_init_checkpoint
from samantics_d2.config import check_override_keys
from samantics_d2.d2 import (
    DatasetCatalog,
    LazyConfig,
    inference_on_dataset,
    instantiate,
    log_backend,
    print_csv_format,
    setup_logger,
)
from samantics_d2.references import build_reference_bank, prepare_references, provenance_source
from samantics_d2.utils.io import atomic_path

logger = logging.getLogger("samantics_d2.tools.ref_sam_embeds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compute RefSAM reference tokens (compute) or evaluate RefSAM with them (eval).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    compute = sub.add_parser("compute", help="cache the mask tokens of every reference of a reference set")
    compute.add_argument("--config-file", required=True, help="a RefSAM config (its model and SAM weights).")
    source = compute.add_mutually_exclusive_group(required=True)
    source.add_argument("--references", help="a registered reference-set dataset, e.g. shapes_train_ref5_seed0.")
    source.add_argument("--reference-json", help="a COCO-format json of your own references (needs --image-root).")
    compute.add_argument("--image-root", help="image folder of --reference-json.")
    compute.add_argument("--output", required=True, help="tokens file to write (.safetensors; a .json beside it).")
    evaluate = sub.add_parser("eval", help="evaluate RefSAM on the config's test set with cached tokens")
    evaluate.add_argument("--config-file", required=True, help="a RefSAM config (model, dataloader.test, evaluator).")
    evaluate.add_argument("--embeds", required=True, help="tokens file written by `compute`.")
    evaluate.add_argument("--shots", type=int, default=None, help="references averaged per class (default: all).")
    evaluate.add_argument("--oracle", action="store_true", help="ask only about the classes present in each image.")
    evaluate.add_argument("--gt-boxes", action="store_true", help="prompt SAM with the GT boxes (mask upper bound).")
    evaluate.add_argument("--results", help="write the metrics here as JSON (default: <output_dir>/ref_sam_eval.json).")
    tsne = sub.add_parser("tsne", help="t-SNE plot of the references' features (PNG)")
    tsne.add_argument("--config-file", required=True, help="the RefSAM config (its fuser, via train.init_checkpoint).")
    tsne.add_argument("--embeds", required=True, help="tokens file written by `compute` (from a registered set).")
    tsne.add_argument("--encoders", nargs="*", default=["dinov2_vits14", "clip_vit_b32_openai"],
                      help="weight tags of other encoders whose mask-pooled reference features are shown too.")
    tsne.add_argument("--encoder-size", choices=["full", "tiny"], default="full",
                      help="'tiny': random tiny variants of --encoders (smoke tests; no weights needed).")
    tsne.add_argument("--novel-classes", default=None,
                      help="comma-separated novel class names (default: the COCO-FSOD and shapes novel classes).")
    tsne.add_argument("--output", required=True, help="PNG to write.")
    shots = sub.add_parser("shots", help="AP against the number of shots, over seeds (CSV + PNG)")
    shots.add_argument("--config-file", required=True, help="a RefSAM config (model, dataloader.test, evaluator).")
    shots.add_argument("--embeds-template", required=True, help="tokens file per seed, with '{seed}' in it.")
    shots.add_argument("--seeds", type=int, nargs="+", required=True)
    shots.add_argument("--shots", type=int, nargs="+", required=True)
    shots.add_argument("--output", required=True, help="output stem: <stem>.csv and <stem>.png are written.")
    for p in (compute, evaluate, tsne, shots):
        p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: key=value ...")
    return parser


def _load_config(config_file: str, opts: Sequence[str]) -> Any:
    cfg = LazyConfig.load(config_file)
    check_override_keys(cfg, list(opts))
    return LazyConfig.apply_overrides(cfg, list(opts))


def _build_model(cfg: Any) -> Any:
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    if cfg.train.init_checkpoint:
        load_init_checkpoint(model, cfg.train.init_checkpoint, training=False)
    else:
        logger.warning("train.init_checkpoint is empty: using the model as built by the config.")
    return model.eval()


def compute(args: argparse.Namespace) -> str:
    """Write the tokens file; returns its path."""
    cfg = _load_config(args.config_file, args.opts)
    if args.reference_json:
        if not args.image_root:
            raise SystemExit("--reference-json needs --image-root (the folder of its images).")
        bank = build_reference_bank(references=args.reference_json, image_root=args.image_root)
    else:
        if args.references not in DatasetCatalog.list():
            raise SystemExit(
                f"--references {args.references!r} is not a registered dataset; register it or use --reference-json."
            )
        bank = build_reference_bank(references=args.references)
    model = _build_model(cfg)
    tokens = model.encode_reference_set(bank.dataset_dicts, bank.reference_classes, source=bank.source)
    tokens.provenance["checkpoint"] = str(cfg.train.init_checkpoint or "")
    tokens.save(args.output)
    print(f"{len(tokens)} reference tokens ({tokens.shots_per_class()}) -> {args.output}")
    return args.output


def evaluate(args: argparse.Namespace) -> dict:
    """Run the config's test set with the cached tokens; returns the evaluator's results."""
    cfg = _load_config(args.config_file, args.opts)
    cfg.model.reference_bank.features_path = args.embeds
    cfg.model.reference_bank.references = None
    cfg.model.reference_bank.shots = args.shots
    if args.oracle:
        cfg.model.query_classes = "present"
    if args.gt_boxes:
        cfg.model.box_source = "gt"
    if args.oracle or args.gt_boxes:  # both read the GT instances of the test images
        cfg.dataloader.test.mapper.is_train = True
        cfg.dataloader.test.mapper.augmentations = []
    model = _build_model(cfg)
    prepare_references(model)  # the cached tokens, checked against the loaded SAM weights
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    path = args.results or os.path.join(cfg.train.output_dir, "ref_sam_eval.json")
    record = {
        "embeds": os.path.abspath(args.embeds),
        "shots": args.shots,
        "oracle": args.oracle,
        "gt_boxes": args.gt_boxes,
        "results": results,
    }
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, default=float)
    return results


def _novel_classes(text: Optional[str]) -> set[str]:
    if text is not None:
        return {name.strip() for name in text.split(",") if name.strip()}
    from samantics_d2.data.reference_sets import COCO_NOVEL_CLASSES
    from samantics_d2.data.shapes import SHAPES_SPLITS

    return set(COCO_NOVEL_CLASSES) | set(SHAPES_SPLITS["novel"])


def _save_figure(figure: Any, path: str) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def tsne(args: argparse.Namespace) -> dict[str, Any]:
    """Plot the references' features in 2-d; returns ``{panel name: [R, 2] coordinates}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch
    from sklearn.manifold import TSNE

    from samantics_d2.modeling.backbone import build_encoder
    from samantics_d2.modeling.ref_sam.reference_encoder import ReferenceTokens
    from samantics_d2.modeling.semantic import MemoryBank, MemoryBankConfig, weights_identity
    from samantics_d2.utils.visualization import class_colour

    cfg = _load_config(args.config_file, args.opts)
    tokens = ReferenceTokens.load(args.embeds)
    if len(tokens) < 3:
        raise SystemExit(f"{args.embeds} holds {len(tokens)} reference(s); t-SNE needs at least 3.")
    model = _build_model(cfg)
    with torch.no_grad():
        panels = {
            "SAM mask tokens (before fuser)": tokens.tokens.flatten(1).numpy(),
            "class prompts (after fuser)": model.fuser(tokens.tokens.to(model.device)).float().cpu().numpy(),
        }
    source = provenance_source(tokens.provenance) or ""
    if args.encoders:
        if source not in DatasetCatalog.list():
            raise SystemExit(
                f"{args.embeds} was computed from {source!r}, not a registered dataset; --encoders needs the reference "
                "set's masks: pass --encoders with no tag, or compute the tokens from a registered reference set."
            )
        references = build_reference_bank(references=source)
        annotation_ids = [ref["annotation_id"] for ref in tokens.references]
        for tag in args.encoders:
            encoder = build_encoder(tag, size=args.encoder_size, pretrained=args.encoder_size == "full").eval()
            weights_id = weights_identity(seed=0) if args.encoder_size == "tiny" else tag
            bank = MemoryBank.build(references=references.dataset_dicts, backbone=encoder, config=MemoryBankConfig(),
                                    weights_id=weights_id, num_classes=len(tokens.class_names))
            row_of = {a: i for i, a in enumerate(bank.annotation_ids)}
            missing = [a for a in annotation_ids if a not in row_of]
            if missing:
                raise SystemExit(f"{tag}: references {missing[:5]} of {args.embeds} are not in {source!r}; recompute.")
            panels[f"{tag} ({args.encoder_size})"] = bank.features[[row_of[a] for a in annotation_ids]].float().numpy()
    novel = _novel_classes(args.novel_classes)
    labels = tokens.labels.numpy()
    perplexity = float(min(30.0, max(1.0, (len(tokens) - 1) / 3)))
    coordinates = {
        name: TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(features)
        for name, features in panels.items()
    }
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    for ax, (name, xy) in zip(axes[0], coordinates.items()):
        for k, class_name in enumerate(tokens.class_names):
            rows = labels == k
            if not rows.any():
                continue
            is_novel = class_name in novel
            ax.scatter(xy[rows, 0], xy[rows, 1], s=28, color=np.array(class_colour(k)) / 255.0,
                       marker="^" if is_novel else "o", edgecolors="black" if is_novel else "none",
                       label=f"{class_name}{' (novel)' if is_novel else ''}")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    _save_figure(figure, args.output)
    plt.close(figure)
    print(f"t-SNE of {len(tokens)} references ({len(panels)} feature types) -> {args.output}")
    return coordinates


def shots(args: argparse.Namespace) -> list[dict]:
    """Evaluate every (seed, shots); write ``<output>.csv`` and ``<output>.png``; returns the rows."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if "{seed}" not in args.embeds_template:
        raise SystemExit(f"--embeds-template {args.embeds_template!r} has no '{{seed}}' to fill in.")
    cfg = _load_config(args.config_file, args.opts)
    model = _build_model(cfg)
    rows = []
    for seed in args.seeds:
        for n in args.shots:
            model.set_reference_bank(build_reference_bank(
                features_path=args.embeds_template.format(seed=seed), class_names=model.class_names(), shots=n
            ))
            prepare_references(model)
            loader, evaluator = instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
            results = inference_on_dataset(model, loader, evaluator)
            rows.append({"seed": seed, "shots": n, "bbox_AP": results.get("bbox", {}).get("AP", float("nan")),
                         "segm_AP": results.get("segm", {}).get("AP", float("nan"))})
            logger.info("seed %d, %d shot(s): %s", seed, n, rows[-1])
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["seed", "shots", "bbox_AP", "segm_AP"])
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(args.output + ".csv") as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text.getvalue())
    figure, ax = plt.subplots(figsize=(5, 3.5))
    for metric in ("bbox_AP", "segm_AP"):
        values = np.array([[r[metric] for r in rows if r["shots"] == n] for n in args.shots], dtype=float)
        ax.errorbar(args.shots, values.mean(axis=1), yerr=values.std(axis=1), marker="o", capsize=3,
                    label=f"{metric.replace('_', ' ')} (mean ± std over {len(args.seeds)} seeds)")
    ax.set_xlabel("shots per class")
    ax.set_ylabel("AP")
    ax.set_xticks(args.shots)
    ax.legend(fontsize=8)
    _save_figure(figure, args.output + ".png")
    plt.close(figure)
    print(f"AP against shots ({len(rows)} evaluations) -> {args.output}.csv, {args.output}.png")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> Any:
    args = build_parser().parse_args(argv)
    setup_logger(name="samantics_d2")
    log_backend()
    commands = {"compute": compute, "eval": evaluate, "tsne": tsne, "shots": shots}
    return commands[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
