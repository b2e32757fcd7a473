"""A hinge on the BOI logit at text targets: keep "start an image" clearly below writing.

Greedy decoding draws when p(BOI) > 1/2 (`draw_decision: mass`), i.e. when the BOI logit beats the
log-sum-exp of every other logit. The cross-entropy of a text target pulls BOI down only by its
probability, a pull that fades as soon as BOI drops just below the target token, so a question
close to a drawing request in the frozen state space keeps a thin margin and can still flip
(benchmarks/results/chat.md: "What is 15 plus 27?" answered, then drawn). The hinge
max(0, margin + logit_BOI - logsumexp(other logits)) at every text target that is not BOI keeps
BOI `margin` nats below half of the probability mass. It reaches only what BOI's logit depends on
(the trainable BOI row of special_head, and image layers upstream), never a base-vocabulary logit.
"""

from __future__ import annotations

import torch


def boi_gap(logits: torch.Tensor, boi_column: int) -> torch.Tensor:
    """logit_BOI - logsumexp(every other logit) over the last dim: > 0 exactly where p(BOI) > 1/2, the
    greedy mass rule's test for drawing (sampling.interleaved.pick_token)."""
    # the other columns' log-sum-exp from the two slices around BOI's, so no [..., V + 2] copy is made
    others = torch.logaddexp(logits[..., :boi_column].logsumexp(-1), logits[..., boi_column + 1:].logsumexp(-1))
    return logits[..., boi_column] - others


def boi_margin_hinge(logits: torch.Tensor, labels: torch.Tensor, boi_column: int, margin: float) -> torch.Tensor:
    """Summed hinge over rows whose label is not BOI. logits [M, V + 2], labels [M] (ids = columns)."""
    return torch.relu(margin + boi_gap(logits, boi_column))[labels != boi_column].sum()
