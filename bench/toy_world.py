"""``python -m bench.toy_world``: the measured properties of the embedded toy world (or any toy-layout checkpoint).

A toy world is only useful to RL if it can express its prompts and leaves the decisions the algorithms study
open. This script measures each of those properties on one checkpoint, prints one table per property and
writes ``bench/results/toy_world[-TAG]-<date>.json``:

1. ``text`` — relative L2 change of the prompt embedding [L, D] when one reward-relevant word is swapped
   (left↔right, above↔below, a colour, a shape, two↔three), mean over every prompt where the swap applies;
   ``unet_words`` — the same swaps seen by the UNet: how far its prediction on noised images of the prompt's
   scene moves, as a fraction of a colour swap's (a word can reach the embedding and still go unused);
   ``symmetry`` — how far the UNet is from mirror-equivariant on the scenes of the relations each mirror swaps
   (an exactly equivariant denoiser draws "A left of B" as often as "A right of B", so it cannot follow the word);
2. ``categories`` — per prompt category: mean dense reward (:func:`b2diffurl.toy.score.toy_score`), binary
   success rate (:func:`~b2diffurl.toy.score.toy_success`), mean within-prompt std of the dense reward, the
   fraction of prompts whose images neither all succeed nor all fail, and for relations the success against
   the prompt with the relation word swapped (a model that ignores the word satisfies both alike) and, where
   both named colours were drawn once, how often the two objects stand in the named order (0.5 by chance);
3. ``speed`` — images per CPU-second (process CPU time) sampling 32 images, batched, CFG, η = 1;
4. ``branches`` — B²'s branch points: P prompts × 4 branches sharing the first s DDIM steps; within-group
   variance of the dense reward, fraction of groups whose 4 dense rewards tie (range < 0.01) and whose 4
   success bits all agree;
5. ``dfusion`` — one D-Fusion stage (:func:`b2diffurl.algos.dfusion.generate_pairs`): fraction of pairs whose
   target beats its base, mean rewards, and how close target and reference are to the base (SSIM and mean
   absolute pixel difference): D-Fusion's targets should stay visually consistent with their bases.
   ``--dfusion-mask-threshold 0`` fuses every position, which shows how much of the reference the
   self-attention K/V can carry at all (``ssim_target_ref`` against ``ssim_ref_base``).

``--threads`` (default 1) fixes torch's thread count so CPU-seconds are comparable between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import RESULTS_DIR, environment, print_table

TIE = 0.01


def _policy(source: str):
    from b2diffurl.models import load_policy

    return load_policy(source)


# ------------------------------------------------------------------------------------------------ 1. text
def _swaps(prompt: str) -> dict[str, str]:
    from b2diffurl.toy import prompts as P

    words = prompt.split()
    out = {}
    pairs = {"left": "right", "right": "left", "above": "below", "below": "above"}
    for w, o in pairs.items():
        if w in words:
            out["relation_" + ("left_right" if w in ("left", "right") else "above_below")] = " ".join(
                o if x == w else x for x in words
            )
    c = next(x for x in words if x in P.COLOURS)
    other = next(x for x in P.COLOURS if x not in words)
    out["colour"] = prompt.replace(c, other, 1)
    s = next(x for x in words if x in P.OBJECT_WORDS)
    stem = s.rstrip("s") if s not in P.SHAPES else s
    new = next(x for x in P.SHAPES if x != stem and x not in prompt)
    out["shape"] = prompt.replace(stem, new, 1)
    if words[0] in ("two", "three"):
        out["count"] = " ".join([{"two": "three", "three": "two"}[words[0]], *words[1:]])
    return out


def text_rows(policy) -> list[dict]:
    from b2diffurl.toy.prompts import get_prompts

    prompts = get_prompts("all")
    base = policy.encode_prompts(prompts).float()
    jobs = [(i, kind, q) for i, p in enumerate(prompts) for kind, q in _swaps(p).items()]
    swapped = policy.encode_prompts([q for _, _, q in jobs]).float()
    changes: dict[str, list[float]] = {}
    for (i, kind, _), e in zip(jobs, swapped):
        changes.setdefault(kind, []).append(((e - base[i]).norm() / base[i].norm()).item())
    colour = sum(changes["colour"]) / len(changes["colour"])
    return [
        {
            "swap": k,
            "prompts": len(v),
            "rel_l2_change": sum(v) / len(v),
            "min": min(v),
            "vs_colour": sum(v) / len(v) / colour,
        }
        for k, v in sorted(changes.items())
    ]


def _predict(policy, x_t, t, emb) -> torch.Tensor:
    return policy.unet(x_t, t, emb).sample.float().flatten(1)


def _noisier_half(policy, steps: int, noisy: int | None = None):
    """(a copy of the policy's scheduler set to ``steps`` steps, its ``noisy`` noisiest timesteps; by default
    those of its noisier half)."""
    if noisy is not None and not 1 <= noisy <= steps:
        raise ValueError(f"noisy must be in [1, {steps}], got {noisy}")
    sched = copy.deepcopy(policy.scheduler)
    sched.set_timesteps(steps)
    return sched, sched.timesteps[: max(1, steps // 2) if noisy is None else noisy]


def _scenes(policy, prompts: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents of each prompt's rendered scene, noise drawn from ``seed``) to noise them with."""
    from b2diffurl.toy.render import render

    x0 = policy.encode_images(render(prompts, seed=seed)).to(policy.dtype)
    return x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)


