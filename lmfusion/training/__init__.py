"""Training: `lmfusion train` (config, data, loop, checkpoints, torchrun data parallelism).

    from lmfusion.training import load_config, train
    summary = train(load_config("quickstart", overrides={"max_steps": 10}))

`resolve_checkpoint(path)` maps a run folder (runs/<name>), a checkpoint folder or a model folder
to the model folder that `LMFusionModel.from_pretrained` loads.
"""

from .checkpoint import latest_checkpoint, resolve_checkpoint
from .config import PRESETS, TrainConfig, load_config

__all__ = ["PRESETS", "TrainConfig", "latest_checkpoint", "load_config", "resolve_checkpoint", "train"]


def train(config, resume: bool = False, overwrite: bool = False) -> dict:
    """See lmfusion.training.loop.train (imported lazily: it pulls in torch.distributed and the model)."""
    from .loop import train as _train

    return _train(config, resume=resume, overwrite=overwrite)
