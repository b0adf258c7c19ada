"""What a run reports: held-out evaluation, the paired before/after gain, image grids and the reward curve.

Every image grid of the package (training stages, ``b2diffurl sample`` / ``eval``, D-Fusion pairs) is written
by :func:`save_grid`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("b2diffurl.report")

# metric names holding wall-clock numbers: they differ between otherwise identical runs
_TIMING_SUFFIXES = ("_time_s", "_per_s", "_time")


def is_timing_key(key: str) -> bool:
    return key.endswith(_TIMING_SUFFIXES)


def _finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _non_finite_keys(record: dict) -> list[str]:
    def bad(v) -> bool:
        if isinstance(v, float):
            return not math.isfinite(v)
        if isinstance(v, (list, tuple)):
            return any(bad(x) for x in v)
        return isinstance(v, dict) and any(bad(x) for x in v.values())

    return [k for k, v in record.items() if bad(v)]


class MetricsLog:
    """``metrics.jsonl``: one JSON record per line, each line fsynced as it is written, so that a checkpoint
    can name how many lines belong to it (:meth:`truncate` drops the rest on resume)."""

    def __init__(self, path: Path, write: bool = True):
        self.path = path
        self.write = write  # False on the processes of a data-parallel run other than rank 0
        self.records: list[dict] = []
        # fed each written record, e.g. TensorBoard (log_with)
        self.mirrors: list[Callable[[dict], None]] = []

    def append(self, record: dict) -> None:
        bad = _non_finite_keys(record)
        if bad:  # JSON has no NaN/inf: write null and say so, rather than emit a file other tools reject
            log.warning("non-finite metric values written as null: %s", ", ".join(bad))
        self.records.append(record)
        if not self.write:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(_finite_or_none(record), allow_nan=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        for mirror in self.mirrors:
            mirror(record)

    def truncate(self, n_lines: int) -> None:
        """Keep the first ``n_lines`` records (those a checkpoint was saved after); later ones are redone."""
        from b2diffurl.checkpoint import atomic_write

        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        keep = lines[:n_lines]
        if len(keep) < n_lines:
            log.warning(
                "%s has %d lines, fewer than the %d the checkpoint logged", self.path, len(keep), n_lines
            )
        self.records = [json.loads(ln) for ln in keep]
        if self.write:
            atomic_write(self.path, "".join(ln + "\n" for ln in keep))

    def of_kind(self, kind: str) -> list[dict]:
        return [m for m in self.records if m.get("kind") == kind]


def mean_se(values) -> tuple[float, float]:
    """Mean of the finite values and its standard error (sample std / √n); NaN where there are too few."""
    d = np.asarray(values, dtype=np.float64)
    d = d[np.isfinite(d)]
    mean = float(d.mean()) if d.size else float("nan")
    return mean, (float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan"))


def paired_gain(before, after) -> dict:
    """Paired comparison of two evaluations of the same (prompt, seed) images: mean per-image gain, its
    standard error, and how many images got better / worse. Images without a finite reward in either
    evaluation (NaN, or null in metrics.jsonl) are left out."""
    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    d = d[np.isfinite(d)]
    gain, se = mean_se(d)
    return {
        "gain": gain,
        "gain_se": se,
        "n_better": int((d > 1e-6).sum()),
        "n_worse": int((d < -1e-6).sum()),
    }


def evaluate(
    stage: int,
    heldout: list[str],
    eval_config,
    *,
    batch_size: int,
    sampler,
    reward_fn,
    group_of: Callable[[str], str] | None,
    metrics: MetricsLog,
    gold_fn=None,
    grid_path: Path | None = None,
) -> None:
    """Log the mean reward on ``eval_config.num_prompts`` held-out prompts, sampled with a fixed noise seed
    (the same images every time) to ``metrics``.

    When the run's first evaluation covers the same images, the record carries the :func:`paired_gain`
    against it. ``group_of`` (from the prompt set) adds the mean reward per prompt group. ``gold_fn`` (the
    monitors' gold reward, when the run has one) scores the same images: ``gold_mean``, ``gold_rewards`` and,
    against the first evaluation, ``gold_gain`` / ``gold_gain_se``, so a run shows what training did to the
    reward it was not trained on. ``grid_path``: up to 32 held-out images go there as a grid, the first of the
    first process's share (the first 32 in a one-process run; the same images every evaluation, so the grids of
    a run show what training changed).
    """
    num_prompts, images_per_prompt = eval_config.num_prompts, eval_config.images_per_prompt
    first = next(iter(metrics.of_kind("eval")), None)
    if not heldout or num_prompts <= 0:
        return
    from b2diffurl.sampling import sample

    n = min(num_prompts, len(heldout))  # evenly spaced: the set may be sorted by group
    chosen = [heldout[(i * len(heldout)) // n] for i in range(n)]
    prompts = [p for p in chosen for _ in range(images_per_prompt)]
    t0 = time.perf_counter()
    # each process samples its share of the batches, every image with its own noise stream, so the numbers do
    # not depend on the number of processes; the rewards are gathered in image order
    from b2diffurl import distributed

    part = distributed.shard(len(prompts), block=batch_size)
    mine = prompts[part.start : part.stop]
    r = g = torch.zeros(0)
    if mine:
        gens = distributed.tree_generators(eval_config.seed, 0, part, sampler.device)
        res = sample(sampler.policy, mine, batch_size=batch_size, sampler=sampler, generators=gens)
        with torch.no_grad():
            r = reward_fn(res.images, mine).float().cpu()
            if gold_fn is not None:
                g = torch.as_tensor(gold_fn(res.images, mine)).detach().float().reshape(-1).cpu()
        if grid_path is not None and distributed.is_main():  # rank 0 holds the first images
            save_grid(res.images[:32], grid_path, mine[:32])
    r = distributed.all_gather_cat(r)
    rec = {
        "kind": "eval",
        "stage": stage,
        # over the finite rewards: the reward boundary turned the others into NaN (counted here)
        "reward_mean": float(r[torch.isfinite(r)].mean()),
        "reward_std": float(r[torch.isfinite(r)].std()) if int(torch.isfinite(r).sum()) > 1 else 0.0,
        "rewards_nonfinite": int((~torch.isfinite(r)).sum()),
        "n": len(prompts),
        "eval_time_s": time.perf_counter() - t0,
        "rewards": [round(v, 6) for v in r.tolist()],
    }
    if first is not None and first["stage"] != stage and len(first["rewards"]) == r.numel():
        rec.update(paired_gain(first["rewards"], rec["rewards"]))
    if gold_fn is not None:
        g = distributed.all_gather_cat(g)
        rec["gold_mean"] = float(g[torch.isfinite(g)].mean())  # NaN when no score is finite, as reward_mean
        rec["gold_rewards"] = [round(v, 6) for v in g.tolist()]
        if first is not None and first["stage"] != stage and len(first.get("gold_rewards", ())) == g.numel():
            pg = paired_gain(first["gold_rewards"], rec["gold_rewards"])
            rec["gold_gain"], rec["gold_gain_se"] = pg["gain"], pg["gain_se"]
    if group_of is not None:
        groups: dict[str, list[float]] = {}
        for p, v in zip(prompts, r.tolist()):
            groups.setdefault(group_of(p), []).append(v)
        rec.update({f"reward_{g}": float(np.mean(v)) for g, v in groups.items()})
    metrics.append(rec)


def save_grid(
    images: torch.Tensor, path: Path | str, captions: list[str] | None = None, ncol: int = 8
) -> Path:
    """Images [N, 3, H, W] in [0, 1] -> one PNG, ``ncol`` per row, 2-px white gutters; images smaller than
    96 px are enlarged by an integer factor (nearest neighbour) so toy images stay readable. ``captions``
    (one per image) go to a ``.txt`` file of the same name."""
    from PIL import Image

    imgs = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    n, _, h, w = imgs.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    canvas = torch.full((3, nrow * (h + 2), ncol * (w + 2)), 255, dtype=torch.uint8)
    for k in range(n):
        r, c = divmod(k, ncol)
        canvas[:, r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = imgs[k]
    img = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    scale = max(1, 96 // max(h, w))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    if captions is not None:
        path.with_suffix(".txt").write_text("\n".join(captions) + "\n")
    return path


def progress_bar(iterable, **tqdm_kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, **tqdm_kwargs)


def plot_reward_curve(metrics: list[dict], path: Path) -> Path | None:
    """One figure of the run per stage: training reward (mean ± std band) with the held-out reward per
    evaluation, then - where logged - the gold reward, the per-prompt diversity and the KL to the starting
    policy; stages where the hacking alarm fired are marked in every panel. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    stages = [m for m in metrics if m.get("kind") == "stage"]
    evals = [m for m in metrics if m.get("kind") == "eval"]
    extra = [
        (key, label)
        for key, label in (("gold_mean", "gold reward"), ("diversity", "diversity"), ("kl_k3", "KL to start"))
        if any(m.get(key) is not None for m in stages)
    ]
    fig, axes = plt.subplots(
        1 + len(extra), 1, figsize=(6, 2.6 * (1 + len(extra))), sharex=True, squeeze=False
    )
    axes = axes[:, 0]
    ax = axes[0]
    if stages:
        x = np.array([m["stage"] for m in stages])
        y = np.array([m["reward_mean"] for m in stages], dtype=float)
        s = np.array([m["reward_std"] for m in stages], dtype=float)
        ax.plot(x, y, label="train reward (stage mean)")
        ax.fill_between(x, y - s, y + s, alpha=0.2)
    if evals:
        ax.plot([m["stage"] for m in evals], [m["reward_mean"] for m in evals], "o-", label="held-out reward")
    ax.set_ylabel("reward")
    for a, (key, label) in zip(axes[1:], extra):
        pts = [(m["stage"], m[key]) for m in stages if m.get(key) is not None]
        a.plot([p[0] for p in pts], [p[1] for p in pts], ".-", label="training images")
        held = [(m["stage"], m[key]) for m in evals if m.get(key) is not None]
        if held:
            a.plot([p[0] for p in held], [p[1] for p in held], "o-", label="held-out images")
            a.legend(fontsize="small")
        a.set_ylabel(label)
    alarms = [m["stage"] for m in stages if m.get("hacking_alarm")]
    for a in axes:
        for k, st in enumerate(alarms):
            a.axvline(st, color="red", alpha=0.4, label="hacking alarm" if k == 0 and a is ax else None)
    ax.legend(fontsize="small")
    axes[-1].set_xlabel("stage")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize(metrics: list[dict]) -> dict:
    """Held-out reward before/after and the paired gain of the last evaluation, for the run summary (logged)."""
    evals = [m for m in metrics if m.get("kind") == "eval"]
    out: dict = {}
    if len(evals) >= 2:
        out.update(heldout_before=evals[0]["reward_mean"], heldout_after=evals[-1]["reward_mean"])
        last = evals[-1]
        if "gain" in last:
            out.update(heldout_gain=last["gain"], heldout_gain_se=last["gain_se"])
            log.info(
                "held-out reward %.4f -> %.4f: paired gain %+.4f ± %.4f (1 s.e.; %d images better, %d worse)",
                out["heldout_before"],
                out["heldout_after"],
                last["gain"],
                last["gain_se"],
                last["n_better"],
                last["n_worse"],
            )
        if "gold_gain" in last:
            out.update(heldout_gold_gain=last["gold_gain"], heldout_gold_gain_se=last["gold_gain_se"])
            num = lambda v: float("nan") if v is None else v  # noqa: E731 - NaN is stored as null
            log.info(
                "held-out gold reward (not trained on) %.4f -> %.4f: paired change %+.4f ± %.4f (1 s.e.)",
                num(evals[0]["gold_mean"]),
                num(last["gold_mean"]),
                num(last["gold_gain"]),
                num(last["gold_gain_se"]),
            )
    return out
