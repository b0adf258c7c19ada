"""D3PO-style DPO on stored trajectory pairs (the training half of D-Fusion).

For a pair (w, l) = (preferred, dispreferred) and a training step j, on the stored transitions:

    ℓ^θ, ℓ^ref = DDIM step log-probs (CFG in training) under π_θ and π_ref (= the same UNet, LoRA disabled)
    log r = log clamp(exp(ℓ^θ − ℓ^ref), 1 − ε, 1 + ε)      (computed as clamp(ℓ^θ − ℓ^ref, log(1−ε), log(1+ε)):
                                                           identical value and gradient, no overflow of exp)
    loss_j = −log σ(β · (log r_w − log r_l))

averaged over steps and pairs. ℓ^ref never changes for a stored transition, so it is computed once per stage
(:func:`reference_logprobs`, no grad, LoRA off) and stored. Steps visited in a random order per pair, the same
order for both members. Only ``train_steps`` are visited: in D-Fusion the steps before the fusion window are
identical for target and base (same latent, model and noise), so their term is log 2 with exactly zero
gradient; gradients are still divided by the total step count T so the update equals the all-steps average.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from b2diffurl import distributed
from b2diffurl.config import DPOConfig


def d3po_loss(
    logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    *,
    beta: float = 0.1,
    eps: float = 0.1,
) -> torch.Tensor:
    """Per-element D3PO loss −log σ(β(log r_w − log r_l)), r = clamp(exp(ℓθ − ℓref), 1−ε, 1+ε)."""
    lo, hi = math.log1p(-eps), math.log1p(eps)
    log_rw = torch.clamp(logp_w - ref_w, lo, hi)
    log_rl = torch.clamp(logp_l - ref_l, lo, hi)
    return -F.logsigmoid(beta * (log_rw - log_rl))


def _reduced(logp: torch.Tensor, reduction: str, numel: int) -> torch.Tensor:
    """The policy step's element-mean log-prob, or (``'sum'``) the sum over the C·H·W elements."""
    return logp * numel if reduction == "sum" else logp


@torch.no_grad()
def reference_logprobs(
    sampler,
    arena,
    ids: torch.Tensor,
    steps: Sequence[int],
    cond: torch.Tensor,
    *,
    reduction: str = "mean",
    batch_size: int = 32,
) -> torch.Tensor:
    """ℓ^ref [len(ids), len(steps)] under π_ref = the sampler's policy with LoRA disabled (no copy), computed once
    per stage. ``cond`` [P, L, D] indexed by the arena's prompt ids."""
    device = cond.device
    ids = torch.as_tensor(ids).long()
    steps_t = torch.as_tensor(list(steps), dtype=torch.long)
    all_ids = ids.repeat_interleave(len(steps_t))
    all_steps = steps_t.repeat(len(ids))
    out = torch.empty(all_ids.numel(), dtype=torch.float32, device=device)
    numel = math.prod(arena.latent_shape)
    with sampler.policy.lora_disabled():
        for a in range(0, all_ids.numel(), batch_size):
            bi, bs = all_ids[a : a + batch_size], all_steps[a : a + batch_size]
            b = arena.gather(bi, bs, device=device)
            out[a : a + len(bi)] = _reduced(sampler.batch_logprob(b, cond), reduction, numel).float()
    return out.reshape(len(ids), len(steps_t))


def _default_optimizer_step(optimizer, params, max_grad_norm):
    def step():
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    return step


