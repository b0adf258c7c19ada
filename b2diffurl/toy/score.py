"""Exact programmatic reward of the toy world: does the image show what the prompt says?

Pipeline, batched over images, no per-pixel Python loops:

1. pixel classes — a pixel is foreground if its brightest channel > 0.4; its colour is the palette entry
   nearest to its chromaticity (rgb / max channel), so anti-aliased edges and dimmed/blurred pixels keep
   their colour;
2. connected components per colour (8-connectivity) by iterated max-pooling of pixel ids;
3. per-component statistics with scatter ops: area, centroid, bounding box, and three scale-free shape
   features — fill = area / bbox area (square 1, circle π/4, triangle ½), the centroid's vertical offset in
   the box (triangle +1/6) and diag = diagonal / axis extent (square √2, circle 1, triangle 1.06; survives
   blur that rounds corners) — compared with each shape's prototype by squared distance d²_s.

Dense reward :func:`toy_score` in [0, 1] (continuous in object areas, shape features and positions, so that
four samples of a prompt almost never tie unless all of them are perfect):

* ``colour`` = (foreground pixels whose colour the prompt names) / (foreground pixels); 0 on a blank image;
* ``objects`` = Σ_types min(found, wanted) / max(Σ found, Σ wanted) over (colour, shape) types, where each
  of the 8 largest components adds ``presence × p_shape`` to its colour's types: presence =
  clamp((area − 4 px) / 8 px, 0, 1) (specks count 0, a ≥ 12 px blob counts 1) and p_shape =
  softmax_s(−d²_s / 0.01) (a soft shape class). This scores count, binding and extras in one number;
* ``relation`` (relation prompts) = clamp((m + 6 px) / 12 px, 0, 1), where m is the signed centroid margin
  of the two named objects along the relation's axis (m > 0: order right; 1 from 6 px on, 0.5 on the
  boundary); 0 if either named object (right colour, right shape preferred, larger preferred) is missing.

``score = 0.3·colour + 0.7·objects`` without a relation, ``0.2·colour + 0.5·objects + 0.3·relation`` with
one (pixel units at 32×32; scaled with the image size).

Binary success :func:`toy_success`: the components of area ≥ 8 px (at 32×32), by hard shape class, are
exactly the wanted multiset of (colour, shape) — right count, right binding, nothing extra — and, for
relations, m > 0. Rendered images of a prompt score ≥ 0.999 and succeed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2diffurl.toy.prompts import COLOURS, RELATIONS, SHAPES, parse
from b2diffurl.toy.render import PALETTE

_W_COLOUR, _W_OBJECTS = 0.3, 0.7  # no relation
_W_REL_COLOUR, _W_REL_OBJECTS, _W_REL = 0.2, 0.5, 0.3  # relation prompts
PRESENCE_FROM, PRESENCE_SPAN = 4.0, 8.0  # px at 32×32: presence ramps 0 -> 1 over areas 4 -> 12
SHAPE_TEMPERATURE = 0.01
RELATION_MARGIN = 6.0  # px at 32×32
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
    ``valid`` (bool, area ≥ ``min_area``), ``colour``, ``shape`` (long), ``shape_p`` (soft shape class
    [N, K, S]), ``cx``, ``cy``, ``area`` (float, pixel units); also ``classes``: the pixel classes [N, H, W]."""
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
    d2 = ((feats[:, :, None] - _PROTOTYPES.to(dev)) ** 2).sum(-1)  # [N, K, S]
    return {
        "valid": top_area >= min_area,
        "colour": g(colour).clamp_min(0),
        "shape": d2.argmin(-1),
        "shape_p": torch.softmax(-d2 / SHAPE_TEMPERATURE, -1),
        "cx": cx,
        "cy": cy,
        "area": top_area,
        "classes": cls,
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


def _pick(obj: dict, colour: torch.Tensor, shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid of the best component for a named (colour, shape) per image: right colour required, right
    shape preferred, larger preferred -> (found [N] bool, centroid [N, 2])."""
    ok = obj["valid"] & (obj["colour"] == colour[:, None])
    key = torch.where(
        ok, obj["area"] + 1e4 * (obj["shape"] == shape[:, None]), torch.full_like(obj["area"], -1)
    )
    j = key.argmax(1, keepdim=True)
    return ok.any(1), torch.cat([obj["cx"].gather(1, j), obj["cy"].gather(1, j)], 1)


def _check(images: torch.Tensor, prompts) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
        raise ValueError(
            f"expected images [N,3,H,W] with N = len(prompts) = {len(prompts)}, got {tuple(images.shape)}"
        )


def _evaluate(images: torch.Tensor, prompts) -> dict[str, torch.Tensor]:
    """Every part of the dense reward and the binary success for a checked batch (see module docs)."""
    _check(images, prompts)
    dev = images.device
    n, _, h, _ = images.shape
    scale = h / 32.0
    obj = component_stats(images)
    tgt = _targets(list(prompts), dev)
    c, s = len(COLOURS), len(SHAPES)
    want = tgt["counts"]  # [N, C, S]
    # colour purity of the foreground
    cls = obj["classes"]
    fg = cls >= 0
    named = (want.sum(2) > 0).float()  # [N, C]
    right = named.gather(1, cls.clamp_min(0).view(n, -1)).view_as(cls).bool() & fg
    n_fg = fg.sum((1, 2)).float()
    colour = torch.where(n_fg > 0, right.sum((1, 2)).float() / n_fg.clamp_min(1), torch.zeros_like(n_fg))
    # soft counts per (colour, shape)
    presence = ((obj["area"] - PRESENCE_FROM * scale**2) / (PRESENCE_SPAN * scale**2)).clamp(0, 1)
    soft = torch.zeros(n, c, s, device=dev)
    soft.index_put_(
        (torch.arange(n, device=dev)[:, None].expand_as(obj["colour"]), obj["colour"]),
        presence[..., None] * obj["shape_p"],
        accumulate=True,
    )
    objects = torch.minimum(soft, want).sum((1, 2)) / torch.maximum(soft.sum((1, 2)), want.sum((1, 2)))
    # hard counts for success
    hard = (
        torch.zeros(n, c * s, device=dev)
        .scatter_add(1, obj["colour"] * s + obj["shape"], obj["valid"].float())
        .view(n, c, s)
    )
    # relation margin
    has_rel = tgt["rel"] >= 0
    fa, pa = _pick(obj, tgt["named"][:, 0, 0], tgt["named"][:, 0, 1])
    fb, pb = _pick(obj, tgt["named"][:, 1, 0], tgt["named"][:, 1, 1])
    d = pb - pa  # B − A, pixels
    margin = torch.stack([d[:, 0], -d[:, 0], d[:, 1], -d[:, 1]], 1).gather(
        1, tgt["rel"].clamp_min(0)[:, None]
    )[:, 0]
    both = has_rel & fa & fb
    m = RELATION_MARGIN * scale
    relation = torch.where(both, ((margin + m) / (2 * m)).clamp(0, 1), torch.zeros_like(margin))
    score = torch.where(
        has_rel,
        _W_REL_COLOUR * colour + _W_REL_OBJECTS * objects + _W_REL * relation,
        _W_COLOUR * colour + _W_OBJECTS * objects,
    ).float()
    success = (hard == want).all(2).all(1) & (~has_rel | (both & (margin > 0)))
    return {
        "score": score,
        "success": success,
        "colour": colour,
        "objects": objects,
        "relation": relation,
        "margin": torch.where(both, margin, torch.full_like(margin, float("nan"))),
    }


def toy_score(images: torch.Tensor, prompts: list[str], *, return_parts: bool = False):
    """Dense reward of images [N, 3, H, W] in [0, 1] for ``prompts`` (len N) -> float32 [N] in [0, 1] on
    images.device (plus a dict of the parts — colour, objects, relation, margin, success — if
    ``return_parts``). Formula in the module docs."""
    out = _evaluate(images, prompts)
    if return_parts:
        return out["score"], {k: v for k, v in out.items() if k != "score"}
    return out["score"]


def toy_success(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Binary success of images [N, 3, H, W] for ``prompts`` -> bool [N]: exactly the wanted objects (count,
    colour, shape, nothing extra) and, for relations, the right order (module docs)."""
    return _evaluate(images, prompts)["success"]
