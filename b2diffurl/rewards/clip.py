"""open_clip image–text cosine similarity (the reward of B²-DiffuRL), batched, weights from a local file.

Images are resized on the device (bicubic, antialiased) to the model's input size and normalised with the
model's mean/std; text features are cached per prompt. fp16 on CUDA, fp32 on CPU. Never downloads: the
architecture is built with ``pretrained=None`` and the weights come from ``checkpoint`` (a local
``open_clip_pytorch_model.bin``/``.safetensors``); ``random_init=True`` (tests only) skips the weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F


class ClipReward:
    """``reward(images [N,3,H,W] in [0,1], prompts) -> cosine similarity [N]`` (float32, images.device)."""

    def __init__(
        self,
        model: str = "ViT-H-14",
        checkpoint: str | None = None,
        *,
        device=None,
        dtype=None,
        batch_size: int = 32,
        model_config: dict | None = None,
        random_init: bool = False,
    ):
        import open_clip

        if model_config is not None:  # register a custom architecture (e.g. a tiny one for tests)
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / f"{model}.json").write_text(json.dumps(model_config))
                open_clip.add_model_config(Path(d) / f"{model}.json")
        if open_clip.get_model_config(model) is None:
            raise ValueError(
                f"unknown open_clip architecture {model!r}; expected e.g. 'ViT-H-14' "
                f"(available: {len(open_clip.list_models())} in open_clip.list_models())"
            )
        if not random_init:
            if checkpoint is None:
                raise ValueError(
                    f"the clip reward needs checkpoint=PATH: a local open_clip weights file for {model} "
                    "(e.g. laion2b_s32b_b79k's open_clip_pytorch_model.bin); downloads are disabled"
                )
            if not Path(checkpoint).is_file():
                raise FileNotFoundError(
                    f"open_clip checkpoint {checkpoint!r} not found; expected a local weights "
                    f"file for {model} (nothing is downloaded)"
                )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        net = open_clip.create_model(model, pretrained=None, device="cpu")
        if not random_init:
            open_clip.load_checkpoint(net, str(checkpoint))
        self.model = net.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        size = self.model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        pre = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        mean = pre.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = pre.get("std", open_clip.OPENAI_DATASET_STD)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.batch_size = batch_size
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            feats = self.model.encode_text(self.tokenizer(new).to(self.device)).float()
            for p, f in zip(new, F.normalize(feats, dim=-1)):
                self._text_cache[p] = f
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            x = images[i : i + self.batch_size].to(self.device, torch.float32)
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True, align_corners=False)
            x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.dtype)
            img = F.normalize(self.model.encode_image(x).float(), dim=-1)
            out.append((img * self._text_features(prompts[i : i + self.batch_size])).sum(-1))
        return torch.cat(out).to(images.device)
