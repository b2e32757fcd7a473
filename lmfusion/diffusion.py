"""The diffusion objective (Transfusion / DDPM): noise images, predict the noise.

The schedule itself is diffusers' DDPMScheduler with the cosine ("squaredcos_cap_v2") betas of
Nichol & Dhariwal, so training and sampling share one well-tested implementation.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin

SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def training_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2") -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,
    )


def sampling_scheduler(name: str, num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                       clip: float | None = None) -> SchedulerMixin:
    """A diffusers scheduler for sampling, built from the training schedule's config.

    clip: clamp each step's estimate of the clean latent to [-clip, clip] (diffusers'
    clip_sample); None leaves it free.
    """
    if name in ("flow", "flow_match"):
        raise ValueError("flow-matching sampling needs a flow-matching-trained model; use ddpm or ddim")
    if name not in SAMPLERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SAMPLERS)}")
    base = training_scheduler(num_train_timesteps, beta_schedule)
    if clip is None:
        return SAMPLERS[name].from_config(base.config)
    return SAMPLERS[name].from_config(base.config, clip_sample=True, clip_sample_range=clip)


def sample_timesteps(
    n: int, max_timestep: torch.Tensor | int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform t in [0, max_timestep) per image; max_timestep may differ per image (noise cap)."""
    limit = torch.as_tensor(max_timestep, dtype=torch.float64).expand(n)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (u * limit).long().clamp(max=limit.long() - 1)


def add_noise(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    return scheduler.add_noise(latents, noise, timesteps)


def per_image_mse(noise_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image (Transfusion computes the diffusion loss per image)."""
    return (noise_pred.float() - noise.float()).pow(2).flatten(1).mean(1)
