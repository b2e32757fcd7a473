"""How a guided prediction is formed from the conditional and unconditional ones, beyond the scale.

Plain classifier-free guidance is uncond + s (cond - uncond). Three known refinements, each off by
default, all sampler-side (no retraining):

* interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"): guide only at
  the steps whose noise level lies in [lo, hi]; elsewhere the conditional prediction alone;
* rescale (Lin et al. 2023, section 3.4; diffusers' `guidance_rescale`): pull the guided
  prediction's standard deviation back toward the conditional one's, against over-saturation;
* parallel_weight (Sadat et al. 2024, adaptive projected guidance's eta; diffusers'
  `normalized_guidance`): weight of the part of the update (cond - uncond) that is parallel to
  the conditional prediction, which the paper finds drives over-saturation; 1 is plain CFG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.guiders.adaptive_projected_guidance import normalized_guidance
from diffusers.guiders.guider_utils import rescale_noise_cfg


@dataclass(frozen=True)
class GuidanceOptions:
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    parallel_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.interval is not None:
            try:
                lo, hi = (float(v) for v in self.interval)
            except (TypeError, ValueError):
                raise ValueError(f"guidance interval must be two noise levels (lo, hi) in [0, 1], got {self.interval!r}") from None
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got ({lo:g}, {hi:g})")
            object.__setattr__(self, "interval", (lo, hi))
        if not 0 <= self.rescale <= 1:
            raise ValueError(f"guidance rescale must be in [0, 1], got {self.rescale}")
        if not 0 <= self.parallel_weight <= 1:
            raise ValueError(f"guidance parallel_weight must be in [0, 1] (1 = plain CFG), got {self.parallel_weight}")

    def guides_at(self, level: float) -> bool:
        """Whether the step at this noise level (a fraction of the training timesteps) is guided."""
        return self.interval is None or self.interval[0] <= level <= self.interval[1]

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided prediction of [N, ...] conditional and unconditional predictions."""
        if self.parallel_weight < 1:
            guided = normalized_guidance(cond, uncond, scale, eta=self.parallel_weight)
        else:
            guided = uncond + scale * (cond - uncond)
        return rescale_noise_cfg(guided, cond, self.rescale) if self.rescale > 0 else guided


PLAIN = GuidanceOptions()
