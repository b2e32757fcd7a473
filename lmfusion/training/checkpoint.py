"""Run folders and checkpoints: atomic, pickle-free, exactly resumable.

    runs/<name>/
      config.yaml                      the resolved TrainConfig
      latest                           "step_000200": the newest COMPLETE checkpoint
      checkpoints/step_000200/
        model/                         LMFusionModel.save_pretrained (load with --checkpoint)
        ema/                           ema_decay > 0 only: the same for the moving average of the weights
        optimizer.safetensors          AdamW moments and step counts
        optimizer.json                 param groups (lr, betas, ...)
        rng.safetensors                torch CPU (+ CUDA) generator states
        trainer_state.json             step, samples seen, scheduler, python/numpy RNG, metrics
        manifest.json                  size and CRC-32 of every file above, written last
        shards/                        parallel=fsdp only: torch.distributed.checkpoint files of the
                                       trainable weights and AdamW state, one per rank (then
                                       optimizer.safetensors is absent; model/ is the gathered
                                       single-file adapter that from_pretrained loads)

A checkpoint is written into a hidden temporary folder and renamed into place, and only then
does `latest` (itself replaced atomically) point at it. A process killed at any instant
therefore leaves either the previous checkpoint or the new one, never a half-written folder that
a resume would trust. Damage after the fact (a truncated copy, a full disk, an edit by hand) is
caught by the manifest: `--resume` verifies it and falls back, loudly, to the newest intact
checkpoint. Everything is safetensors or JSON: loading a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..integrity import CheckpointError, read_json, read_safetensors, verify_manifest, write_manifest
from ..run_folders import (  # noqa: F401  (re-exported: the trainer's names for the layout)
    CHECKPOINTS, LATEST, MODEL_CONFIG, MODEL_DIR, STEP_PATTERN, latest_checkpoint, list_checkpoints, resolve_checkpoint,
    step_name,
)
from .ema import EMA_DIR
from ..utils import atomic_directory, atomic_write_bytes, publish_directory, recover_aside, staging_directory

SHARDS_DIR = "shards"  # parallel: fsdp checkpoints


# --------------------------------------------------------------------------- run folders
def prepare_run_dir(config, resume: bool, overwrite: bool) -> Path:
    """Create (or reopen, for --resume) runs/<name>/ and write the resolved config.yaml.

    An existing run is never silently mixed with a new one: without --resume or --overwrite it
    is an error, and --resume refuses a config that would train something different.
    """
    from .config import TrainConfig, config_differences, read_yaml

    run_dir = config.run_dir
    saved = run_dir / "config.yaml"
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if (saved.is_file() or list_checkpoints(run_dir)) and not (resume or overwrite):
        raise ValueError(f"{run_dir} already holds a training run: pass --resume to continue it, "
                         "--overwrite to start over, or choose another --name")
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if resume and saved.is_file():
        old = TrainConfig.from_dict(read_yaml(saved))
        changed = config_differences(old, config)
        if changed:
            raise ValueError(f"--resume: {', '.join(changed)} differ from {saved}; resume with the same settings "
                             "(or start a new run with another --name)")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial(run_dir)
    atomic_write_bytes(saved, config.to_yaml().encode())
    return run_dir


# --------------------------------------------------------------------------- state (de)serialisation
def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split optimizer.state_dict() into tensors (safetensors) and everything else (JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- save / load
def save_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, trainer_state: dict, keep: int,
                    average=None) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, then drop all but the newest `keep`.
    `average`: the run's WeightAverage (lmfusion.training.ema), written to ema/ beside model/."""
    run_dir = Path(run_dir)
    target = run_dir / CHECKPOINTS / step_name(step)
    # Re-saving a step that exists (after a resume) replaces it the same atomic way.
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp / MODEL_DIR)
        if average is not None:
            average.save(model, tmp / EMA_DIR)
            trainer_state = {**trainer_state, "ema_updates": average.updates}
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", opt_meta)
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = {**trainer_state, "step": step, "scheduler": scheduler.state_dict(), "rng": rng_meta}
        _write_json(tmp / "trainer_state.json", state)
        write_manifest(tmp, editable=(MODEL_CONFIG,))  # last: sizes and checksums of everything above
    atomic_write_bytes(run_dir / LATEST, f"{target.name}\n".encode())
    prune_checkpoints(run_dir, keep)
    return target


