"""``brightness``: the mean pixel value of the image (all channels, in [0, 1]); ``foreground``: the fraction of
pixels whose brightest channel exceeds ``level`` (0.4: the toy world's foreground rule), i.e. how much of a
dark-background image is drawn.

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
    return _sparse("brightness", mean_brightness, weight, threshold)


def _sparse(name: str, values, weight: float, threshold: float | None):
    """``weight`` × ``values(images)``, or ``weight`` × 1[``values(images)`` > ``threshold``]."""
    w = float(weight)
    if threshold is None:
        return lambda images, prompts: w * values(images)
    t = float(threshold)
    if not math.isfinite(t):
        raise ValueError(f"{name}: threshold must be a finite number, got {threshold!r}")
    return lambda images, prompts: w * (values(images) > t).float()


def foreground_fraction(images: torch.Tensor, level: float = 0.4) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> [N] float32 fraction of pixels whose brightest channel exceeds ``level``."""
    return (images.detach().float().amax(1) > level).float().mean(dim=(1, 2))


def foreground(weight: float = 1.0, level: float = 0.4, threshold: float | None = None):
    """Reward = ``weight`` × the foreground fraction, or ``weight`` × 1[foreground fraction > ``threshold``]."""
    lv = float(level)
    if not 0.0 <= lv < 1.0:
        raise ValueError(f"foreground: level must be in [0, 1), got {level!r}")
    return _sparse("foreground", lambda images: foreground_fraction(images, lv), weight, threshold)
