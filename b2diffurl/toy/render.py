"""Deterministic anti-aliased renderer for toy prompts (32×32 RGB on black by default).

Scenes are sampled per prompt from a seeded ``random.Random`` (placement only — a handful of numbers per
object); the pixels of the whole batch are then drawn at once from signed distance fields, so rendering is
vectorised over images, objects and pixels. Coverage = clamp(0.5 − sdf, 0, 1) gives 1-pixel anti-aliasing.
"""

from __future__ import annotations

import random

import torch

from b2diffurl.toy.prompts import COLOURS, RELATION_AXES, RELATIONS, SHAPES, parse, relation_gap

#: RGB of each colour in COLOURS, in [0, 1]
PALETTE = torch.tensor([[0.95, 0.12, 0.10], [0.10, 0.85, 0.15], [0.15, 0.30, 1.00], [0.98, 0.90, 0.10]])
MAX_OBJECTS = 3
_GAP = 2.0  # minimum free pixels between the bounding boxes of two objects (at 32×32)


#: how a relation prompt's two objects may be placed: ``any`` = anywhere the relation holds with a gap;
#: ``halves`` = each object wholly in its own half of the image (left/right or top/bottom), a stricter case of
#: the same relation that pretraining can use to make the relation word a simpler signal
RELATION_LAYOUTS = ("any", "halves")


def _place(
    scene, rng: random.Random, size: int, relation_layout: str = "any"
) -> list[tuple[float, float, float]]:
    """Sample (cx, cy, s) per object (pixel units, s = bbox side) so boxes don't touch and the relation
    holds (see :data:`RELATION_LAYOUTS`); rejection sampling over a few hundred tries."""
    k = size / 32.0
    n = len(scene.objects)
    lo, hi = (10.0, 16.0) if n == 1 else (8.0, 11.0)
    for _ in range(1000):
        objs = []
        for _ in range(n):
            s = rng.uniform(lo, hi) * k
            objs.append(
                (rng.uniform(s / 2 + k, size - s / 2 - k), rng.uniform(s / 2 + k, size - s / 2 - k), s)
            )
        ok = all(
            max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= (a[2] + b[2]) / 2 + _GAP * k
            for i, a in enumerate(objs)
            for b in objs[i + 1 :]
        )
        if ok and scene.relation is not None:
            a, b = objs
            ok = relation_gap(scene.relation, a, b) >= (a[2] + b[2]) / 2 + _GAP * k
            if ok and relation_layout == "halves":
                axis, sign = RELATION_AXES[scene.relation]
                near, far = (a, b) if sign > 0 else (b, a)  # `near` is the one nearer the origin
                mid = size / 2
                ok = near[axis] + near[2] / 2 + _GAP * k / 2 <= mid <= far[axis] - far[2] / 2 - _GAP * k / 2
        if ok:
            return objs
    raise RuntimeError(f"could not place {scene} in a {size}x{size} image")


def sample_layout(
    prompts: list[str], seed: int = 0, size: int = 32, relation_layout: str = "any"
) -> torch.Tensor:
    """Object parameters for each prompt -> float tensor [N, MAX_OBJECTS, 6] of
    (cx, cy, side, colour index, shape index, valid). Deterministic in (prompts, seed, relation_layout)."""
    if relation_layout not in RELATION_LAYOUTS:
        raise ValueError(
            f"unknown relation_layout {relation_layout!r}; expected one of {list(RELATION_LAYOUTS)}"
        )
    out = torch.zeros(len(prompts), MAX_OBJECTS, 6)
    for i, p in enumerate(prompts):
        scene = parse(p)
        rng = random.Random(seed * 1_000_003 + i)
        for m, ((colour, shape), (cx, cy, s)) in enumerate(
            zip(scene.objects, _place(scene, rng, size, relation_layout))
        ):
            out[i, m] = torch.tensor([cx, cy, s, COLOURS.index(colour), SHAPES.index(shape), 1.0])
    return out


def _sdf(layout: torch.Tensor, size: int) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside) of every object at every pixel centre -> [N, M, H, W]."""
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    cx, cy, s = (layout[..., j, None, None] for j in range(3))
    dx, dy, h = xx - cx, yy - cy, s / 2
    circle = torch.sqrt(dx**2 + dy**2) - h
    square = torch.maximum(dx.abs(), dy.abs()) - h
    # upward isosceles triangle with base = height = s: apex (cx, cy-h), base corners (cx±h, cy+h).
    # Sides have slope 2, outward unit normals (±2, -1)/√5; exact inside, a tight bound outside.
    tri = torch.maximum(dy - h, (2 * dx.abs() - dy - h) / 5**0.5)
    shape = layout[..., 4, None, None]
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, tri))


def render_layout(layout: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Draw a layout [N, M, 6] (see :func:`sample_layout`) -> images [N, 3, size, size] in [0, 1]."""
    cover = (0.5 - _sdf(layout, size)).clamp(0, 1) * layout[..., 5, None, None]  # [N, M, H, W]
    colour = PALETTE[layout[..., 3].long()]  # [N, M, 3]
    img = torch.zeros(layout.shape[0], 3, size, size)
    for m in range(layout.shape[1]):
        a = cover[:, m, None]
        img = img * (1 - a) + colour[:, m, :, None, None] * a
    return img


def render(prompts: list[str], seed: int = 0, size: int = 32, relation_layout: str = "any") -> torch.Tensor:
    """Images satisfying ``prompts`` -> [N, 3, size, size] float32 in [0, 1]; deterministic in (prompts, seed,
    relation_layout)."""
    return render_layout(sample_layout(list(prompts), seed, size, relation_layout), size)


__all__ = ["PALETTE", "RELATION_LAYOUTS", "RELATIONS", "render", "render_layout", "sample_layout"]