def unet_word_rows(policy, *, steps, prompts=48, seed=0, noisy=None) -> list[dict]:
    """How far the UNet's prediction moves when one word is swapped, against a colour swap of the same prompts.

    The text table shows that each word reaches the prompt embedding; this one shows whether the UNet uses
    it. Inputs are the prompt's own rendered scene noised to the noisier half of the ``steps``-step sampling
    schedule (where the layout is decided), or to its ``noisy`` noisiest steps; the change is the L2 norm of
    the prediction's difference, averaged over prompts and timesteps. ``vs_colour`` divides by the colour
    swap's change on the same prompts and inputs."""
    from b2diffurl.toy import prompts as P

    rng = random.Random(seed)
    sched, ts = _noisier_half(policy, steps, noisy)
    rows = []
    for cat in ("count", "relation"):
        ps = P.get_prompts(f"all:{cat}")
        ps = sorted(rng.sample(ps, min(prompts, len(ps))))
        swaps = [_swaps(p) for p in ps]
        kinds = sorted({k for sw in swaps for k in sw if k != "colour"})
        x0, noise = _scenes(policy, ps, seed)
        embed = lambda qs: policy.encode_prompts(qs)
        e_own, e_colour, e_none = embed(ps), embed([sw["colour"] for sw in swaps]), embed([""] * len(ps))
        for kind in kinds:
            idx = [i for i, sw in enumerate(swaps) if kind in sw]
            e_kind = embed([swaps[i][kind] for i in idx])
            moved = {"kind": [], "colour": [], "uncond": []}
            for t in ts:
                x_t = sched.add_noise(x0[idx], noise[idx], t.expand(len(idx)))
                own = _predict(policy, x_t, t, e_own[idx])
                for name, e in (("kind", e_kind), ("colour", e_colour[idx]), ("uncond", e_none[idx])):
                    moved[name].append((own - _predict(policy, x_t, t, e)).norm(dim=1).mean().item())
            mean = {k: sum(v) / len(v) for k, v in moved.items()}
            rows.append(
                {
                    "prompts": f"{cat} ({len(idx)})",
                    "swap": kind,
                    "timesteps": f"{int(ts[0])}..{int(ts[-1])}",
                    "change": mean["kind"],
                    "colour_change": mean["colour"],
                    "vs_colour": mean["kind"] / mean["colour"],
                    "cond_vs_uncond": mean["uncond"],
                }
            )
    return rows


def _mirror(policy, latents: torch.Tensor, dim: int) -> torch.Tensor:
    """Mirror latents as their images mirror (dim 3: left-right, dim 2: top-bottom): exact through the toy's
    pixel-shuffle codec; for a VAE, the mirrored latent grid (as near as a convolutional VAE comes)."""
    patch = getattr(policy.codec, "patch", None)
    if patch is None:
        return latents.flip(dim)
    return F.pixel_unshuffle(F.pixel_shuffle(latents, patch).flip(dim), patch)


