"""Triton kernels for the fused DDIM step (log-prob forward/backward, sampling forward/backward).

Layout: kernels → launchers → torch.library custom ops (+ fake impls and autograd).

Every program loads its row's ᾱ_t, ᾱ_prev from the device table (``step_idx`` may differ per row), folds the
prediction type into a linear form ``μ = A·x_t + B·ε̂`` (ε̂ = the CFG-combined model output, never stored) and
reads each input once. Grids are 1-D (``pid = row * k + j``), so neither N nor the row length meets the 65535
limit of grid axes 1/2.

* forward: program = (row, part) walks ``chunks_per_prog`` BLOCK-element chunks of its row, accumulating
  (x_prev-μ)² in a BLOCK-wide fp32 register vector, and writes ``-Σ/(2σ²D)`` (+ ``-log σ - ½log 2π`` for
  part 0) to a [N, progs_per_row] fp32 buffer. ``progs_per_row`` is just enough to fill the GPU (≈ 8 programs/SM): at
  N=1280 SD rows it is 1 (one program per row, logp written directly, a single launch); at N=16 every chunk is
  its own program and ``logp = partials.sum(1)``. Deterministic, no atomics (the RL ratio π/π_old must not
  jitter between sampling and training).
* forward (sample): additionally writes ``x_prev = μ + σ·z`` in the I/O dtype; the log-prob uses that
  *rounded* x_prev, exactly what a later ``ddim_step_logprob`` sees.
* backward: one program per (row, BLOCK chunk) — no reduction, so no reason to loop.
  Log-prob: ``∂logp/∂ε̂ = g_row · B · (x_prev-μ) / (σ² D)``; CFG splits it as ``w·G`` (cond) and
  ``(1-w)·G`` (uncond). One read of each input, one write per gradient.
  Sample: ``∂x_prev/∂ε̂ = B``; the log-prob of a reparameterised sample does not depend on ε̂
  (x_prev-μ = σz), so its gradient contribution is exactly 0.

All arithmetic is fp32 whatever the I/O dtype; offsets are int64 (row·D can pass 2³¹).
"""

import functools
import math

import torch
import triton
import triton.language as tl

from b2kernels._dispatch import triton_interpret

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Tests set this to fill fresh outputs with NaN, so any element a kernel fails to write shows up.
POISON_OUTPUTS = False


