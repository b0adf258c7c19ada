"""A tiny random-init :class:`b2diffurl.models.Policy` for CPU tests of the sampler and trainers, built with
:func:`b2diffurl.models.random_policy`: UNet2DConditionModel on 4×8×8 latents, a 1-layer CLIPTextModel over the
toy world's word tokenizer, SD's DDIM scheduler config, and a codec whose "image" is the first 3 latent channels."""

from __future__ import annotations

import torch

from b2diffurl.models import Policy, random_policy

# Tiny shapes: one thread is fastest, and with the shared 2-core machine under load, multi-threaded OpenMP
# spin-waits make tiny convolutions ~20× slower.
torch.set_num_threads(1)

LATENT_SHAPE = (4, 8, 8)
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=4,
)


def tiny_policy(seed: int = 0, dtype=torch.float32, device="cpu") -> Policy:
    return random_policy(UNET, device, dtype, text_heads=2, seed=seed, source="tiny")


def brightness_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A dense test reward: mean of the red channel minus the blue one (prompt-independent)."""
    return (images[:, 0] - images[:, 2]).mean(dim=(1, 2)).float()


def one_stage_overrides(out, algo: str = "b2", **over) -> dict:
    """Config overrides for one tiny stage on a tiny policy: 3 prompts × 3 branches, T = 3, no evaluation,
    nothing written but the run directory ``out``."""
    return {
        "algo": algo,
        "stages": 1,
        "sample.num_steps": 3,
        "sample.prompts_per_stage": 3,
        "sample.branches": 3,
        "sample.batch_size": 3,
        "b2.k_left": 2,
        "b2.k_right": 3,
        "eval.prompts": "none",
        "train.micro_batch_size": 4,
        "out": str(out),
        "progress": False,
        "grid_every": 0,
        "checkpoint_every": 0,
        "preset": "toy",
        **over,
    }


def three_stage_overrides(out, num_steps: int, **over) -> dict:
    """Config overrides for a 3-stage B² run on a tiny policy: ``num_steps`` DDIM steps, 3 prompts × 3 branches
    (sampled 2 at a time), k from 2 to 4, 3 accumulated micro-batches of 2 at lr 1e-3, no evaluation, no grids
    or checkpoints; the run directory is ``out``."""
    return {
        "stages": 3,
        "sample.num_steps": num_steps,
        "sample.prompts_per_stage": 3,
        "sample.branches": 3,
        "sample.batch_size": 2,
        "b2.k_left": 2,
        "b2.k_right": 4,
        "eval.prompts": "none",
        "train.micro_batch_size": 2,
        "train.grad_accum_steps": 3,
        "train.lr": 1e-3,
        "out": str(out),
        "progress": False,
        "grid_every": 0,
        "checkpoint_every": 0,
        "preset": "toy",
        **over,
    }
