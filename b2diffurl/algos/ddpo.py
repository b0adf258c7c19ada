"""DDPO baseline on the B² machinery: no branching, no backward schedule, every step trained.

Equal sample budget with B²: each stage draws ``sample.prompts_per_stage`` prompts and samples
``sample.branches`` *independent* trajectories per prompt (trees with B = 1 and split step T). Per-prompt
z-scores come from ddpo-pytorch's tracker (the last ``ddpo.buffer_size`` rewards of each prompt, the stage's
statistics until a prompt has ``ddpo.min_count``); every trajectory is trained with advantage
clamp(z, ±adv_clip) over all T steps with PPO-clip. The ``official`` preset for this algorithm takes
ddpo-pytorch's training values (clip 1e-4, lr 3e-4, one inner epoch, LoRA; docs/ALGORITHMS.md, "DDPO").
"""

from __future__ import annotations

import numpy as np
import torch

from b2diffurl.algos.api import RunContext
from b2diffurl.algos.ppo import BufferStatTracker, TreePPOAlgorithm, clamp_advantages


class DDPOAlgorithm(TreePPOAlgorithm):
    name = "ddpo"

    def __init__(self, ctx: RunContext):
        c = ctx.cfg
        self.per_prompt = c.sample.branches
        super().__init__(
            ctx,
            tracker=BufferStatTracker(c.ddpo.buffer_size, c.ddpo.min_count),
            max_trees=c.sample.prompts_per_stage * self.per_prompt,
            branches=1,
        )

    def layout(self, stage: int):
        prompts = self.ctx.draw_prompts(self.ctx.cfg.sample.prompts_per_stage)
        return [p for p in prompts for _ in range(self.per_prompt)], self.T

    def select(self, z: np.ndarray, stage: int):
        rows = np.flatnonzero(np.isfinite(z))  # a sample without a finite reward is not trained on
        adv = clamp_advantages(z[rows], self.ctx.cfg.train.adv_clip)
        return rows, adv, {"n_selected": len(rows)}

    def trained_steps(self, stage: int, split_step: int) -> torch.Tensor:
        return torch.arange(self.T, dtype=torch.long)
