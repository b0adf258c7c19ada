"""LAION aesthetic predictor v2 ("improved aesthetic predictor"): an MLP on CLIP ViT-L/14 image embeddings.

Score = head(normalise(clip_image_embedding)), about 1-10 (DDPO's ``aesthetic`` reward). Two local files:

* ``checkpoint`` - the open_clip weights of the image encoder the head was trained on: OpenAI CLIP ViT-L/14
  (architecture ``ViT-L-14-quickgelu``; e.g. ``open_clip_pytorch_model.bin`` of
  ``timm/vit_large_patch14_clip_224.openai``);
* ``head`` - the MLP state dict (e.g. ``sac+logos+ava1-l14-linearMSE.pth``: ``layers.{0,2,4,6,7}``
  Linear 768-1024-128-64-16-1, dropouts between, which are identities at inference).

The head's layer sizes are read from the file, so any ``layers.<i>`` stack of Linear layers ending in one
output loads.
"""

from __future__ import annotations

import re

import torch

from b2diffurl.rewards import RewardError, require_file
from b2diffurl.rewards.clip import OpenClipScorer


def load_mlp_head(path, embed_dim: int) -> torch.nn.Sequential:
    """``layers.<i>.weight/bias`` Linear stack -> ``nn.Sequential`` with the same indices (Identity where the
    original had Dropout), checked to map ``embed_dim`` to one output."""
    p = require_file(
        path, "aesthetic reward: MLP head", "pass head=PATH, e.g. sac+logos+ava1-l14-linearMSE.pth"
    )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable file is the user's input error
        raise RewardError(f"aesthetic reward: cannot read MLP head {str(p)!r}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    keys = {}
    for k in state if isinstance(state, dict) else ():
        m = re.fullmatch(r"(?:module\.)?layers\.(\d+)\.(weight|bias)", k)
        if m is None:
            raise RewardError(
                f"aesthetic reward: {str(p)!r} has key {k!r}; expected an MLP of layers.<i>.weight/bias"
            )
        keys.setdefault(int(m.group(1)), {})[m.group(2)] = state[k]
    if not keys:
        raise RewardError(f"aesthetic reward: {str(p)!r} holds no layers.<i>.weight tensors")
    layers: list[torch.nn.Module] = []
    dim = embed_dim
    for i in range(max(keys) + 1):
        if i not in keys:
            layers.append(torch.nn.Identity())
            continue
        w, b = keys[i].get("weight"), keys[i].get("bias")
        if w is None or w.ndim != 2 or w.shape[1] != dim:
            raise RewardError(
                f"aesthetic reward: head layer {i} in {str(p)!r} has weight {None if w is None else tuple(w.shape)}; "
                f"expected [out, {dim}] (the CLIP embedding is {embed_dim}-d)"
            )
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        layers.append(lin)
        dim = w.shape[0]
    if dim != 1:
        raise RewardError(f"aesthetic reward: head {str(p)!r} ends in {dim} outputs; expected 1")
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


class AestheticReward(OpenClipScorer):
    """``reward(images [N,3,H,W] in [0,1], prompts) -> aesthetic score [N]`` (prompts unused)."""

    def __init__(
        self,
        checkpoint: str | None = None,
        head: str | None = None,
        *,
        model: str = "ViT-L-14-quickgelu",
        device=None,
        dtype=None,
        batch_size: int = 32,
        model_config: dict | None = None,
    ):
        # the head is checked first: a missing file fails before the 1.7 GB encoder loads
        require_file(
            head, "aesthetic reward: MLP head", "pass head=PATH, e.g. sac+logos+ava1-l14-linearMSE.pth"
        )
        super().__init__(
            model,
            checkpoint,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            model_config=model_config,
            random_init=False,
            what="aesthetic reward: CLIP checkpoint",
            hint=(
                "pass checkpoint=PATH, the open_clip weights of OpenAI CLIP ViT-L/14 "
                "(e.g. timm/vit_large_patch14_clip_224.openai's open_clip_pytorch_model.bin)"
            ),
        )
        self.modules["head"] = load_mlp_head(head, int(self.model.visual.output_dim))

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        emb = self.image_features(images)  # L2-normalised, as the head was trained
        return self.modules["head"](emb.to(self.dtype)).float().reshape(-1)
