"""Policy-gradient machinery shared by B² and DDPO: per-prompt stat tracker, advantages, PPO-clip loss and
update, and the tree-PPO algorithm base (sample trees → reward → z-scores → select → PPO)."""

from __future__ import annotations

import logging
import math
import time
from typing import NamedTuple

import numpy as np
import torch

from b2diffurl import distributed
from b2diffurl.algos.api import RunContext, StageData
from b2diffurl.algos.kl import batch_logprob_and_kl, kl_to_start
from b2diffurl.algos.terms import RewardNormaliser
from b2diffurl.config import switch
from b2diffurl.rewards import as_reward
from b2diffurl.rewards.background import StageScorer

log = logging.getLogger(__name__)


class PPOPayload(NamedTuple):
    """What a tree-PPO stage hands from sampling to training."""

    ids: torch.Tensor  # [M] selected trajectory ids in the arena
    steps: torch.Tensor  # [K] trained step indices
    cond_table: torch.Tensor  # [P, L, D] prompt embeddings indexed by the arena's prompt ids


class PromptStatTracker:
    """Per-prompt z-scores pooled by prompt *text* over the current stage plus the raw scores of the last
    ``history`` stages (official B²-DiffuRL). Unbiased (N−1) std, z = (r − mean) / (std + 1e-8).

    ``min_std`` > 0 (a deviation, ``b2.min_std``; official 0) divides by max(std, min_std) instead: a prompt
    whose pooled scores differ only by noise (a dense reward near its ceiling) then gets small z-scores, not
    full-sized advantages of either sign.

    A prompt with a single pooled score has no std: its z-score is 0 (the official code would give NaN).
    A non-finite score (the reward boundary made it NaN) is never pooled or stored; its z-score is NaN, which
    selection reads as "no score". The history (raw scores, not z-scores) is run state:
    ``state_dict``/``load_state_dict``.
    """

    def __init__(self, history: int, min_std: float = 0.0):
        self.history = int(history)
        self.min_std = float(min_std)
        self.past: list[dict[str, np.ndarray]] = []

    def update(self, prompts: list[str], scores) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(prompts) != scores.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {scores.shape[0]} scores")
        finite = np.isfinite(scores)
        current: dict[str, list[float]] = {}
        for p, s, ok in zip(prompts, scores, finite):
            if ok:
                current.setdefault(p, []).append(s)
        cur = {p: np.asarray(v) for p, v in current.items()}
        past = self.past[-self.history :] if self.history > 0 else []
        z = np.full(scores.shape, math.nan)
        for p, v in cur.items():
            pool = np.concatenate([d[p] for d in past if p in d] + [v])
            rows = finite & (np.asarray(prompts, dtype=object) == p)
            if pool.size > 1:
                z[rows] = (scores[rows] - pool.mean()) / (max(pool.std(ddof=1), self.min_std) + 1e-8)
            else:
                z[rows] = 0.0
        self.past.append(cur)
        self.past = self.past[-self.history :] if self.history > 0 else []
        return z

    def state_dict(self) -> dict:
        return {"history": self.history, "past": [{p: v.tolist() for p, v in d.items()} for d in self.past]}

    def load_state_dict(self, state: dict) -> None:
        self.history = int(state["history"])
        self.past = [{p: np.asarray(v, dtype=np.float64) for p, v in d.items()} for d in state["past"]]


