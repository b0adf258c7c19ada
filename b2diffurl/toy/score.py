"""Exact programmatic reward of the toy world: does the image show what the prompt says?

Pipeline, batched over images, no per-pixel Python loops:

1. pixel classes — a pixel is foreground if its brightest channel > 0.4; its colour is the palette entry
   nearest to its chromaticity (rgb / max channel), so anti-aliased edges and dimmed/blurred pixels keep
   their colour;
2. connected components per colour (8-connectivity) by iterated max-pooling of pixel ids;
3. per-component statistics with scatter ops: area, centroid, bounding box; shape from two scale-free
   features — fill = area / bbox area (square 1, circle π/4, triangle ½), the centroid's vertical
   offset in the box (triangle +1/6) and diag = diagonal / axis extent (square √2, circle 1, triangle
   1.06; survives blur that rounds corners) — by nearest prototype; components smaller than ``min_area``
   (noise specks) are ignored;
4. partial-credit score in [0, 1]:
   ``0.25·colours + 0.25·shapes + 0.3·objects + 0.2·relation`` (weights renormalised without a relation),
   where colours/shapes are Jaccard indices between the wanted and the found sets, objects =
   Σ min(found, wanted) per (colour, shape) type / max(#wanted, #found) (right binding and right count,
   extra objects penalised), relation = the centroid order of the two named objects (0..1 ramp over 3 px).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2diffurl.toy.prompts import COLOURS, RELATIONS, SHAPES, parse
from b2diffurl.toy.render import PALETTE

_W_COLOUR, _W_SHAPE, _W_OBJECTS, _W_REL = 0.25, 0.25, 0.30, 0.20
# shape prototypes (fill, 2·voff, diag) for circle, square, triangle; see component_stats
_PROTOTYPES = torch.tensor([[0.785, 0.0, 1.0], [1.0, 0.0, 1.414], [0.5, 1 / 3, 1.06]])
MAX_COMPONENTS = 8


def pixel_classes(images: torch.Tensor, threshold: float = 0.4) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> long [N, H, W]: colour index, or -1 for background."""
    bright = images.amax(1)
    chroma = images / bright.clamp_min(1e-3)[:, None]
    pal = PALETTE.to(images) / PALETTE.to(images).amax(1, keepdim=True)
    dist = ((chroma[:, None] - pal[None, :, :, None, None]) ** 2).sum(2)  # [N, K, H, W]
    cls = dist.argmin(1)
    return torch.where(bright > threshold, cls, torch.full_like(cls, -1))


