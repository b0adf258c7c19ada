"""Load the toy checkpoint folder's components (diffusers layout) without going through load_policy."""

from __future__ import annotations

from pathlib import Path

import torch


def load_toy_components(path: Path, device="cpu", dtype=torch.float32):
    """-> (unet, text_encoder, tokenizer, ddim scheduler), eval mode, from a toy checkpoint folder."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    path = Path(path)
    unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True, torch_dtype=dtype)
    te = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, torch_dtype=dtype)
    tok = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer", local_files_only=True)
    ddim = DDIMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    return unet.to(device).eval(), te.to(device).eval(), tok, ddim
