"""Evaluation along the paper's three axes (text preservation, understanding, generation).

`evaluate_checkpoint` runs all of them for one model; the metric functions are usable alone:
`cider_d`, `fid_from_features`, `compare_text`, `feature_net_for`, `caption_metrics`,
`generation_metrics`. `lmfusion eval` is the command-line front end.

Names load on first use, so importing the package (as the CLI does for every command) costs
nothing until an evaluation actually runs.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "cider_d": "cider", "exact_match": "cider", "simple_tokenize": "cider",
    "Split": "data", "feature_net_for": "data", "load_split": "data", "split_paths": "data",
    "EvalSettings": "evaluate", "evaluate_checkpoint": "evaluate", "load_report": "evaluate",
    "FeatureNetRecipe": "feature_net", "load_feature_net": "feature_net", "train_feature_net": "feature_net",
    "feature_statistics": "fid", "fid_from_features": "fid", "frechet_distance": "fid",
    "generate_images": "generation", "generation_metrics": "generation", "oracle_scores": "generation",
    "compare_text": "perplexity", "heldout_text": "perplexity",
    "caption_metrics": "understanding", "caption_scene_scores": "understanding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
