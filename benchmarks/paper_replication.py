"""The paper's claims at small scale: LMFusion vs training from scratch, dense and FFN-only, at equal FLOPs.

    python benchmarks/paper_replication.py            # the real run: SmolLM2-135M on shapes (~1 hour on 2 CPU cores)
    python benchmarks/paper_replication.py --recipe v1   # the first replication's eps / 32 px pixel settings
    python benchmarks/paper_replication.py --smoke    # tiny offline model, a few steps: checks the pipeline

Four runs on the same shapes data and the same examples in the same order (Table 1 + the §5.1 ablation):
  lmfusion  frozen SmolLM2 + image copies of every layer initialised from the text weights (the paper)
  scratch   the same architecture, everything random and trained (the Transfusion baseline)
  dense     one set of weights for both modalities, all trained (no separation, eta_text/eta_img = 1)
  ffn_only  only the FFNs are per modality, attention shared and frozen (shallow separation)

Equal FLOPs: LMFusion trains `--steps` steps; its FLOPs per step (measured by
lmfusion.training.flops on the run's own batches) times those steps is the budget, and every
other mode trains budget / (its FLOPs per step) steps. Each run is then evaluated with
lmfusion.evaluation (text perplexity and exact-logit check, CIDEr, FID, oracle accuracy).

Everything is resumable: the data, FLOP measurements, training runs (lmfusion train --resume)
and finished evaluations under --work are reused; run the same command again after an
interruption. Results: benchmarks/results/paper_replication[_v1][_smoke][_TAG].{md,json}. A second
budget gets its own --tag (e.g. `--steps 400 --tag 2x`), so neither run's folders nor results
overwrite the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from lmfusion.config import TINY_UNET
from lmfusion.evaluation.evaluate import EvalSettings, evaluate_checkpoint, load_report, weights_fingerprint
from lmfusion.evaluation.feature_net import FeatureNetRecipe
from lmfusion.training.flops import run_step_flops
from lmfusion.evaluation.tables import write_results
from lmfusion.training import load_config, train
from lmfusion.training.checkpoint import latest_checkpoint, resolve_checkpoint
from lmfusion.training.config import RENAMED_KEYS

MODES = ("lmfusion", "scratch", "dense", "ffn_only")
ROOT = Path(__file__).resolve().parents[1]

# The real run uses the quickstart's recipe (the `quickstart` preset: TAEF2 latents, 64 px in 2x2
# patches = 16 image tokens, flow objective with the high-noise shift, standardising readout,
# batch 16, lr 1e-3, image-first share 0.38) on single-object shapes, and evaluates on shapes drawn
# with a seed no run trained on. 360 LMFusion steps ~ 12 min a run on 2 CPU cores.
REAL = dict(
    preset="quickstart", base_model="smollm2-135m", image_size=64, patch_size=2, batch_size=16, steps=360,
    lr=1e-3, min_lr=1e-4, warmup_steps=20, images=3000, two_object_prob=0.0, heldout_seed=1, eval_n=64,
    eval_steps=20, flop_sample_steps=4, model={}, recipe=FeatureNetRecipe(),
)
# The first replication's settings (benchmarks/results/paper_replication_v1.md and _v1_2x.md): the paper's
# eps objective, 32 px pixel codec, 8 px patches, batch 8, lr 3e-4, evaluated on the test split of
# the training seed. Under it no model learned to use its prompt (docs/image_learning.md).
V1 = dict(
    preset=None, base_model="smollm2-135m", image_size=32, patch_size=8, batch_size=8, steps=200, lr=3e-4,
    min_lr=3e-5, warmup_steps=20, images=4000, two_object_prob=0.5, heldout_seed=None, eval_n=64,
    eval_steps=20, flop_sample_steps=4, model=dict(objective="eps", timestep_shift=1.0, readout="plain"),
    recipe=FeatureNetRecipe(), config=dict(codec={"name": "pixel"}, image_first_ratio=0.2),
)
SMOKE = dict(
    preset=None, base_model=None, image_size=16, patch_size=8, batch_size=4, steps=3, lr=1e-3, min_lr=1e-4,
    warmup_steps=1, images=160, two_object_prob=0.5, heldout_seed=1, eval_n=6, eval_steps=2, flop_sample_steps=1,
    model=dict(TINY_UNET),
    recipe=FeatureNetRecipe(epochs=3, max_train_images=200),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny offline base model and a few steps (pipeline check)")
    p.add_argument("--recipe", choices=("quickstart", "v1"), default="quickstart",
                   help="quickstart (default): the fixed image recipe; v1: the first replication's eps/pixel settings")
    p.add_argument("--tag", default="", help="names a second budget's work folder and results: paper_replication_TAG")
    p.add_argument("--work", default=None, help="data, runs and caches (default runs/<results stem>)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="where the .md/.json go")
    p.add_argument("--steps", type=int, default=None, help="LMFusion's steps; sets the FLOP budget of every run")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--eval-n", type=int, default=None, help="test images captioned / captions generated per run")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.tag and not args.tag.replace("-", "").replace("_", "").isalnum():
        p.error(f"--tag must be letters, digits, '-' or '_', got {args.tag!r}")
    return args


def settings_for(args) -> dict:
    settings = dict(SMOKE if args.smoke else V1 if args.recipe == "v1" else REAL)
    for key, value in (("steps", args.steps), ("batch_size", args.batch_size), ("eval_n", args.eval_n)):
        if value is not None:
            if value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be positive, got {value}")
            settings[key] = value
    return settings


# ------------------------------------------------------------------------------------ preparation
def prepare_data(work: Path, settings: dict, seed: int = 0) -> Path:
    """A shapes dataset with train/ and test/ splits (generated once, deterministic in the seed)."""
    from lmfusion.data import generate_shapes_dataset

    suffix = "" if seed == 0 else f"-seed{seed}"
    objects = "" if settings["two_object_prob"] == 0.5 else f"-p{settings['two_object_prob']:g}"
    path = work / "data" / f"shapes-{settings['images']}-{settings['image_size']}px{objects}{suffix}"
    if not (path / "test" / "metadata.jsonl").is_file():
        print(f"[replication] generating {settings['images']} shapes images at {path}", flush=True)
        size = max(settings["image_size"], 32)  # the feature net reads 32 px; smaller models downsample
        generate_shapes_dataset(path, settings["images"], size=size, seed=seed, progress=False, split=True,
                                test_fraction=0.1, overwrite=True, two_object_prob=settings["two_object_prob"])
    return path


def base_model_for(work: Path, settings: dict) -> str:
    if settings["base_model"] is not None:
        return settings["base_model"]
    from lmfusion.testing import save_tiny_base

    path = work / "tiny_base"
    if not (path / "config.json").is_file():
        save_tiny_base(path)
    return str(path)


def train_config(mode: str, steps: int, work: Path, data: Path, base_model: str, settings: dict, args):
    return load_config(settings["preset"], overrides=dict(
        **settings.get("config", {}), sample_every=0, probe_every=0, generate_shapes=0,
        name=mode, runs_dir=str(work / "runs"), mode=mode, base_model=base_model, data=str(data),
        image_size=settings["image_size"], patch_size=settings["patch_size"], model=dict(settings["model"]),
        batch_size=settings["batch_size"], max_steps=steps, lr=settings["lr"], min_lr=settings["min_lr"],
        warmup_steps=min(settings["warmup_steps"], max(steps - 1, 0)), latent_cache=str(work / "latents"),
        checkpoint_every=max(steps // 4, 1), keep_checkpoints=1, log_every=max(steps // 20, 1),
        progress=not args.smoke, threads=args.threads,
    ))


# ------------------------------------------------------------------------------------ FLOPs and steps
def step_flops(mode: str, work: Path, data: Path, base_model: str, settings: dict, args) -> dict:
    """FLOPs per step of `mode`, measured once and cached (keyed by everything that changes them)."""
    config = train_config(mode, 1, work, data, base_model, settings, args)
    key = {k: v for k, v in config.to_dict().items() if k not in ("max_steps", "warmup_steps", "checkpoint_every",
                                                                    "log_every", "progress", "threads")}
    key["sample_steps"] = settings["flop_sample_steps"]
    path = work / "flops" / f"{mode}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        cached_key = {RENAMED_KEYS.get(k, k): v for k, v in cached.get("key", {}).items()}  # caches from before a rename
        if cached_key == key:
            return cached["flops"]
    print(f"[replication] measuring FLOPs per step of {mode}", flush=True)
    flops = run_step_flops(config, settings["flop_sample_steps"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "flops": flops}, indent=1) + "\n")
    return flops


def equal_flop_steps(flops: dict[str, dict], lmfusion_steps: int) -> tuple[float, dict[str, int]]:
    """The budget (LMFusion's FLOPs) and each mode's step count that spends it."""
    reference = flops["lmfusion"]["measured"] if "lmfusion" in flops else next(iter(flops.values()))["measured"]
    budget = reference * lmfusion_steps
    return budget, {mode: max(1, round(budget / f["measured"])) for mode, f in flops.items()}


# ------------------------------------------------------------------------------------ train and evaluate
def train_seconds(run_dir: Path) -> float:
    """Summed step times of the run's final history (a resumed run's redone steps counted once)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0.0
    times = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            times[row["step"]] = row.get("step_time", 0.0)
    return float(sum(times.values()))


