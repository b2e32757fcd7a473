"""Quickstart step time on this CPU under a few variants, side by side (issue 17, item 9).

Each variant runs in its own process (an environment variable such as OMP_WAIT_POLICY must be
set before torch starts), builds the quickstart model, and times the real training step
(lmfusion.training.loop.train_step) on shapes batches. The variants run in turn, round after
round (A B C A B C ...), so that a change in the machine's load hits them all alike; the table
gives each one's mean step time and its ratio to the first variant.

    python benchmarks/cpu_step_variants.py                           # the default set below
    python benchmarks/cpu_step_variants.py --rounds 2 --steps 4 \\
        --variant default --variant passive:OMP_WAIT_POLICY=PASSIVE --variant b8:batch_size=8

A variant is NAME[:KEY=VALUE,...]; an upper-case KEY is an environment variable, a lower-case
one a TrainConfig override (values parsed as YAML: 8, true, 1e-3). `compile=true` compiles the
decoder layers as `lmfusion train --compile` does; its first step (the compilation) is excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

DEFAULT_VARIANTS = ["default", "passive:OMP_WAIT_POLICY=PASSIVE", "batch12:batch_size=12", "batch8:batch_size=8"]


def worker(overrides: dict, steps: int, warmup: int) -> dict:
    """Build the quickstart model in this process and time `steps` training steps after `warmup`."""
    from lmfusion.training.loop import train_step
    from quickstart_profile import quickstart_training

    run = quickstart_training(overrides, images=256)
    config = run["config"]
    seconds, tokens = [], 0
    for step in range(warmup + steps):
        start = time.perf_counter()
        metrics = train_step(step, run["model"], run["model"], run["source"], run["optimizer"], run["scheduler"],
                             config, run["plan"], run["info"])
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
            tokens += metrics["tokens"]
    return {"step_s": seconds, "tokens": tokens, "batch": config.batch_size}


def parse_variant(text: str) -> tuple[str, dict, dict]:
    import yaml

    name, _, spec = text.partition(":")
    env, overrides = {}, {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {text!r}: expected KEY=VALUE, got {item!r}")
        if key.isupper():
            env[key] = value
        else:
            overrides[key] = yaml.safe_load(value)
    return name, env, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--variant", action="append",
                        help="NAME[:KEY=VALUE,...] (repeatable; default: " + " ".join(DEFAULT_VARIANTS) + ")")
    parser.add_argument("--rounds", type=int, default=2, help="times each variant runs, in turn with the others")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile variants add one)")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one run, inside its own process
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["overrides"], args.steps, args.warmup)))
        return

    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    runs: dict[str, list] = {name: [] for name, _, _ in variants}
    for round_index in range(args.rounds):
        for name, env, overrides in variants:
            warmup = args.warmup + (1 if overrides.get("compile") else 0)
            command = [sys.executable, __file__, "--worker", json.dumps({"overrides": overrides}),
                       "--steps", str(args.steps), "--warmup", str(warmup)]
            result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"variant {name} failed:\n{result.stderr[-2000:]}")
            runs[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1}/{args.rounds} {name}: "
                  f"{sum(runs[name][-1]['step_s']) / args.steps:.2f} s/step", file=sys.stderr, flush=True)

    rows, first = [], None
    for name, env, overrides in variants:
        seconds = [s for run in runs[name] for s in run["step_s"]]
        tokens = sum(run["tokens"] for run in runs[name])
        mean = sum(seconds) / len(seconds)
        first = first or mean
        rows.append({"variant": name, "env": env, "overrides": overrides, "batch": runs[name][0]["batch"],
                     "step_s": mean, "min_step_s": min(seconds), "tokens_per_s": tokens / sum(seconds),
                     "ratio_to_first": mean / first})
    print("| variant | batch | s/step (mean, min) | tok/s | step time / first |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['batch']} | {row['step_s']:.2f}, {row['min_step_s']:.2f} | "
              f"{row['tokens_per_s']:.0f} | {row['ratio_to_first']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "rounds": args.rounds, "steps": args.steps, "machine": platform.processor()
                       or platform.machine(), "cpus": os.cpu_count(), "command": " ".join(sys.argv)}, f, indent=1)


if __name__ == "__main__":
    main()
