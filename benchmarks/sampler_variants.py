"""Held-out generation of one checkpoint under several sampler settings, side by side.

Every variant draws the same prompts (the first N test captions of DATA) with the same seeds
(image i: seed i, as `lmfusion eval` does), so the oracle figures differ only by the sampler:

    python benchmarks/sampler_variants.py --checkpoint runs/quickstart --data data/shapes_heldout_s1 \\
        --n 64 --guidance-scale 5 --variant plain --variant high_off:interval=0-0.95 --variant apg:parallel=0

A variant is NAME (plain guidance) or NAME:KEY=VALUE,... with the keys of
lmfusion.sampling.guidance.GuidanceOptions: interval=LO-HI (guide only at the steps whose noise
level, a fraction of the training timesteps, lies in [LO, HI]), rescale=R, parallel=ETA; and
shift=S, the flow Euler sampler's timestep shift (default: the model's training shift), which
decides where the steps fall: at shift 10 and 20 steps the last three go from noise 0.56 to 0.40 to 0.09 to 0.
Prints a markdown table and writes the figures as JSON (--out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from lmfusion.evaluation.data import load_split, split_paths
from lmfusion.evaluation.generation import ORACLE_KEYS, generate_images, oracle_scores
from lmfusion.model.lmfusion import LMFusionModel
from lmfusion.run_folders import resolve_checkpoint
from lmfusion.sampling.guidance import GuidanceOptions
from lmfusion.sampling.image import resolve_guidance_scale
from lmfusion.sampling.pipeline import LMFusionPipeline


def parse_variant(text: str) -> tuple[str, GuidanceOptions, float | None]:
    """NAME[:KEY=VALUE,...] with keys interval=LO-HI, rescale=R, parallel=ETA (GuidanceOptions), shift=S."""
    name, _, spec = text.partition(":")
    fields, shift = {}, None
    try:
        for item in filter(None, spec.split(",")):
            key, _, value = item.partition("=")
            if key == "interval":
                fields["interval"] = tuple(float(v) for v in value.split("-"))
            elif key in ("rescale", "parallel"):
                fields["rescale" if key == "rescale" else "parallel_weight"] = float(value)
            elif key == "shift":
                shift = float(value)
                if shift <= 0:
                    raise ValueError(f"shift must be positive, got {shift:g}")
            else:
                raise ValueError(f"unknown key {key!r} (interval, rescale, parallel, shift)")
        return name, GuidanceOptions(**fields), shift
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"variant {text!r}: {error}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run, checkpoint or model folder")
    parser.add_argument("--data", required=True, help="shapes dataset whose test split gives prompts and scenes")
    parser.add_argument("--n", type=int, default=64, help="test captions to draw (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default 20, as lmfusion eval)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's saved one")
    parser.add_argument("--variant", action="append", type=parse_variant, required=True,
                        help="NAME or NAME:interval=LO-HI,rescale=R,parallel=ETA,shift=S; repeat for each variant")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = LMFusionModel.from_pretrained(resolve_checkpoint(args.checkpoint)).eval()
    pipe = LMFusionPipeline(model)
    test = load_split(split_paths(args.data)[1], model.config.image_size, args.n)
    scale = resolve_guidance_scale(model, args.guidance_scale)
    rows = {}
    training_shift = model.objective.shift
    if model.objective.name != "flow" and any(shift is not None for _, _, shift in args.variant):
        parser.error(f"shift=S is for flow models; this one was trained with objective {model.objective.name!r}")
    for name, options, shift in args.variant:
        started = time.time()
        model.objective.shift = training_shift if shift is None else shift  # read by objective.sampler()
        try:
            images = generate_images(pipe, test.captions, 0, args.steps, scale, None, 16, guidance=options)
        finally:
            model.objective.shift = training_shift
        rows[name] = {"guidance": dataclasses.asdict(options), "sampler_shift": shift or training_shift, **oracle_scores(images, test.metas), "seconds": round(time.time() - started, 1)}
        print(f"{name}: all-correct {rows[name]['all_correct']:.3f} count {rows[name]['count']:.3f} "
              f"({rows[name]['seconds']} s)", flush=True)
    print(f"\n{args.checkpoint}, {len(test)} prompts of {args.data}, guidance {scale:g}, {args.steps} steps\n")
    print("| variant | guidance | " + " | ".join(ORACLE_KEYS) + " |")
    print("|---|---|" + "---|" * len(ORACLE_KEYS))
    for name, row in rows.items():
        print(f"| {name} | {row['guidance']} | " + " | ".join(f"{row[k]:.3f}" for k in ORACLE_KEYS) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "data": args.data, "n": len(test),
                                              "guidance_scale": scale, "steps": args.steps, "variants": rows}, indent=1))


if __name__ == "__main__":
    main()
