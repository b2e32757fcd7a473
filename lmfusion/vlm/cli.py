"""`lmfusion vlm build`: train the tiny LLaVA-style VLM; `lmfusion vlm eval`: its held-out accuracy."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

# Recipe fields the build command exposes: flag -> (field, help). Defaults come from the recipe.
_BUILD_FLAGS = {
    "--base-model": ("base_model", "text LM: the alias smollm2-135m or a local HF folder"),
    "--steps": ("steps", "stage-1 optimizer steps (answers through the frozen LM)"),
    "--batch-size": ("batch_size", "stage-1 examples per step"),
    "--lr": ("lr", "stage-1 peak learning rate (AdamW, warm-up then cosine to a tenth)"),
    "--tower-lr-scale": ("tower_lr_scale", "stage-1 tower learning rate as a share of --lr (0 = frozen)"),
    "--pretrain-steps": ("pretrain_steps", "stage-0 steps of the tower alone on attribute labels (0 = skip)"),
    "--train-scenes": ("train_scenes", "number of training scenes (generated, or read from --data)"),
    "--train-seed": ("train_seed", "shapes seed of the generated training scenes (evaluate on another)"),
    "--patch-size": ("patch_size", "tower patch side in pixels; image tokens = (image_size / patch_size)^2"),
    "--tower-hidden": ("tower_hidden", "tower width"),
    "--tower-layers": ("tower_layers", "tower depth"),
    "--seed": ("seed", "seed of the initial weights and of example sampling"),
    "--threads": ("threads", "torch CPU threads"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    from .train import TinyLlavaRecipe

    defaults = {f.name: f.default for f in dataclasses.fields(TinyLlavaRecipe)}
    vlm = subparsers.add_parser("vlm", help="build and evaluate a small LLaVA-style VLM (SmolLM2 + SigLIP tower)")
    commands = vlm.add_subparsers(dest="vlm_command", required=True)

    build = commands.add_parser("build", help="train a LLaVA-style VLM on shapes questions and save it as an HF folder",
                                description="Defaults are the recipe of benchmarks/results/tiny_llava.md.")
    build.add_argument("--out", required=True, help="output folder (a standard HF Llava folder)")
    build.add_argument("--data", default=None,
                       help="a shapes image folder (`lmfusion data shapes`) to train on instead of generated scenes")
    for flag, (field, text) in _BUILD_FLAGS.items():
        kind = type(defaults[field])
        build.add_argument(flag, type=kind, default=None, help=f"{text} (default {defaults[field]})")
    build.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)

    evaluate = commands.add_parser("eval", help="held-out answer and caption accuracy of a VLM folder, with blind baselines")
    evaluate.add_argument("--vlm", required=True, help="the VLM folder (`lmfusion vlm build --out`)")
    evaluate.add_argument("--seed", type=int, default=1, help="shapes seed of the held-out scenes (default 1; "
                          "must differ from the training seed)")
    evaluate.add_argument("--count", type=int, default=200, help="number of held-out single-object scenes (default 200)")
    evaluate.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    evaluate.add_argument("--max-new-tokens", type=int, default=24,
                          help="answer length limit in tokens (default 24; the longest caption is about 12)")
    evaluate.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    evaluate.add_argument("--out", default=None, help="also write the full report (with examples) to this JSON file")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    evaluate.set_defaults(func=_eval)


def _build(args: argparse.Namespace) -> int:
    from .train import TinyLlavaRecipe, build_tiny_llava

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _) in _BUILD_FLAGS.items()}
    recipe = TinyLlavaRecipe(**{k: v for k, v in overrides.items() if v is not None})
    started = time.perf_counter()
    record = build_tiny_llava(out, recipe, data=args.data, progress=not args.no_progress)
    print(f"answer loss {record['first_answer_loss']:.3f} -> {record['final_answer_loss']:.3f}; "
          f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import evaluate_vlm, format_report
    from .questions import generated_scenes
    from .train import RECIPE_FILE

    for flag in ("count", "batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    recipe_file = Path(args.vlm) / RECIPE_FILE
    recipe = json.loads(recipe_file.read_text())["recipe"] if recipe_file.is_file() else {}
    if recipe.get("train_seed") == args.seed:
        raise ValueError(f"--seed {args.seed} is the seed {args.vlm} was trained on; pick a held-out seed")
    torch.set_num_threads(args.threads)
    image_size = json.loads((Path(args.vlm) / "config.json").read_text())["vision_config"]["image_size"] \
        if (Path(args.vlm) / "config.json").is_file() else 64
    scenes = generated_scenes(args.seed, args.count, image_size)
    started = time.perf_counter()
    report = evaluate_vlm(args.vlm, scenes, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          progress=not args.no_progress, base_model=recipe.get("base_model"))
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(format_report(report))
    print(f"evaluated in {report['seconds']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0
