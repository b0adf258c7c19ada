"""DDPO baseline on the B² machinery: no branching, no backward schedule, every step trained.

Equal sample budget with B²: each stage draws ``sample.prompts_per_stage`` prompts and samples
``sample.branches`` *independent* trajectories per prompt (trees with B = 1 and split step T). Per-prompt
z-scores use the same tracker (pooled by prompt text with ``ddpo.history`` earlier stages); every trajectory
is trained with advantage clamp(z, ±adv_clip) over all T steps with PPO-clip.
"""

from __future__ import annotations

import numpy as np
import torch

from b2diffurl.algos.api import RunContext
from b2diffurl.algos.ppo import TreePPOAlgorithm, clamp_advantages


class DDPOAlgorithm(TreePPOAlgorithm):
    name = "ddpo"

    def __init__(self, ctx: RunContext):
        c = ctx.cfg
        self.per_prompt = c.sample.branches
        super().__init__(
            ctx, history=c.ddpo.history, max_trees=c.sample.prompts_per_stage * self.per_prompt, branches=1
        )

    def layout(self, stage: int):
        prompts = self.ctx.draw_prompts(self.ctx.cfg.sample.prompts_per_stage)
        return [p for p in prompts for _ in range(self.per_prompt)], self.T

    def select(self, z: np.ndarray, stage: int):
        adv = clamp_advantages(z, self.ctx.cfg.train.adv_clip)
        return np.arange(len(z)), adv, {"n_selected": len(z)}

    def trained_steps(self, stage: int, split_step: int) -> torch.Tensor:
        return torch.arange(self.T, dtype=torch.long)
