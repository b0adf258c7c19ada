"""DDPO's JPEG rewards: the image's JPEG size in kB (quality 95), as is (incompressibility) or negated
(compressibility). They need no weights, and they are the classic demonstration that a proxy can be
optimised into degenerate images (flat colour for compressibility, noise for incompressibility).

Images are quantised to uint8 (round, clamp) and encoded with PIL, one thread per image; the scores come
back on the images' device. kB = 1000 bytes, as in DDPO.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import torch

QUALITY = 95


def jpeg_sizes_kb(images: torch.Tensor, quality: int = QUALITY) -> torch.Tensor:
    """images [N, 3, H, W] in [0, 1] -> JPEG size in kB [N] (float32, on images.device)."""
    from PIL import Image

    arr = (
        (images.detach().float() * 255)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )

    def size(a) -> float:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        return buf.tell() / 1000

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(arr)))) as pool:  # PIL's encoder releases the GIL
        sizes = list(pool.map(size, arr))
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_incompressibility():
    """Reward = JPEG size in kB: bigger files (more detail or noise) score higher."""
    return lambda images, prompts: jpeg_sizes_kb(images)


def jpeg_compressibility():
    """Reward = -JPEG size in kB: smaller files (flatter images) score higher."""
    return lambda images, prompts: -jpeg_sizes_kb(images)