def connected_components(cls: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label 8-connected same-class regions of ``cls`` [N, H, W] (-1 = background) -> long [N, H, W]:
    0 for background, else the largest flat pixel index + 1 inside the component (unique per image)."""
    n, h, w = cls.shape
    masks = (cls[:, None] == torch.arange(num_classes, device=cls.device)[None, :, None, None]).float()
    ids = torch.arange(1, h * w + 1, device=cls.device, dtype=torch.float32).view(1, 1, h, w) * masks
    for it in range(4 * (h + w)):  # geodesic diameter bound; exits early once stable
        nxt = F.max_pool2d(ids, 3, 1, 1) * masks
        if it % 4 == 3 and torch.equal(nxt, ids):
            break
        ids = nxt
    return ids.sum(1).long()


def component_stats(images: torch.Tensor, min_area: float | None = None) -> dict[str, torch.Tensor]:
    """Objects found in each image -> dict of [N, MAX_COMPONENTS] tensors (largest first):
    ``valid`` (bool), ``colour``, ``shape`` (long), ``cx``, ``cy``, ``area`` (float, pixel units)."""
    n, _, h, w = images.shape
    cls = pixel_classes(images.float())
    lab = connected_components(cls, len(COLOURS)).view(n, -1)  # [N, HW]
    dev = images.device
    ys, xs = torch.meshgrid(
        torch.arange(h, device=dev, dtype=torch.float32),
        torch.arange(w, device=dev, dtype=torch.float32),
        indexing="ij",
    )
    xs, ys = xs.reshape(1, -1).expand(n, -1), ys.reshape(1, -1).expand(n, -1)

    def per_component(values: torch.Tensor, how: str) -> torch.Tensor:  # [N, HW] -> [N, HW + 1]
        init = {"sum": 0.0, "amin": 1e9, "amax": -1e9}[how]
        out = torch.full((n, h * w + 1), init, device=dev)
        return out.scatter_add(1, lab, values) if how == "sum" else out.scatter_reduce(1, lab, values, how)

    area, sx, sy = (
        per_component(torch.ones_like(xs), "sum"),
        per_component(xs, "sum"),
        per_component(ys, "sum"),
    )
    x0, x1, y0, y1 = (per_component(v, how) for v in (xs, ys) for how in ("amin", "amax"))
    u0, u1, v0, v1 = (per_component(v, how) for v in (xs + ys, xs - ys) for how in ("amin", "amax"))
    colour = per_component(cls.view(n, -1).float(), "amax").long()
    area[:, 0] = 0  # background
    min_area = 8.0 * h * w / 1024 if min_area is None else min_area
    top_area, idx = area.topk(MAX_COMPONENTS, dim=1)
    g = lambda t: t.gather(1, idx)
    cx, cy = g(sx) / top_area.clamp_min(1), g(sy) / top_area.clamp_min(1)
    bw, bh = (g(x1) - g(x0) + 1).clamp_min(1), (g(y1) - g(y0) + 1).clamp_min(1)
    fill = top_area / (bw * bh)
    voff = (cy - (g(y0) + g(y1)) / 2) / bh
    diag = ((g(u1) - g(u0)) + (g(v1) - g(v0)) + 2) / (2**0.5 * (bw + bh))  # ≈ √2 for a square
    feats = torch.stack([fill, 2 * voff, diag], -1)  # [N, K, 3]
    shape = ((feats[:, :, None] - _PROTOTYPES.to(dev)) ** 2).sum(-1).argmin(-1)
    return {
        "valid": top_area >= min_area,
        "colour": g(colour).clamp_min(0),
        "shape": shape,
        "cx": cx,
        "cy": cy,
        "area": top_area,
    }


def _targets(prompts: list[str], device) -> dict[str, torch.Tensor]:
    """Wanted (colour, shape) counts [N, C, S], relation index [N] (-1 none), named objects [N, 2, 2]."""
    n = len(prompts)
    counts = torch.zeros(n, len(COLOURS), len(SHAPES))
    rel = torch.full((n,), -1, dtype=torch.long)
    named = torch.zeros(n, 2, 2, dtype=torch.long)
    for i, p in enumerate(prompts):
        scene = parse(p)
        for j, (c, s) in enumerate(scene.objects):
            counts[i, COLOURS.index(c), SHAPES.index(s)] += 1
            if scene.relation is not None:
                named[i, j] = torch.tensor([COLOURS.index(c), SHAPES.index(s)])
        if scene.relation is not None:
            rel[i] = RELATIONS.index(scene.relation)
    return {"counts": counts.to(device), "rel": rel.to(device), "named": named.to(device)}


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter, union = (a & b).sum(1).float(), (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def _pick(obj: dict, colour: torch.Tensor, shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid of the best component for a named (colour, shape) per image: right colour required, right
    shape preferred, larger preferred -> (found [N] bool, centroid [N, 2])."""
    ok = obj["valid"] & (obj["colour"] == colour[:, None])
    key = torch.where(
        ok, obj["area"] + 1e4 * (obj["shape"] == shape[:, None]), torch.full_like(obj["area"], -1)
    )
    j = key.argmax(1, keepdim=True)
    return ok.any(1), torch.cat([obj["cx"].gather(1, j), obj["cy"].gather(1, j)], 1)


def toy_score(images: torch.Tensor, prompts: list[str], *, return_parts: bool = False):
    """Reward of images [N, 3, H, W] in [0, 1] for ``prompts`` (len N) -> float32 [N] in [0, 1] on
    images.device (plus a dict of the partial scores if ``return_parts``)."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
        raise ValueError(
            f"expected images [N,3,H,W] with N = len(prompts) = {len(prompts)}, got {tuple(images.shape)}"
        )
    dev = images.device
    obj = component_stats(images)
    tgt = _targets(list(prompts), dev)
    c, s = len(COLOURS), len(SHAPES)
    valid = obj["valid"].float()
    found = (
        torch.zeros(images.shape[0], c * s, device=dev)
        .scatter_add(1, obj["colour"] * s + obj["shape"], valid)
        .view(-1, c, s)
    )  # [N, C, S]
    want = tgt["counts"]
    colours = _jaccard(want.sum(2) > 0, found.sum(2) > 0)
    shapes = _jaccard(want.sum(1) > 0, found.sum(1) > 0)
    objects = torch.minimum(found, want).sum((1, 2)) / torch.maximum(found.sum((1, 2)), want.sum((1, 2)))
    has_rel = tgt["rel"] >= 0
    fa, pa = _pick(obj, tgt["named"][:, 0, 0], tgt["named"][:, 0, 1])
    fb, pb = _pick(obj, tgt["named"][:, 1, 0], tgt["named"][:, 1, 1])
    d = pb - pa  # B − A, pixels
    scale = images.shape[-1] / 32.0
    signed = torch.stack([d[:, 0], -d[:, 0], d[:, 1], -d[:, 1]], 1).gather(
        1, tgt["rel"].clamp_min(0)[:, None]
    )[:, 0]
    relation = torch.where(has_rel & fa & fb, (signed / (3 * scale)).clamp(0, 1), torch.zeros_like(signed))
    total = _W_COLOUR * colours + _W_SHAPE * shapes + _W_OBJECTS * objects + _W_REL * relation
    score = torch.where(has_rel, total, total / (1 - _W_REL)).float()
    if return_parts:
        return score, {"colours": colours, "shapes": shapes, "objects": objects, "relation": relation}
    return score
