"""Text preservation: does the multimodal model still model text exactly like its base LM?

The paper's central claim is that freezing the text modules keeps the LM's text abilities
intact (Table 1: identical HellaSwag/SIQA/WinoGrande). At this scale the direct test is
(a) perplexity of both models on held-out English the base was not tuned on, and (b) the
largest absolute difference between their logits over the base vocabulary, which must be
exactly 0.0 for the frozen modes (lmfusion, ffn_only) and is not for dense / scratch.

The held-out text (``heldout_text.txt``) was written for this project, so no download is
needed and it cannot be in any pretraining corpus verbatim.
"""

from __future__ import annotations

import math
from importlib import resources

import torch
import torch.nn.functional as F


def heldout_text() -> str:
    return resources.files("lmfusion.evaluation").joinpath("heldout_text.txt").read_text(encoding="utf-8")


def text_windows(tokenizer, text: str, window: int = 256) -> list[torch.Tensor]:
    """Non-overlapping windows ``[1, <= window]`` of the token ids (short tails dropped).

    Both models see exactly the same windows, so their perplexities compare directly.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    windows = [ids[i : i + window].unsqueeze(0) for i in range(0, len(ids), window)]
    windows = [w for w in windows if w.shape[1] >= 2]
    if not windows:
        raise ValueError("the held-out text is too short to score")
    return windows


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of ids[1:] given the logits at ids[:-1]."""
    return float(F.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum"))


@torch.no_grad()
def compare_text(model, base_model, tokenizer, text: str | None = None, window: int = 256) -> dict:
    """Perplexities of base and LMFusion model on the same text, and their max logit difference.

    ``model_ppl`` uses the base-vocabulary columns (the distribution the model samples from in
    text mode); ``model_ppl_with_image_tokens`` renormalises over BOI/EOI too, so it also shows
    how much probability the model puts on starting an image in the middle of prose.
    """
    model.eval()
    base_model.eval()
    vocab = model.text_vocab_size
    device = model.device
    nll_base = nll_model = nll_full = 0.0
    tokens = 0
    max_diff = 0.0
    for ids in text_windows(tokenizer, heldout_text() if text is None else text, window):
        ids = ids.to(device)
        base_logits = base_model(ids).logits.float()
        logits = model(ids).logits.float()
        max_diff = max(max_diff, float((logits[..., :vocab] - base_logits).abs().max()))
        nll_base += _nll(base_logits, ids)
        nll_model += _nll(logits[..., :vocab], ids)
        nll_full += _nll(logits, ids)
        tokens += ids.shape[1] - 1
    return {
        "tokens": tokens,
        "base_ppl": math.exp(nll_base / tokens),
        "model_ppl": math.exp(nll_model / tokens),
        "model_ppl_with_image_tokens": math.exp(nll_full / tokens),
        "max_abs_logit_diff": max_diff,
        "logits_identical": max_diff == 0.0,
    }
