"""``python -m bench.word_signal``: how much does the denoising loss reward knowing each word of a toy prompt?

Every UNet we trained on the toy world learns colours, shapes and counts but draws "A left of B" as often as "A
right of B" (``bench.toy_world``, ``bench.coord_toy``). This asks whether the training objective pays for the
relation word at all, with no model: the best possible denoiser, computed from the data.

For a prompt p and a swap q of one of its words (left↔right, a colour, a shape, two↔three; the swaps of
``bench.toy_world``), render N reference scenes of each. A denoiser that knows the word predicts the posterior
mean of the clean image given the noised one over p's scenes; one that does not know it, over p's and q's
scenes together (equal prior). The word's **gain** at timestep t is the mean squared error of the second minus
that of the first, on fresh scenes of p noised to t (pixels in [-1, 1], the toy latent's values; the latent
is a lossless reshuffle of them). It is the most that learning the word can lower the x₀ loss at t, so a gain
near zero means the loss barely rewards the word there. ``vs_colour`` divides by the colour swap's gain on the
same prompts. ``change_vs_colour`` is how far the best denoiser's prediction moves when the word is swapped,
against a colour swap: the ratio ``bench.toy_world``'s ``unet_words`` reports for the trained UNet.

The posterior over N samples is exact for that finite set and close to the true one where the noise is large
(the layout decisions); where it is small the finite set overfits, so each row also gives the gain with N/4
references (``gain_quarter``) and ``ess``, the effective number of references behind the estimate (1/Σw², median over
test scenes): rows where it is near 1 (the posterior has collapsed onto the nearest reference) or where the two
gains differ much should not be read.
Timesteps are those of the toy's 10-step DDIM schedule. Results go to
``bench/results/word_signal[-TAG]-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, environment, print_table


def posterior_weights(x_t: torch.Tensor, refs: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Posterior probabilities [B, R] of each row of ``refs`` [R, D] given ``x_t`` [B, D], when x₀ is uniform
    over the rows and x_t = √ᾱ x₀ + √(1−ᾱ) ε, ε ~ N(0, I): the softmax of −‖x_t − √ᾱ r‖² / 2(1−ᾱ)."""
    a = float(alpha_bar)
    if not 0.0 <= a < 1.0:
        raise ValueError(f"alpha_bar must be in [0, 1), got {a}")
    return torch.softmax((2 * a**0.5 * x_t @ refs.T - a * (refs * refs).sum(1)) / (2 * (1 - a)), dim=1)


