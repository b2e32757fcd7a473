"""The image objective: how training noises a latent, what the image path predicts, how to sample.

Three objectives share one interface (`DiffusionObjective`), so the model, the training loop and
the samplers never branch on which one is in use:

* ``flow`` (default): rectified flow, as in BAGEL, JanusFlow, SD3 and transfusion-pytorch.
  x_t = (1 - s) x_0 + s * noise with s = t / T in (0, 1]; the target is the velocity noise - x_0;
  s is drawn uniformly and then shifted toward high noise (SD3's shift); sampled with diffusers'
  FlowMatchEulerDiscreteScheduler.
* ``eps``: the paper's DDPM objective (Transfusion / LMFusion): cosine schedule, predict the noise,
  t uniform; sampled with DDIM or DDPM.
* ``v``: the same DDPM schedule, predicting v = sqrt(a) noise - sqrt(1 - a) x_0.

Why flow is the default (measured in docs/image_learning.md): under ``eps`` a model can score well
at high noise by returning its input (at t = 950 the noise IS almost the input), so nothing in the
loss asks it to read the prompt; under ``flow`` the target at high noise is noise - x_0, and the
only way to lower that error is to know what x_0 should look like, i.e. to read the prompt.

Timesteps are always in [0, T) "training-step" units (T = num_train_timesteps), so one timestep
embedding and one per-image noise cap (Transfusion's t < 500 for image-first examples) serve all
objectives; flow's timesteps are fractional.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin

OBJECTIVES = ("flow", "eps", "v")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
# Which sampler names fit which objective; the first is the default.
SAMPLERS = {"flow": ("euler",), "eps": ("ddim", "ddpm"), "v": ("ddim", "ddpm")}
SAMPLER_NAMES = ("euler", "ddim", "ddpm")
# Classifier-free guidance, eps = uncond + guidance_scale * (cond - uncond); 1 = none. The one
# default of every sampler entry point (Python API, pipeline, `lmfusion generate | chat | serve`).
# Evaluation (1.0, the paper's FID without guidance) and the training sample grids choose their own.
DEFAULT_GUIDANCE_SCALE = 1.6
# Editing's second scale, on the source image (InstructPix2Pix's default, 1.5; 1 = none): above 1 it
# pulls the edit toward the source, i.e. it preserves what the instruction does not change.
DEFAULT_IMAGE_GUIDANCE_SCALE = 1.5


def check_objective(objective: str, timestep_sampling: str | None = None) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if timestep_sampling is not None and timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, got {timestep_sampling!r}")


class DiffusionObjective:
    """Noising, regression target and sampler of one objective (see the module docstring)."""

    def __init__(self, objective: str = "flow", num_train_timesteps: int = 1000,
                 beta_schedule: str = "squaredcos_cap_v2", timestep_sampling: str | None = None,
                 shift: float = 1.0):
        check_objective(objective, timestep_sampling)
        timestep_sampling = timestep_sampling or "uniform"
        self.name = objective
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.timestep_sampling = timestep_sampling
        if shift <= 0 or (shift != 1.0 and objective != "flow"):
            raise ValueError(f"timestep shift must be positive and is for the flow objective only, got {shift}")
        self.shift = shift
        self.ddpm = None
        if objective != "flow":
            self.ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                      prediction_type="epsilon" if objective == "eps" else "v_prediction",
                                      clip_sample=False)

    # ------------------------------------------------------------------ training
    def sample_timesteps(self, n: int, max_timestep: torch.Tensor | int,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """One t per image in [0, max_timestep) (the cap may differ per image); float64 for flow."""
        limit = torch.as_tensor(max_timestep, dtype=torch.float64).expand(n)
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64)
        if self.name == "flow":  # continuous; t = 0 would be a clean image, so keep it off zero
            # SD3's shift (> 1 moves mass to high noise), for uncapped images only: capped ones are
            # image-first examples, there to be read, so they keep the plain draw below the cap.
            shifted = self.shift * u / (1 + (self.shift - 1) * u)
            u = torch.where(limit >= self.num_train_timesteps, shifted, u)
            return (u * limit).clamp(min=1e-3 * self.num_train_timesteps)
        return (u * limit).long().clamp(max=limit.long() - 1)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.name == "flow":
            s = self.sigmas(timesteps, latents)
            return (1 - s) * latents + s * noise
        return self.ddpm.add_noise(latents, noise, timesteps.long())

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the image path must output for these noisy latents."""
        if self.name == "flow":
            return noise - latents
        if self.name == "eps":
            return noise
        return self.ddpm.get_velocity(latents, noise, timesteps.long())

    def clean_estimate(self, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_0 implied by a prediction (for diagnostics: how far off an error puts the image)."""
        if self.name == "flow":
            return noisy - self.sigmas(timesteps, noisy) * prediction
        a = self.ddpm.alphas_cumprod.to(noisy.device)[timesteps.long()].view(-1, *[1] * (noisy.dim() - 1))
        if self.name == "eps":
            return (noisy - (1 - a).sqrt() * prediction) / a.sqrt()
        return a.sqrt() * noisy - (1 - a).sqrt() * prediction

    def clip_prediction(self, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor,
                        clip: float | None) -> torch.Tensor:
        """The prediction, with its implied clean latent clamped to [-clip, clip] (None: as is).

        The flow counterpart of DDIM's clip_sample: with x0 = x_t - s v clamped, the Euler step
        toward s = 0 lands inside the codec's range. eps / v predictions pass through unchanged:
        the sampler from `sampler(clip=...)` clips them itself.
        """
        if clip is None or self.name != "flow":
            return prediction
        s = self.sigmas(timesteps.reshape(-1).expand(noisy.shape[0]), noisy)
        clean = (noisy - s * prediction).clamp(-clip, clip)
        return (noisy - clean) / s

    def sigmas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Flow: each image's noise level s (x_s = (1 - s) x + s n), shaped to broadcast over `like`."""
        s = timesteps.to(like.device, torch.float64) / self.num_train_timesteps
        return s.to(like.dtype).view(-1, *[1] * (like.dim() - 1))

    # ------------------------------------------------------------------ sampling
    @property
    def default_sampler(self) -> str:
        return SAMPLERS[self.name][0]

    def sampler(self, name: str | None = None, clip: float | None = None) -> SchedulerMixin:
        """A diffusers scheduler that inverts this objective.

        clip: for DDIM/DDPM, clamp each step's clean-latent estimate to [-clip, clip] (diffusers'
        clip_sample); for flow the sampler loop applies `clip_prediction`, which eps / v pass through.
        """
        name = name or self.default_sampler
        check_sampler(name, self.name)
        if name == "euler":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
        cls = DDIMScheduler if name == "ddim" else DDPMScheduler
        options = {"clip_sample": True, "clip_sample_range": clip} if clip is not None else {}
        return cls.from_config(self.ddpm.config, **options)


def check_sampler(name: str | None, objective: str | None = None) -> None:
    """A clear error for an unknown sampler, or one that does not fit the model's objective."""
    if name is None:
        return
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown scheduler {name!r}; choose from {list(SAMPLER_NAMES)}")
    if objective is not None and name not in SAMPLERS[objective]:
        raise ValueError(f"scheduler {name!r} does not fit a model trained with objective {objective!r}; "
                         f"use {' or '.join(SAMPLERS[objective])}")


def per_image_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image (Transfusion computes the diffusion loss per image)."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
