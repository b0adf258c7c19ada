"""KL to the starting policy for tree-PPO: the monitor (how far the sampling policy has moved) and the optional
regulariser ``train.kl_coef`` (flow_grpo's ``beta``, the standard remedy for reward hacking).

Both evaluate the starting policy through ``RunContext.reference`` (the UNet with LoRA disabled, or a frozen
copy of a fully fine-tuned one) and go through the sampler's policy step, so CFG and the log-prob convention
(mean over the latent's elements) are the ones training uses.
"""

from __future__ import annotations

import time

import torch

from b2diffurl import distributed
from b2diffurl.monitors import kl_estimate


def step_kl(
    sampler, reference, x_t: torch.Tensor, steps: torch.Tensor, cond: torch.Tensor, *, x_prev=None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per row, the exact KL(π_θ(·|x_t) ‖ π_ref(·|x_t)) of one DDIM step, differentiable w.r.t. the policy.

    Both steps are Gaussians with the same σ (it depends on the step only), so the KL is ‖μ_θ − μ_ref‖²/(2σ²);
    averaged over the latent's elements like the log-probs. It is read off log-probs, so no step mean has to
    leave the DDIM op: at x = μ_ref, log π_ref(x) − log π_θ(x) = (μ_θ − μ_ref)²/(2σ²) per element (the
    normalisers cancel). μ_ref is the reference step taken with zero noise. Costs one no-grad reference forward
    and one policy forward per call.

    With ``x_prev`` (stored transitions of the same rows), that one policy forward also scores them: returns
    ``(kl, log π_θ(x_prev | x_t))``, so PPO's log-prob and its KL term share a UNet call."""
    x_t = x_t.to(sampler.dtype)
    embeds = sampler.embeds_for(cond, training=True)
    with torch.no_grad(), reference():
        mu_ref, logp_ref = sampler.policy_step(x_t, steps, embeds, noise=torch.zeros_like(x_t), training=True)
    if x_prev is None:
        return logp_ref - sampler.policy_step(x_t, steps, embeds, x_prev=mu_ref, training=True)
    at_ref, logp = sampler.policy_step(x_t, steps, embeds, x_prev=(mu_ref, x_prev), training=True)
    return logp_ref - at_ref, logp


def batch_logprob_and_kl(ctx, batch, cond_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows gathered from a trajectory arena -> (log π_θ of their stored transitions [N], mean :func:`step_kl`),
    from one policy forward and one reference forward (the ``train.kl_coef`` path of PPO)."""
    if ctx.reference is None:
        raise RuntimeError("train.kl_coef > 0 needs RunContext.reference (the trainer sets it)")
    cond = cond_table[batch.prompt_id.to(cond_table.device)]
    kl, logp = step_kl(ctx.sampler, ctx.reference, batch.x_t, batch.step, cond, x_prev=batch.x_prev)
    return logp, kl.mean()


KL_SHARE = 8


@torch.no_grad()
def kl_to_start(
    ctx, arena, ids: torch.Tensor, steps: torch.Tensor, cond_table: torch.Tensor, stage: int
) -> dict:
    """``kl_k1`` / ``kl_k3`` (:func:`~b2diffurl.monitors.kl_estimate`) of the stage's sampling policy against
    the starting policy, per trained step, on up to ``monitor.kl_samples`` of the stage's trained
    (trajectory, step) pairs (and at most one in :data:`KL_SHARE`): their stored sampling log-probs against
    the starting policy's log-probs of the same transitions (one no-grad forward per pair). Empty when there
    is no reference or nothing was trained."""
    n_max = ctx.cfg.monitor.kl_samples
    if ctx.reference is None or n_max <= 0:
        return {}
    t0 = time.perf_counter()
    here = ids[distributed.held(ids)]
    M, K = int(here.numel()), int(steps.numel())
    logp_old, logp_ref = torch.zeros(0), torch.zeros(0)
    if M and K:
        # the subsample depends on the run seed and stage only: the run's own random streams are untouched
        gen = torch.Generator().manual_seed(ctx.cfg.seed * 1_000_003 + stage)
        # at most one trained pair in KL_SHARE: the update runs ≥ 2 passes (forward + backward) over every pair
        # per inner epoch, so the estimate stays a few percent of it even on a small stage
        n = min(n_max // distributed.size(), M * K // KL_SHARE)
        take = torch.randperm(M * K, generator=gen)[: max(1, n)]
        pair_ids, pair_steps = here[take // K], steps.cpu()[take % K]
        # rows per call: as many as a sampling call holds, known to fit
        chunk = max(1, ctx.cfg.sample.batch_size * ctx.cfg.sample.branches)
        old, ref = [], []
        for a in range(0, len(take), chunk):
            batch = arena.gather(pair_ids[a : a + chunk], pair_steps[a : a + chunk], device=ctx.device)
            with ctx.reference():
                ref.append(ctx.sampler.batch_logprob(batch, cond_table).float().cpu())
            old.append(batch.logprob.float().cpu())
        logp_old, logp_ref = torch.cat(old), torch.cat(ref)
    logp_old, logp_ref = distributed.all_gather_cat(logp_old), distributed.all_gather_cat(logp_ref)
    if logp_old.numel() == 0:
        return {}
    return {
        **kl_estimate(logp_old, logp_ref),
        "kl_pairs": int(logp_old.numel()),
        "kl_time_s": time.perf_counter() - t0,
    }