def load_checkpoint(checkpoint: str | Path, model, optimizer, scheduler, average=None) -> dict:
    """Restore model adapter weights, optimizer, scheduler and RNG (and `average`, the run's
    WeightAverage, from ema/); return the trainer state.

    The manifest is verified first; a damaged or foreign file raises CheckpointError naming it.
    """
    from ..model.lmfusion import WEIGHTS_FILE

    checkpoint = Path(checkpoint)
    verify_manifest(checkpoint)
    weights = read_safetensors(checkpoint / MODEL_DIR / WEIGHTS_FILE)
    state = read_json(checkpoint / "trainer_state.json")
    meta = read_json(checkpoint / "optimizer.json")
    opt_tensors = read_safetensors(checkpoint / "optimizer.safetensors")
    rng_tensors = read_safetensors(checkpoint / "rng.safetensors")
    model.load_adapter_state(weights, checkpoint / MODEL_DIR / WEIGHTS_FILE)
    with _names_file(checkpoint / "optimizer.safetensors"):
        optimizer.load_state_dict(optimizer_from_files(opt_tensors, meta))
    with _names_file(checkpoint / "trainer_state.json"):
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(rng_tensors, state["rng"])
    if average is not None:
        if not (checkpoint / EMA_DIR).is_dir():
            raise ValueError(f"{checkpoint}: no {EMA_DIR}/ folder, so the weight average of ema_decay cannot be "
                             "restored (it was saved without one); resume with ema_decay: 0, or start a new run")
        average.load(model, checkpoint / EMA_DIR, state["ema_updates"])
    return state


# LMFusionConfig fields two models must share for one's adapter weights to mean the same in the other
# (shapes are checked by load_adapter_state; these change meaning without changing a shape).
# The U-Net's size, set through --model: a mismatch names that flag (norm groups change no shape,
# so load_adapter_state alone would let them through).
INIT_UNET = ("unet_channels", "unet_norm_groups", "time_embed_dim")
INIT_MATCHING = ("base_model_hash", "mode", "codec", "image_size", "objective", "num_train_timesteps", "tokens_per_image")


def init_folder(path: str | Path) -> Path:
    """The model folder `init_from` names; missing is a one-line error that says how to make it."""
    try:
        return resolve_checkpoint(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"init_from: {error} (train that run first, e.g. `lmfusion train --preset "
                                "quickstart`, or pass --init-from '' to start from fresh image modules)") from None


