"""A tiny random-init policy with the ``b2diffurl.models`` policy interface (docs/CONTRACTS.md), for CPU tests
of the sampler and trainers: UNet2DConditionModel on 4×8×8 latents, a 1-layer CLIPTextModel, a hashing word
tokenizer, SD's DDIM scheduler config, and an "image" = first 3 latent channels mapped to [0, 1]."""

from __future__ import annotations

import contextlib
import zlib

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

# Tiny shapes: one thread is fastest, and with the shared 2-core machine under load, multi-threaded OpenMP
# spin-waits make tiny convolutions ~20× slower.
torch.set_num_threads(1)

LATENT_SHAPE = (4, 8, 8)
MAX_LEN = 6


class TinyPolicy:
    def __init__(self, seed: int = 0, dtype=torch.float32, device="cpu"):
        torch.manual_seed(seed)
        self.unet = UNet2DConditionModel(
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
        self.text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=MAX_LEN,
                projection_dim=16,
            )
        ).to(device, dtype)
        self.tokenizer = None
        self.scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        self.vae = None
        self.latent_shape = LATENT_SHAPE
        self.device = torch.device(device)
        self._lora = False

    def _tokens(self, prompts):
        ids = torch.zeros(len(prompts), MAX_LEN, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = p.split()[: MAX_LEN - 1]
            ids[i, 0] = 1
            for j, w in enumerate(words):
                ids[i, j + 1] = 2 + zlib.crc32(w.encode()) % 62
        return ids.to(self.device)

    def encode_prompts(self, prompts):
        return self.text_encoder(self._tokens(prompts)).last_hidden_state

    def decode(self, latents):
        return (latents[:, :3].float() * 0.5 + 0.5).clamp(0, 1)

    def add_lora(self, rank=4, alpha=4, targets=("to_q", "to_k", "to_v", "to_out.0")):
        from peft import LoraConfig

        self.unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian")
        )
        self._lora = True

    @contextlib.contextmanager
    def lora_disabled(self):
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()


def brightness_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A dense test reward: mean of the red channel minus the blue one (prompt-independent)."""
    return (images[:, 0] - images[:, 2]).mean(dim=(1, 2)).float()
