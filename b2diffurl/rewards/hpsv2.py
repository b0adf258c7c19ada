"""HPS v2 / v2.1 (Human Preference Score): an open_clip ViT-H-14 fine-tuned on human preferences.

The score is what the HPSv2 package reports: the cosine similarity of the L2-normalised image and
prompt embeddings (no logit scale), typically 0.2-0.35. ``checkpoint`` is the local
``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (a ``{"state_dict": ...}`` file that
open_clip reads); the preprocessing is the model's open_clip eval transform, as in HPSv2's own scorer.
"""

from __future__ import annotations

import torch

from b2diffurl.rewards.clip import OpenClipScorer


class HPSv2Reward(OpenClipScorer):
    """``reward(images [N,3,H,W] in [0,1], prompts) -> HPS [N]``."""

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        model: str = "ViT-H-14",
        device=None,
        dtype=None,
        batch_size: int = 32,
        model_config: dict | None = None,
    ):
        super().__init__(
            model,
            checkpoint,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            model_config=model_config,
            random_init=False,
            what="hpsv2 reward: checkpoint",
            hint="pass checkpoint=PATH, the local HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt)",
        )

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)
