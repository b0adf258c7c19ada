"""A tiny random-init :class:`b2diffurl.models.Policy` for CPU tests of the sampler and trainers, built with
``Policy.from_components``: UNet2DConditionModel on 4×8×8 latents, a 1-layer CLIPTextModel over the toy world's
word tokenizer, SD's DDIM scheduler config, and a codec whose "image" is the first 3 latent channels."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from b2diffurl.models import Policy

# Tiny shapes: one thread is fastest, and with the shared 2-core machine under load, multi-threaded OpenMP
# spin-waits make tiny convolutions ~20× slower.
torch.set_num_threads(1)

LATENT_SHAPE = (4, 8, 8)


class FirstChannelsCodec:
    """Latents [N, 4, h, w] <-> "images" [N, 3, h, w]: the first 3 channels mapped from [-1, 1] to [0, 1]."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents[:, :3].float() * 0.5 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)


def tiny_policy(seed: int = 0, dtype=torch.float32, device="cpu") -> Policy:
    from b2diffurl.toy.model import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
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
    ).to(device, dtype)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).to(device, dtype)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return Policy.from_components(
        unet, text_encoder, tokenizer, scheduler, FirstChannelsCodec(), source="tiny"
    )


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
