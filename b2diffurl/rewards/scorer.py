"""What every model-based reward shares: preprocessing on the images' device, and following that device.

Preprocessing is the tensor twin of open_clip's / CLIPImageProcessor's PIL path.

Both libraries resize the shortest edge to the model's size (bicubic), centre-crop, scale to [0, 1] and
normalise with the model's mean/std. Running that per image through PIL would move every decoded batch
to the host; this does it batched with ``F.interpolate(..., antialias=True)`` (the same a = -0.5 bicubic
kernel PIL uses), so scores match the libraries' own preprocessing up to uint8 rounding (tests check it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2diffurl.rewards import RewardError


def shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output (h, w) after resizing the shortest edge to ``size`` keeping the aspect ratio (the long edge
    truncated, as torchvision's and transformers' resize do)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def scorer_preprocess(
    images: torch.Tensor,
    size: tuple[int, int],
    mean,
    std,
    *,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    crop: str = "round",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> normalised model input [N, 3, *size] (``dtype``, images' device).

    ``resize_mode``: ``"shortest"`` (resize the shortest edge to the target, centre-crop: open_clip's
    default and CLIPImageProcessor's) or ``"squash"`` (resize straight to ``size``)."""
    if interpolation not in ("bicubic", "bilinear"):
        raise RewardError(f"scorer interpolation {interpolation!r} unsupported; expected bicubic or bilinear")
    th, tw = size
    x = images.float().clamp(0, 1)
    h, w = x.shape[-2:]
    if resize_mode == "squash" or (h, w) == (th, tw):
        out_hw = (th, tw)
    elif resize_mode == "shortest":
        out_hw = shortest_edge_size(h, w, th) if th == tw else _cover(h, w, th, tw)
    else:
        raise RewardError(f"scorer resize_mode {resize_mode!r} unsupported; expected shortest or squash")
    if out_hw != (h, w):
        x = F.interpolate(x, size=out_hw, mode=interpolation, antialias=True, align_corners=False)
    if crop not in ("round", "floor"):
        raise RewardError(f"scorer crop {crop!r} unsupported; expected round or floor")
    top, left = ((m // 2) if crop == "floor" else int(round(m / 2)) for m in (out_hw[0] - th, out_hw[1] - tw))
    x = x[..., top : top + th, left : left + tw]
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return ((x - m) / s).to(dtype or torch.float32)


def _cover(h: int, w: int, th: int, tw: int) -> tuple[int, int]:
    scale = max(th / h, tw / w)
    return max(th, round(h * scale)), max(tw, round(w * scale))


class DeviceFollowingScorer:
    """Base of the model rewards: the scorer lives on ``device`` if one is given, else it moves to the
    device of the first images it scores (the policy's, since images come straight from its decoder), so a
    reward built from a config with no device runs batched next to the policy. ``dtype`` defaults to fp16
    on CUDA and fp32 elsewhere. Subclasses keep their modules in ``self.modules`` (name -> nn.Module)."""

    def __init__(self, device=None, dtype=None, batch_size: int = 32):
        if int(batch_size) < 1:
            raise RewardError(f"reward batch_size must be >= 1, got {batch_size}")
        self._fixed_device = torch.device(device) if device is not None else None
        self._dtype_arg = dtype
        self.batch_size = int(batch_size)
        self.device: torch.device | None = None
        self.dtype: torch.dtype = torch.float32
        self.modules: dict[str, torch.nn.Module] = {}

    def _place(self, images_device: torch.device) -> None:
        device = self._fixed_device or images_device
        if self.device == device:
            return
        self.device = device
        self.dtype = self._dtype_arg or (torch.float16 if device.type == "cuda" else torch.float32)
        for m in self.modules.values():
            m.to(device=device, dtype=self.dtype).eval().requires_grad_(False)
        self._on_moved()

    def _on_moved(self) -> None:
        """Hook: drop caches that hold tensors on the old device."""

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self._place(images.device)
        out = [
            self.score_batch(
                images[i : i + self.batch_size].to(self.device), prompts[i : i + self.batch_size]
            )
            for i in range(0, len(prompts), self.batch_size)
        ]
        return torch.cat(out).float().to(images.device)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (already on ``self.device``) -> L2-normalised embeddings [n, D] fp32."""
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Batched :meth:`image_features` for any N, returned on the images' device."""
        self._place(images.device)
        out = [
            self.image_features(images[i : i + self.batch_size].to(self.device))
            for i in range(0, images.shape[0], self.batch_size)
        ]
        return torch.cat(out).to(images.device)
