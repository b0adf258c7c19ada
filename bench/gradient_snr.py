"""How much signal is in one sample's policy gradient? A diagnostic for "training runs but nothing improves".

Samples one stage with the real trainer (toy world by default), then computes every trained sample's gradient of
``-A · Σ_steps log π`` (the PPO gradient at ratio 1) one sample at a time and estimates, from running sums only,

* ``signal²`` = |E g|²  — unbiased: (|Σ g_i|² − Σ |g_i|²) / (n (n − 1));
* ``noise²``  = E|g − E g|² = mean |g_i|² − signal²;

and reports ``signal² / noise²`` (overall and per DDIM step). ``noise² / signal²`` is roughly how many samples one
update must average before its direction is more signal than noise; the standard error of the ratio estimate is
about sqrt(2) / n, so small n can only bound it from above.

    python bench/gradient_snr.py --k 14 --prompts 32 --branches 8            # B² selection at split step T - k
    python bench/gradient_snr.py --estimator ddpo --prompts 24 --branches 8  # every row, z-score advantages

Slow by design (one backward per sample and step): ~1 s per sample·step-batch on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--estimator",
        choices=["b2", "ddpo"],
        default="b2",
        help="b2: best/worst branch selection; ddpo: every row with its clamped z-score (default b2)",
    )
    ap.add_argument(
        "--k", type=int, default=14, help="branched (trained) steps; split step = T - k (default 14)"
    )
    ap.add_argument(
        "--prompts", type=int, default=32, help="prompts (branch groups) in the stage (default 32)"
    )
    ap.add_argument("--branches", type=int, default=8, help="branches per prompt (default 8)")
    ap.add_argument(
        "--lora", choices=["on", "off"], default="off", help="LoRA adapters or the full UNet (default off)"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="write the result JSON here")
    a = ap.parse_args(argv)
    if a.prompts < 1 or a.branches < 2 or a.k < 1:
        ap.error("need --prompts >= 1, --branches >= 2, --k >= 1")
    torch.set_num_threads(a.threads)

    from b2diffurl import config as C
    from b2diffurl.algos.ppo import clamp_advantages
    from b2diffurl.trainer import Trainer

    over = {
        "stages": 1,
        "sample.prompts_per_stage": a.prompts,
        "sample.branches": a.branches,
        "b2.k_left": a.k,
        "b2.k_right": a.k,
        "eval.prompts": "none",
        "progress": False,
        "reward": "toy",  # the prompt-following toy reward this bench is about, whatever the preset trains
        "model.lora": a.lora,
        "out": tempfile.mkdtemp(prefix="b2diffurl-gradient-snr-"),
    }
    for kv in a.set:
        key, sep, value = kv.partition("=")
        if not sep:
            ap.error(f"--set expects KEY=VALUE, got {kv!r}")
        over[key] = yaml.safe_load(value)
    cfg = C.load_config(overrides=over)
    tr = Trainer(cfg)
    algo, ctx = tr.algo, tr.ctx
    if a.estimator == "ddpo":
        clip = cfg.train.adv_clip
        algo.select = lambda z, stage: (np.arange(z.size), clamp_advantages(z, clip), {"n_selected": z.size})
    data = algo.sample_stage(0)
    shutil.rmtree(over["out"], ignore_errors=True)  # nothing of the throwaway run is kept
    ids, steps, cond_table = data.payload
    n, K = int(ids.numel()), int(steps.numel())
    if n < 2:
        raise SystemExit(f"only {n} trained sample(s) in this stage: nothing to compare; raise --prompts")
    P = sum(p.numel() for p in ctx.params)
    S = torch.zeros(K, P, dtype=torch.float64)
    sq = torch.zeros(K, dtype=torch.float64)
    S_all, sq_all = torch.zeros(P, dtype=torch.float64), 0.0
    t0 = time.perf_counter()
    for c, i in enumerate(ids.tolist()):
        g_i = torch.zeros(P, dtype=torch.float64)
        for j, step in enumerate(steps.tolist()):
            for p in ctx.params:
                p.grad = None
            b = algo.arena.gather(torch.tensor([i]), torch.tensor([step]), device=ctx.device)
            lp = ctx.sampler.batch_logprob(b, cond_table)
            (-(b.advantage.to(lp) * lp).sum()).backward()
            g = torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double().cpu()
                    for p in ctx.params
                ]
            )
            S[j] += g
            sq[j] += g @ g
            g_i += g
        S_all += g_i
        sq_all += float(g_i @ g_i)
        print(f"\r{c + 1}/{n} samples", end="", flush=True)
    print()

    def ratio(s, q):
        sig2 = (float(s @ s) - float(q)) / (n * (n - 1))
        noise2 = float(q) / n - sig2
        return sig2 / noise2 if noise2 > 0 else float("nan")  # nan: every advantage was 0 (tied rewards)

    res = {
        "estimator": a.estimator,
        "k": a.k,
        "split_step": int(data.metrics["split_step"]),
        "prompts": a.prompts,
        "branches": a.branches,
        "lora": a.lora,
        "trainable_params": P,
        "samples": n,
        "steps": K,
        "signal2_over_noise2": ratio(S_all, sq_all),
        "ratio_standard_error": float(np.sqrt(2.0) / n),
        "per_step": {int(st): ratio(S[j], sq[j]) for j, st in enumerate(steps.tolist())},
        "stage_reward_mean": data.metrics["reward_mean"],
        "time_s": time.perf_counter() - t0,
    }
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
