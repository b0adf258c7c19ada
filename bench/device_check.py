"""``python -m bench.device_check``: every bench suite on its device shapes, then one summary table.

Called by ``bench/device_check.sh`` (which installs the package and runs the GPU tests first); usable alone on
a machine where the package is installed. Each suite runs in its own process (``python -m bench SUITE``) with
its baselines in the same run, under a time limit: the suite's own budget, cut to what is left before the
overall ``--deadline``. A suite past its limit gets SIGTERM, writes the rows it finished (``"complete":
false``), and is killed 20 s later if it has not. Suites that no longer fit are listed as not run. Suites run in
the order of ``PLAN`` (most important first), so a short lease still measures the kernels.

Writes ``<suite>-<device>-<date>.json`` per suite (``python -m bench`` does) and
``summary-<device>-<date>-<hhmm>.md`` — measured vs goal per target, pass/fail, and each suite's status — into
``--out`` (default ``$OUT`` when set, else bench/results/). The summary is rewritten after every suite, so a
run stopped from outside still leaves the table of what finished.

``--dry-run``: tiny shapes on CPU (Triton under its interpreter), for tests/test_device_check.py: the script,
the JSON schema and the summary are exercised without a GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.results_table import targets_of

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    suite: str
    args: list[str]
    budget_s: float  # wall-clock limit of the suite on the device, compiles included
    min_s: float = 20.0  # not started with less than this left
    extra_env: dict = field(default_factory=dict)


# Device shapes (SD 1.5 at 512²: latents 4×64×64, 8 heads, CFG batch 2×8), baselines in the same run.
DEVICE_PLAN = [
    Step(
        "ddim_logprob",
        ["--n", "16,1280", "--dtypes", "bf16", "--modes", "fwd,fwd+bwd", "--compile", "--launch-n", "16,64"],
        100,
    ),
    # correctness first: every tile × mask kind × head-dim split against an fp32 oracle, faults pinned per case
    Step("kv_inject_matrix", ["--workers", "12"], 90),
    Step(
        "kv_inject_attention",
        ["--shapes", "0,1,2", "--dtypes", "bfloat16", "--batch", "16", "--iters", "10"],
        75,
    ),
    Step("unet_step", ["--model", "sd15", "--images", "16", "--iters", "10"], 160, min_s=60),
    Step("arena", ["--prompts", "64", "--rows", "320", "1280", "--iters", "5"], 40),
    Step("stage", ["--models", "sd15", "--prompts", "4", "--branches", "5", "--steps", "20"], 150, min_s=60),
    Step("dfusion", ["--steps", "20"], 100, min_s=40),
]

# CPU dry run: the same suites at toy sizes, Triton interpreted (exercises the plumbing, measures nothing).
DRY_PLAN = [
    Step(
        "ddim_logprob",
        ["--n", "2", "--latent", "2,4,4", "--dtypes", "fp32", "--modes", "fwd,fwd+bwd", "--compile"]
        + ["--compile-backend", "aot_eager", "--iters", "1", "--cpu-timer", "wall"],
        120,
    ),
    Step(
        "kv_inject_attention",
        ["--shapes", "40:1:16", "--dtypes", "float32", "--batch", "2", "--iters", "1", "--warmup", "0"],
        120,
    ),
    Step(
        "unet_step",
        ["--model", "tiny", "--images", "1", "--iters", "1", "--warmup", "0", "--no-compile"],
        120,
    ),
    Step("arena", ["--prompts", "2", "--rows", "8", "--iters", "1"], 120),
    Step("kv_inject_matrix", ["--workers", "2"], 120),  # CPU: the quick cases
]


def _slug() -> str:
    from bench.common import device_slug

    return device_slug()


def _today() -> str:
    return _dt.date.today().isoformat()


def _newest(out: Path, suite: str, since: float) -> Path | None:
    files = [p for p in out.glob(f"{suite}-*.json") if p.stat().st_mtime >= since - 1]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def run_suite(step: Step, out: Path, limit_s: float, log) -> dict:
    """Run one suite in its own process group under ``limit_s``; returns its status entry."""
    cmd = [sys.executable, "-m", "bench", step.suite, "--out", str(out), "--no-plot", *step.args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.extra_env}
    print(f"\n=== {step.suite} (limit {limit_s:.0f} s): {' '.join(cmd[2:])}", file=log, flush=True)
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    status = "ok"
    try:
        proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        status = "stopped at its time limit"
        os.killpg(proc.pid, signal.SIGTERM)  # the runner writes the rows it finished
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "killed at its time limit (no rows written)"
    wall = time.time() - t0
    if proc.returncode not in (0, 124) and status == "ok":
        status = f"failed (exit {proc.returncode}; see the log)"
    path = _newest(out, step.suite, t0)
    entry = {
        "suite": step.suite,
        "status": status,
        "wall_s": round(wall, 1),
        "json": path.name if path else None,
    }
    if path:
        data = json.loads(path.read_text())
        entry["complete"] = data.get("complete")
        entry["rows"] = len(data.get("rows", []))
        entry["targets"] = targets_of(data)  # stored by the suite, or derived from its rows
    print(f"=== {step.suite}: {status} in {wall:.0f} s", file=log, flush=True)
    return entry


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def write_summary(path: Path, entries: list[dict], header: dict) -> None:
    lines = [f"# Device check — {header['device']} — {header['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k not in ("device", "date")]
    lines += [
        "",
        "## Targets",
        "",
        "| suite | target | measured | goal | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        for t in e.get("targets", []):
            result = {True: "pass", False: "**miss**", None: "not measured"}[t.get("met")]
            unit = t.get("unit") or ""
            note = f" ({t['note']})" if t.get("note") else ""
            measured = _fmt(t.get("measured")) + (unit if t.get("measured") is not None else "")
            lines.append(
                f"| {e['suite']} | {t['name']}{note} | {measured} | {t['op']} {_fmt(t['goal'])}{unit} | {result} |"
            )
    lines += [
        "",
        "## Suites",
        "",
        "| suite | status | wall s | rows | complete | file |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        lines.append(
            f"| {e['suite']} | {e['status']} | {_fmt(e.get('wall_s'))} | {_fmt(e.get('rows'))} | "
            f"{_fmt(e.get('complete'))} | {_fmt(e.get('json'))} |"
        )
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def suite_limit(plan: list[Step], i: int, left: float, focused: bool) -> float:
    """Seconds suite ``i`` may run with ``left`` seconds to the deadline.

    A full check caps each suite at its planned budget, so a short lease still reaches the later suites. A
    focused call (``--suites``, e.g. a second call for the suites the first one could not finish) gives each
    suite all that is left except the minimum start time of the suites after it.
    """
    if not focused:
        return min(plan[i].budget_s, left)
    later = sum(s.min_s for s in plan[i + 1 :])
    return max(min(plan[i].min_s, left), left - later)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.device_check", description=__doc__)
    p.add_argument("--out", default=None, help="output directory (default $OUT, else bench/results)")
    p.add_argument("--deadline", type=float, default=None, help="unix time by which everything must end")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for all suites (without --deadline)")
    p.add_argument(
        "--suites",
        default=None,
        help="comma list: run only these suites (in plan order), each with all the time left but the minimum "
        "start time of the ones after it (a full check caps each suite at its planned budget)",
    )
    p.add_argument("--dry-run", action="store_true", help="tiny CPU shapes, Triton interpreted")
    p.add_argument("--log", default=None, help="append suite output to this file (default: stdout)")
    p.add_argument("--note", action="append", default=[], help="KEY=VALUE lines for the summary header")
    p.add_argument("--stamp", default=None, help="date-time part of the summary's name (default: now, UTC)")
    args = p.parse_args(argv)

    out = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline or (time.time() + args.budget)
    plan = DRY_PLAN if args.dry_run else DEVICE_PLAN
    if args.suites:
        wanted = args.suites.split(",")
        unknown = sorted(set(wanted) - {s.suite for s in plan})
        if unknown:
            print(f"unknown suite(s) {unknown}; choose from {[s.suite for s in plan]}", file=sys.stderr)
            return 2
        plan = [s for s in plan if s.suite in wanted]
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    slug = _slug()
    stamp = args.stamp or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d-%H%M")
    summary = out / f"summary-{slug}-{stamp}.md"
    header = {
        "device": slug,
        "date": _today(),
        "mode": "dry run (CPU, interpreter)" if args.dry_run else "device",
    }
    header.update(dict(kv.split("=", 1) for kv in args.note if "=" in kv))
    log = open(args.log, "a") if args.log else sys.stdout  # noqa: SIM115 - closed below
    entries: list[dict] = []
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    try:
        for i, step in enumerate(plan):
            left = deadline - time.time()
            if stop or left < step.min_s:
                why = (
                    f"received {stop[0]}"
                    if stop
                    else f"not enough time left ({left:.0f} s < {step.min_s:.0f} s)"
                )
                entries.append({"suite": step.suite, "status": f"not run: {why}"})
            else:
                entries.append(
                    run_suite(step, out, suite_limit(plan, i, left, focused=bool(args.suites)), log)
                )
            write_summary(summary, entries, header)
    finally:
        if log is not sys.stdout:
            log.close()
    print(summary.read_text())
    print(f"wrote {summary}")
    unfinished = [
        e["suite"] for e in entries if e.get("complete") is not True and not e["status"].startswith("failed")
    ]
    if unfinished and not args.dry_run:
        print(
            "not finished: "
            + ", ".join(unfinished)
            + f"; a second call for them: bash bench/device_check.sh --suites {','.join(unfinished)} --no-tests"
        )
    failed = [e for e in entries if e["status"].startswith(("failed", "killed"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
