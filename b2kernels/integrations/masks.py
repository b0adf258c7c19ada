"""Object masks from cross-attention maps, and their nearest-neighbour resize: the one mask rule of D-Fusion.

The attention processors (:mod:`b2kernels.integrations.diffusers`) only *record* the cross-attention
probabilities of chosen token columns (conditional reference rows, layers at the mask grid, averaged over heads
and layers); whoever needs a mask builds it here, once per step.

**Items.** D-Fusion's code binarises one cross-attention column per *item* and unites the items. An item is one
occurrence of an object word: in "a blue circle above a green circle" the two "circle" tokens are two items,
each thresholded on its own column. Summing both columns first and thresholding once would switch on cells where
neither circle alone passes (a superset mask).

**Multi-token words** (a tokenizer that splits a word into pieces): the item is still one occurrence of the
word, and its map is the attention mass on all of its pieces (the sum of their columns). The official code only
handles single-token items; the sum keeps "how much this cell attends to the word" independent of how the
tokenizer splits it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["object_mask", "resize_mask", "MASK_RULES"]

MASK_RULES = ("threshold", "mean")


def object_mask(
    maps: torch.Tensor,
    thresholds: float | Sequence[float] | torch.Tensor,
    *,
    items: torch.Tensor | None = None,
    rule: str = "threshold",
) -> torch.Tensor:
    """Binary object mask per row: each item's map binarised on its own, then the union over items.

    maps: [R, N, J] cross-attention probabilities of J token columns over N cells. items: [R, J, I] weights
    (1 where column j belongs to item i), or None when every column is its own item (I = J). thresholds: a float,
    [I] or [R, I]; ``+inf`` marks a padding item that never switches a cell on. rule: ``"threshold"`` keeps cells
    with map ``>=`` the item's threshold (D-Fusion); ``"mean"`` keeps cells ``>=`` the item's spatial mean
    (scale-free; padding items stay off). Returns [R, N] bool.
    """
    if maps.dim() != 3:
        raise ValueError(f"object_mask: expected maps [R, N, J], got {list(maps.shape)}")
    if rule not in MASK_RULES:
        raise ValueError(f"object_mask: rule must be one of {MASK_RULES}, got {rule!r}")
    a = maps.to(torch.float32)
    if items is not None:
        if items.dim() != 3 or items.shape[:2] != (a.shape[0], a.shape[2]):
            raise ValueError(
                f"object_mask: items must be [R={a.shape[0]}, J={a.shape[2]}, I], got {list(items.shape)}"
            )
        a = torch.bmm(a, items.to(a.device, torch.float32))  # [R, N, I]: each item's attention mass
    R, _, I = a.shape
    thr = torch.as_tensor(thresholds, dtype=torch.float32, device=a.device)
    if thr.dim() > 2 or (thr.dim() >= 1 and thr.shape[-1] != I):
        raise ValueError(f"object_mask: thresholds must be a float, [I={I}] or [R, I], got {list(thr.shape)}")
    thr = thr.expand(R, I)
    if rule == "mean":
        thr = torch.where(torch.isinf(thr), thr, a.mean(dim=1))
    return (a >= thr[:, None, :]).any(dim=2)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[R, h, w] (bool or float) → [R, H, W] float32, nearest neighbour: source index ⌊dst·h/H⌋, i.e.
    ``F.interpolate(mode="nearest")`` as D-Fusion resizes its mask to each fused layer's grid."""
    if mask.dim() != 3:
        raise ValueError(f"resize_mask: expected [R, h, w], got {list(mask.shape)}")
    m = mask.to(torch.float32)
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m[:, None], size=tuple(size), mode="nearest")[:, 0]
    return m