def _new(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    out = torch.empty(like.shape if shape is None else shape, dtype=dtype or like.dtype, device=like.device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


@triton.jit
def _ddim_coeffs(
    a_t_ptr, a_p_ptr, step_ptr, step_const, num_steps, row, eta, PRED: tl.constexpr, HAS_STEP: tl.constexpr
):
    """(A, B, σ) of μ = A·x_t + B·ε̂ for ``row`` (fp32 scalars; diffusers' formulas, correctly rounded).

    A per-row step outside [0, num_steps) (only possible when the host range check was skipped, i.e. under
    torch.compile tracing or CUDA-graph capture) reads step 0 and makes σ NaN: the row's outputs turn NaN
    instead of reading out of bounds."""
    if HAS_STEP:
        s = tl.load(step_ptr + row)
        ok = (s >= 0) & (s < num_steps)
        s = tl.where(ok, s, 0)
    else:
        s = step_const
    a_t = tl.load(a_t_ptr + s).to(tl.float32)
    a_p = tl.load(a_p_ptr + s).to(tl.float32)
    b_t = 1.0 - a_t
    b_p = 1.0 - a_p
    variance = tl.div_rn(b_p, b_t) * (1.0 - tl.div_rn(a_t, a_p))
    sigma = eta * tl.sqrt_rn(variance)
    direction = tl.sqrt_rn(tl.maximum(1.0 - a_p - sigma * sigma, 0.0))
    sa_t = tl.sqrt_rn(a_t)
    sb_t = tl.sqrt_rn(b_t)
    sa_p = tl.sqrt_rn(a_p)
    if PRED == 0:  # epsilon: x̂0 = (x - √β_t ε)/√ᾱ_t, ε̂ = ε
        A = tl.div_rn(sa_p, sa_t)
        B = direction - tl.div_rn(sa_p * sb_t, sa_t)
    elif PRED == 1:  # sample: x̂0 = m, ε̂ = (x - √ᾱ_t m)/√β_t
        A = tl.div_rn(direction, sb_t)
        B = sa_p - tl.div_rn(direction * sa_t, sb_t)
    else:  # v_prediction: x̂0 = √ᾱ_t x - √β_t v, ε̂ = √ᾱ_t v + √β_t x
        A = sa_p * sa_t + direction * sb_t
        B = direction * sa_t - sa_p * sb_t
    if HAS_STEP:
        sigma = tl.where(ok, sigma, float("nan"))
    return A, B, sigma


@triton.jit
def _step_mean(x_t_ptr, model_ptr, uncond_ptr, offs, mask, A, B, w, CFG: tl.constexpr):
    """μ = A·x_t + B·ε̂ (fp32) at ``offs``; ε̂ = uncond + w·(cond − uncond) under CFG, else the model output."""
    x = tl.load(x_t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(model_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        u = tl.load(uncond_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps = u + w * (eps - u)
    return A * x + B * eps


@triton.jit
def _ddim_fwd_kernel(
    x_t_ptr,
    model_ptr,
    uncond_ptr,  # uncond model output (CFG) or a dummy
    x_prev_or_noise_ptr,  # x_prev (log-prob) or noise (sample)
    x_prev_out_ptr,
    partial_ptr,
    a_t_ptr,
    a_p_ptr,
    step_ptr,
    step_const,
    num_steps,
    D,
    progs_per_row,
    chunks_per_prog,
    eta,
    w,
    log_const,
    PRED: tl.constexpr,
    HAS_STEP: tl.constexpr,
    CFG: tl.constexpr,
    SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # program = (row, part_idx): the part_idx-th run of ``chunks_per_prog`` BLOCK-chunks of the row
    pid = tl.program_id(0)
    row = pid // progs_per_row
    part_idx = pid - row * progs_per_row
    A, B, sigma = _ddim_coeffs(a_t_ptr, a_p_ptr, step_ptr, step_const, num_steps, row, eta, PRED, HAS_STEP)

    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_base = row.to(tl.int64) * D
    first = part_idx.to(tl.int64) * chunks_per_prog * BLOCK
    for i in range(0, chunks_per_prog):
        col = first + i * BLOCK + tl.arange(0, BLOCK)
        mask = col < D
        offs = row_base + col
        mean = _step_mean(x_t_ptr, model_ptr, uncond_ptr, offs, mask, A, B, w, CFG)
        y = tl.load(x_prev_or_noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SAMPLE:
            xo = (mean + sigma * y).to(x_prev_out_ptr.dtype.element_ty)
            tl.store(x_prev_out_ptr + offs, xo, mask=mask)
            diff = xo.to(tl.float32) - mean
        else:
            diff = y - mean
        acc += tl.where(mask, diff * diff, 0.0)
    part = -tl.div_rn(tl.sum(acc, axis=0), 2.0 * sigma * sigma * D)
    if part_idx == 0:
        part = part - tl.log(sigma) - log_const
    tl.store(partial_ptr + pid, part)


@triton.jit
def _ddim_bwd_kernel(
    x_t_ptr,
    model_ptr,
    uncond_ptr,
    x_prev_or_grad_ptr,  # x_prev (log-prob) or dL/dx_prev (sample)
    grad_logp_ptr,  # dL/dlogp [N] (log-prob; unused for sample)
    d_model_ptr,
    d_uncond_ptr,
    a_t_ptr,
    a_p_ptr,
    step_ptr,
    step_const,
    num_steps,
    D,
    n_chunks,
    eta,
    w,
    PRED: tl.constexpr,
    HAS_STEP: tl.constexpr,
    CFG: tl.constexpr,
    SAMPLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // n_chunks
    chunk = pid - row * n_chunks
    A, B, sigma = _ddim_coeffs(a_t_ptr, a_p_ptr, step_ptr, step_const, num_steps, row, eta, PRED, HAS_STEP)

    col = chunk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = col < D
    offs = row.to(tl.int64) * D + col
    y = tl.load(x_prev_or_grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SAMPLE:
        grad = B * y
    else:
        mean = _step_mean(x_t_ptr, model_ptr, uncond_ptr, offs, mask, A, B, w, CFG)
        g = tl.load(grad_logp_ptr + row).to(tl.float32)
        grad = (y - mean) * tl.div_rn(g * B, sigma * sigma * D)
    if CFG:
        tl.store(d_model_ptr + offs, (w * grad).to(d_model_ptr.dtype.element_ty), mask=mask)
        tl.store(d_uncond_ptr + offs, ((1.0 - w) * grad).to(d_uncond_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(d_model_ptr + offs, grad.to(d_model_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------ launchers


def _block(d: int) -> tuple[int, int]:
    """(BLOCK, num_warps). The interpreter pays per program, so it gets whole (small) rows per program."""
    if triton_interpret():
        return min(triton.next_power_of_2(d), 4096), 1
    return min(max(triton.next_power_of_2(d), 16), 1024), 4


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _progs_per_row(n: int, n_chunks: int, device: torch.device) -> int:
    """Programs per row of the forward. Rows are split only as far as needed to fill the GPU (≈ 8 programs
    per SM): at N=1280 SD rows each program owns a whole row and writes logp directly (no partials to sum);
    at N=16 rows are split into single chunks so 16 rows still spread over every SM."""
    if device.type != "cuda" or n == 0:
        return 1
    return max(1, min(n_chunks, triton.cdiv(8 * _num_sms(device), n)))


def _geometry(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(rows N, row length D, BLOCK, num_warps, BLOCK-chunks per row) shared by the forward and backward."""
    n, d = x.shape[0], math.prod(x.shape[1:])
    block, warps = _block(d)
    return n, d, block, warps, triton.cdiv(d, block)


def _launch_fwd(a_t, a_p, step, step_const, x, model, uncond, other, eta, w, pred, sample):
    n, d, block, warps, n_chunks = _geometry(x)
    chunks_per_prog = triton.cdiv(n_chunks, _progs_per_row(n, n_chunks, x.device))
    progs_per_row = triton.cdiv(n_chunks, chunks_per_prog)
    parts = _new(x, (n, progs_per_row), torch.float32)
    xout = _new(x) if sample else parts  # dummy pointer when unused
    if n > 0 and d > 0:
        _ddim_fwd_kernel[(n * progs_per_row,)](
            x,
            model,
            uncond if uncond is not None else model,
            other,
            xout,
            parts,
            a_t,
            a_p,
            step if step is not None else a_t,
            int(step_const),
            a_t.shape[0],
            d,
            progs_per_row,
            chunks_per_prog,
            float(eta),
            float(w),
            _HALF_LOG_2PI,
            PRED=pred,
            HAS_STEP=step is not None,
            CFG=uncond is not None,
            SAMPLE=sample,
            BLOCK=block,
            num_warps=warps,
        )
    logp = parts.view(n) if progs_per_row == 1 else parts.sum(dim=1)  # deterministic: no atomics
    return (xout, logp) if sample else logp


def _launch_bwd(a_t, a_p, step, step_const, x, model, uncond, other, g, eta, w, pred, sample):
    n, d, block, warps, n_chunks = _geometry(x)
    d_model = _new(model)
    d_uncond = _new(uncond) if uncond is not None else d_model.new_empty(0)
    if n > 0 and d > 0:
        _ddim_bwd_kernel[(n * n_chunks,)](
            x,
            model,
            uncond if uncond is not None else model,
            other,
            g,
            d_model,
            d_uncond if uncond is not None else d_model,
            a_t,
            a_p,
            step if step is not None else a_t,
            int(step_const),
            a_t.shape[0],
            d,
            n_chunks,
            float(eta),
            float(w),
            PRED=pred,
            HAS_STEP=step is not None,
            CFG=uncond is not None,
            SAMPLE=sample,
            BLOCK=block,
            num_warps=warps,
        )
    return d_model, d_uncond


# ------------------------------------------------------------------------------- torch.library custom ops
# Inputs arrive contiguous and validated (b2kernels.ops.ddim_logprob). ``step`` is a LongTensor [N] or None
# (then every row uses ``step_const``); ``w`` is ignored without ``uncond`` (the uncond output).


@torch.library.custom_op("b2kernels::ddim_logprob_fwd", mutates_args=())
def ddim_logprob_fwd(
    a_t: torch.Tensor,
    a_p: torch.Tensor,
    step: torch.Tensor | None,
    step_const: int,
    x: torch.Tensor,
    model: torch.Tensor,
    uncond: torch.Tensor | None,
    x_prev: torch.Tensor,
    eta: float,
    w: float,
    pred: int,
) -> torch.Tensor:
    return _launch_fwd(a_t, a_p, step, step_const, x, model, uncond, x_prev, eta, w, pred, sample=False)


@ddim_logprob_fwd.register_fake
def _(a_t, a_p, step, step_const, x, model, uncond, x_prev, eta, w, pred):
    return x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("b2kernels::ddim_sample_fwd", mutates_args=())
def ddim_sample_fwd(
    a_t: torch.Tensor,
    a_p: torch.Tensor,
    step: torch.Tensor | None,
    step_const: int,
    x: torch.Tensor,
    model: torch.Tensor,
    uncond: torch.Tensor | None,
    noise: torch.Tensor,
    eta: float,
    w: float,
    pred: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_fwd(a_t, a_p, step, step_const, x, model, uncond, noise, eta, w, pred, sample=True)


@ddim_sample_fwd.register_fake
def _(a_t, a_p, step, step_const, x, model, uncond, noise, eta, w, pred):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("b2kernels::ddim_step_bwd", mutates_args=())
def ddim_step_bwd(
    a_t: torch.Tensor,
    a_p: torch.Tensor,
    step: torch.Tensor | None,
    step_const: int,
    x: torch.Tensor,
    model: torch.Tensor,
    uncond: torch.Tensor | None,
    other: torch.Tensor,
    g: torch.Tensor,
    eta: float,
    w: float,
    pred: int,
    sample: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/d_model, dL/d_uncond) — the second is empty without CFG. ``other``/``g``: x_prev/grad_logp [N] (log-prob) or
    grad_x_prev/unused (sample)."""
    return _launch_bwd(a_t, a_p, step, step_const, x, model, uncond, other, g, eta, w, pred, sample)


@ddim_step_bwd.register_fake
def _(a_t, a_p, step, step_const, x, model, uncond, other, g, eta, w, pred, sample):
    return torch.empty_like(model), (torch.empty_like(uncond) if uncond is not None else model.new_empty(0))


def _setup_context(ctx, inputs, output):
    a_t, a_p, step, step_const, x, model, uncond, other, eta, w, pred = inputs
    ctx.save_for_backward(a_t, a_p, step, x, model, uncond, other)
    ctx.args = (step_const, eta, w, pred)


def _input_grads(d_model, d_uncond):
    """Gradients for the op's 11 inputs: only the model output(s) (positions 5 and 6) receive one."""
    return (None,) * 5 + (d_model, d_uncond) + (None,) * 4


def _logprob_backward(ctx, grad_logp):
    a_t, a_p, step, x, model, uncond, x_prev = ctx.saved_tensors
    step_const, eta, w, pred = ctx.args
    d_model, d_uncond = ddim_step_bwd(
        a_t, a_p, step, step_const, x, model, uncond, x_prev, grad_logp.contiguous(), eta, w, pred, False
    )
    return _input_grads(d_model, d_uncond if uncond is not None else None)


def _sample_backward(ctx, grad_x_prev, grad_logp):
    a_t, a_p, step, x, model, uncond, _noise = ctx.saved_tensors
    step_const, eta, w, pred = ctx.args
    if grad_x_prev is None:  # only the log-prob was used: it does not depend on ε̂ (reparameterised sample)
        d_model, d_uncond = (
            torch.zeros_like(model),
            (torch.zeros_like(uncond) if uncond is not None else None),
        )
    else:
        d_model, d_uncond = ddim_step_bwd(
            a_t,
            a_p,
            step,
            step_const,
            x,
            model,
            uncond,
            grad_x_prev.contiguous(),
            grad_x_prev,
            eta,
            w,
            pred,
            True,
        )
    return _input_grads(d_model, d_uncond if uncond is not None else None)


ddim_logprob_fwd.register_autograd(_logprob_backward, setup_context=_setup_context)
ddim_sample_fwd.register_autograd(_sample_backward, setup_context=_setup_context)