class BufferStatTracker:
    """ddpo-pytorch's per-prompt statistics: each prompt keeps its last ``buffer_size`` raw rewards (the
    current stage's included); z = (r − mean) / (std + 1e-6) with the biased (N) std of that buffer. Until a
    prompt's buffer holds ``min_count`` rewards, the whole stage's mean/std stand in. ``buffer_size`` 0 keeps no
    memory: the current stage's rewards of that prompt only. Non-finite rewards are never buffered or pooled;
    their z-score is NaN ("no score")."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size = int(buffer_size)
        self.min_count = int(min_count)
        self.buffers: dict[str, list[float]] = {}

    def update(self, prompts: list[str], scores) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(prompts) != scores.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {scores.shape[0]} scores")
        prompts_arr = np.asarray(prompts, dtype=object)
        finite = np.isfinite(scores)
        z = np.full_like(scores, math.nan)
        for p in dict.fromkeys(prompts_arr[finite].tolist()):
            mask = (prompts_arr == p) & finite
            mine = scores[mask]
            if self.buffer_size > 0:
                buf = (self.buffers.get(p, []) + mine.tolist())[-self.buffer_size :]
                self.buffers[p] = buf
            else:
                buf = mine.tolist()
            pool = np.asarray(buf) if len(buf) >= self.min_count else scores[finite]
            z[mask] = (mine - pool.mean()) / (pool.std() + 1e-6)
        return z

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = int(state["buffer_size"]), int(state["min_count"])
        self.buffers = {p: [float(x) for x in v] for p, v in state["buffers"].items()}


def reward_stats(rewards: torch.Tensor) -> dict:
    """Mean, std, max and min of a stage's finite rewards, and ``rewards_nonfinite``: how many were NaN (the
    reward boundary, :meth:`b2diffurl.rewards.Reward.score`, turns every non-finite score into NaN)."""
    r = rewards.detach().float().cpu().reshape(-1)
    ok = r[torch.isfinite(r)]
    if not ok.numel():
        ok = torch.full((1,), math.nan)
    return {
        "reward_mean": float(ok.mean()),
        "reward_std": float(ok.std()) if ok.numel() > 1 else 0.0,
        "reward_max": float(ok.max()),
        "reward_min": float(ok.min()),
        "rewards_nonfinite": int(r.numel() - int(torch.isfinite(r).sum())),
    }


def lopsided_warning(adv: np.ndarray, stage: int, fraction: float = 0.9, minimum: int = 8) -> str | None:
    """A message when at least ``fraction`` of a stage's (≥ ``minimum``) advantages share one sign: the
    baseline has drifted away from what the policy does (a stale history mean, or a reward shift), and the
    update pushes the policy away from (or towards) everything it does."""
    adv = np.asarray(adv)
    if adv.size < minimum:
        return None
    for name, frac in (("negative", float((adv < 0).mean())), ("positive", float((adv > 0).mean()))):
        if frac >= fraction:
            return (
                f"stage {stage}: {frac:.0%} of {adv.size} advantages are {name}: the per-prompt baseline "
                "lags the policy; consider per-stage statistics (b2.history=0 / ddpo.buffer_size=0)"
            )
    return None


def ppo_clip_loss(advantage: torch.Tensor, ratio: torch.Tensor, clip_range: float) -> torch.Tensor:
    """mean( max( −A·r, −A·clamp(r, 1−ε, 1+ε) ) )."""
    unclipped = -advantage * ratio
    clipped = -advantage * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def clamp_advantages(z, clip: float, beta_pos: float = 1.0, beta_neg: float = 1.0) -> np.ndarray:
    """clamp(z, −clip, clip) × (β₁ where z > 0 else β₂)."""
    z = np.asarray(z, dtype=np.float64)
    return np.clip(z, -clip, clip) * np.where(z > 0, beta_pos, beta_neg)


def ppo_update(
    ctx: RunContext, arena, ids: torch.Tensor, steps: torch.Tensor, cond_table: torch.Tensor
) -> dict:
    """PPO-clip epochs over trajectories ``ids`` [M] at trained step indices ``steps`` [K].

    Per inner epoch: shuffle samples, draw a random permutation of the K trained steps per sample, then for each
    micro-batch and each column j of the permutation gather (id, step) rows from the arena, forward, backward.

    Accumulation in the official unit (B²-DiffuRL's and ddpo-pytorch's accelerate setting): one optimizer step
    per ``grad_accum_steps`` micro-batches × all K trained steps, the loss being the mean over those micro-steps.
    The count runs on across inner epochs; a partial group left at the end of the stage is dropped, as there
    (``train.flush_partial_accum`` applies it instead). Optimizer steps per stage:
    floor(E·ceil(M/mb)/A), or ceil(...) when flushing. All statistics stay on the device until the end.
    """
    tc = ctx.cfg.train
    M, K = int(ids.numel()), int(steps.numel())
    dev = ctx.device
    zero = torch.zeros((), device=dev)
    stats = {
        "loss": zero.clone(),
        "approx_kl": zero.clone(),
        "clipfrac": zero.clone(),
        "grad_norm": zero.clone(),
        **({"kl_penalty": zero.clone()} if tc.kl_coef > 0 else {}),
    }
    ratio_dev, n_micro, n_opt = zero.clone(), 0, 0
    if M == 0 or K == 0:
        return {"train_samples": M, "optimizer_steps": 0, "ratio_dev_max": 0.0, "train_time_s": 0.0}
    t0 = time.perf_counter()
    pre_update = True
    mb = tc.micro_batch_size
    n_mb = math.ceil(M / mb)
    full_group = tc.grad_accum_steps * K  # micro-steps per optimizer step
    total = tc.inner_epochs * n_mb * K
    done = 0  # micro-steps done in this stage
    group = 0
    for _epoch in range(tc.inner_epochs):
        perm = torch.randperm(M, generator=ctx.cpu_gen)
        col = torch.stack([torch.randperm(K, generator=ctx.cpu_gen) for _ in range(M)])  # [M, K]
        ids_e, steps_e = ids[perm], steps[col]
        for b in range(n_mb):
            mb_ids, mb_steps = ids_e[b * mb : (b + 1) * mb], steps_e[b * mb : (b + 1) * mb]
            for j in range(K):
                if group == 0:
                    left = total - done
                    # the last, partial group: its mean when it will be applied, else the official scale
                    group_size = min(full_group, left) if tc.flush_partial_accum else full_group
                # the rows of this micro-batch this process holds (all of them in one process): its loss is
                # their share of the micro-batch mean; optimizer_step sums the shares over processes
                here = distributed.held(mb_ids)
                share = int(here.sum()) / len(mb_ids)
                if share > 0:
                    batch = arena.gather(mb_ids[here], mb_steps[here, j], device=dev)
                    if tc.kl_coef > 0:  # one policy forward scores the transitions and the KL term
                        logp, kl = batch_logprob_and_kl(ctx, batch, cond_table)
                    else:  # 0: no reference forward at all
                        logp = ctx.sampler.batch_logprob(batch, cond_table)
                    old = batch.logprob.to(dev)
                    ratio = torch.exp(logp - old)
                    adv = batch.advantage.to(dev)
                    loss = ppo_clip_loss(adv, ratio, tc.clip_range) * share
                    if tc.kl_coef > 0:
                        kl = kl * share
                        stats["kl_penalty"] += kl.detach()
                        loss = loss + tc.kl_coef * kl
                    ctx.backward(loss / group_size)
                    with torch.no_grad():
                        if pre_update:
                            ratio_dev = torch.maximum(ratio_dev, (ratio - 1).abs().max())
                        stats["loss"] += loss.detach()
                        stats["approx_kl"] += 0.5 * ((logp - old) ** 2).mean() * share
                        stats["clipfrac"] += ((ratio - 1).abs() > tc.clip_range).float().mean() * share
                n_micro += 1
                done += 1
                group += 1
                if group == group_size or (tc.flush_partial_accum and done == total):
                    stats["grad_norm"] += ctx.optimizer_step()
                    n_opt += 1
                    group = 0
                    pre_update = False
    dropped = group  # micro-steps of a partial group whose gradient is never applied
    if dropped:
        ctx.optimizer.zero_grad(set_to_none=True)
    # each process summed its shares of the micro-batch means: add them up (grad_norm is global already)
    for k in stats:
        if k != "grad_norm":
            distributed.all_reduce(stats[k])
    distributed.all_reduce(ratio_dev, "max")
    out = {k: (v / max(n_opt if k == "grad_norm" else n_micro, 1)).item() for k, v in stats.items()}
    out.update(
        train_samples=M,
        trained_steps=K,
        optimizer_steps=n_opt,
        micro_steps=n_micro,
        dropped_micro_steps=dropped,
        ratio_dev_max=ratio_dev.item(),
        train_time_s=time.perf_counter() - t0,
        lr=ctx.optimizer.param_groups[0]["lr"],
    )
    out["train_rows_per_s"] = n_micro * mb / max(out["train_time_s"], 1e-9)
    warning = ctx.sampler.forward_disagreement(out["ratio_dev_max"])
    if warning:
        log.warning(warning)
    return out


class TreePPOAlgorithm:
    """Sample trees → reward → per-prompt z-scores → select → PPO. B² and DDPO differ only in the tree layout
    (split step, branches), the selection rule and the trained steps (subclass hooks)."""

    name = "tree-ppo"
    needs_reference_policy = False
    data_parallel = True  # trees sharded, rewards gathered, gradient shares summed (b2diffurl.distributed)

    def __init__(self, ctx: RunContext, *, tracker, max_trees: int, branches: int):
        from b2kernels.buffer import TrajectoryArena

        self.ctx = ctx
        self.T = ctx.cfg.sample.num_steps
        self.branches = branches
        self.tracker = tracker  # PromptStatTracker (B²) or BufferStatTracker (DDPO)
        # z-scores of the total, or per term under reward_aggregate=advantage
        self.normaliser = RewardNormaliser(tracker, as_reward(ctx.reward_fn))
        self.overlap_reward = switch(
            ctx.cfg.sample.overlap_reward, auto=torch.device(ctx.device).type == "cuda"
        )
        self.arena = TrajectoryArena(
            tuple(ctx.policy.latent_shape),
            num_steps=self.T,
            max_trees=max_trees,
            branches=branches,
            dtype=ctx.sampler.dtype,
        )

    # hooks ------------------------------------------------------------------------------------------------
    def layout(self, stage: int) -> tuple[list[str], int]:
        """(prompt of each tree, split step) for this stage."""
        raise NotImplementedError

    def select(self, z: np.ndarray, stage: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """(selected row indices, their advantages, metrics) from the z-scores of all P·B rows."""
        raise NotImplementedError

    def trained_steps(self, stage: int, split_step: int) -> torch.Tensor:
        raise NotImplementedError

    # the stage ------------------------------------------------------------------------------------------
    def sample_stage(self, stage: int) -> StageData[PPOPayload]:
        ctx, B = self.ctx, self.branches
        t0 = time.perf_counter()
        tree_prompts, split = self.layout(stage)
        uniq = list(dict.fromkeys(tree_prompts))
        pid = {p: i for i, p in enumerate(uniq)}
        cond_table = ctx.encode(uniq)
        self.arena.reset()
        rows_prompts = [p for p in tree_prompts for _ in range(B)]
        # equal UNet rows per call for every layout: batch_size prompts × the config's branches
        bs = max(1, ctx.cfg.sample.batch_size * ctx.cfg.sample.branches // B)
        # this process samples the trees `mine` (all of them in one process), in the batches one process would
        # use; each tree has its own noise stream
        mine = distributed.shard(len(tree_prompts), block=bs)
        ids = self.arena.add_trees(
            torch.tensor([pid[tree_prompts[t]] for t in mine], dtype=torch.long), split
        )
        rewards, grid = [torch.zeros(0, device=ctx.device)], None
        self.normaliser.start()
        scorer = StageScorer(as_reward(ctx.reward_fn), overlap=self.overlap_reward)
        for a in range(0, len(mine), bs):
            trees = mine[a : a + bs]
            cond = cond_table[torch.tensor([pid[tree_prompts[t]] for t in trees], device=cond_table.device)]
            out = ctx.sampler.sample_trees(
                cond,
                split_step=split,
                branches=B,
                generator=distributed.tree_generators(ctx.cfg.seed, stage, trees, ctx.device),
                arena=self.arena,
                ids=ids[a * B : (a + len(trees)) * B],
            )
            with torch.no_grad():
                images = ctx.policy.decode(out.latents).float().clamp(0, 1)
                # scored while the next batch samples (sample.overlap_reward), else at once
                scorer.submit(images, rows_prompts[trees.start * B : trees.stop * B])
            if grid is None:
                grid = images[:16].cpu()
        for res in scorer.results():  # in batch order
            rewards.append(res.total.float().reshape(-1))
            self.normaliser.add(res)
        # every process gets every reward: statistics and selection see all samples, as one process would;
        # the stage's one host sync for scores
        rewards_t = distributed.all_gather_cat(torch.cat(rewards)).cpu()
        sample_time = time.perf_counter() - t0
        z = self.normaliser.zscores(rows_prompts, rewards_t)
        sel, adv, sel_metrics = self.select(z, stage)
        rows_here = range(mine.start * B, mine.stop * B)
        self.arena.set_rewards(ids, rewards_t[rows_here.start : rows_here.stop])
        # the selected rows in global order; rows another process sampled get id -1 (distributed.localize)
        sel_ids = distributed.localize(torch.as_tensor(sel, dtype=torch.long), rows_here, ids)
        here = distributed.held(sel_ids)
        if bool(here.any()):
            self.arena.set_advantages(sel_ids[here], torch.as_tensor(adv, dtype=torch.float32)[here])
        steps = self.trained_steps(stage, split)
        if ctx.cfg.train.min_step_sigma > 0:
            sigma = ctx.sampler.table.sigmas(ctx.sampler.eta).to(steps.device)
            steps = steps[sigma[steps] >= ctx.cfg.train.min_step_sigma]
        warning = lopsided_warning(adv, stage)
        if warning:
            log.warning(warning)
        metrics = {
            "split_step": split,
            "trained_steps": int(steps.numel()),
            "images": len(rows_prompts),
            **reward_stats(rewards_t),
            "sample_time_s": sample_time,
            "sample_images_per_s": len(rows_prompts) / max(sample_time, 1e-9),
            **scorer.metrics(),
            "arena_mb": self.arena.bytes_used / 2**20,
            "adv_neg_frac": float((np.asarray(adv) < 0).mean()) if len(adv) else 0.0,
            "lopsided": warning is not None,
            **sel_metrics,
        }
        return StageData(
            metrics=metrics,
            images=grid,
            captions=rows_prompts[:16],
            payload=PPOPayload(sel_ids, steps, cond_table),
        )

    def train_stage(self, stage: int, data: StageData[PPOPayload]) -> dict:
        sel_ids, steps, cond_table = data.payload
        out = ppo_update(self.ctx, self.arena, sel_ids, steps, cond_table)
        return {**out, **kl_to_start(self.ctx, self.arena, sel_ids, steps, cond_table, stage)}

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), **self.normaliser.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.normaliser.load_state_dict(state)
