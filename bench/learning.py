"""Does training raise the held-out reward? ``python -m bench.learning SUITE [--seeds N] [--jobs J]``.

Every run is a real ``b2diffurl train`` subprocess (one torch thread each, at most ``--jobs`` at once), so what is
measured is what a user gets. Each run evaluates the same held-out prompts with the same noise seeds before and
after training; the paired per-image gain and its standard error come from the run's ``metrics.jsonl``. Across
seeds we report the mean gain, its standard error over seeds, and every seed's own number.

Suites (each compares arms at the same sample budget, same held-out set, same seeds):

* ``default``    — ``b2diffurl train`` with no arguments, per seed (the README's learning claim). On the toy that
  trains the sparse brightness reward below, with the prompt-following toy reward as the held-out gold reward.
* ``prompt_reward`` — B² at the default settings on the toy's prompt-following reward (``--set reward=toy``).
* ``b2_vs_ddpo`` — B² against DDPO (its own official-style settings) on the exact, end-only toy reward.
* ``dpo_pairs``  — DPO on D-Fusion (target, base) pairs against DPO on plain best/worst pairs, same pair count.
* ``jpeg``       — B² against DDPO on DDPO's JPEG-compressibility reward (minus the kB of each image): a reward
  of the whole image that every prompt shares, so no composition is needed to raise it.
* ``brightness`` — B² against DDPO on the mean pixel value (reward ``brightness``): the sanity check that the
  trainer raises a reward which one direction improves for every prompt.
* ``sparse_brightness`` — the same with a sparse, end-only reward: 1 when the mean pixel value exceeds 0.09
  (about a third of the toy's held-out images before training), else 0. The paper's claim (B² beats DDPO on
  sparse rewards) on a reward this trainer can move. Further arms take B² apart: DDPO with B²'s PPO clip range
  and epochs, DDPO with per-prompt statistics, both together, and B² with no shared prefix (no branching) or
  with the first step shared at every stage.
* ``word``       — B² on ±brightness, the sign set by one word of the prompt (``bench/sanity_rewards.py``):
  a colour word (which the toy follows) against a relation word (which it ignores when drawing). It tells
  whether training can make the model act on that word at all.

Arguments after ``--`` go to every run, so ``-- --model DIR --set model.device=cuda`` runs a suite on a GPU with
another toy checkpoint, e.g. the SD-shaped one of ``bench/sd_shaped.py`` (its docstring has the command).

Outputs: ``<out>/<suite>.json`` (per-run and per-arm numbers, reward curves) and ``<out>/<suite>.png``.
``python -m bench.learning table`` prints the README table from every ``learning-*.json`` in ``bench/results``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import git_commit

RESULTS = Path(__file__).resolve().parent / "results"

# 1 when the mean pixel value exceeds 0.09 (a third of the toy's held-out images before training), else 0
_SPARSE_BRIGHTNESS = ["--set", "reward=brightness", "--set", "reward_options.threshold=0.09"]

# DPO (D3PO) on D-Fusion's (target, base) pairs vs on plain (reference, base) pairs, at an equal pair count
_DPO_PAIRS = {
    "dpo on d-fusion pairs": ["--algo", "dfusion", "--set", "dfusion.pairs=fused"],
    "dpo on best/worst pairs": ["--algo", "dfusion", "--set", "dfusion.pairs=plain"],
}

# arm name -> extra ``b2diffurl train`` arguments (the run seed is added per run)
SUITES: dict[str, dict[str, list[str]]] = {
    "default": {"b2 (default run)": []},
    # B² at the default settings on the toy's prompt-following reward (the default run's reward until
    # 2026-11-29; the same command then)
    "prompt_reward": {"b2 (default settings)": ["--algo", "b2", "--set", "reward=toy"]},
    "b2_vs_ddpo": {
        "b2": ["--algo", "b2", "--set", "reward=toy"],
        "ddpo": ["--algo", "ddpo", "--set", "reward=toy"],
    },
    "jpeg": {
        "b2": ["--algo", "b2", "--set", "reward=jpeg_compressibility"],
        "ddpo": ["--algo", "ddpo", "--set", "reward=jpeg_compressibility"],
    },
    "brightness": {
        "b2": ["--algo", "b2", "--set", "reward=brightness"],
        "ddpo": ["--algo", "ddpo", "--set", "reward=brightness"],
    },
    "sparse_brightness": {
        "b2": ["--algo", "b2", *_SPARSE_BRIGHTNESS],
        "ddpo": ["--algo", "ddpo", *_SPARSE_BRIGHTNESS],
        # DDPO's sampling and statistics with B²'s PPO settings: separates B²'s branching and selection from
        # its larger clip range and second inner epoch
        "ddpo with b2's clip and epochs": [
            *["--algo", "ddpo", *_SPARSE_BRIGHTNESS],
            *["--set", "train.clip_range=0.1", "--set", "train.inner_epochs=2"],
        ],
        # per-prompt statistics from the stage's own 4 rewards per prompt (no 16-reward buffer), DDPO's PPO
        # settings: with the arms around it, a 2×2 of statistics × PPO settings
        "ddpo with per-prompt stats": [
            *["--algo", "ddpo", *_SPARSE_BRIGHTNESS],
            *["--set", "ddpo.buffer_size=0", "--set", "ddpo.min_count=2"],
        ],
        # both changes together: B²'s clip range and epochs and per-prompt statistics; everything B² has except
        # branching and best/worst selection
        "ddpo with per-prompt stats and b2's clip and epochs": [
            *["--algo", "ddpo", *_SPARSE_BRIGHTNESS],
            *["--set", "train.clip_range=0.1", "--set", "train.inner_epochs=2"],
            *["--set", "ddpo.buffer_size=0", "--set", "ddpo.min_count=2"],
        ],
        # B² with no shared prefix at any stage (the toy preset shares at most one step): selection and
        # statistics without branching
        "b2 without a shared prefix": ["--algo", "b2", *_SPARSE_BRIGHTNESS, "--set", "b2.k_left=10"],
        # and the other way: the first step shared (so never trained) at every stage, not only the early ones
        "b2 sharing the first step throughout": [
            "--algo",
            "b2",
            *_SPARSE_BRIGHTNESS,
            "--set",
            "b2.k_right=9",
        ],
    },
    "word": {
        "colour word": ["--algo", "b2", "--set", "reward=python:bench.sanity_rewards:colour_brightness"],
        "relation word": ["--algo", "b2", "--set", "reward=python:bench.sanity_rewards:relation_brightness"],
    },
    "dpo_pairs": _DPO_PAIRS,
    # the same two arms on the dense brightness reward (mean pixel value): a reward the policy-gradient
    # trainers raise on this toy, so it tells whether DPO training moves anything at all, and which pairs
    # move it more
    "dpo_pairs_brightness": {arm: [*args, "--set", "reward=brightness"] for arm, args in _DPO_PAIRS.items()},
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise_run(metrics: list[dict]) -> dict:
    """Held-out before/after, the paired gain (recomputed from the stored per-image rewards), the curve, and the
    paired gain at every later evaluation (``eval.every``): ``gain_curve`` = [(stage, gain, s.e.), ...]."""
    evals = [m for m in metrics if m.get("kind") == "eval" and "rewards" in m]
    stages = [m for m in metrics if m.get("kind") == "stage"]
    out: dict = {
        "stages": len(stages),
        "train_reward_curve": [m.get("reward_mean") for m in stages],
        "eval_curve": [(m["stage"], m["reward_mean"]) for m in evals],
    }
    if len(evals) >= 2 and len(evals[0]["rewards"]) == len(evals[-1]["rewards"]):
        from b2diffurl.report import paired_gain  # the trainer's own paired comparison

        before = evals[0]["rewards"]
        curve = [
            (m["stage"], paired_gain(before, m["rewards"]))
            for m in evals[1:]
            if len(m["rewards"]) == len(before)
        ]
        out.update(
            heldout_before=evals[0]["reward_mean"],
            heldout_after=evals[-1]["reward_mean"],
            **curve[-1][1],  # the last evaluation: gain, gain_se, n_better, n_worse
            n_images=len(before),
            per_image_gain=_differences(evals[-1]["rewards"], before),
            gain_curve=[(stage, g["gain"], g["gain_se"]) for stage, g in curve],
        )
        gold_before, gold_after = evals[0].get("gold_rewards"), evals[-1].get("gold_rewards")
        if gold_before and gold_after and len(gold_before) == len(gold_after):
            # the run's gold reward (on the toy: the prompt-following reward it was not trained on), same images
            g = paired_gain(gold_before, gold_after)
            out.update(
                gold_before=_number(evals[0]["gold_mean"]),
                gold_after=_number(evals[-1]["gold_mean"]),
                gold_gain=g["gain"],
                gold_gain_se=g["gain_se"],
                per_image_gold_gain=_differences(gold_after, gold_before),
            )
    return out


def _number(v) -> float:
    """A logged number: metrics.jsonl stores NaN as null."""
    return float("nan") if v is None else float(v)


def _differences(after: list, before: list) -> list[float]:
    """Per-image after − before; NaN where either score is missing (null) or not finite."""
    return [_number(a) - _number(b) for a, b in zip(after, before)]


def _finite_mean(values) -> float:
    kept = [v for v in map(_number, values) if math.isfinite(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def run_one(args: list[str], seed: int, out_dir: Path, log_path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "b2diffurl.cli",
        "train",
        *args,
        "--set",
        f"seed={seed}",
        "--out",
        str(out_dir),
    ]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    shown = [*cmd[1:-1], "RUN_DIR"]  # no machine path in committed results
    res = {"cmd": " ".join(shown), "seed": seed, "rc": rc, "wall_s": round(wall, 1)}
    res.update(summarise_run(read_metrics(out_dir)))
    return res


def _over_seeds(runs: list[dict], key: str) -> dict:
    """``key`` ("gain" or "gold_gain") over runs: its mean with the s.e. across seeds, the pooled per-image
    comparison (``per_image_<key>``), and each seed's own (value, s.e.)."""
    from b2diffurl.report import mean_se

    mean, se_seeds = mean_se([r[key] for r in runs])
    per_image = [_number(x) for r in runs for x in r[f"per_image_{key}"]]
    pooled, se_pool = mean_se([x for x in per_image if math.isfinite(x)])  # images without a score left out
    return {
        "mean": mean,
        "se_over_seeds": se_seeds,
        "pooled": pooled,
        "pooled_se": se_pool,
        "per_seed": [(r["seed"], r[key], r[f"{key}_se"]) for r in runs],
    }


