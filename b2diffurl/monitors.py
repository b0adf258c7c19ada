"""Cheap run monitors that catch reward hacking: pure torch functions, no state, no model loading.

* :func:`prompt_diversity` - mean pairwise distance between the images of each prompt (image embeddings, or
  downsampled pixels from :func:`pixel_features` when no embedding model is loaded). Collapse to one image
  per prompt ("one style for every prompt") shows as a fall.
* :func:`image_statistics` - saturation, contrast and high-frequency energy of a batch: oversaturation and
  grid/noise artefacts, the usual look of a hacked reward, move these.
* :func:`kl_estimate` - KL(policy ‖ reference) from log-probs of the same samples under both.
* :func:`hacking_alarm` - the rule: the training reward rises while the gold reward or the diversity falls,
  by more than given margins over a window of stages.
* :class:`StageMonitor` - collects the above batch by batch while a stage samples (one ``add`` per batch,
  no host sync) and returns the stage's metrics, including its own cost.

All image inputs are [N, 3, H, W] floats in [0, 1]; results are Python floats (ready for metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Rec. 601 luma, the weights PIL's "L" conversion uses
LUMA = (0.299, 0.587, 0.114)


# -- diversity -----------------------------------------------------------------------------------------------------
def pixel_features(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """images [N, 3, H, W] -> [N, 3·size·size] area-downsampled pixels, the embedding-free stand-in for an image
    embedding: coarse layout and colour, insensitive to the pixel noise that DDIM sampling leaves."""
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.adaptive_avg_pool2d(x, size)
    return x.flatten(1)


def pairwise_distances(x: torch.Tensor, metric: str = "rms") -> torch.Tensor:
    """x [n, D] -> [n·(n−1)/2] distances between all pairs. ``rms``: ‖a − b‖ / √D (for pixels in [0, 1] this is
    in [0, 1] whatever the resolution); ``cosine``: 1 − cos(a, b) (for embeddings)."""
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    x = x.float()
    if metric == "rms":
        return (x[i] - x[j]).pow(2).mean(-1).sqrt()
    if metric == "cosine":
        u = F.normalize(x, dim=-1)
        return 1 - (u[i] * u[j]).sum(-1)
    raise ValueError(f"metric must be 'rms' or 'cosine', got {metric!r}")


def prompt_diversity(features: torch.Tensor, prompts: Sequence[str], metric: str = "rms") -> float:
    """Mean over prompts (with ≥ 2 samples) of the mean pairwise distance between that prompt's ``features``
    [N, D]. NaN when no prompt has two samples."""
    if features.shape[0] != len(prompts):
        raise ValueError(f"{features.shape[0]} feature rows for {len(prompts)} prompts")
    groups: dict[str, list[int]] = {}
    for k, p in enumerate(prompts):
        groups.setdefault(p, []).append(k)
    per_prompt = [
        float(pairwise_distances(features[idx], metric).mean()) for idx in groups.values() if len(idx) > 1
    ]
    return sum(per_prompt) / len(per_prompt) if per_prompt else math.nan


def image_diversity(
    images: torch.Tensor, prompts: Sequence[str], embeddings: torch.Tensor | None = None
) -> float:
    """:func:`prompt_diversity` of image ``embeddings`` (cosine) if given, else of :func:`pixel_features` (rms)."""
    if embeddings is not None:
        return prompt_diversity(embeddings, prompts, "cosine")
    return prompt_diversity(pixel_features(images), prompts, "rms")


# -- image statistics ------------------------------------------------------------------------------------------------
def image_statistics_per_image(images: torch.Tensor, hf_cutoff: float = 0.25) -> dict[str, torch.Tensor]:
    """Per-image statistics, each [N] fp32 on the images' device (no host sync):

    * ``brightness`` - mean luma;
    * ``saturation`` - mean HSV saturation (max − min) / max of the pixels (0 for black pixels);
    * ``contrast`` - RMS contrast, the standard deviation of luma over the image;
    * ``high_freq_energy`` - the fraction of the luma's spectral energy (mean removed) above ``hf_cutoff``
      cycles/pixel in radial frequency (Nyquist is 0.5): ~0 for smooth images, 1 for a pixel checkerboard.
    """
    x = images.float().clamp(0, 1)
    hi, lo = x.amax(1), x.amin(1)
    sat = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-12), torch.zeros_like(hi))
    w = torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)
    luma = (x * w).sum(1)  # [N, H, W]
    centred = luma - luma.mean((1, 2), keepdim=True)
    spec = torch.fft.rfft2(centred)  # half the work of fft2; the missing half mirrors the kept one
    h, wd = luma.shape[-2:]
    fy = torch.fft.fftfreq(h, device=x.device).view(-1, 1)
    fx = torch.fft.rfftfreq(wd, device=x.device).view(1, -1)
    mirrored = torch.full((wd // 2 + 1,), 2.0, device=x.device)
    mirrored[0] = 1.0
    if wd % 2 == 0:
        mirrored[-1] = 1.0  # the Nyquist column has no mirror image
    power = (spec.real.pow(2) + spec.imag.pow(2)) * mirrored
    high = (fy.pow(2) + fx.pow(2)).sqrt() > hf_cutoff
    total = power.sum((1, 2))
    hf = torch.where(total > 0, (power * high).sum((1, 2)) / total.clamp_min(1e-30), torch.zeros_like(total))
    return {
        "brightness": luma.mean((1, 2)),
        "saturation": sat.mean((1, 2)),
        "contrast": luma.std((1, 2), correction=0),
        "high_freq_energy": hf,
    }


def image_statistics(images: torch.Tensor, hf_cutoff: float = 0.25) -> dict[str, float]:
    """Batch means of :func:`image_statistics_per_image`."""
    return {k: float(v.mean()) for k, v in image_statistics_per_image(images, hf_cutoff).items()}


# -- KL to the reference policy ----------------------------------------------------------------------------------
def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor) -> dict[str, float]:
    """KL(π ‖ π_ref) per element from samples drawn from π, with ``logp`` = log π(x) and ``logp_ref`` =
    log π_ref(x) of the same samples (any matching shape, e.g. [N, steps]: the result is per step).

    ``kl_k1`` = mean(log π − log π_ref), unbiased but noisy and can go negative; ``kl_k3`` = mean((r − 1) − log r)
    with r = π_ref / π, unbiased and never negative (Schulman's k3, the estimator GRPO uses)."""
    if logp.shape != logp_ref.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and logp_ref {tuple(logp_ref.shape)} must match")
    log_r = (logp_ref.double() - logp.double()).flatten()
    return {"kl_k1": float((-log_r).mean()), "kl_k3": float((log_r.exp() - 1 - log_r).mean())}


# -- the alarm -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class HackingAlarm:
    """``fired``; ``changes``: relative change over the window of each watched series (None when it could not
    be measured); ``stages``: the window; ``message``: one line with the numbers (empty when silent)."""

    fired: bool
    changes: dict[str, float | None]
    stages: tuple[int, int] | None
    message: str = ""


def _line_fit(stages: Sequence[float], values: Sequence[float], min_points: int):
    """Least squares through the finite (stage, value) points: (xs, ys, mean x, mean y, Sxx, slope), or None
    for fewer than ``min_points`` points or a single stage."""
    pts = [(float(s), float(v)) for s, v in zip(stages, values) if v is not None and math.isfinite(float(v))]
    if len(pts) < min_points:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((a - mx) ** 2 for a in xs)
    if sxx == 0:
        return None
    return xs, ys, mx, my, sxx, sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sxx


def trend_change(stages: Sequence[float], values: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares line through (stage, value): (change over the span, fitted value at the first stage).
    A fit, not the two end points, so one noisy stage neither raises nor silences the alarm. None for < 2
    finite points."""
    fit = _line_fit(stages, values, 2)
    if fit is None:
        return None
    xs, _, mx, my, _, slope = fit
    return slope * (xs[-1] - xs[0]), my + slope * (xs[0] - mx)


def trend_t(stages: Sequence[float], values: Sequence[float]) -> float | None:
    """The least-squares slope over its standard error (residual variance with n − 2 degrees of freedom): how
    many standard errors the trend lies from flat. ±inf for points exactly on a sloped line, None for fewer than
    3 finite points or a flat exact line."""
    fit = _line_fit(stages, values, 3)
    if fit is None:
        return None
    xs, ys, mx, my, sxx, slope = fit
    rss = sum((b - my - slope * (a - mx)) ** 2 for a, b in zip(xs, ys))
    se = math.sqrt(rss / (len(xs) - 2) / sxx)
    if se == 0 or se < 1e-12 * abs(slope):
        return None if slope == 0 else math.copysign(math.inf, slope)
    return slope / se


def hacking_alarm(
    history: Sequence[dict],
    *,
    window: int = 5,
    reward_rise: float = 0.02,
    gold_drop: float = 0.05,
    diversity_drop: float = 0.10,
    min_trend_t: float = 0.0,
    reward_key: str = "reward",
    gold_key: str = "gold",
    diversity_key: str = "diversity",
) -> HackingAlarm:
    """Fires when, over the last ``window`` stages of ``history`` (dicts with ``stage`` and the three keys; a
    missing or None value is skipped), the training reward's trend rises by more than ``reward_rise`` while
    the gold reward's falls by more than ``gold_drop`` or the diversity's by more than ``diversity_drop``.

    Margins are fractions of the series' fitted level at the window's first stage (|level|), so one setting
    serves rewards on any scale (CLIP ~0.3, PickScore ~20, JPEG −kB). With ``min_trend_t`` > 0 a fall of the gold
    reward or the diversity counts only when its trend also lies at least that many standard errors below flat
    (:func:`trend_t`), so stage-to-stage noise - e.g. the mix of prompts each stage draws - does not fire the
    alarm on its own. The training reward's rise needs only its margin: rising is what training is for."""
    if window < 2:
        raise ValueError(f"window must be >= 2 stages, got {window}")
    recent = list(history)[-window:]
    changes: dict[str, float | None] = {reward_key: None, gold_key: None, diversity_key: None}
    if len(recent) < window:
        return HackingAlarm(False, changes, None)
    stages = [float(h.get("stage", k)) for k, h in enumerate(recent)]
    clear: dict[str, bool] = {}
    for key in changes:
        values = [h.get(key) for h in recent]
        fit = trend_change(stages, values)
        if fit is not None:
            delta, level = fit
            changes[key] = delta / max(abs(level), 1e-12)
        t = trend_t(stages, values) if min_trend_t > 0 else None
        clear[key] = min_trend_t <= 0 or (t is not None and t <= -min_trend_t)  # a clear fall
    span = (int(stages[0]), int(stages[-1]))
    rew, gold, div = changes[reward_key], changes[gold_key], changes[diversity_key]
    falls = []
    if gold is not None and gold < -gold_drop and clear[gold_key]:
        falls.append(f"gold reward {gold:+.1%} (margin -{gold_drop:.0%})")
    if div is not None and div < -diversity_drop and clear[diversity_key]:
        falls.append(f"diversity {div:+.1%} (margin -{diversity_drop:.0%})")
    fired = rew is not None and rew > reward_rise and bool(falls)
    message = (
        f"reward hacking suspected over stages {span[0]}-{span[1]}: training reward {rew:+.1%} "
        f"(margin +{reward_rise:.0%}) while {' and '.join(falls)}"
        if fired
        else ""
    )
    return HackingAlarm(fired, changes, span, message)


# -- per-stage collection -----------------------------------------------------------------------------------------
class StageMonitor:
    """Collects one stage's monitor inputs batch by batch: ``add(images, prompts, result)`` after each scored
    batch (no host sync), then ``metrics()`` once.

    ``gold_fn(images, prompts) -> [N]``: the held-out gold reward scored on the same images (None: off).
    ``embed_fn(images) -> [N, D] | None``: image embeddings for diversity (e.g. ``Reward.image_embeddings``);
    when it is None or returns None, diversity uses :func:`pixel_features`. ``time_s`` is the wall time spent
    in ``add`` and ``metrics`` (on CUDA, ``metrics`` waits for the queued work, so the total is honest)."""

    def __init__(self, gold_fn: Callable | None = None, embed_fn: Callable | None = None):
        self.gold_fn, self.embed_fn = gold_fn, embed_fn
        self.components_: dict[str, list[torch.Tensor]] = {}
        self.gold: list[torch.Tensor] = []
        self.features: list[torch.Tensor] = []
        self.stats: dict[str, list[torch.Tensor]] = {}
        self.prompts: list[str] = []
        self.metric: str | None = None
        self.time_s = 0.0

    @torch.no_grad()
    def add(self, images: torch.Tensor, prompts: Sequence[str], result=None) -> None:
        """``result``: the batch's :class:`~b2diffurl.rewards.RewardResult` (its components are kept)."""
        t0 = time.perf_counter()
        if result is not None:
            for name, c in result.components.items():
                self.components_.setdefault(name, []).append(c.detach().float().reshape(-1))
        if self.gold_fn is not None:
            self.gold.append(
                torch.as_tensor(self.gold_fn(images, list(prompts))).detach().float().reshape(-1)
            )
        emb = self.embed_fn(images) if self.embed_fn is not None and self.metric != "rms" else None
        if self.metric is None:
            self.metric = "cosine" if emb is not None else "rms"
        self.features.append(emb.float() if emb is not None else pixel_features(images))
        for k, v in image_statistics_per_image(images).items():
            self.stats.setdefault(k, []).append(v)
        self.prompts += list(prompts)
        self.time_s += time.perf_counter() - t0

    def components(self) -> dict[str, torch.Tensor]:
        """{term: scores [N]} on the CPU, in ``add`` order (for per-term advantage aggregation)."""
        return {n: torch.cat(v).cpu() for n, v in self.components_.items()}

    def _every_rank(self):
        """(components, gold, features, prompts, statistics) of this stage's images on every process of a
        data-parallel run, in rank order (one collective: b2diffurl.distributed); this process's own in one."""
        from b2diffurl import distributed

        def cat(parts):
            return torch.cat(parts) if parts else None

        mine = (
            self.components(),
            cat(self.gold),
            cat(self.features),
            self.prompts,
            {k: torch.cat(v) for k, v in self.stats.items()},
        )
        if not distributed.world().distributed:
            return mine

        def cpu(t):  # tensors travel through the CPU (pickled): no device of another rank in this process
            return None if t is None else t.cpu()

        ranks = distributed.all_gather_object(
            (mine[0], cpu(mine[1]), cpu(mine[2]), mine[3], {k: cpu(v) for k, v in mine[4].items()})
        )
        names = list(dict.fromkeys(n for r in ranks for n in r[0]))
        comps = {n: torch.cat([r[0][n] for r in ranks if n in r[0]]) for n in names}
        gold, feats = (cat([r[i] for r in ranks if r[i] is not None]) for i in (1, 2))
        keys = list(dict.fromkeys(k for r in ranks for k in r[4]))
        stats = {k: torch.cat([r[4][k] for r in ranks if k in r[4]]) for k in keys}
        return comps, gold, feats, [p for r in ranks for p in r[3]], stats

    def metrics(self) -> dict[str, float]:
        """``reward_<term>_mean`` / ``_std`` per term (multi-rewards only), ``gold_mean``, ``gold_std``,
        ``diversity``, the image statistics' means and ``monitor_time_s``."""
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        comps, gold, feats, prompts, stats = self._every_rank()
        if len(comps) > 1:
            for n, v in comps.items():
                out[f"reward_{n}_mean"] = float(v.mean())
                out[f"reward_{n}_std"] = float(v.std()) if v.numel() > 1 else 0.0
        if gold is not None:
            g = gold.cpu()
            out["gold_mean"] = float(g.mean())
            out["gold_std"] = float(g.std()) if g.numel() > 1 else 0.0
        if feats is not None:
            out["diversity"] = prompt_diversity(feats, prompts, self.metric or "rms")
        out.update({k: float(v.mean()) for k, v in stats.items()})
        self.time_s += time.perf_counter() - t0
        out["monitor_time_s"] = self.time_s
        return out
