"""`evaluate_checkpoint`: one model, the paper's three axes, one JSON report and one Markdown page.

    text preservation    perplexity on held-out English + max |logit difference| vs the base LM
    image understanding  greedy captions of test images: CIDEr-D, exact match, scene accuracy
    image generation     one image per test caption: FID (project feature net), oracle accuracy
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..utils import atomic_write_bytes
from .data import feature_net_for, load_split, split_paths
from .feature_net import FeatureNetRecipe
from .generation import generate_images, generation_metrics
from .perplexity import compare_text
from .report import write_markdown, write_sample_grids
from .understanding import caption_images, caption_metrics

log = logging.getLogger(__name__)
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclass
class EvalSettings:
    """Everything that changes the numbers; stored in the report so results are comparable."""

    n: int = 64  # test images captioned, and test captions turned into images
    steps: int = 20  # DDIM denoising steps
    guidance_scale: float = 1.0  # classifier-free guidance (1 = none, the paper's "FID without CFG")
    scheduler: str | None = None  # None: the objective's default sampler
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int = 32
    text_window: int = 256
    base_model: str | None = None  # where to load the base LM from (default: the checkpoint's)
    feature_cache: str | None = None  # feature-net cache folder (default: <LMFUSION_CACHE>/feature_nets)
    recipe: FeatureNetRecipe = field(default_factory=FeatureNetRecipe)

    def __post_init__(self) -> None:
        if isinstance(self.recipe, dict):
            self.recipe = FeatureNetRecipe(**self.recipe)
        if self.n < 2:
            raise ValueError(f"n must be at least 2 (FID and CIDEr need a set), got {self.n}")
        if self.steps < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("steps, batch_size and max_new_tokens must be positive")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 = none), got {self.guidance_scale}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_out_dir(model_dir: Path) -> Path:
    """``runs/x/eval/step_000200`` for a run's checkpoint, else ``<model folder>-eval`` beside it."""
    if model_dir.name == "model" and model_dir.parent.parent.name == "checkpoints":
        return model_dir.parent.parent.parent / "eval" / model_dir.parent.name
    return model_dir.with_name(model_dir.name + "-eval")