def pool_arm(runs: list[dict]) -> dict:
    """Mean of the per-seed paired gains with its s.e. across seeds, plus the pooled per-image comparison; the
    same for the held-out gold reward when every run logged it."""
    ok = [r for r in runs if "gain" in r]
    if not ok:
        return {"seeds": 0}
    k = len(ok)
    g = _over_seeds(ok, "gain")
    out = {
        "seeds": k,
        "gain_mean": g["mean"],
        "gain_se_over_seeds": g["se_over_seeds"],
        "pooled_gain": g["pooled"],
        "pooled_gain_se": g["pooled_se"],
        "per_seed": g["per_seed"],
        "seeds_above_3se": sum(r["gain"] >= 3 * r["gain_se"] for r in ok),
        "before_mean": _finite_mean(r["heldout_before"] for r in ok),
        "after_mean": _finite_mean(r["heldout_after"] for r in ok),
        "wall_s_mean": sum(r["wall_s"] for r in ok) / k,
    }
    if all("gold_gain" in r for r in ok):
        gold = _over_seeds(ok, "gold_gain")
        out.update({f"gold_{name}": v for name, v in gold.items()})
        out["gold_before_mean"] = _finite_mean(r["gold_before"] for r in ok)
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    runs = [
        (i, arm, j, run)
        for i, (arm, data) in enumerate(result["arms"].items())
        for j, run in enumerate(data["runs"])
    ]
    with_gain = any(run.get("gain_curve") for *_, run in runs)
    fig, axes = plt.subplots(1, 2 if with_gain else 1, figsize=(12 if with_gain else 7, 4), squeeze=False)
    ax = axes[0, 0]
    for i, arm, j, run in runs:
        curve = [c for c in run.get("train_reward_curve", []) if c is not None]
        ax.plot(curve, color=f"C{i}", alpha=0.7, label=arm if j == 0 else None)
    ax.set_xlabel("stage")
    ax.set_ylabel("training reward (stage mean)")
    ax.set_title(f"bench.learning {result['suite']}: training reward")
    ax.legend()
    if with_gain:  # the measure: paired held-out gain at every evaluation, ± its standard error
        ax = axes[0, 1]
        for i, arm, j, run in runs:
            pts = [(0, 0.0, 0.0), *run.get("gain_curve", [])]
            ax.errorbar(
                [p[0] + 0.08 * j for p in pts],  # seeds side by side
                [p[1] for p in pts],
                yerr=[p[2] for p in pts],
                color=f"C{i}",
                alpha=0.8,
                capsize=3,
                marker="o",
                label=arm if j == 0 else None,
            )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("stage")
        ax.set_ylabel("held-out paired gain ± s.e.")
        ax.set_title("held-out gain, one line per seed")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def toy_version() -> str:
    """Which embedded toy checkpoint the runs used: the version that starts its recipe note (``v3 phase 2 ...``)."""
    from b2diffurl.toy import toy_recipe

    note = (toy_recipe("toy") or {}).get("note", "")
    return note.split()[0] if note.strip() else "unknown"


