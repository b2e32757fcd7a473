"""`lmfusion train`: every TrainConfig field is also a flag (`--max-steps 200`, `--codec '{name: taef2}'`).

Resolution order: defaults <- --preset <- --config FILE <- flags. Values are parsed as YAML, so
numbers, booleans, lists and mappings work as on the command line as in the file.

    lmfusion train --preset quickstart
    lmfusion train --config configs/quickstart.yaml --max-steps 100 --name longer
    lmfusion train --preset quickstart --resume                  # continue after a crash
    torchrun --standalone --nproc_per_node 2 -m lmfusion.cli train --preset quickstart
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex

from .config import PRESETS, RENAMED_KEYS, TrainConfig, load_config, parse_value
from .config_help import FIELD_HELP


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train the image modules of an LMFusion model",
        description="Train LMFusion: frozen text LM + trainable image copies, text CE + 5 x diffusion MSE.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[-1],
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset")
    parser.add_argument("--config", help="YAML file of config keys (overrides the preset)")
    parser.add_argument("--resume", action="store_true", help="continue runs/<name> from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing runs/<name> first")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device from the base model's config.json (no weights), print "
                             "parameters, tokens per step and per-rank memory under DDP and FSDP, and exit")
    parser.add_argument("--world-size", type=int, default=1, metavar="N",
                        help="ranks the --dry-run estimates are for (default: 1)")
    fields = parser.add_argument_group("config keys (see configs/quickstart.yaml); defaults before any preset")
    defaults = TrainConfig().to_dict()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        # argparse expands %-formats in help; a default such as "50%" must stay literal.
        text = f"{FIELD_HELP.get(field.name, '')} (default: {json.dumps(defaults[field.name])})".replace("%", "%%")
        if field.type in ("list", list):
            fields.add_argument(flag, dest=field.name, nargs="+", default=argparse.SUPPRESS, metavar="VALUE", help=text)
        elif field.type in ("bool", bool):
            fields.add_argument(flag, dest=field.name, nargs="?", const=True, type=parse_value, default=argparse.SUPPRESS,
                                help=text)
        else:  # strings stay verbatim (YAML would turn "no" into False); the rest parse as YAML
            kind = str if field.type in ("str", str) else parse_value
            fields.add_argument(flag, dest=field.name, type=kind, default=argparse.SUPPRESS, metavar="VALUE", help=text)
    for old, new in RENAMED_KEYS.items():  # old spellings still work, unlisted
        fields.add_argument("--" + old.replace("_", "-"), dest=new, type=parse_value, default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)
    parser.set_defaults(func=run_train)


def config_from_args(args) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return load_config(args.preset, args.config, overrides)


def run_train(args) -> int:
    config = config_from_args(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.dry_run:
        from .dry_run import dry_run, report

        if args.world_size < 1:
            raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
        print(report(config, dry_run(config, args.world_size)))
        return 0
    from . import train

    summary = train(config, resume=args.resume, overwrite=args.overwrite)
    if summary.get("checkpoint"):
        print_epilogue(config, summary)
    return 0


def print_epilogue(config: TrainConfig, summary: dict) -> None:
    final = summary["final"] or {}
    run = summary["run_dir"]
    prompt = (config.sample_prompts or ["a small red circle"])[0]
    print(f"\ntrained {summary['steps'] - summary['first_step']} steps in {summary['wall_time']:.0f} s"
          + (f"; final loss {final['loss']:.4f} (text {final['text_loss']:.4f}, image {final['image_loss']:.4f})" if final else ""))
    print(f"run folder:   {run}/  (config.yaml, train.log, metrics.jsonl)")
    print(f"checkpoint:   {summary['checkpoint']}/model  ({run}/latest names the newest)")
    if config.sample_every:
        print(f"samples:      {run}/samples/")
    print(f"tensorboard:  tensorboard --logdir {run}/tensorboard")
    from .chat_data import wants_chat_data
    from .edit_data import wants_edit_data

    if wants_chat_data(config):
        print(f"chat:         lmfusion chat --checkpoint {run} --chat-template --prompt 'Draw a small red circle.' --out chat/")
        print(f"evaluate:     lmfusion eval --task chat --checkpoint {run} --data {config.data}")
    elif wants_edit_data(config):
        print(f"edit:         lmfusion edit --checkpoint {run} --image in.png --prompt 'make the red circle blue' --out out.png")
        print(f"evaluate:     lmfusion eval --task edit --checkpoint {run} --data {config.data}")
    else:
        print(f"generate:     lmfusion generate --checkpoint {run} --prompt {shlex.quote(prompt)} --out sample.png")
    print(f"continue:     lmfusion train --config {run}/config.yaml --resume --max-steps {2 * summary['steps']}")