def weights_fingerprint(model_dir: Path) -> dict:
    """Cheap identity of the evaluated weights (a re-trained checkpoint changes size or mtime)."""
    from ..model.lmfusion import WEIGHTS_FILE

    stat = (model_dir / WEIGHTS_FILE).stat()
    return {"path": str(model_dir.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def load_report(out_dir: str | Path) -> dict | None:
    """A finished report, its settings in today's names (older reports said `guidance`)."""
    path = Path(out_dir) / REPORT_JSON
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    settings = report.get("settings")
    if isinstance(settings, dict) and "guidance" in settings and "guidance_scale" not in settings:
        settings["guidance_scale"] = settings.pop("guidance")
    return report


def parameter_counts(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    settings: EvalSettings | None = None,
    device: str = "cpu",
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate one checkpoint (model, checkpoint or run folder) on ``data``; write and return the report."""
    from ..model.lmfusion import LMFusionModel
    from ..sampling.pipeline import LMFusionPipeline
    from ..run_folders import resolve_checkpoint

    settings = settings or EvalSettings()
    _, test_path = split_paths(data)  # fail on bad data before the model loads
    model_dir = Path(resolve_checkpoint(checkpoint))
    out_dir = Path(out) if out is not None else default_out_dir(model_dir)
    started = time.time()
    model = LMFusionModel.from_pretrained(model_dir, base_model=settings.base_model).to(device).eval()
    pipe = LMFusionPipeline(model)
    sampler = settings.scheduler or model.objective.default_sampler  # settings stay as asked: reports compare them
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": weights_fingerprint(model_dir),
        "mode": model.config.mode,
        "base_model": settings.base_model or model.config.base_model,
        "data": str(Path(data).resolve()),
        "settings": settings.to_dict(),
        "sampler": sampler,
        "parameters": parameter_counts(model),
        "machine": machine_description(device),
    }

    timer = _PhaseTimer()
    with timer("text"):
        report(f"[eval] text preservation on held-out text ({model.config.mode})")
        result["text"] = _text_phase(model, result["base_model"], settings, device)
    test = load_split(test_path, model.config.image_size, settings.n)
    with timer("captioning"):
        report(f"[eval] captioning {len(test)} test images")
        captions = caption_images(pipe, test.images, settings.batch_size, settings.max_new_tokens)
        result["understanding"] = caption_metrics(captions, test.captions, test.metas)
        result["understanding"]["samples"] = [{"reference": r, "caption": c} for r, c in zip(test.captions, captions)]
    with timer("generation"):
        report(f"[eval] generating {len(test)} images ({settings.steps} {sampler} steps, guidance scale {settings.guidance_scale})")
        generated = generate_images(pipe, test.captions, settings.seed, settings.steps, settings.guidance_scale,
                                    settings.scheduler, settings.batch_size)
    with timer("image_metrics"):
        result["generation"] = _image_metrics(data, test, test_path, generated, model.config.image_size, settings, report)
    result["seconds"] = round(time.time() - started, 1)
    result["phase_seconds"] = timer.seconds
    result["out_dir"] = str(out_dir)

    write_report(out_dir, result, test.images, generated, captions, test.captions)
    report(summary_line(result))
    return result


def _text_phase(model, base_model_name: str, settings: EvalSettings, device: str) -> dict:
    """Perplexities and logit difference against a freshly loaded copy of the base LM."""
    from ..base_models import load_text_model

    base_model, _ = load_text_model(base_model_name)
    return compare_text(model, base_model.to(device), model.tokenizer, window=settings.text_window)


def _image_metrics(data, test, test_path: Path, generated, image_size: int, settings: EvalSettings, report) -> dict:
    """FID (with the real-vs-real floor) and oracle scores; trains or loads the feature net."""
    net, net_path = feature_net_for(data, settings.recipe, settings.feature_cache, report)
    reference = _reference_images(data, test_path, image_size, len(test))
    metrics = generation_metrics(generated, test.images, test.metas, net, reference, prompts=test.captions)
    metrics["feature_net"] = {"path": str(net_path), "kind": net.kind, **net.metrics}
    return metrics


class _PhaseTimer:
    """``with timer("name"):`` adds the block's wall time to ``timer.seconds["name"]``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - started, 1)


def _reference_images(data, test_path: Path, size: int, n: int) -> torch.Tensor | None:
    """As many *train* images as test images, for the real-vs-real FID floor (None without a train split)."""
    train_path, _ = split_paths(data)
    if train_path == test_path:
        return None
    return load_split(train_path, size, n).images


def write_report(out_dir: Path, result: dict, real, generated, captions, references) -> None:
    """Grids first, report.json last: its presence means the evaluation finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grids = write_sample_grids(out_dir, real, generated)
    write_markdown(out_dir / REPORT_MD, result, grids, captions, references)
    atomic_write_bytes(out_dir / REPORT_JSON, (json.dumps(result, indent=1) + "\n").encode())


def machine_description(device: str = "cpu") -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": device, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def summary_line(result: dict) -> str:
    text, und, gen = result["text"], result["understanding"], result["generation"]
    parts = [
        f"mode={result['mode']}",
        f"ppl base {text['base_ppl']:.3f} model {text['model_ppl']:.3f}",
        f"max|dlogit| {text['max_abs_logit_diff']:.3g}",
        f"CIDEr {und['cider']:.1f} (blind {und['blind_cider']:.1f})",
        f"exact {und['exact_match']:.3f}",
        f"FID {gen['fid']:.2f}",
    ]
    if "oracle" in gen:
        parts.append(f"oracle all-correct {gen['oracle']['all_correct']:.3f}")
    return "[eval] " + " | ".join(parts)
