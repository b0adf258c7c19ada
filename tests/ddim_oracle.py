"""Test-only oracle of one DDIM policy step, written independently of b2kernels and b2diffurl.sampling.

Per row: two separate UNet calls (uncond, cond; no batching), ε̂ = ε_u + w·(ε_c − ε_u), the mean from
``diffusers.DDIMScheduler.step`` with zero variance noise, σ_t = η·sqrt((1−ᾱ_t')/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_t')), and the
Gaussian log-density of x_prev averaged over the C·H·W elements (the papers' convention).
"""

from __future__ import annotations

import math

import torch


def ddim_scheduler(policy, num_steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(policy.scheduler.config)
    sched.set_timesteps(num_steps)
    return sched


def official_step(unet, sched, x_t, i: int, cond, uncond, guidance: float | None, eta: float = 1.0):
    """(mean [1, ...], σ) of step i for one row x_t [1, C, H, W]; ``guidance=None``: no CFG (cond only)."""
    t = sched.timesteps[i]
    e_c = unet(x_t, t, encoder_hidden_states=cond).sample
    if guidance is None:
        eps = e_c
    else:
        e_u = unet(x_t, t, encoder_hidden_states=uncond).sample
        eps = e_u + guidance * (e_c - e_u)
    mean = sched.step(eps, t, x_t, eta=eta, variance_noise=torch.zeros_like(x_t)).prev_sample
    prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
    a_t = sched.alphas_cumprod[t]
    a_p = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
    sigma = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    return mean, sigma


def gaussian_logprob(x_prev, mean, sigma: float) -> torch.Tensor:
    """Element-mean Gaussian log-density of x_prev [1, ...] under N(mean, σ²)."""
    lp = -((x_prev - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return lp.mean()


@torch.no_grad()
def transition_logprobs(policy, sched, x_t, x_prev, steps, cond, guidance, eta: float = 1.0) -> torch.Tensor:
    """[N] oracle log π(x_prev | x_t, c) of N stored transitions (rows at any steps; ``cond`` [N, L, D])."""
    uncond = policy.encode_prompts([""])
    out = []
    for r in range(x_t.shape[0]):
        mean, sigma = official_step(
            policy.unet, sched, x_t[r : r + 1], int(steps[r]), cond[r : r + 1], uncond, guidance, eta
        )
        out.append(gaussian_logprob(x_prev[r : r + 1], mean, sigma))
    return torch.stack(out)
