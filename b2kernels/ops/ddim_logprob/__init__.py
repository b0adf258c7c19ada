"""Fused DDIM step log-probability and sampling (``b2kernels.ddim_step_logprob`` / ``ddim_step_sample``).

One DDIM step x_t → x_prev per row of a batch, with the row's own step index, so one launch serves all steps of
many trajectories (docs/ALGORITHMS.md, "Common")::

    table = DDIMTable.from_scheduler(scheduler, device="cuda")   # after scheduler.set_timesteps(T)
    x_prev, logp = ddim_step_sample(table, i, x_t, eps_cond, noise, eta=1.0,
                                    model_output_uncond=eps_uncond, guidance_scale=5.0)
    logp = ddim_step_logprob(table, steps, x_t, eps, x_prev, eta=1.0)      # steps: LongTensor [N]

Backends: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"reference"`` (pure torch, any device,
also float64), ``"auto"`` (Triton on CUDA, reference elsewhere). See b2kernels/_dispatch.py and ENVs.md.
Every input check below runs before any launch; the only host sync is the range check of a tensor
``step_idx`` (skipped while torch.compile traces or a CUDA graph captures).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from b2kernels._dispatch import resolve
from b2kernels.ops.ddim_logprob import reference

__all__ = ["DDIMTable", "ddim_step_logprob", "ddim_step_sample"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_PRED_CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DDIMTable:
    """Per-step DDIM coefficients on one device, indexed by the step's position in ``scheduler.timesteps``.

    ``alpha_prod_t`` [T] fp32: ᾱ at ``timesteps[i]``; ``alpha_prod_t_prev`` [T] fp32: ᾱ at
    ``timesteps[i] - num_train_timesteps // T`` exactly as ``DDIMScheduler.step`` derives it
    (``final_alpha_cumprod`` when that is < 0); ``timesteps`` [T] long.
    """

    alpha_prod_t: torch.Tensor
    alpha_prod_t_prev: torch.Tensor
    timesteps: torch.Tensor
    prediction_type: str
    num_train_timesteps: int
    zero_sigma_steps: tuple[int, ...] = ()  # host-side: steps whose σ is 0 for every η (no density there)

    @property
    def num_steps(self) -> int:
        return self.alpha_prod_t.shape[0]

    @property
    def device(self) -> torch.device:
        return self.alpha_prod_t.device

    def sigmas(self, eta: float) -> torch.Tensor:
        """σ_i [T] fp32 of every step: η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)) (DDIM, eq. 16)."""
        a_t, a_p = self.alpha_prod_t.float(), self.alpha_prod_t_prev.float()
        return float(eta) * (((1 - a_p) / (1 - a_t)) * (1 - a_t / a_p)).clamp_min(0).sqrt()

    def to(self, device) -> DDIMTable:
        return DDIMTable(
            self.alpha_prod_t.to(device),
            self.alpha_prod_t_prev.to(device),
            self.timesteps.to(device),
            self.prediction_type,
            self.num_train_timesteps,
            self.zero_sigma_steps,
        )

    @classmethod
    def from_alphas(
        cls,
        alphas_cumprod,
        timesteps,
        final_alpha_cumprod,
        num_train_timesteps: int,
        prediction_type: str = "epsilon",
        device=None,
    ) -> DDIMTable:
        """Build from raw schedule arrays (what ``from_scheduler`` reads off a DDIMScheduler)."""
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"DDIMTable: prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
            )
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float32).detach().cpu()
        ts = torch.as_tensor(timesteps).detach().cpu().long().reshape(-1)
        if ts.numel() == 0:
            raise ValueError(
                "DDIMTable: the scheduler has no timesteps; call scheduler.set_timesteps(T) with T >= 1"
            )
        if int(ts.min()) < 0 or int(ts.max()) >= ac.numel():
            raise ValueError(f"DDIMTable: timesteps must lie in [0, {ac.numel()}), got {ts.tolist()}")
        prev = ts - num_train_timesteps // ts.numel()
        final = torch.as_tensor(final_alpha_cumprod, dtype=torch.float32).cpu().reshape(())
        a_t = ac[ts]
        a_p = torch.where(prev >= 0, ac[prev.clamp_min(0)], final)
        variance = ((1 - a_p) / (1 - a_t)) * (1 - a_t / a_p)  # as diffusers' _get_variance, fp32
        zero = tuple(int(i) for i in torch.nonzero(variance <= 0).reshape(-1))
        return cls(
            a_t.to(device), a_p.to(device), ts.to(device), prediction_type, int(num_train_timesteps), zero
        )

    @classmethod
    def from_scheduler(cls, scheduler, device=None) -> DDIMTable:
        """Table of a diffusers ``DDIMScheduler`` on which ``set_timesteps(T)`` was called (no diffusers import)."""
        name = type(scheduler).__name__
        if not any(c.__name__ == "DDIMScheduler" for c in type(scheduler).__mro__):
            raise TypeError(
                f"DDIMTable.from_scheduler: expected a diffusers DDIMScheduler, got {name}; "
                f"build one with DDIMScheduler.from_config(scheduler.config)"
            )
        if getattr(scheduler, "num_inference_steps", None) is None:
            raise ValueError(
                "DDIMTable.from_scheduler: the scheduler had no set_timesteps(T); call "
                "scheduler.set_timesteps(T) first"
            )
        cfg = scheduler.config
        if getattr(cfg, "thresholding", False) or getattr(cfg, "clip_sample", False):
            raise ValueError(
                "DDIMTable.from_scheduler: clip_sample/thresholding clamp x̂0 and are not supported (the step "
                "density is defined without them, as in Stable Diffusion's scheduler config); build the scheduler "
                "with clip_sample=False, thresholding=False"
            )
        if scheduler.num_inference_steps != len(scheduler.timesteps):
            raise ValueError(
                f"DDIMTable.from_scheduler: num_inference_steps={scheduler.num_inference_steps} but "
                f"{len(scheduler.timesteps)} timesteps; call scheduler.set_timesteps(T) again"
            )
        return cls.from_alphas(
            scheduler.alphas_cumprod,
            scheduler.timesteps,
            scheduler.final_alpha_cumprod,
            cfg.num_train_timesteps,
            cfg.prediction_type,
            device=device,
        )


# ------------------------------------------------------------------------------------------------ checks


def _shape(t: torch.Tensor) -> str:
    return "[" + ",".join(str(s) for s in t.shape) + "]"


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, torch.Tensor))


def _skip_sync_checks() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _validate(
    op, table, step_idx, x_t, model_output, other, other_name, eta, uncond, guidance_scale, density: bool
):
    """Raise a clear error for any bad input; return step_idx as an int or a contiguous LongTensor [N]."""
    if not isinstance(table, DDIMTable):
        raise TypeError(
            f"{op}: table must be a DDIMTable (DDIMTable.from_scheduler(scheduler)), got "
            f"{type(table).__name__}"
        )
    if not _is_number(eta):
        raise TypeError(f"{op}: eta must be a Python float, got {type(eta).__name__}")
    if not eta > 0:
        raise ValueError(
            f"{op}: eta must be > 0, got eta={eta}: with eta=0 the DDIM step is deterministic "
            "(σ=0) and has no density/log-prob; use eta in (0, 1] (the papers use 1.0)"
        )
    if eta > 1:
        raise ValueError(
            f"{op}: eta must be <= 1, got eta={eta}: for eta > 1 the DDIM direction term "
            "sqrt(1 - ᾱ_prev - σ²) is undefined"
        )
    tensors = {"x_t": x_t, "model_output": model_output, other_name: other}
    if (uncond is None) != (guidance_scale is None):
        raise ValueError(f"{op}: pass model_output_uncond and guidance_scale together (CFG) or neither")
    if uncond is not None:
        if not _is_number(guidance_scale):
            raise TypeError(
                f"{op}: guidance_scale must be a Python float, got {type(guidance_scale).__name__}"
            )
        tensors["model_output_uncond"] = uncond
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x_t.dim() < 2:
        raise ValueError(f"{op}: expected x_t of shape [N, C, H, W] (at least 2 dims), got {_shape(x_t)}")
    if math.prod(x_t.shape[1:]) == 0:
        raise ValueError(
            f"{op}: each sample needs at least one element (the log-prob is a mean over C·H·W), "
            f"got x_t of shape {_shape(x_t)}"
        )
    if x_t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x_t must be float32/float16/bfloat16/float64, got {x_t.dtype}")
    for name, t in tensors.items():
        if t.shape != x_t.shape:
            raise ValueError(f"{op}: expected {name} of shape {_shape(x_t)} (like x_t), got {_shape(t)}")
        if t.dtype != x_t.dtype:
            raise TypeError(
                f"{op}: expected {name} of dtype {x_t.dtype} (like x_t), got {t.dtype}; cast it "
                "(all inputs share one dtype)"
            )
        if t.device != x_t.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x_t is on {x_t.device}")
    if table.device != x_t.device:
        raise ValueError(
            f"{op}: the DDIMTable is on {table.device} but the tensors are on {x_t.device}; build it "
            f"with DDIMTable.from_scheduler(scheduler, device=...) or use table.to(x_t.device)"
        )
    n, num_steps = x_t.shape[0], table.num_steps
    if isinstance(step_idx, numbers.Integral) and not isinstance(step_idx, bool):
        step_idx = int(step_idx)  # numpy integers too
    if isinstance(step_idx, bool) or not isinstance(step_idx, (int, torch.Tensor)):
        raise TypeError(f"{op}: step_idx must be an int or a LongTensor [N], got {type(step_idx).__name__}")
    if isinstance(step_idx, int):
        if not 0 <= step_idx < num_steps:
            raise IndexError(
                f"{op}: step_idx {step_idx} out of range for a table of {num_steps} steps "
                f"(valid 0..{num_steps - 1})"
            )
        if density and step_idx in table.zero_sigma_steps:
            raise ValueError(_zero_sigma_msg(op, step_idx))
        return step_idx
    if step_idx.dtype.is_floating_point or step_idx.dtype.is_complex or step_idx.dtype == torch.bool:
        raise TypeError(f"{op}: step_idx must be an integer tensor, got {step_idx.dtype}")
    if step_idx.dim() == 0:
        step_idx = step_idx.expand(n)
    if step_idx.shape != (n,):
        raise ValueError(
            f"{op}: expected step_idx of shape [{n}] (one step per row of x_t), got {_shape(step_idx)}"
        )
    if step_idx.device != x_t.device:
        raise ValueError(f"{op}: step_idx is on {step_idx.device} but x_t is on {x_t.device}")
    step_idx = step_idx.to(torch.long).contiguous()
    if n > 0 and not _skip_sync_checks():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(step_idx)).tolist())  # the one host sync
        if lo < 0 or hi >= num_steps:
            bad = lo if lo < 0 else hi
            raise IndexError(
                f"{op}: step_idx contains {bad}, out of range for a table of {num_steps} steps "
                f"(valid 0..{num_steps - 1})"
            )
        if density and table.zero_sigma_steps:
            hit = [s for s in table.zero_sigma_steps if bool((step_idx == s).any())]
            if hit:
                raise ValueError(_zero_sigma_msg(op, hit[0]))
    return step_idx


def _zero_sigma_msg(op, step):
    return (
        f"{op}: step {step} has σ=0 for every eta (ᾱ_prev = final_alpha_cumprod = 1: the scheduler has "
        "set_alpha_to_one=True), so the step is deterministic and has no log-prob; use "
        "set_alpha_to_one=False (as Stable Diffusion does) or leave that step out of training"
    )


def _triton_reasons(dtype, data: dict) -> list[str]:
    reasons = []
    if dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {dtype} is not supported by the Triton kernels (float32/float16/bfloat16)")
    for name, t in data.items():
        if t.requires_grad:
            reasons.append(
                f"{name} requires grad: the Triton backward differentiates the model outputs only "
                "(x_t/x_prev/noise are data); use backend='reference'"
            )
    return reasons


def _step(
    op, table, step_idx, x_t, model_output, other, other_name, eta, uncond, guidance_scale, backend, sample
):
    """Validate, pick a backend and run one of the two ops; ``other`` is x_prev (log-prob) or noise (sample)."""
    step_idx = _validate(
        op,
        table,
        step_idx,
        x_t,
        model_output,
        other,
        other_name,
        eta,
        uncond,
        guidance_scale,
        density=not sample,
    )
    choice = resolve(op, backend, x_t.device, _triton_reasons(x_t.dtype, {"x_t": x_t, other_name: other}))
    if choice == "reference":
        ref = reference.ddim_step_sample if sample else reference.ddim_step_logprob
        return ref(
            table,
            step_idx,
            x_t,
            model_output,
            other,
            eta=eta,
            model_output_uncond=uncond,
            guidance_scale=guidance_scale,
        )
    from b2kernels.ops.ddim_logprob import triton as tri

    if isinstance(step_idx, int):
        step, const = None, step_idx
    else:
        step, const = step_idx, 0
    return (tri.ddim_sample_fwd if sample else tri.ddim_logprob_fwd)(
        table.alpha_prod_t,
        table.alpha_prod_t_prev,
        step,
        const,
        x_t.contiguous(),
        model_output.contiguous(),
        uncond.contiguous() if uncond is not None else None,
        other.contiguous(),
        float(eta),
        float(guidance_scale or 0.0),
        _PRED_CODES[table.prediction_type],
    )


# ------------------------------------------------------------------------------------------------ public API


def ddim_step_logprob(
    table: DDIMTable,
    step_idx,
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    x_prev: torch.Tensor,
    *,
    eta: float = 1.0,
    model_output_uncond: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """log π(x_prev | x_t, c) of one DDIM step per row: mean over the non-batch dims (docs/ALGORITHMS.md, "Common").

    ``step_idx``: int or LongTensor [N] (position in ``scheduler.timesteps``). ``x_t``, ``model_output``,
    ``x_prev`` (and ``model_output_uncond``): [N, ...] of one dtype (fp32/fp16/bf16; fp64 on the reference).
    ``model_output`` is read per ``table.prediction_type``; with ``model_output_uncond`` and ``guidance_scale`` it
    is the conditional output and ε̂ = uncond + w·(cond − uncond) is formed inside the kernel.
    Returns [N] float32 (float64 on the reference for float64 inputs), differentiable w.r.t. the model outputs.
    """
    return _step(
        "ddim_step_logprob",
        table,
        step_idx,
        x_t,
        model_output,
        x_prev,
        "x_prev",
        eta,
        model_output_uncond,
        guidance_scale,
        backend,
        sample=False,
    )


def ddim_step_sample(
    table: DDIMTable,
    step_idx,
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    noise: torch.Tensor,
    *,
    eta: float = 1.0,
    model_output_uncond: torch.Tensor | None = None,
    guidance_scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step: ``x_prev = μ + σ·noise`` (= ``DDIMScheduler.step(..., eta, variance_noise=noise)``) and its
    log-prob.

    Shapes/dtypes as :func:`ddim_step_logprob`; returns (x_prev [N, ...] in x_t's dtype, logp [N] float32). The
    log-prob is that of x_prev as returned (rounded to the I/O dtype), so ``ddim_step_logprob`` on the stored
    x_prev reproduces it. At a step with σ=0 (the last one under ``set_alpha_to_one=True``) x_prev is the
    deterministic mean and logp is NaN (no density). Gradients flow to the model outputs through x_prev.
    """
    return _step(
        "ddim_step_sample",
        table,
        step_idx,
        x_t,
        model_output,
        noise,
        "noise",
        eta,
        model_output_uncond,
        guidance_scale,
        backend,
        sample=True,
    )
