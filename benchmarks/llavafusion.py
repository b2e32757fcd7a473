"""LLaVAFusion end to end on 2 CPU cores: build the tiny VLM, train the llavafusion preset on it,
and measure on a held-out shapes seed what issue 15 asks (lmfusion/evaluation/llavafusion.py).

    python benchmarks/llavafusion.py                       # builds / trains what is missing, then measures
    python benchmarks/llavafusion.py --quickstart runs/quickstart   # + the text-only quickstart, same steps

Steps whose output folder already exists are not rerun (their wall time is then not reported).
Writes JSON and Markdown next to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def timed(command: list[str]) -> float:
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return round(time.perf_counter() - start, 1)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vlm", default="runs/tiny_llava", help="the VLM folder (built with `lmfusion vlm build` if missing)")
    p.add_argument("--run", default="runs/llavafusion", help="the llavafusion run (trained if missing)")
    p.add_argument("--quickstart", default=None, help="a quickstart run to compare generation with (same steps)")
    p.add_argument("--seed", type=int, default=1, help="held-out shapes seed (training used 0)")
    p.add_argument("--n", type=int, default=64, help="held-out scenes")
    p.add_argument("--context-n", type=int, default=32, help="scenes for the image-context comparison")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales to generate at")
    p.add_argument("--out", default="benchmarks/results/llavafusion.json", help="JSON output (Markdown beside it)")
    p.add_argument("--context-only", action="store_true",
                   help="keep --out's other measurements and redo only the image-context comparison")
    p.add_argument("--quickstart-only", action="store_true",
                   help="keep --out's other measurements and add only --quickstart's generation figures")
    args = p.parse_args()

    from lmfusion.evaluation.llavafusion import (
        ATTRIBUTES, accuracy, compare_replies, context_answers, generation_scores, lmfusion_replies, self_consistency)
    from lmfusion.sampling.interleaved import IMAGE_CONTEXTS
    from lmfusion.sampling.pipeline import LMFusionPipeline
    from lmfusion.training.checkpoint import resolve_checkpoint
    from lmfusion.vlm.evaluate import ask, load_vlm
    from lmfusion.vlm.questions import QUESTIONS, answer, generated_scenes

    if args.context_only:
        return redo_context(args)
    if args.quickstart_only:
        return add_quickstart(args)
    result: dict = {"machine": {"cpu": cpu_name(), "cores": torch.get_num_threads(), "torch": torch.__version__},
                    "seed": args.seed, "n": args.n, "wall_s": {}}
    if not Path(args.vlm, "config.json").is_file():
        result["wall_s"]["vlm_build"] = timed(["lmfusion", "vlm", "build", "--out", args.vlm])
    if not Path(args.run).exists():
        result["wall_s"]["llavafusion_train"] = timed(
            ["lmfusion", "train", "--preset", "llavafusion", "--base-model", args.vlm,
             "--runs-dir", str(Path(args.run).parent), "--name", Path(args.run).name])
    start = time.perf_counter()
    scenes = generated_scenes(args.seed, args.n)
    kinds = list(QUESTIONS)

    # The VLM alone (transformers, no lmfusion code) versus through the trained LMFusion model.
    vlm, processor = load_vlm(args.vlm)
    before = {k: ask(vlm, processor, [s.image for s in scenes], QUESTIONS[k]) for k in kinds}
    del vlm
    pipe = LMFusionPipeline.from_pretrained(resolve_checkpoint(args.run), device="cpu")
    after = lmfusion_replies(pipe.model, scenes, kinds, progress=True)
    majority = {}
    for k in kinds:
        answers = [answer(k, s.objects, s.relation) for s in scenes]
        majority[k] = max(set(answers), key=answers.count)
    result["answers"] = {"compare": compare_replies(before, after), "accuracy_before": accuracy(before, scenes),
                         "accuracy_after": accuracy(after, scenes),
                         "majority_baseline": accuracy({k: [majority[k]] * len(scenes) for k in kinds}, scenes),
                         "examples": [{"question": QUESTIONS[k], "answer": after[k][i],
                                       "reference": answer(k, scenes[i].objects)} for i in range(3) for k in kinds]}

    # Generation (oracle), and the VLM checking what was drawn.
    result["generation"], result["self_consistency"] = {}, {}
    runs = {"llavafusion": pipe}
    if args.quickstart:
        runs["quickstart"] = LMFusionPipeline.from_pretrained(resolve_checkpoint(args.quickstart), device="cpu")
    for name, run_pipe in runs.items():
        for scale in args.guidance:
            scores, images = generation_scores(run_pipe, scenes, scale, args.steps)
            result["generation"][f"{name}@{scale:g}"] = scores
            if name == "llavafusion":
                result["self_consistency"][f"{scale:g}"] = self_consistency(pipe.model, scenes, images)
            print(name, scale, scores, flush=True)
    best = max(args.guidance, key=lambda g: result["generation"][f"llavafusion@{g:g}"]["all_correct"])
    result["image_context"] = {"guidance": best, "n": args.context_n, "accuracy": {
        mode: context_answers(pipe, scenes[: args.context_n], mode, best, args.steps) for mode in IMAGE_CONTEXTS}}
    result["wall_s"]["measure"] = round(time.perf_counter() - start, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result, ATTRIBUTES, kinds, QUESTIONS, IMAGE_CONTEXTS, " ".join(sys.argv)))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def redo_context(args) -> int:
    from lmfusion.evaluation.llavafusion import ATTRIBUTES, context_answers
    from lmfusion.sampling.interleaved import IMAGE_CONTEXTS
    from lmfusion.sampling.pipeline import LMFusionPipeline
    from lmfusion.training.checkpoint import resolve_checkpoint
    from lmfusion.vlm.questions import QUESTIONS, generated_scenes

    out = Path(args.out)
    result = json.loads(out.read_text())
    scenes = generated_scenes(result["seed"], args.context_n)
    pipe = LMFusionPipeline.from_pretrained(resolve_checkpoint(args.run), device="cpu")
    best = result["image_context"]["guidance"]
    start = time.perf_counter()
    result["image_context"] = {"guidance": best, "n": args.context_n, "accuracy": {
        mode: context_answers(pipe, scenes, mode, best, args.steps) for mode in IMAGE_CONTEXTS}}
    result["wall_s"]["image_context"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result, ATTRIBUTES, list(QUESTIONS), QUESTIONS, IMAGE_CONTEXTS,
                                               " ".join(sys.argv)))
    print(f"rewrote {out}: {result['image_context']}")
    return 0


def add_quickstart(args) -> int:
    from lmfusion.evaluation.llavafusion import ATTRIBUTES, generation_scores
    from lmfusion.sampling.interleaved import IMAGE_CONTEXTS
    from lmfusion.sampling.pipeline import LMFusionPipeline
    from lmfusion.training.checkpoint import resolve_checkpoint
    from lmfusion.vlm.questions import QUESTIONS, generated_scenes

    if not args.quickstart:
        raise SystemExit("--quickstart-only needs --quickstart RUN")
    out = Path(args.out)
    result = json.loads(out.read_text())
    scenes = generated_scenes(result["seed"], result["n"])
    pipe = LMFusionPipeline.from_pretrained(resolve_checkpoint(args.quickstart), device="cpu")
    for scale in args.guidance:  # the same scenes, prompts and seeds as the llavafusion rows
        result["generation"][f"quickstart@{scale:g}"] = generation_scores(pipe, scenes, scale, args.steps)[0]
        print("quickstart", scale, result["generation"][f"quickstart@{scale:g}"], flush=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    body = markdown(result, ATTRIBUTES, list(QUESTIONS), QUESTIONS, IMAGE_CONTEXTS, " ".join(sys.argv))
    md = out.with_suffix(".md")
    if not md.exists():  # no report beside the JSON yet: write the whole of it
        md.write_text(body)
        return 0
    old = md.read_text()
    start, end = old.index("## Generation (shapes oracle)"), old.index("## Self-consistency")
    new_start, new_end = body.index("## Generation (shapes oracle)"), body.index("## Self-consistency")
    md.write_text(old[:start] + body[new_start:new_end] + old[end:])  # only the generation table changes
    return 0


def markdown(result: dict, attributes, kinds, questions, contexts, command: str) -> str:
    answers = result["answers"]
    lines = [f"# LLaVAFusion on shapes (held-out seed {result['seed']}, n = {result['n']})", "",
             f"Command: `python {command}`. Machine: {result['machine']['cpu']}, {result['machine']['cores']} "
             f"torch threads, torch {result['machine']['torch']}. Wall time (s): {result['wall_s']}.", "",
             "## The VLM's answers, before (transformers alone) and after (through the trained model)", "",
             f"Identical as strings: **{answers['compare']['identical']}** "
             f"({answers['compare']['answers']} answers, {answers['compare']['different']} different).", "",
             "| question | before | after | majority answer |", "|---|---|---|---|"]
    for k in kinds:
        lines.append(f"| {questions[k]} | {answers['accuracy_before'][k]:.3f} | {answers['accuracy_after'][k]:.3f} "
                     f"| {answers['majority_baseline'][k]:.3f} |")
    lines += ["", "## Generation (shapes oracle)", "", "| run@guidance | colour on white | shape | size | all correct |",
              "|---|---|---|---|---|"]
    for name, s in result["generation"].items():
        lines.append(f"| {name} | {s['colour_on_white']:.3f} | {s['shape']:.3f} | {s['size']:.3f} | {s['all_correct']:.3f} |")
    lines += ["", "## Self-consistency: the VLM asked about what was drawn, vs the prompt", "",
              "| guidance | " + " | ".join(attributes) + " |", "|---" * (len(attributes) + 1) + "|"]
    for scale, acc in result["self_consistency"].items():
        lines.append(f"| {scale} | " + " | ".join(f"{acc[a]:.3f}" for a in attributes) + " |")
    context = result["image_context"]
    lines += ["", f"## A question in the drawing's own context (guidance {context['guidance']:g}, n = {context['n']})", "",
              "| drawn image kept as | " + " | ".join(attributes) + " |", "|---" * (len(attributes) + 1) + "|"]
    for mode in contexts:
        acc = context["accuracy"][mode]
        lines.append(f"| {mode} | " + " | ".join(f"{acc[a]:.3f}" for a in attributes) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