def train_option(extra: list[str], *, flag: str | None = None, key: str | None = None) -> str | None:
    """The last value the extra ``b2diffurl train`` arguments give as ``FLAG VALUE`` or ``--set KEY=VALUE``."""
    value = None
    for a, b in zip(extra, extra[1:]):
        if flag is not None and a == flag:
            value = b
        elif key is not None and a == "--set" and b.startswith(f"{key}="):
            value = b.split("=", 1)[1]
    return value


def model_label(extra: list[str]) -> str:
    """What the runs trained: the embedded toy's version, ``sd_shaped-<size>`` for a bench/sd_shaped.py folder,
    else the folder's name."""
    from b2diffurl.toy import toy_recipe

    path = train_option(extra, flag="--model", key="model.path") or "toy"
    if path == "toy":
        return toy_version()
    recipe = toy_recipe(path) or {}
    if "bench.sd_shaped" in recipe.get("command", ""):
        return f"sd_shaped-{recipe.get('size', '?')}"
    return Path(path).name


def run_device(extra: list[str]) -> str:
    """The device label of the runs (``model.device``; 'auto' is CUDA when there is one, as in the trainer)."""
    import torch

    from bench.common import device_name

    dev = train_option(extra, key="model.device") or "auto"
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return device_name(dev) if dev.startswith("cuda") else f"cpu-{platform.machine()}-1threads"


