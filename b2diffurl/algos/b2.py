"""B²-DiffuRL: backward progressive schedule + branch-based sampling, per-prompt z-scores with history,
best/worst branch selection, PPO-clip over the branched steps (docs/ALGORITHMS.md, "B²-DiffuRL")."""

from __future__ import annotations

import numpy as np
import torch

from b2diffurl.algos.api import RunContext
from b2diffurl.algos.ppo import PromptStatTracker, TreePPOAlgorithm, clamp_advantages


def split_k(stage: int, stages: int, k_left: int, k_right: int) -> int:
    """Branched steps at ``stage``: k_s = floor(k_left + (k_right − k_left + 1)·s/S), at most k_right.

    Integer arithmetic as the official run script (14 → 20 over S = 100: k = 14 + floor(7·s/100))."""
    return min(k_right, k_left + ((k_right - k_left + 1) * stage) // stages)


def select_branches(z: np.ndarray, pos_threshold: float, neg_threshold: float):
    """Per branch group (row of z [P, B]): the best branch if z ≥ pos_threshold (positive), the worst if
    z < neg_threshold (negative); ties → lowest branch index. Returns (flat row indices p·B + b, is_positive),
    positive before negative within a group. A NaN z (a sample without a finite reward) is never selected."""
    z = np.asarray(z, dtype=np.float64)
    P, B = z.shape
    nan = np.isnan(z)  # numpy: first occurrence on ties; NaN rows lose both contests
    best, worst = np.where(nan, -np.inf, z).argmax(axis=1), np.where(nan, np.inf, z).argmin(axis=1)
    rows, positive = [], []
    for p in range(P):
        if z[p, best[p]] >= pos_threshold:
            rows.append(p * B + int(best[p]))
            positive.append(True)
        if z[p, worst[p]] < neg_threshold:
            rows.append(p * B + int(worst[p]))
            positive.append(False)
    return np.asarray(rows, dtype=np.int64), np.asarray(positive, dtype=bool)


class B2Algorithm(TreePPOAlgorithm):
    name = "b2"

    def __init__(self, ctx: RunContext):
        c = ctx.cfg
        super().__init__(
            ctx,
            tracker=PromptStatTracker(c.b2.history, c.b2.min_std),
            max_trees=c.sample.prompts_per_stage,
            branches=c.sample.branches,
        )

    def k_for_stage(self, stage: int) -> int:
        b2 = self.ctx.cfg.b2
        return split_k(stage, self.ctx.cfg.stages, b2.k_left, b2.k_right)

    def layout(self, stage: int):
        prompts = self.ctx.draw_prompts(self.ctx.cfg.sample.prompts_per_stage)
        return prompts, self.T - self.k_for_stage(stage)

    def select(self, z: np.ndarray, stage: int):
        b2, tc = self.ctx.cfg.b2, self.ctx.cfg.train
        z = z.reshape(-1, self.branches)
        if b2.group_centering:  # over the group's finite z-scores (NaN: no reward, stays NaN)
            ok = np.isfinite(z)
            z = z - np.where(ok, z, 0.0).sum(axis=1, keepdims=True) / np.maximum(
                ok.sum(axis=1, keepdims=True), 1
            )
        z = z.reshape(-1)
        rows, positive = select_branches(z.reshape(-1, self.branches), b2.pos_threshold, b2.neg_threshold)
        adv = clamp_advantages(z[rows], tc.adv_clip, b2.beta1, b2.beta2) if len(rows) else np.zeros(0)
        return (
            rows,
            adv,
            {
                "n_pos": int(positive.sum()),
                "n_neg": int((~positive).sum()),
                "n_selected": len(rows),
                "k": self.k_for_stage(stage),
            },
        )

    def trained_steps(self, stage: int, split_step: int) -> torch.Tensor:
        return torch.arange(split_step, self.T, dtype=torch.long)  # only the branched steps
