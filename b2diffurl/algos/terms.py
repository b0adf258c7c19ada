"""Per-prompt normalisation of a stage's rewards for tree-PPO, under either multi-reward aggregation.

``reward_aggregate=reward`` (and every single reward): the total is z-scored by the algorithm's stat tracker.
``reward_aggregate=advantage`` with two or more terms: each term gets its own copy of that tracker (its own
baseline and history) and the z-scores are summed with the weights (MixGRPO's ``advantage_aggr``,
:func:`b2diffurl.rewards.multi.aggregate_advantages`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from b2diffurl import distributed


class RewardNormaliser:
    """``start()`` per stage, ``add(result)`` per scored batch, ``zscores(prompts, totals)`` once all
    batches are scored (collective under data parallelism, like the totals' gather). The term trackers are
    run state: ``state_dict`` / ``load_state_dict``."""

    def __init__(self, tracker, reward):
        self.tracker, self.weights = tracker, dict(reward.weights)
        per_term = reward.aggregate == "advantage" and len(self.weights) > 1
        # copies of the fresh tracker: same rule and history length, each with its own history
        self.term_trackers = {n: copy.deepcopy(tracker) for n in self.weights} if per_term else {}
        self.parts: dict[str, list[torch.Tensor]] = {}

    def start(self) -> None:
        self.parts = {n: [] for n in self.term_trackers}

    def add(self, result) -> None:
        for name, parts in self.parts.items():
            parts.append(result.components[name].detach().float().reshape(-1))

    def zscores(self, prompts: list[str], totals: torch.Tensor) -> np.ndarray:
        """z [N] over all processes' rows (``totals`` and the added terms are already in global order)."""
        if not self.term_trackers:
            return self.tracker.update(prompts, totals.numpy())
        from b2diffurl.rewards.multi import aggregate_advantages

        comps = {
            n: distributed.all_gather_cat(torch.cat(v) if v else torch.zeros(0)).cpu()
            for n, v in self.parts.items()
        }
        return aggregate_advantages(
            comps, self.weights, zscore=lambda n, v: self.term_trackers[n].update(prompts, v.numpy())
        )

    def state_dict(self) -> dict:
        return {"term_trackers": {n: t.state_dict() for n, t in self.term_trackers.items()}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("term_trackers", {})
        for n, t in self.term_trackers.items():
            t.load_state_dict(saved[n])
