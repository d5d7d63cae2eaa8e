"""Learning rates relative to each tensor's scale, for the passes that train pruned weights with Adam.

Adam moves every weight by about the learning rate per step, whatever the weight's size, so one absolute rate is a
different relative step on models whose weights differ in scale (the RMS of SmolLM2-135M's Linear weights is about
0.19, Gemma-3-270M's 0.012-0.04: a rate of 2e-4 is 0.1 % of a typical SmolLM2 weight per step and up to 1.6 % of a
Gemma-3 one). With scale "rms" a rate is a fraction of the tensor's RMS instead.
"""

from __future__ import annotations

from typing import Literal

import torch

RateScale = Literal["absolute", "rms"]


def kept_rms(weight: torch.Tensor) -> float:
    """RMS of the nonzero entries of `weight` (0.0 when all are zero): the scale of what training can move."""
    w = weight.detach()
    kept = w[w != 0].float()
    return kept.pow(2).mean().sqrt().item() if kept.numel() else 0.0


def peak_rates(params: dict[str, torch.Tensor], lr: float, scale: RateScale) -> dict[str, float]:
    """Each tensor's rate: `lr` (absolute), or `lr` x its kept RMS (rms; an all-zero tensor gets `lr`, its zeros
    stay zero anyway)."""
    if scale == "absolute":
        return {n: lr for n in params}
    return {n: lr * (kept_rms(p) or 1.0) for n, p in params.items()}
