"""Training FLOPs per optimizer step, for comparing runs at equal compute.

Two numbers, both per step (forward + backward of one batch; the optimizer update, ~10 FLOPs
per trainable parameter, is ignored as negligible):

* **measured**: torch's ``FlopCounterMode`` counts every matmul, convolution and attention
  kernel that the training objective actually executes, forward and backward, on the run's own
  batches (the same examples the run trains on). Autograd skips weight gradients of frozen
  weights and skips backward through anything that does not lead to a trainable weight, so
  this is exactly what freezing saves and what it does not.
* **analytic** (decoder layers and LM head only, a cross-check of the formula):

      C = (4 N_text + 2 N_text_trained) T_text + 2 N_text T_context + (4 N_img + 2 N_img_trained) T_img
          + (4 N_head + 2 N_head_trained) T_scored + 2 N_head T_scored_context

  i.e. 2N forward + 2N backward to the activations + 2N backward to the weights: the usual 6N
  for a trained path, 4N for a frozen path that something trainable feeds (the LM loss of
  image-first captions, and the trainable BOI embedding whose K/V every later token attends
  to, need the gradient carried back through the frozen text layers), and 2N, forward only,
  for the *frozen context*: text that nothing trainable precedes in its example (a caption
  before its image, padding), which LMFusionModel runs without an autograd graph
  (lmfusion.model.routing.Routing.frozen_context). T_text counts the other non-image
  positions, T_scored / T_scored_context the positions with an LM loss (the head runs only
  there; at context rows only the 2-row BOI/EOI head is differentiated, which is negligible).
  Dense and scratch modes train the text path, so they have no frozen context. The U-Net and
  the attention scores are not in the formula; the measured count has them.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..model.routing import frozen_context_mask
from .data import build_batch_source, open_latent_store
from .loop import StepPlan, build_model, chunk_seed, loss_sums
from .metrics import path_parameters

_aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# CPU scaled-dot-product attention is not in torch's FLOP registry; count it like the GPU kernels.
CPU_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


def analytic_batch_flops(model, batch) -> float:
    """The formula in the module docstring, for one MultimodalBatch."""
    n = path_parameters(model)
    wants, _ = batch.text_targets()
    images = int(batch.image_mask.sum())
    context = torch.zeros_like(batch.image_mask)
    if model.config.text_frozen and model.skip_frozen_context and images:
        context = frozen_context_mask(batch.input_ids, batch.image_mask, batch.attention_mask, model.text_vocab_size)
    n_context = int((context & ~batch.image_mask).sum())
    text = batch.image_mask.numel() - images - n_context
    scored_context = int((wants & context).sum())
    scored = int(wants.sum()) - scored_context
    total = (4 * n["text"] + 2 * n["text_trained"]) * text + 2 * n["text"] * n_context
    total += (4 * n["image"] + 2 * n["image_trained"]) * images
    total += (4 * n["head"] + 2 * n["head_trained"]) * scored + 2 * n["head"] * scored_context
    return float(total)


def measure_step_flops(model, source, config, steps: Iterable[int]) -> dict[str, float]:
    """Mean measured and analytic FLOPs per optimizer step over the given steps of a run.

    Uses the training loop's own batch plan and objective (lmfusion.training.loop), so the
    batches, their image-first / caption-first mix and the loss are the run's.
    """
    micro, accum = config.split_batch(1)
    plan = StepPlan(config.batch_size, micro, accum)
    steps = list(steps)
    totals = dict.fromkeys(("measured", "matmul", "convolution", "attention", "analytic_transformer"), 0.0)
    weight = model.config.diffusion_loss_weight
    model.train()
    for step in steps:
        for chunk in range(accum):
            batch = source.batch(plan.positions(step, chunk))[0]
            generator = torch.Generator().manual_seed(chunk_seed(config.seed, step, chunk))
            with flop_counter() as counter:
                part = loss_sums(model, model, batch, generator)
                loss = part.text / max(part.text_tokens, 1) + weight * part.image / max(part.images, 1)
                loss.backward()
            totals["measured"] += counter.get_total_flops()
            for op, count in counter.get_flop_counts()["Global"].items():
                totals[_category(str(op))] += count
            totals["analytic_transformer"] += analytic_batch_flops(model, batch)
        model.zero_grad(set_to_none=True)
    return {key: value / len(steps) for key, value in totals.items()}


def _category(op: str) -> str:
    """matmul (decoder layers, LM head, time MLP), convolution (U-Net) or attention (scores)."""
    if "convolution" in op:
        return "convolution"
    if "scaled_dot_product" in op or "attention" in op:
        return "attention"
    return "matmul"


def run_step_flops(config, sample_steps: int = 4) -> dict:
    """FLOPs per step of the run described by a TrainConfig (builds its model and data)."""
    model, codec = build_model(config)
    data = open_latent_store(config, codec, progress=False, say=lambda _: None)
    source = build_batch_source(data, model, config)
    flops = measure_step_flops(model, source, config, range(sample_steps))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**flops, "sample_steps": sample_steps, "trainable_parameters": trainable,
            "parameters": sum(p.numel() for p in model.parameters()), "paths": path_parameters(model)}
