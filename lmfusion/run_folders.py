"""Where a training run keeps its checkpoints, and how a --checkpoint argument finds a model folder.

Shared by training (which writes run folders) and by inference and evaluation (which only read
them), so that those never import the trainer.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_DIR = "model"
STEP_PATTERN = re.compile(r"^step_(\d{6,})$")
MODEL_CONFIG = "lmfusion_config.json"  # = lmfusion.model.lmfusion.CONFIG_FILE


def step_name(step: int) -> str:
    return f"step_{step:06d}"


# --------------------------------------------------------------------------- finding checkpoints
def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name)]
    found = [p for p in found if (p / "trainer_state.json").is_file() and (p / MODEL_DIR / MODEL_CONFIG).is_file()]
    return sorted(found, key=lambda p: int(STEP_PATTERN.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; if that file is missing or stale, the newest complete one."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if pointer.is_file():
        candidate = run_dir / CHECKPOINTS / pointer.read_text().strip()
        if (candidate / "trainer_state.json").is_file():
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Map what a user passes as --checkpoint to a model folder `LMFusionModel.from_pretrained` loads.

    Accepts a model folder, a checkpoint folder (runs/x/checkpoints/step_000100) or a run folder
    (runs/x, resolved through its `latest` pointer).
    """
    path = Path(path)
    if (path / MODEL_CONFIG).is_file():
        return path
    if (path / MODEL_DIR / MODEL_CONFIG).is_file():
        return path / MODEL_DIR
    if (path / LATEST).is_file() or (path / CHECKPOINTS).is_dir():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise FileNotFoundError(f"training run {path} has no complete checkpoint yet")
        return checkpoint / MODEL_DIR
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raise FileNotFoundError(f"{path} is neither an LMFusion model folder, a checkpoint folder nor a training run folder")
