"""An official-style B²-DiffuRL stage, reimplemented for a side-by-side benchmark (not used for training).

It keeps the maths of the official mechanics and their costs, written from ALGORITHMS.md's description:

* sampling per batch of ``batch_size`` prompts: the prefix batched over the prompts, then *one UNet call per
  branch* (each branch continues separately), CFG as a 2× batch per call;
* an unfused scheduler step: x̂₀, variance, mean, sample and log-prob as separate torch ops with per-step
  coefficient lookups (the DDPO-style ``ddim_step_with_logprob``);
* ``latents`` and ``next_latents`` both stored for every step, the prefix copied into every branch record,
  everything moved to the host after sampling;
* selection with per-prompt statistics built from host scalars (``.item()`` per prompt);
* training from the host copy: each micro-batch of 2 samples is sliced on the host and copied to the device,
  one UNet call (CFG) per trained timestep, the loss read back with ``.item()`` every micro-step.

What the real official code also pays and this bench does not: three processes per stage exchanging pickles,
model reloads per stage, image files written and re-read for scoring.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch


def ddim_step_with_logprob_unfused(scheduler, eps, t, x, eta: float, prev_sample=None, generator=None):
    """DDPO-style DDIM step (unfused torch ops, per-row timesteps ``t`` [N] or an int): returns
    (x_prev, log-prob [N] mean over C·H·W)."""
    T = scheduler.num_inference_steps
    n = x.shape[0]
    t = (
        torch.as_tensor(t, device=x.device).long().expand(n)
        if not torch.is_tensor(t) or t.dim() == 0
        else t.to(x.device).long()
    )
    prev_t = t - scheduler.config.num_train_timesteps // T
    ac = scheduler.alphas_cumprod.to(x.device)
    shape = (n,) + (1,) * (x.dim() - 1)
    a_t = ac.gather(0, t).reshape(shape)
    a_p = torch.where(
        prev_t >= 0, ac.gather(0, prev_t.clamp_min(0)), scheduler.final_alpha_cumprod.to(x.device)
    ).reshape(shape)
    b_t = 1 - a_t
    x0 = (x - b_t.sqrt() * eps) / a_t.sqrt()
    var = (1 - a_p) / b_t * (1 - a_t / a_p)
    std = eta * var.sqrt()
    direction = (1 - a_p - std**2).clamp_min(0).sqrt() * eps
    mean = a_p.sqrt() * x0 + direction
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        prev_sample = mean + std * noise
    lp = (
        -((prev_sample.detach() - mean) ** 2) / (2 * std**2)
        - torch.log(std)
        - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, lp.mean(dim=tuple(range(1, lp.ndim)))


def _unet_cfg(policy, x, t, emb2, guidance):
    # half-precision weights: the UNet runs in its dtype and the scheduler step in the latents' (fp32), as the
    # official scripts do under autocast
    dt = policy.unet.dtype
    out = policy.unet(torch.cat([x, x]).to(dt), t, encoder_hidden_states=emb2.to(dt)).sample.to(x.dtype)
    u, c = out.chunk(2)
    return u + guidance * (c - u)


def official_stage(
    policy,
    prompts: list[str],
    *,
    branches: int,
    k: int,
    num_steps: int,
    reward_fn,
    optimizer,
    params,
    guidance: float = 5.0,
    eta: float = 1.0,
    batch_size: int = 8,
    train_batch: int = 2,
    grad_accum: int = 64,
    inner_epochs: int = 2,
    clip_range: float = 0.1,
    adv_clip: float = 5.0,
    pos_threshold: float = 0.5,
    neg_threshold: float = -0.5,
    generator=None,
) -> dict:
    """One official-style stage over ``prompts`` (P prompts × ``branches``). Returns timings and counts."""
    dev = next(policy.unet.parameters()).device
    T, B = num_steps, branches
    sched = policy.scheduler
    sched.set_timesteps(T)
    ts = [int(t) for t in sched.timesteps]
    split_at = T - k
    with torch.no_grad():
        neg = policy.encode_prompts([""])
    t0 = time.perf_counter()
    records = []  # per branch record: prompt text, embeds, latents [T+1] host, log_probs [T] host
    with torch.no_grad():
        for a in range(0, len(prompts), batch_size):
            batch_prompts = prompts[a : a + batch_size]
            n = len(batch_prompts)
            emb = policy.encode_prompts(batch_prompts)
            emb2 = torch.cat([neg.expand(n, -1, -1), emb])
            x = torch.randn((n, *policy.latent_shape), generator=generator, device=dev)
            lat_lists, lp_lists = [[x]], [[]]
            for i, t in enumerate(ts):
                if i == split_at:  # split: copy the prefix record into every branch
                    lat_lists = [list(lat_lists[j // B]) for j in range(len(lat_lists) * B)]
                    lp_lists = [list(lp_lists[j // B]) for j in range(len(lp_lists) * B)]
                for j in range(len(lat_lists)):  # one UNet call per branch
                    xt = lat_lists[j][i]
                    eps = _unet_cfg(policy, xt, torch.full((2 * n,), t, device=dev), emb2, guidance)
                    xn, lp = ddim_step_with_logprob_unfused(sched, eps, t, xt, eta, generator=generator)
                    lat_lists[j].append(xn)
                    lp_lists[j].append(lp)
            for j in range(len(lat_lists)):
                images = policy.decode(lat_lists[j][T]).float().clamp(0, 1)
                scores = reward_fn(images, batch_prompts).float()
                lats = torch.stack(lat_lists[j], dim=1)
                records.append(
                    {
                        "prompts": batch_prompts,
                        "embeds": emb.cpu(),
                        "latents": lats[:, :-1].cpu(),
                        "next_latents": lats[:, 1:].cpu(),  # both stored
                        "log_probs": torch.stack(lp_lists[j], dim=1).cpu(),
                        "scores": scores.cpu(),
                        "timesteps": torch.tensor(ts).repeat(n, 1),
                    }
                )
    sample_time = time.perf_counter() - t0
    stored_bytes = sum(r["latents"].numel() * 4 * 2 for r in records)

    # ---- selection: per prompt z-scores from host scalars, best/worst per group
    t1 = time.perf_counter()
    flat_scores, flat_prompts = [], []
    for r in records:
        for p, s in zip(r["prompts"], r["scores"]):
            flat_scores.append(s.item())
            flat_prompts.append(p)
    by_prompt: dict[str, list[float]] = {}
    for p, s in zip(flat_prompts, flat_scores):
        by_prompt.setdefault(p, []).append(s)
    stats = {p: (np.mean(v), np.std(v, ddof=1) if len(v) > 1 else 1.0) for p, v in by_prompt.items()}
    data = {k_: [] for k_ in ("embeds", "latents", "next_latents", "log_probs", "timesteps", "adv")}
    nb = math.ceil(len(prompts) / batch_size)
    for b in range(nb):
        group_recs = records[b * B : (b + 1) * B]
        n = len(group_recs[0]["prompts"])
        for row in range(n):
            z = [
                (r["scores"][row].item() - stats[r["prompts"][row]][0]) / (stats[r["prompts"][row]][1] + 1e-8)
                for r in group_recs
            ]
            best, worst = int(np.argmax(z)), int(np.argmin(z))
            for idx, ok in ((best, z[best] >= pos_threshold), (worst, z[worst] < neg_threshold)):
                if not ok:
                    continue
                r = group_recs[idx]
                data["embeds"].append(r["embeds"][row])
                data["latents"].append(r["latents"][row, split_at:])
                data["next_latents"].append(r["next_latents"][row, split_at:])
                data["log_probs"].append(r["log_probs"][row, split_at:])
                data["timesteps"].append(r["timesteps"][row, split_at:])
                data["adv"].append(float(np.clip(z[idx], -adv_clip, adv_clip)))
    M = len(data["adv"])
    data = {k_: (torch.stack(v) if k_ != "adv" else torch.tensor(v)) for k_, v in data.items()} if M else data
    select_time = time.perf_counter() - t1

    # ---- training: host slices -> device per micro-batch, one UNet call per timestep, .item() per micro-step
    t2 = time.perf_counter()
    micro = 0
    losses = []
    for _ in range(inner_epochs if M else 0):
        perm = torch.randperm(M)
        d = {k_: v[perm] for k_, v in data.items()}
        perms = torch.stack([torch.randperm(k) for _ in range(M)])
        for key in ("latents", "next_latents", "log_probs", "timesteps"):
            d[key] = d[key][torch.arange(M)[:, None], perms]
        for s in range(0, M, train_batch):
            mb = {k_: v[s : s + train_batch].to(dev) for k_, v in d.items()}  # host gather per micro-batch
            n = mb["adv"].shape[0]
            emb2 = torch.cat([neg.expand(n, -1, -1), mb["embeds"]])
            for j in range(k):
                t_rows = mb["timesteps"][:, j]
                eps = _unet_cfg(policy, mb["latents"][:, j], torch.cat([t_rows, t_rows]), emb2, guidance)
                _, lp = ddim_step_with_logprob_unfused(
                    sched, eps, t_rows, mb["latents"][:, j], eta, prev_sample=mb["next_latents"][:, j]
                )
                ratio = torch.exp(lp - mb["log_probs"][:, j])
                adv = mb["adv"]
                loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
                (loss / grad_accum).backward()
                losses.append(loss.item())  # host sync per micro-step
                micro += 1
                if micro % grad_accum == 0:
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad()
    if micro % grad_accum:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    train_time = time.perf_counter() - t2
    return {
        "sample_time_s": sample_time,
        "select_time_s": select_time,
        "train_time_s": train_time,
        "images": len(prompts) * B,
        "train_samples": M,
        "micro_steps": micro,
        "traj_storage_mb": stored_bytes / 2**20,
    }