def train_dpo(
    sampler,
    arena,
    preferred: torch.Tensor,
    dispreferred: torch.Tensor,
    train_steps: Sequence[int],
    cond: torch.Tensor,
    cfg: DPOConfig,
    *,
    inner_epochs: int = 2,
    pairs_per_batch: int = 1,
    optimizer=None,
    max_grad_norm: float = 1.0,
    optimizer_step: Callable | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    generator: torch.Generator | None = None,
    ref_logp: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: Callable | None = None,
) -> dict:
    """D3PO update on the pairs (preferred[k], dispreferred[k]) over ``train_steps``. Returns metrics.

    Per batch of ``pairs_per_batch`` pairs: each pair draws a random order of ``train_steps`` (shared by both
    members); for every position of that order one CFG UNet call on the 2·B transitions gives ℓθ, and the loss
    is backpropagated with weight 1/(B·T) (T = all DDIM steps: the skipped steps have exactly zero gradient, so
    this is the all-steps average). After the last position ``optimizer_step()`` runs (the trainer's: clip, step,
    schedule, zero grads; default: clip to ``max_grad_norm`` and step ``optimizer``). ``backward(loss)`` is the
    trainer's (through its float16 loss scaler) or plain ``loss.backward()``.
    """
    cfg.validate()
    device = cond.device
    preferred, dispreferred = torch.as_tensor(preferred).long(), torch.as_tensor(dispreferred).long()
    k_pairs, steps = preferred.numel(), torch.as_tensor(list(train_steps), dtype=torch.long)
    metrics = {"dpo_pairs": k_pairs, "optimizer_steps": 0}
    if k_pairs == 0 or steps.numel() == 0 or inner_epochs == 0:
        return metrics
    params = [p for p in sampler.policy.unet.parameters() if p.requires_grad]
    if optimizer_step is None:
        optimizer_step = _default_optimizer_step(optimizer, params, max_grad_norm)
    if backward is None:
        backward = torch.Tensor.backward
    t0 = time.perf_counter()
    # data-parallel: ``preferred``/``dispreferred`` list every process's pairs, -1 for those another process
    # holds; each process computes its pairs and its share of the loss (all pairs in one process)
    held = distributed.held(preferred)
    if ref_logp is None:
        ref_logp = []
        for ids in (preferred, dispreferred):
            ref = torch.full((k_pairs, steps.numel()), float("nan"), device=device)
            ref[held.to(device)] = reference_logprobs(
                sampler,
                arena,
                ids[held],
                steps.tolist(),
                cond,
                reduction=cfg.logprob_reduction,
                batch_size=cfg.ref_batch_size,
            )
            ref_logp.append(ref)
    ref_w, ref_l = ref_logp
    T, numel = sampler.num_steps, math.prod(arena.latent_shape)
    lo, hi = math.log1p(-cfg.clip_eps), math.log1p(cfg.clip_eps)
    losses, clipped, correct, norms = [], [], [], []
    was_training = sampler.policy.unet.training
    sampler.policy.unet.train()
    for _ in range(inner_epochs):
        order = torch.randperm(k_pairs, generator=generator)
        for a in range(0, k_pairs, pairs_per_batch):
            pb = order[a : a + pairs_per_batch]
            b = pb.numel()
            pos = torch.stack(
                [torch.randperm(steps.numel(), generator=generator) for _ in range(b)]
            )  # [b, K]
            here = held[pb]  # the loss is divided by the batch's global pair count b: shares add up
            pb, pos, bh = pb[here], pos[here], int(here.sum())
            ids = torch.cat([preferred[pb], dispreferred[pb]])
            for k in range(steps.numel() if bh else 0):
                col = pos[:, k]
                st = steps[col]
                batch = arena.gather(ids, torch.cat([st, st]), device=device)
                logp = _reduced(sampler.batch_logprob(batch, cond), cfg.logprob_reduction, numel)
                lw, ll = logp[:bh], logp[bh:]
                rw, rl = ref_w[pb, col].to(device), ref_l[pb, col].to(device)
                loss = d3po_loss(lw, ll, rw, rl, beta=cfg.beta, eps=cfg.clip_eps)
                backward(loss.sum() / (b * T))
                with torch.no_grad():
                    dw, dl = lw - rw, ll - rl
                    losses.append(loss.detach())
                    clipped.append(((dw < lo) | (dw > hi) | (dl < lo) | (dl > hi)).float())
                    correct.append((dw > dl).float())
            norms.append(optimizer_step())
            if progress is not None:
                progress(1)
    sampler.policy.unet.train(was_training)
    every = [  # every process's values (its own in one process)
        distributed.all_gather_cat(torch.cat(v) if v else torch.zeros(0, device=device))
        for v in (losses, clipped, correct)
    ]
    metrics.update(
        loss=float(every[0].mean()),
        dpo_clipfrac=float(every[1].mean()),
        dpo_acc=float(every[2].mean()),
        grad_norm=float(torch.stack(norms).float().mean()),
        optimizer_steps=len(norms),
        trained_steps=int(steps.numel()),
        train_time_s=time.perf_counter() - t0,
    )
    return metrics
