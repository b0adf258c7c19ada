"""One D-Fusion stage (:func:`generate_pairs`): Phase A, pairing, fusion, scoring, the arena records and the
pair grid."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from b2diffurl import distributed
from b2diffurl.algos.dfusion.fusion import (
    capture_columns,
    fused_step_range,
    fusion_block_indices,
    run_fusion,
    run_phase_a,
)
from b2diffurl.algos.dfusion.pairs import (
    RowNoise,
    item_selection,
    pair_indices,
    pairing_sizes,
    preference_pairs,
    sample_seed,
)
from b2diffurl.algos.ppo import reward_stats
from b2diffurl.config import DFusionConfig
from b2kernels.integrations.masks import resize_mask


@dataclass
class DFusionStage:
    """What one stage of pair generation produced. Trajectory ids point into the arena."""

    prompts: list[str]  # unique prompts of the stage (arena prompt id = index here)
    sample_ids: torch.Tensor  # [P·n] Phase-A trajectory ids (prompt-major)
    sample_rewards: torch.Tensor  # [P·n]
    ref_ids: torch.Tensor  # [P·nb] reference trajectory id of each pair
    base_ids: torch.Tensor  # [P·nb]
    target_ids: torch.Tensor  # [P·nb]
    base_rewards: torch.Tensor  # [P·nb]
    target_rewards: torch.Tensor  # [P·nb]
    pair_prompt: torch.Tensor  # [P·nb] prompt index of each pair
    masks: torch.Tensor  # [P·nb, T, grid²] bool: the mask used at each step (zeros outside window)
    fused_steps: list[int]
    preferred: torch.Tensor  # [K] ids of the preferred member of each decisive pair
    dispreferred: torch.Tensor  # [K]
    metrics: dict
    images: torch.Tensor | None = None  # a few (reference, base, target) images for grids
    cond: torch.Tensor | None = None  # [P, L, D] prompt embeddings (arena prompt id indexes them)

    @property
    def num_pairs(self) -> int:
        return int(self.preferred.numel())


@torch.no_grad()
def _generate_chunk(
    sampler,
    prompts,
    cond,
    selection,
    thresholds,
    p0,
    cfg,
    *,
    reward_fn,
    arena,
    run_seed,
    epoch,
    decode_batch,
    progress,
    first_prompt=0,
) -> dict:
    """Phase A + pairing + fusion + scoring for prompts p0 … p0+len(prompts)−1 of the stage (noise seeds
    count prompts from ``first_prompt``)."""
    policy, T, device = sampler.policy, sampler.num_steps, sampler.device
    shape = tuple(policy.latent_shape)
    fused_steps = fused_step_range(cfg, T)
    layers = fusion_block_indices(policy.unet, cfg.fusion_layers)
    n = cfg.samples_per_prompt
    _, n_base = pairing_sizes(n, cfg.ref_fraction, cfg.base_fraction, cfg.ref_reuse)
    P = len(prompts)
    tok, sub = capture_columns(selection)

    # ---- Phase A (per-sample generators; masks captured for every row, references chosen afterwards)
    row_prompt = torch.arange(P).repeat_interleave(n)
    seeds = [sample_seed(run_seed, epoch, (first_prompt + p0) * n + j) for j in range(P * n)]
    ids_a = arena.add_trees((row_prompt + p0).tolist(), T)
    lat_a, logp_a, masks_a = run_phase_a(
        sampler,
        cond[row_prompt.to(device)],
        RowNoise(seeds, T, shape, device),
        token_cols=tok[row_prompt],
        selection=sub[row_prompt],
        thresholds=thresholds[row_prompt],
        cfg=cfg,
        arena=arena,
        ids=ids_a,
        progress=progress,
    )
    rewards_a = _score(
        policy, reward_fn, lat_a[:, -1], [prompts[i] for i in row_prompt.tolist()], decode_batch
    )
    rewards_a = rewards_a.float().cpu()
    arena.set_rewards(ids_a, rewards_a)

    # ---- pairing (indices local to each prompt -> rows of this chunk)
    ref_local, base_local = pair_indices(
        rewards_a.reshape(P, n), cfg.ref_fraction, cfg.base_fraction, cfg.ref_reuse
    )
    offs = (torch.arange(P) * n)[:, None]
    ref_rows, base_rows = (ref_local + offs).reshape(-1), (base_local + offs).reshape(-1)
    uniq_refs = (ref_local[:, :: cfg.ref_reuse] + offs).reshape(-1)  # each reference once
    ref_of_target = torch.arange(uniq_refs.numel()).repeat_interleave(cfg.ref_reuse)
    pair_prompt = torch.arange(P).repeat_interleave(n_base)

    # ---- fusion: targets replay the bases' noise streams
    s0 = fused_steps[0]
    step_on = torch.zeros(T, dtype=torch.bool, device=masks_a.device)
    step_on[fused_steps] = True
    ref_masks = masks_a[uniq_refs.to(masks_a.device)] & step_on[None, :, None]
    lat_f, logp_f = run_fusion(
        sampler,
        lat_a[uniq_refs],
        cond[row_prompt[uniq_refs].to(device)],
        ref_of_target,
        cond[pair_prompt.to(device)],
        lat_a[base_rows, s0],
        RowNoise([seeds[j] for j in base_rows.tolist()], T, shape, device),
        ref_masks,
        fused_steps,
        layers,
        cfg,
        progress=progress,
    )

    ids_t = arena.add_trees((pair_prompt + p0).tolist(), T)
    for i in range(s0 + 1):  # identical to the base up to the first fused step
        arena.write_latents(ids_t, i, lat_a[base_rows, i])
    for k, i in enumerate(range(s0, T)):
        arena.write_latents(ids_t, i + 1, lat_f[:, k + 1])
    logp_t = torch.cat([logp_a[base_rows, :s0], logp_f], 1).float().cpu()
    for i in range(T):
        arena.write_logprobs(ids_t, i, logp_t[:, i])
    rewards_t = _score(
        policy, reward_fn, lat_f[:, -1], [prompts[i] for i in pair_prompt.tolist()], decode_batch
    )
    rewards_t = rewards_t.float().cpu()
    arena.set_rewards(ids_t, rewards_t)
    return {
        "sample_ids": ids_a.cpu(),
        "sample_rewards": rewards_a,
        "ref_ids": ids_a[ref_rows].cpu(),
        "base_ids": ids_a[base_rows].cpu(),
        "target_ids": ids_t.cpu(),
        "base_rewards": rewards_a[base_rows],
        "target_rewards": rewards_t,
        "ref_rewards": rewards_a[ref_rows],
        "pair_prompt": pair_prompt + p0,
        "masks": ref_masks[ref_of_target.to(ref_masks.device)].cpu(),
        "final": (lat_a[ref_rows, -1], lat_a[base_rows, -1], lat_f[:, -1]),
    }


@torch.no_grad()
def generate_pairs(
    sampler,
    prompts: Sequence[str],
    cfg: DFusionConfig,
    *,
    reward_fn,
    arena,
    run_seed: int = 0,
    epoch: int = 0,
    first_prompt: int = 0,
    prompts_per_call: int | None = None,
    decode_batch: int = 64,
    save_dir: str | None = None,
    progress: Callable | None = None,
) -> DFusionStage:
    """One D-Fusion stage on ``sampler.policy``: Phase A for ``prompts`` (each ``cfg.samples_per_prompt``
    times), pairing, fusion, scoring, ``prompts_per_call`` prompts per batched UNet call (default: all).
    Every trajectory (Phase A and targets) goes into ``arena`` (branches=1, prompt id = index into ``prompts``;
    a prompt listed twice is two groups), with rewards; target log-probs are the fused sampling log-probs.
    ``save_dir``: write the reference | base | target | mask grid there. ``first_prompt``: the index of
    ``prompts[0]`` in the stage's prompt list, which seeds the noise (a data-parallel rank's share of the prompts
    draws what one process would draw); the metrics cover every rank's samples."""
    cfg.validate()
    policy = sampler.policy
    prompts = list(prompts)
    T = sampler.num_steps
    fused_steps = fused_step_range(cfg, T)
    fusion_block_indices(policy.unet, cfg.fusion_layers)  # fail on a bad layer range before sampling
    cond = policy.encode_prompts(prompts).to(sampler.device, sampler.dtype)
    selection, thresholds = item_selection(policy.tokenizer, prompts, cfg, cond.shape[1], policy.object_words)
    step = prompts_per_call or len(prompts)
    parts = [
        _generate_chunk(
            sampler,
            prompts[a : a + step],
            cond[a : a + step],
            selection[a : a + step],
            thresholds[a : a + step],
            a,
            cfg,
            reward_fn=reward_fn,
            arena=arena,
            run_seed=run_seed,
            epoch=epoch,
            decode_batch=decode_batch,
            progress=progress,
            first_prompt=first_prompt,
        )
        for a in range(0, len(prompts), step)
    ]
    arena.synchronize()
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "final"}
    rb, rt = cat["base_rewards"], cat["target_rewards"]
    preferred, dispreferred, decisive = preference_pairs(cat["target_ids"], cat["base_ids"], rt, rb)
    # the metrics of the whole stage: every process's samples (one process: its own)
    g = {k: distributed.all_gather_cat(cat[k]) for k in ("sample_rewards", "ref_rewards")}
    rb_all, rt_all = distributed.all_gather_cat(rb), distributed.all_gather_cat(rt)
    coverage = distributed.all_gather_cat(cat["masks"][:, fused_steps].float().flatten(1).mean(1))
    # NaN rewards (non-finite at the reward boundary) take part in no mean and no pair
    win, decisive_all = rt_all > rb_all, (rt_all > rb_all) | (rt_all < rb_all)
    metrics = {
        "images": int(g["sample_rewards"].numel() + rt_all.numel()),
        **reward_stats(g["sample_rewards"]),
        "reward_ref_mean": float(g["ref_rewards"].nanmean()),
        "reward_base_mean": float(rb_all.nanmean()),
        "reward_target_mean": float(rt_all.nanmean()),
        "target_minus_base": float((rt_all - rb_all).nanmean()),
        "target_beats_base": float(win.float().mean()),
        "pairs": int(decisive_all.sum()),
        "pairs_tied": int((rt_all == rb_all).sum()),
        "rewards_nonfinite": int(g["sample_rewards"].isnan().sum() + rt_all.isnan().sum()),
        "mask_coverage": float(coverage.mean()),
    }
    ref_f, base_f, tgt_f = parts[0]["final"]
    k = min(8, tgt_f.shape[0])
    images = torch.stack(
        [policy.decode(x[:k]).float().clamp(0, 1).cpu() for x in (ref_f, base_f, tgt_f)], 1
    ).flatten(0, 1)
    stage = DFusionStage(
        prompts=prompts,
        sample_ids=cat["sample_ids"],
        sample_rewards=cat["sample_rewards"],
        ref_ids=cat["ref_ids"],
        base_ids=cat["base_ids"],
        target_ids=cat["target_ids"],
        base_rewards=rb,
        target_rewards=rt,
        pair_prompt=cat["pair_prompt"],
        masks=cat["masks"],
        fused_steps=fused_steps,
        preferred=preferred,
        dispreferred=dispreferred,
        metrics=metrics,
        images=images,
        cond=cond,
    )
    if save_dir:
        path = os.path.join(save_dir, f"pairs-stage{epoch:05d}.png")
        save_pair_grid(
            path,
            policy,
            ref_f,
            base_f,
            tgt_f,
            parts[0]["masks"][:, fused_steps[len(fused_steps) // 2]],
            cfg.mask_grid,
        )
        stage.metrics["pairs_png"] = path
    return stage


def _score(policy, reward_fn, latents, prompts, batch):
    out = []
    for i in range(0, latents.shape[0], batch):
        images = policy.decode(latents[i : i + batch])
        out.append(reward_fn(images, prompts[i : i + batch]).float())
    return torch.cat(out)


def save_pair_grid(
    path: str, policy, ref_lat, base_lat, tgt_lat, masks, grid: int, max_rows: int = 16
) -> str:
    """PNG grid, one row per pair: reference | base | target | mask (nearest-upsampled to the image size)."""
    from b2diffurl.report import save_grid

    k = min(max_rows, ref_lat.shape[0])
    imgs = [policy.decode(x[:k]).float().clamp(0, 1).cpu() for x in (ref_lat, base_lat, tgt_lat)]
    h, w = imgs[0].shape[-2:]
    m = resize_mask(masks[:k].cpu().reshape(k, grid, grid), (h, w))[:, None].expand(k, 3, h, w)
    return str(save_grid(torch.stack(imgs + [m], 1).flatten(0, 1), path, ncol=4))
