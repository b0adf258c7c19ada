"""``brightness``: the mean pixel value of the image (all channels, in [0, 1]).

A sanity reward, not a goal: every prompt shares one direction that raises it (more or larger bright
regions), so a trainer that works raises it within a few stages, whatever the model follows of its prompts.
The learning benchmark uses it to tell "the trainer cannot learn" from "this reward asks for a skill the
model cannot reach at this budget". ``weight`` < 0 turns it into a darkness reward. With ``threshold`` it is
sparse: 1 when the mean pixel value exceeds the threshold, else 0 (an end-only success signal, the kind of
reward B²-DiffuRL is built for).
"""

from __future__ import annotations

import math

import torch


def mean_brightness(images: torch.Tensor) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> [N] float32 mean over channels and pixels (on images.device)."""
    return images.detach().float().mean(dim=(1, 2, 3))


def brightness(weight: float = 1.0, threshold: float | None = None):
    """Reward = ``weight`` × mean pixel value, or ``weight`` × 1[mean pixel value > ``threshold``]."""
    w = float(weight)
    if threshold is None:
        return lambda images, prompts: w * mean_brightness(images)
    t = float(threshold)
    if not math.isfinite(t):
        raise ValueError(f"brightness: threshold must be a finite number, got {threshold!r}")
    return lambda images, prompts: w * (mean_brightness(images) > t).float()
