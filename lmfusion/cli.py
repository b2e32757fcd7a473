"""The `lmfusion` command. Each area registers its own subcommands:

  data shapes            lmfusion.data.cli
  train                  lmfusion.training.cli
  generate/caption/chat  lmfusion.sampling.cli
  eval                   lmfusion.evaluation.cli
  serve                  lmfusion.serving.cli
  vlm build/eval         lmfusion.vlm.cli

Expected failures (bad input, missing files, wrong checkpoints) print one line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "lmfusion.data.cli", "lmfusion.training.cli", "lmfusion.sampling.cli", "lmfusion.evaluation.cli",
    "lmfusion.serving.cli", "lmfusion.vlm.cli",
)
# OSError covers missing/existing files, permissions and full disks: all things a user fixes.
# KeyError is not here: a missing dict key is a bug and keeps its traceback; code that looks up
# a user-given name raises ValueError with the choices instead.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmfusion", description="Teach a pretrained text LM to understand and generate images (LMFusion).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:  # a real missing dependency, not an area that is not built yet
                raise
            continue
        module.register(subparsers)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data.formats import NoUsableDataError

    return (*USER_ERRORS, NoUsableDataError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("lmfusion: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as error:
        print(f"lmfusion {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