def run_suite(
    suite: str, seeds: list[int], jobs: int, out: Path, extra: list[str], keep: bool, only=None
) -> dict:
    arms = {arm: args for arm, args in SUITES[suite].items() if only is None or arm in only}
    work = Path(tempfile.mkdtemp(prefix=f"learning-{suite}-"))
    tasks = [(arm, args + extra, s) for arm, args in arms.items() for s in seeds]

    def go(task):
        arm, args, seed = task
        tag = f"{arm.replace(' ', '_').replace('/', '-')}-seed{seed}"
        res = run_one(args, seed, work / tag, work / f"{tag}.log")
        print(
            f"[{suite}] {arm} seed {seed}: rc {res['rc']}, "
            + (f"gain {res['gain']:+.4f} ± {res['gain_se']:.4f}" if "gain" in res else "no paired eval")
            + "".join(f"; stage {st}: {g:+.4f} ± {se:.4f}" for st, g, se in res.get("gain_curve", [])[:-1])
            + f", {res['wall_s']:.0f} s",
            flush=True,
        )
        return arm, res

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        results = list(ex.map(go, tasks))
    by_arm: dict[str, list[dict]] = {arm: [] for arm in arms}
    for arm, res in results:
        by_arm[arm].append(res)
    result = {
        "suite": suite,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {jobs} runs at once, 1 torch thread each",
        # the shape bench.results_table reads
        "env": {
            "device": run_device(extra),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "commit": git_commit(),
        },
        "toy": model_label(extra),
        "extra_args": extra,
        "wall_s": round(time.perf_counter() - t0, 1),
        "arms": {arm: {"summary": pool_arm(runs), "runs": runs} for arm, runs in by_arm.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"learning-{suite}.json"
    path.write_text(json.dumps(result, indent=1))
    plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"run directories kept in {work}")
    return result


BEGIN = "<!-- learning-table:begin (generated by python -m bench.learning table --write; do not edit) -->"
END = "<!-- learning-table:end -->"


def table(results_dir: Path = RESULTS) -> str:
    """Markdown table of every committed learning result (the README's learning section)."""
    lines = [
        "| suite | toy | arm | seeds | held-out before → after | gain, mean over seeds ± s.e. "
        "| gain, all images pooled ± s.e. | seeds with gain ≥ 3 s.e. | gold reward change, pooled ± s.e. "
        "| wall / run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(results_dir.glob("learning-*.json")):
        res = json.loads(path.read_text())
        toy = res.get("toy", "v2")  # results written before the version was recorded ran on v2
        device = res.get("env", {}).get("device", "cpu")
        if not device.startswith("cpu"):
            toy = f"{toy} on {device}"
        for arm, data in res["arms"].items():
            s = data["summary"]
            if not s.get("seeds"):
                lines.append(f"| {res['suite']} | {toy} | {arm} | 0 | – | – | – | – | – | – |")
                continue
            se = s["gain_se_over_seeds"]
            over_seeds = f"{s['gain_mean']:+.4f} ± {se:.4f}" if math.isfinite(se) else "– (1 seed)"
            gold = f"{s['gold_pooled']:+.4f} ± {s['gold_pooled_se']:.4f}" if "gold_pooled" in s else "–"
            lines.append(
                f"| {res['suite']} | {toy} | {arm} | {s['seeds']} | {s['before_mean']:.3f} → {s['after_mean']:.3f} "
                f"| {over_seeds} | {s['pooled_gain']:+.4f} ± {s['pooled_gain_se']:.4f} "
                f"| {s['seeds_above_3se']}/{s['seeds']} | {gold} | {s['wall_s_mean']:.0f} s |"
            )
    return "\n".join(lines)


def write_readme_table(readme: Path = RESULTS.parents[1] / "README.md") -> None:
    """Replace the block between the learning-table markers in README.md with :func:`table`."""
    from bench.results_table import render_readme

    readme.write_text(render_readme(readme.read_text(), table(), BEGIN, END))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.learning",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("suite", choices=[*SUITES, "table"])
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (run seeds 0..N-1 offset by --seed0)")
    p.add_argument("--seed0", type=int, default=42)
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each uses one torch thread)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the run directories (printed at the end)")
    p.add_argument("--write", action="store_true", help="table: also replace README's learning table")
    p.add_argument(
        "--arms",
        default="",
        help="comma list: run only these arms of the suite (e.g. ddpo, when the b2 arm is the default suite)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    a.extra = argv[cut + 1 :]  # after --: more train arguments for every arm
    if a.suite == "table":
        if a.write:
            write_readme_table()
        print(table(a.out))
        return 0
    if a.seeds < 1 or a.jobs < 1:
        p.error("--seeds and --jobs must be >= 1")
    only = [x.strip() for x in a.arms.split(",") if x.strip()] or None
    unknown = sorted(set(only or []) - set(SUITES[a.suite]))
    if unknown:
        p.error(f"--arms: {', '.join(unknown)} not in suite {a.suite} (arms: {', '.join(SUITES[a.suite])})")
    run_suite(a.suite, [a.seed0 + i for i in range(a.seeds)], a.jobs, a.out, a.extra, a.keep, only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
