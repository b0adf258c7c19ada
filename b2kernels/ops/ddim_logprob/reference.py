"""Pure-torch DDIM step log-probability: the CPU path and the test oracle of the Triton kernels.

Same signature as the public functions (minus ``backend``); inputs are assumed validated by
``b2kernels.ops.ddim_logprob`` (the public functions do that before dispatching here).

The maths follows ``diffusers.DDIMScheduler.step`` term by term (x̂₀ and ε̂ first, then the mean), computed in
float32 whatever the I/O dtype (float64 inputs stay float64, for ``gradcheck``). Autograd flows through
everything, so this is also the gradient oracle of the Triton backward.
"""

from __future__ import annotations

import math

import torch

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_coeffs(table, step_idx, n: int, ndim: int, device, dtype):
    """Per-row ᾱ_t, ᾱ_prev as [N, 1, ..., 1] tensors of ``dtype``."""
    if isinstance(step_idx, int):
        idx = torch.full((n,), step_idx, dtype=torch.long, device=device)
    else:
        idx = step_idx.to(device=device, dtype=torch.long)
    shape = (n,) + (1,) * (ndim - 1)
    a_t = table.alpha_prod_t.to(device=device, dtype=dtype)[idx].reshape(shape)
    a_p = table.alpha_prod_t_prev.to(device=device, dtype=dtype)[idx].reshape(shape)
    return a_t, a_p


def _mean_and_sigma(table, step_idx, x_t, model_output, eta, model_output_uncond, guidance_scale):
    ct = _compute_dtype(x_t.dtype)
    n = x_t.shape[0]
    a_t, a_p = _row_coeffs(table, step_idx, n, x_t.dim(), x_t.device, ct)
    x = x_t.to(ct)
    eps = model_output.to(ct)
    if model_output_uncond is not None:
        u = model_output_uncond.to(ct)
        eps = u + guidance_scale * (eps - u)
    b_t = 1 - a_t
    pred = table.prediction_type
    if pred == "epsilon":
        x0 = (x - b_t.sqrt() * eps) / a_t.sqrt()
        e = eps
    elif pred == "sample":
        x0 = eps
        e = (x - a_t.sqrt() * x0) / b_t.sqrt()
    elif pred == "v_prediction":
        x0 = a_t.sqrt() * x - b_t.sqrt() * eps
        e = a_t.sqrt() * eps + b_t.sqrt() * x
    else:  # DDIMTable validates this; kept for direct callers
        raise ValueError(f"unknown prediction_type {pred!r}")
    variance = ((1 - a_p) / b_t) * (1 - a_t / a_p)
    sigma = eta * variance.sqrt()
    # clamp: rounding can make 1 - ᾱ_prev - σ² a hair below 0 where it is exactly 0 in exact arithmetic
    direction = (1 - a_p - sigma * sigma).clamp_min(0).sqrt()
    mean = a_p.sqrt() * x0 + direction * e
    return mean, sigma


def _logp(diff: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    n = diff.shape[0]
    sigma_row = sigma.reshape(n)
    sq = (diff * diff).flatten(1).mean(dim=1)
    return -sq / (2 * sigma_row * sigma_row) - sigma_row.log() - _HALF_LOG_2PI


def ddim_step_logprob(
    table, step_idx, x_t, model_output, x_prev, *, eta=1.0, model_output_uncond=None, guidance_scale=None
) -> torch.Tensor:
    """log π(x_prev | x_t) of one DDIM step per row, mean over non-batch dims. Returns [N] float32 (float64 for
    float64 inputs)."""
    mean, sigma = _mean_and_sigma(
        table, step_idx, x_t, model_output, eta, model_output_uncond, guidance_scale
    )
    return _logp(x_prev.to(mean.dtype) - mean, sigma)


def ddim_step_sample(
    table, step_idx, x_t, model_output, noise, *, eta=1.0, model_output_uncond=None, guidance_scale=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_prev = μ + σ·noise (in the dtype of ``x_t``) and its log-prob [N] float32.

    The log-prob is taken at x_prev *as returned* (rounded to the I/O dtype), so recomputing it later from the
    stored x_prev with :func:`ddim_step_logprob` gives the same number.
    """
    mean, sigma = _mean_and_sigma(
        table, step_idx, x_t, model_output, eta, model_output_uncond, guidance_scale
    )
    x_prev = (mean + sigma * noise.to(mean.dtype)).to(x_t.dtype)
    return x_prev, _logp(x_prev.to(mean.dtype) - mean, sigma)