def posterior_mean(x_t: torch.Tensor, refs: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """E[x₀ | x_t] [B, D] under :func:`posterior_weights`."""
    return posterior_weights(x_t, refs, alpha_bar) @ refs


def word_gain(
    x0: torch.Tensor, known: torch.Tensor, other: torch.Tensor, alpha_bar: float, noise: torch.Tensor
) -> dict:
    """The gain of knowing a word, on clean images ``x0`` [B, D] noised with ``noise`` to ``alpha_bar``.
    ``known``: the prompt's reference scenes [R, D]; ``other``: the swapped prompt's [R, D]. The denoiser that
    does not know the word uses the first R/2 rows of each (equal prior, and as many references as the one
    that knows it, so neither gains from a denser sample). Returns ``mse_knowing`` (mean squared error per value
    of the denoiser that knows the word), ``gain`` (the other's error minus it) and ``ess`` (the median
    effective number of references, 1/Σw², behind the knowing denoiser's estimate) and ``change`` (the mean L2
    distance between the predictions given the prompt and given the swapped prompt: what ``bench.toy_world``'s
    ``unet_words`` measures for a trained UNet)."""
    if known.shape != other.shape:
        raise ValueError(
            f"known and other must have one shape, got {tuple(known.shape)} and {tuple(other.shape)}"
        )
    a = float(alpha_bar)
    half = known.shape[0] // 2
    x_t = a**0.5 * x0 + (1 - a) ** 0.5 * noise
    w = posterior_weights(x_t, known, a)
    err_known = (w @ known - x0).pow(2).mean().item()
    err_blind = (posterior_mean(x_t, torch.cat([known[:half], other[:half]]), a) - x0).pow(2).mean().item()
    ess = (1 / w.pow(2).sum(1)).median().item()
    change = (w @ known - posterior_mean(x_t, other, a)).norm(dim=1).mean().item()
    return {"mse_knowing": err_known, "gain": err_blind - err_known, "ess": ess, "change": change}


def _scenes(prompt: str, n: int, seed: int, layout: str) -> torch.Tensor:
    from b2diffurl.toy.render import render

    return (render([prompt] * n, seed=seed, relation_layout=layout) * 2 - 1).flatten(1)


def signal_rows(*, prompts: int, refs: int, tests: int, layout: str, seed: int = 0) -> list[dict]:
    """One row per (category, swap, timestep): the word's gain, averaged over ``prompts`` prompts of each of the
    count and relation categories, with ``refs`` reference scenes per prompt and ``tests`` test scenes."""
    from b2diffurl.toy import model as M
    from b2diffurl.toy import prompts as P
    from bench.toy_world import _swaps

    _, ddim = M.build_schedulers()
    ddim.set_timesteps(10)
    schedule = [(int(t), float(ddim.alphas_cumprod[int(t)])) for t in ddim.timesteps]
    rng = random.Random(seed)
    rows = []
    for cat in ("count", "relation"):
        pool = P.get_prompts(f"all:{cat}")
        ps = sorted(rng.sample(pool, min(prompts, len(pool))))
        acc: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
        for i, p in enumerate(ps):
            base = seed * 1_000_003 + i * 1_009
            known = _scenes(p, refs, base + 1, layout)
            x0 = _scenes(p, tests, base + 2, layout)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(base + 3))
            for kind, q in _swaps(p).items():
                other = _scenes(q, refs, base + 4, layout)
                quarter = refs // 4
                for t, a in schedule:
                    full = word_gain(x0, known, other, a, noise)
                    small = word_gain(x0, known[:quarter], other[:quarter], a, noise)
                    acc.setdefault((kind, t), []).append((full, small))
        mean = lambda vals, key, which=0: sum(v[which][key] for v in vals) / len(vals)  # noqa: E731
        colour = {t: mean(acc[("colour", t)], "gain") for t, _ in schedule}
        colour_change = {t: mean(acc[("colour", t)], "change") for t, _ in schedule}
        for (kind, t), vals in sorted(acc.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
            gain = mean(vals, "gain")
            rows.append(
                {
                    "prompts": f"{cat} ({len(vals)})",
                    "swap": kind,
                    "t": t,
                    "alpha_bar": dict(schedule)[t],
                    "ess": mean(vals, "ess"),
                    "mse_knowing": mean(vals, "mse_knowing"),
                    "gain": gain,
                    "gain_quarter": mean(vals, "gain", 1),
                    "vs_colour": gain / colour[t] if colour[t] > 0 else float("nan"),
                    "change_vs_colour": mean(vals, "change") / colour_change[t],
                }
            )
    return rows


def main(argv=None) -> int:
    from b2diffurl.toy.render import RELATION_LAYOUTS

    ap = argparse.ArgumentParser(prog="python -m bench.word_signal", description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=12, help="prompts per category (count, relation)")
    ap.add_argument("--refs", type=int, default=4096, help="reference scenes per prompt and per swap")
    ap.add_argument("--tests", type=int, default=128, help="noised test scenes per prompt")
    ap.add_argument(
        "--relation-layout",
        choices=RELATION_LAYOUTS,
        default="any",
        help="how relation scenes are drawn (the shipped toy was trained on 'any')",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="added to the result file name")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    for name in ("prompts", "tests"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if args.refs < 4:
        ap.error("--refs must be at least 4 (the check uses a quarter of them)")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows = signal_rows(
        prompts=args.prompts, refs=args.refs, tests=args.tests, layout=args.relation_layout, seed=args.seed
    )
    print_table(rows)
    record = {
        "suite": "word_signal",
        "env": environment(),
        "relation_layout": args.relation_layout,
        "prompts_per_category": args.prompts,
        "refs": args.refs,
        "tests": args.tests,
        "seed": args.seed,
        "wall_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    path = args.out / f"word_signal{tag}-{_dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path} ({record['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