def run_training(config) -> None:
    found = latest_checkpoint(config.run_dir)
    done = found is not None and json.loads((found / "trainer_state.json").read_text())["step"] >= config.max_steps
    if done:
        print(f"[replication] {config.name}: already trained ({config.max_steps} steps)", flush=True)
        return
    print(f"[replication] training {config.name} for {config.max_steps} steps", flush=True)
    train(config, resume=True)


def run_evaluation(config, data: Path, settings: dict, work: Path) -> dict:
    eval_settings = EvalSettings(n=settings["eval_n"], steps=settings["eval_steps"], batch_size=16,
                                 feature_cache=str(work / "feature_nets"), recipe=settings["recipe"])
    out = config.run_dir / "eval"
    previous = load_report(out)
    model_dir = resolve_checkpoint(config.run_dir)
    if previous and previous.get("settings") == json.loads(json.dumps(eval_settings.to_dict())) \
            and previous.get("model") == weights_fingerprint(model_dir):
        print(f"[replication] {config.name}: evaluation reused from {out}", flush=True)
        return previous
    print(f"[replication] evaluating {config.name}", flush=True)
    return evaluate_checkpoint(config.run_dir, data, out, eval_settings)


def shown(path) -> str:
    """A path relative to the repository when it is inside it (results files stay portable)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = settings_for(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe_tag = ["v1"] if args.recipe == "v1" and not args.smoke else []
    stem = "_".join(["paper_replication", *recipe_tag, *(["smoke"] if args.smoke else []), *([args.tag] if args.tag else [])])
    work = Path(args.work or ROOT / "runs" / stem)
    started = time.time()
    data = prepare_data(work, settings)
    # Evaluate on scenes drawn with a seed no run trained on (v1 used the training seed's test split).
    heldout = data if settings["heldout_seed"] is None else prepare_data(work, settings, settings["heldout_seed"])
    base_model = base_model_for(work, settings)
    modes = list(dict.fromkeys(["lmfusion", *args.modes]))  # LMFusion sets the budget
    flops = {m: step_flops(m, work, data, base_model, settings, args) for m in modes}
    budget, steps = equal_flop_steps(flops, settings["steps"])
    runs = []
    for mode in modes:
        config = train_config(mode, steps[mode], work, data, base_model, settings, args)
        run_training(config)
        report = run_evaluation(config, heldout, settings, work)
        runs.append({"mode": mode, "steps": steps[mode], "flops_per_step": flops[mode],
                     "train_flops": flops[mode]["measured"] * steps[mode], "train_seconds": train_seconds(config.run_dir),
                     "run_dir": shown(config.run_dir), "eval": report})
    reference = train_config("lmfusion", 1, work, data, base_model, settings, args)
    image_path = (f"{settings['image_size']} px images, {reference.codec['name']} codec, {settings['patch_size']} px "
                  f"patches of its latents, objective {reference.model.get('objective', 'flow')}, "
                  f"readout {reference.model.get('readout', 'standardize')}")
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])])
    meta = {"command": command, "smoke": args.smoke, "recipe": args.recipe, "settings": {k: v for k, v in settings.items() if k != "recipe"},
            "budget_flops": budget, "base_model": shown(base_model) if Path(base_model).exists() else base_model,
            "data": shown(data), "heldout_data": shown(heldout), "image_path": image_path, "machine": machine(),
            "wall_seconds": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    paths = write_results(Path(args.results), stem, meta, runs)
    print(f"[replication] wrote {paths[0]} and {paths[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