def load_init_weights(model, path: str | Path, say=print) -> Path:
    """`init_from`: load the adapter weights of a saved model (a run, checkpoint or model folder)
    before step 0, e.g. an editing run that starts from a quickstart run. Optimizer, schedule and
    step start fresh. A folder of another base model, codec or objective is refused in one line."""
    from ..config import LMFusionConfig
    from ..model.lmfusion import CONFIG_FILE, WEIGHTS_FILE

    folder = init_folder(path)
    verify_manifest(folder)
    saved = LMFusionConfig.load(folder / CONFIG_FILE)
    differ = [k for k in INIT_MATCHING if getattr(saved, k) != getattr(model.config, k)]
    if differ:
        key = differ[0]
        raise ValueError(f"init_from {path}: its model differs from this run's in {differ} (e.g. {key}: "
                         f"{getattr(saved, key)!r} vs {getattr(model.config, key)!r}); train it with the same settings")
    if any(getattr(saved, k) != getattr(model.config, k) for k in INIT_UNET):  # e.g. a quickstart from before its wider U-Net
        theirs, ours = ([getattr(c, k) for k in INIT_UNET] for c in (saved, model.config))
        flag = ", ".join(f"{k}: {v}" for k, v in zip(INIT_UNET, theirs))
        raise ValueError(f"init_from {path}: its U-Net blocks are {theirs[0]} channels wide (norm groups, timestep "
                         f"width {theirs[1]}, {theirs[2]}), this run's {ours[0]} ({ours[1]}, {ours[2]}); "
                         f"add --model '{{{flag}}}' or retrain the start")
    state = read_safetensors(folder / WEIGHTS_FILE)
    gained = []
    if saved.image_position_embedding == "none" and model.config.image_position_embedding == "learned":
        # a model trained without the patch-position table gains one, at its init (zero)
        state["image_in.position"] = torch.zeros_like(model.image_in.position)
        gained.append("the patch-position table starts at zero")
    if saved.image_condition == "none" and model.config.reads_previous_image:
        # ... or the previous image's input channels, at their init (zero weights): same output
        weight = state["image_in.conv_in.weight"]
        extra = model.image_in.conv_in.weight.shape[1] - weight.shape[1]
        state["image_in.conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])], 1)
        gained.append("the previous-image input channels start at zero")
    model.load_adapter_state(state, folder / WEIGHTS_FILE)
    gained_note = f" ({'; '.join(gained)})" if gained else ""
    say(f"init_from: adapter weights loaded from {folder}{gained_note}")
    return folder


def load_newest_intact(run_dir: str | Path, model, optimizer, scheduler, say=print,
                       average=None) -> tuple[Path, dict] | None:
    """Resume from `latest`, or, when it is damaged, from the newest checkpoint that is intact.

    Each damaged checkpoint is reported through `say`, naming the file and the problem. Returns
    None when the run has no checkpoint; raises CheckpointError when none of them is intact.
    """
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return None
    candidates = [newest] + [c for c in reversed(list_checkpoints(run_dir)) if c != newest]
    problems = []
    for candidate in candidates:
        try:
            return candidate, load_checkpoint(candidate, model, optimizer, scheduler, average)
        except CheckpointError as error:
            problems.append(str(error))
            following = candidates[len(problems)] if len(problems) < len(candidates) else None
            say(f"WARNING: checkpoint {candidate.name} is damaged: {error}; "
                + (f"falling back to {following.name}" if following else "no older checkpoint is left"))
    raise CheckpointError(f"no intact checkpoint in {run_dir}: " + "; ".join(problems))


@contextlib.contextmanager
def _names_file(path: Path):
    """Re-raise a malformed entry (a missing key, a shape mismatch) as a CheckpointError naming `path`."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"{path}: does not fit this run ({type(error).__name__}: {error})") from None


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints, and always the one `latest` names."""
    pinned = latest_checkpoint(run_dir)
    for old in list_checkpoints(run_dir)[:-keep]:
        if old != pinned:
            shutil.rmtree(old, ignore_errors=True)


def remove_partial(run_dir: str | Path) -> int:
    """Clean up after a process killed mid-save; returns how many leftovers were handled.

    Half-written checkpoints are deleted; a checkpoint caught between the two renames of a
    re-save is put back, so no saved step is ever lost.
    """
    return recover_aside(Path(run_dir) / CHECKPOINTS, "step_*")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------- sharded (FSDP2) checkpoints
def sharded_state(model, optimizer) -> dict:
    """What torch.distributed.checkpoint writes and reads in place: the trainable weights (DTensor
    shards) by their saved names, and the AdamW tensors as "<param index>.<key>"."""
    tensors, _ = _split_optimizer(optimizer)
    return {"model": dict(model.adapter_state_dict()), "optimizer": tensors}


def _split_optimizer(optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            (tensors if isinstance(value, torch.Tensor) else scalars)[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_sharded_checkpoint(run_dir: str | Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                            keep: int, info) -> Path:
    """Collective: every rank writes its shards; rank 0 adds the gathered adapter, the rest of the
    state and the manifest, then publishes the folder atomically (ranks share the file system)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    from .distributed import barrier, broadcast_object

    run_dir = Path(run_dir)
    target = run_dir / CHECKPOINTS / step_name(step)
    staged = Path(broadcast_object(str(staging_directory(target)) if info.is_main else None, info))
    try:
        dcp.save(sharded_state(model, optimizer), checkpoint_id=str(staged / SHARDS_DIR))
        # Gathering is collective too, one tensor at a time, so every rank walks the same keys.
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in model.adapter_state_dict().items()}
        if info.is_main:
            model.save_pretrained(staged / MODEL_DIR, state=full)
            _write_json(staged / "optimizer.json", _split_optimizer(optimizer)[1])
            rng_tensors, rng_meta = rng_state()
            save_file(rng_tensors, str(staged / "rng.safetensors"))
            state = {**trainer_state, "step": step, "scheduler": scheduler.state_dict(), "rng": rng_meta}
            _write_json(staged / "trainer_state.json", state)
            write_manifest(staged, editable=(MODEL_CONFIG,))
            publish_directory(staged, target)
            atomic_write_bytes(run_dir / LATEST, f"{target.name}\n".encode())
            prune_checkpoints(run_dir, keep)
    except BaseException:
        if info.is_main:
            shutil.rmtree(staged, ignore_errors=True)
        raise
    barrier(info)
    return target


def find_intact_sharded(run_dir: str | Path, world_size: int, say=print) -> Path | None:
    """The newest sharded checkpoint whose manifest verifies, reporting each damaged one (rank 0)."""
    newest = latest_checkpoint(run_dir)
    if newest is None:
        return None
    candidates = [newest] + [c for c in reversed(list_checkpoints(run_dir)) if c != newest]
    problems = []
    for index, candidate in enumerate(candidates):
        try:
            verify_manifest(candidate, required=True)
            if not (candidate / SHARDS_DIR).is_dir():
                raise CheckpointError(f"{candidate}: not a sharded checkpoint (written with parallel: ddp)")
            written_by = read_json(candidate / "trainer_state.json").get("world_size")
            if written_by != world_size:
                raise CheckpointError(f"{candidate}: written by {written_by} processes; resume it with as many")
            return candidate
        except CheckpointError as error:
            problems.append(str(error))
            following = candidates[index + 1].name if index + 1 < len(candidates) else None
            say(f"WARNING: checkpoint {candidate.name} is damaged: {error}; "
                + (f"falling back to {following}" if following else "no older checkpoint is left"))
    raise CheckpointError(f"no intact checkpoint in {run_dir}: " + "; ".join(problems))


def load_sharded_checkpoint(checkpoint: str | Path, model, optimizer, scheduler) -> dict:
    """Collective: restore weights and AdamW state into this rank's shards, then scheduler and RNG."""
    import torch.distributed.checkpoint as dcp

    checkpoint = Path(checkpoint)
    state = read_json(checkpoint / "trainer_state.json")
    meta = read_json(checkpoint / "optimizer.json")
    initialize_optimizer_state(optimizer)  # DCP loads in place: the moments must exist first
    target = sharded_state(model, optimizer)
    with _names_file(checkpoint / SHARDS_DIR):
        dcp.load(target, checkpoint_id=str(checkpoint / SHARDS_DIR))
        optimizer.load_state_dict(optimizer_from_files(target["optimizer"], meta))
    with _names_file(checkpoint / "trainer_state.json"):
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(read_safetensors(checkpoint / "rng.safetensors"), state["rng"])
    return state


@torch.no_grad()
def initialize_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state tensors without changing any weight: one step at lr 0 on zero gradients."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    lrs = [group["lr"] for group in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
