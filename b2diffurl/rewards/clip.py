"""open_clip image-text cosine similarity (the reward of B²-DiffuRL), and the open_clip loading that the
``aesthetic`` and ``hpsv2`` rewards share.

Never downloads: the architecture is built with ``pretrained=None`` and the weights come from
``checkpoint`` (a local ``open_clip_pytorch_model.bin`` / ``.safetensors`` / ``.pt`` state dict);
``model_config`` registers a custom architecture and ``random_init=True`` skips the weights (both for tests).
Images are preprocessed on the device exactly as the model's open_clip transform does
(:func:`~b2diffurl.rewards.scorer.scorer_preprocess`); text features are cached per prompt.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from b2diffurl.rewards import RewardError, require_file
from b2diffurl.rewards.scorer import DeviceFollowingScorer, scorer_preprocess


def load_open_clip(
    model: str,
    checkpoint,
    *,
    model_config: dict | None = None,
    random_init: bool = False,
    what: str = "open_clip checkpoint",
    hint: str = "",
):
    """open_clip ``model`` (architecture name) with weights from the local file ``checkpoint``, fp32 on CPU.
    Returns ``(net, tokenizer, preprocess)`` where ``preprocess`` holds size/mean/std/interpolation/
    resize_mode of the model's eval transform."""
    import open_clip

    if model_config is not None:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / f"{model}.json").write_text(json.dumps(model_config))
            open_clip.add_model_config(Path(d) / f"{model}.json")
    arch = open_clip.get_model_config(model) if not model.startswith(("hf-hub:", "local-dir:")) else None
    if arch is None:
        raise RewardError(
            f"unknown open_clip architecture {model!r}; expected a built-in name such as 'ViT-H-14' or "
            "'ViT-L-14-quickgelu' (see open_clip.list_models(); hub names are not fetched)"
        )
    text_cfg = arch.get("text_cfg", {})
    hub_parts = [k for k in ("hf_model_name", "hf_tokenizer_name") if text_cfg.get(k)]
    if hub_parts:  # open_clip would fetch these from the Hugging Face hub
        raise RewardError(
            f"open_clip architecture {model!r} needs a Hugging Face text tower/tokenizer ({', '.join(hub_parts)}), "
            "which would be downloaded; use an architecture with CLIP's own text tower, e.g. ViT-H-14"
        )
    path = None
    if not random_init:
        path = require_file(checkpoint, what, hint or f"expected a local open_clip weights file for {model}")
    net = open_clip.create_model(model, pretrained=None, device="cpu")
    if path is not None:
        try:
            open_clip.load_checkpoint(net, str(path))
        except RuntimeError as e:  # wrong architecture for these weights: say which, in one line
            first = str(e).strip().splitlines()
            raise RewardError(
                f"{what} {str(path)!r} does not fit open_clip {model}: {first[1].strip() if len(first) > 1 else e}"
            ) from None
        except Exception as e:  # noqa: BLE001 - unreadable file: report it as the user's input error
            raise RewardError(f"{what} {str(path)!r} could not be read as a weights file: {e}") from None
    net.eval().requires_grad_(False)
    size = net.visual.image_size
    pre = getattr(net.visual, "preprocess_cfg", {}) or {}
    preprocess = {
        "size": tuple(size) if isinstance(size, (tuple, list)) else (size, size),
        "mean": tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": tuple(pre.get("std", open_clip.OPENAI_DATASET_STD)),
        "interpolation": pre.get("interpolation", "bicubic"),
        "resize_mode": pre.get("resize_mode", "shortest"),
    }
    return net, open_clip.get_tokenizer(model), preprocess


class OpenClipScorer(DeviceFollowingScorer):
    """An open_clip model plus its preprocessing; ``image_features`` / ``text_features`` are L2-normalised
    fp32 (text cached per prompt)."""

    def __init__(
        self, model, checkpoint, *, device, dtype, batch_size, model_config, random_init, what, hint
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        net, self.tokenizer, self.preprocess = load_open_clip(
            model, checkpoint, model_config=model_config, random_init=random_init, what=what, hint=hint
        )
        self.modules["clip"] = net
        self.model = net
        self.image_size = self.preprocess["size"]
        self._text_cache: dict[str, torch.Tensor] = {}

    def _on_moved(self) -> None:
        self._text_cache.clear()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        p = self.preprocess
        x = scorer_preprocess(
            images,
            p["size"],
            p["mean"],
            p["std"],
            interpolation=p["interpolation"],
            resize_mode=p["resize_mode"],
            dtype=self.dtype,
        )
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            feats = self.model.encode_text(self.tokenizer(new).to(self.device)).float()
            for p, f in zip(new, F.normalize(feats, dim=-1)):
                self._text_cache[p] = f
        return torch.stack([self._text_cache[p] for p in prompts])


class ClipReward(OpenClipScorer):
    """``reward(images [N,3,H,W] in [0,1], prompts) -> cosine similarity [N]``."""

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
        super().__init__(
            model,
            checkpoint,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            model_config=model_config,
            random_init=random_init,
            what="clip reward: open_clip checkpoint",
            hint=(
                f"pass checkpoint=PATH, a local open_clip weights file for {model} "
                "(e.g. laion2b_s32b_b79k's open_clip_pytorch_model.bin)"
            ),
        )

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)