def symmetry_rows(policy, *, steps, prompts=32, seed=0, noisy=None) -> list[dict]:
    """How far the UNet is from mirror-equivariant: |f(mirror x) − mirror f(x)| / |f(x)| on the noised scenes of
    the relation prompts that mirror concerns (left-right: "to the left of" / "to the right of"; top-bottom:
    "above" / "below"), averaged over the noisier half of the schedule (or its ``noisy`` noisiest steps).
    A denoiser exactly equivariant under a mirror draws "A left of B" and "A right of B" (or "above" and
    "below") equally often from symmetric noise, so it cannot follow those words. (The toy's data is
    left-right symmetric; top-bottom it is not, as its triangles point up.)"""
    from b2diffurl.toy import prompts as P

    rng = random.Random(seed)
    sched, ts = _noisier_half(policy, steps, noisy)
    rows = []
    for dim, axis, words in (
        (3, "left-right", ("to the left of", "to the right of")),
        (2, "top-bottom", ("above", "below")),
    ):
        pool = [p for p in P.get_prompts("all:relation") if P.parse(p).relation in words]
        ps = sorted(rng.sample(pool, min(prompts, len(pool))))
        x0, noise = _scenes(policy, ps, seed)
        emb = policy.encode_prompts(ps)
        errs = []
        for t in ts:
            x_t = sched.add_noise(x0, noise, t.expand(len(ps)))
            out = _predict(policy, x_t, t, emb).view_as(x_t)
            mirrored = _predict(policy, _mirror(policy, x_t, dim), t, emb).view_as(x_t)
            gap = (mirrored - _mirror(policy, out, dim)).flatten(1).norm(dim=1).mean()
            errs.append((gap / out.flatten(1).norm(dim=1).mean()).item())
        rows.append(
            {
                "mirror": axis,
                "prompts": len(ps),
                "timesteps": f"{int(ts[0])}..{int(ts[-1])}",
                "equivariance_error": sum(errs) / len(errs),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------ 2. categories
def _sample(policy, prompts, *, steps, cfg, seed, batch=64):
    from b2diffurl.sampling import sample

    return sample(
        policy, prompts, num_steps=steps, guidance_scale=cfg, eta=1.0, seed=seed, batch_size=batch
    ).images


def _eval_prompts(per_category: int, seed: int = 0) -> dict[str, list[str]]:
    """Every single and count prompt; ``per_category`` relation prompts (train and held-out alike)."""
    from b2diffurl.toy.prompts import CATEGORIES, get_prompts

    rng = random.Random(seed)
    out = {}
    for cat in CATEGORIES:
        ps = get_prompts(f"all:{cat}")
        out[cat] = sorted(rng.sample(ps, per_category)) if len(ps) > per_category else ps
    return out


def category_rows(policy, *, steps, cfg, n, per_category) -> list[dict]:
    from b2diffurl.toy.score import toy_score, toy_success

    rows = []
    for cat, prompts in _eval_prompts(per_category).items():
        ps = [p for p in prompts for _ in range(n)]
        imgs = _sample(policy, ps, steps=steps, cfg=cfg, seed=1)
        r, ok = toy_score(imgs, ps), toy_success(imgs, ps).float()
        r_p, ok_p = r.view(-1, n), ok.view(-1, n)
        row = {
            "category": cat,
            "prompts": len(prompts),
            "images": len(ps),
            "dense_mean": r.mean().item(),
            "success": ok.mean().item(),
            "within_prompt_std": r_p.std(1).mean().item(),
            "prompts_mixed_success": ((ok_p.mean(1) > 0) & (ok_p.mean(1) < 1)).float().mean().item(),
        }
        if cat == "relation":
            sw = [_swaps(p)[next(k for k in _swaps(p) if k.startswith("relation"))] for p in ps]
            row["success_vs_swapped_prompt"] = toy_success(imgs, sw).float().mean().item()
            row["pairs_found"], row["order_right"] = relation_order(imgs, ps)
        rows.append(row)
    return rows


def relation_order(images: torch.Tensor, prompts: list[str]) -> tuple[float, float]:
    """(fraction of relation images where each of the two named colours forms exactly one object, fraction of
    those whose two objects stand in the named order along the relation's axis; NaN when there are none). The
    order ignores shapes, sizes and the reward's margin, so a model that ignores the relation word scores
    about 0.5."""
    from b2diffurl.toy.prompts import COLOURS, parse, relation_gap
    from b2diffurl.toy.score import component_stats

    obj = component_stats(images)
    found = right = 0
    for i, p in enumerate(prompts):
        scene = parse(p)
        centres = []
        for colour, _ in scene.objects:
            hit = obj["valid"][i] & (obj["colour"][i] == COLOURS.index(colour))
            if int(hit.sum()) != 1:
                break
            j = int(hit.nonzero()[0, 0])
            centres.append((obj["cx"][i][j].item(), obj["cy"][i][j].item()))
        if len(centres) != 2:
            continue
        found += 1
        right += relation_gap(scene.relation, *centres) > 0
    return found / max(1, len(prompts)), (right / found if found else float("nan"))


# ----------------------------------------------------------------------------------------------- 3. speed
def speed_rows(policy, *, steps, cfg, images=32, repeats=2) -> list[dict]:
    from b2diffurl.toy.prompts import get_prompts

    ps = (get_prompts("train:count") + get_prompts("train:relation"))[:images]
    best = None
    for k in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        _sample(policy, ps, steps=steps, cfg=cfg, seed=k, batch=images)
        c, w = time.process_time() - c0, time.perf_counter() - w0
        best = (c, w) if best is None or c < best[0] else best
    return [
        {
            "images": images,
            "steps": steps,
            "cfg": cfg,
            "threads": torch.get_num_threads(),
            "cpu_s": best[0],
            "wall_s": best[1],
            "images_per_cpu_s": images / best[0],
        }
    ]


# -------------------------------------------------------------------------------------------- 4. branches
def branch_rows(policy, *, steps, cfg, prompts_per_category, shared) -> list[dict]:
    from b2diffurl.sampling import TreeSampler
    from b2diffurl.toy.score import toy_score, toy_success

    cats = _eval_prompts(prompts_per_category, seed=1)
    ps = cats["count"][:prompts_per_category] + cats["relation"][:prompts_per_category]
    sampler = TreeSampler(policy, num_steps=steps, guidance_scale=cfg, eta=1.0)
    cond = policy.encode_prompts(ps)
    B = 4
    rows = []
    for s in shared:
        gen = torch.Generator().manual_seed(1000 + s)
        with torch.no_grad():
            out = sampler.sample_trees(cond, split_step=s, branches=B, generator=gen)
            imgs = policy.decode(out.latents)
        rep = [p for p in ps for _ in range(B)]
        r = toy_score(imgs, rep).view(-1, B)
        ok = toy_success(imgs, rep).view(-1, B).float()
        rows.append(
            {
                "shared_steps": s,
                "branch_k": steps - s,
                "groups": len(ps),
                "within_group_var": r.var(1).mean().item(),
                "dense_ties": ((r.amax(1) - r.amin(1)) < TIE).float().mean().item(),
                "success_ties": ((ok.mean(1) == 0) | (ok.mean(1) == 1)).float().mean().item(),
                "success": ok.mean().item(),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------- 5. dfusion
def _ssim(a: torch.Tensor, b: torch.Tensor, win: int = 7) -> torch.Tensor:
    """Mean SSIM per image (uniform win×win window, per channel, constants of Wang et al. 2004 for range 1)."""
    c1, c2 = 0.01**2, 0.03**2
    pool = lambda x: F.avg_pool2d(x, win, 1)
    mu_a, mu_b = pool(a), pool(b)
    va, vb = pool(a * a) - mu_a**2, pool(b * b) - mu_b**2
    cov = pool(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return s.mean((1, 2, 3))


def dfusion_rows(policy, *, steps, cfg, prompts, n, mask_threshold=0.05, layers="auto") -> list[dict]:
    from b2diffurl.algos import dfusion as D
    from b2diffurl.rewards import get_reward
    from b2diffurl.sampling import TreeSampler
    from b2diffurl.toy import prompts as TP
    from b2kernels.buffer import TrajectoryArena

    gen = torch.Generator().manual_seed(0)
    train = TP.train_prompts()
    ps = [train[i] for i in torch.randperm(len(train), generator=gen)[:prompts].tolist()]
    sampler = TreeSampler(policy, num_steps=steps, guidance_scale=cfg, eta=1.0)
    first = max(1, round(steps / 10))  # official 2 of 20: the noisiest steps stay the base's
    conf = D.DFusionConfig(
        samples_per_prompt=n, fusion_steps=[first, -1], mask_threshold=mask_threshold, fusion_layers=layers
    )
    arena = TrajectoryArena(policy.latent_shape, num_steps=steps, max_trees=prompts * n * 2, branches=1)
    t0 = time.perf_counter()
    st = D.generate_pairs(
        sampler,
        ps,
        conf,
        reward_fn=get_reward("toy"),
        arena=arena,
        run_seed=0,
        epoch=0,
        prompts_per_call=max(1, 64 // n),
    )
    arena.synchronize()
    img = lambda ids: policy.decode(arena.latents(ids, steps).to(policy.dtype)).float()
    ref, base, tgt = img(st.ref_ids), img(st.base_ids), img(st.target_ids)
    m = st.metrics
    return [
        {
            "prompts": prompts,
            "n": n,
            "steps": steps,
            "fused_steps": f"{st.fused_steps[0]}-{st.fused_steps[-1]}",
            "mask_threshold": mask_threshold,
            "fused_blocks": layers,
            "pairs": int(st.target_ids.numel()),
            "reward_ref": m["reward_ref_mean"],
            "reward_base": m["reward_base_mean"],
            "reward_target": m["reward_target_mean"],
            "target_beats_base": m["target_beats_base"],
            "target_loses": float((st.target_rewards < st.base_rewards).float().mean()),
            "ssim_target_base": _ssim(tgt, base).mean().item(),
            "ssim_ref_base": _ssim(ref, base).mean().item(),
            "ssim_target_ref": _ssim(tgt, ref).mean().item(),
            "l1_target_base": (tgt - base).abs().mean().item(),
            "l1_ref_base": (ref - base).abs().mean().item(),
            "mask_coverage": m["mask_coverage"],
            "s": time.perf_counter() - t0,
        }
    ]


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.toy_world", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint", default="toy", help="'toy' (the embedded checkpoint) or a toy-layout folder"
    )
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps T")
    ap.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    ap.add_argument(
        "--noisy-steps",
        type=int,
        default=None,
        help="how many of the noisiest timesteps unet_words and symmetry average over "
        "(default: half of --steps)",
    )
    ap.add_argument("--n", type=int, default=8, help="images per prompt for the category table")
    ap.add_argument("--relation-prompts", type=int, default=24, help="relation prompts in the category table")
    ap.add_argument(
        "--branch-prompts", type=int, default=12, help="count and relation prompts each, branch table"
    )
    ap.add_argument(
        "--shared", default=None, help="comma list of shared steps s (default: 0, 10 %%, ..., 80 %% of T)"
    )
    ap.add_argument("--dfusion-prompts", type=int, default=8)
    ap.add_argument("--dfusion-n", type=int, default=16)
    ap.add_argument(
        "--dfusion-mask-threshold",
        type=float,
        default=0.05,
        help="D-Fusion mask threshold (0 = every position fused: how much can self-attention K/V carry?)",
    )
    ap.add_argument("--dfusion-layers", default="auto", help="D-Fusion fused blocks ('auto' or 'a-b')")
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of sections to skip (text,unet_words,symmetry,categories,speed,branches,dfusion)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="added to the result file name")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    if args.noisy_steps is not None and not 1 <= args.noisy_steps <= args.steps:
        ap.error(f"--noisy-steps must be in [1, --steps = {args.steps}], got {args.noisy_steps}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy = _policy(args.checkpoint)
    T = args.steps
    shared = (
        [int(x) for x in args.shared.split(",")]
        if args.shared
        else sorted({round(T * f) for f in (0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8)})
    )
    skip = set(filter(None, args.skip.split(",")))
    sections = {
        "text": lambda: text_rows(policy),
        "unet_words": lambda: unet_word_rows(policy, steps=T, noisy=args.noisy_steps),
        "symmetry": lambda: symmetry_rows(policy, steps=T, noisy=args.noisy_steps),
        "categories": lambda: category_rows(
            policy, steps=T, cfg=args.cfg, n=args.n, per_category=args.relation_prompts
        ),
        "speed": lambda: speed_rows(policy, steps=T, cfg=args.cfg),
        "branches": lambda: branch_rows(
            policy, steps=T, cfg=args.cfg, prompts_per_category=args.branch_prompts, shared=shared
        ),
        "dfusion": lambda: dfusion_rows(
            policy,
            steps=T,
            cfg=args.cfg,
            prompts=args.dfusion_prompts,
            n=args.dfusion_n,
            mask_threshold=args.dfusion_mask_threshold,
            layers=args.dfusion_layers,
        ),
    }
    index = policy_index(args.checkpoint)
    results = {"checkpoint": args.checkpoint, "model": index, "steps": T, "cfg": args.cfg}
    for name, fn in sections.items():
        if name in skip:
            continue
        t0 = time.perf_counter()
        with torch.no_grad() if name != "dfusion" else contextlib.nullcontext():
            rows = fn()
        print(f"\n== {name} ({time.perf_counter() - t0:.0f} s)")
        print_table(rows)
        results[name] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    path = args.out / f"toy_world{tag}-{_dt.date.today().isoformat()}.json"
    path.write_text(json.dumps({"suite": "toy_world", "env": environment(), **results}, indent=2))
    print(f"wrote {path}")
    return 0


def policy_index(source: str) -> dict:
    """The checkpoint's recipe block (``b2diffurl_toy`` in model_index.json), empty if it has none."""
    from b2diffurl.toy import toy_recipe

    return toy_recipe(source) or {}


if __name__ == "__main__":
    raise SystemExit(main())
