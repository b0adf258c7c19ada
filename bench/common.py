"""Shared benchmark machinery: timing, environment metadata, JSON results and plots.

A suite is a module ``bench/<name>.py`` exposing ``run(args) -> list[dict]`` (one dict per measured row) and
optionally ``add_args(parser)`` and ``summary(rows) -> dict``. Register it in ``SUITES`` below. Rows are plain
JSON-able dicts; the runner adds the environment (GPU name, versions, commit) and writes
``bench/results/<suite>-<device>-<date>.json``.

* A suite that appends its rows to ``args.result_rows`` as it measures them (and returns that list) keeps what it has
  finished when it is stopped (SIGTERM/SIGINT, e.g. by the device check's time limit): the runner then writes
  the partial rows with ``"complete": false``.
* ``summary(rows)`` may return ``{"targets": [target(...), ...]}``: the issue's goals as measured-vs-goal
  entries, which ``bench.device_check`` collects into its summary table.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCHEMA_VERSION = 1

SUITES = {
    "ddim_logprob": "bench.ddim_logprob",
    "kv_inject_attention": "bench.kv_inject_attention",
    "kv_inject_matrix": "bench.kv_inject_matrix",
    "arena": "bench.arena",
    "stage": "bench.stage",
    "dfusion": "bench.dfusion",
    "unet_step": "bench.unet_step",
    "scaling": "bench.scaling",
}

# bf16 dense tensor-core peaks (datasheet, TFLOP/s) for MFU; unknown devices report MFU against the matmul
# rate measured in the same run only.
PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}

# UNet2DConditionModel configs of the random-init models the suites build (weights don't change FLOPs):
# Stable Diffusion 1.5's UNet (860 M parameters, 4×64×64 latents) and a CPU-sized one with the same block layout.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)


def target(name: str, measured, goal: float, op: str = ">=", unit: str = "", note: str = "") -> dict:
    """One goal of the issue as measured vs goal: ``met`` is None when it was not measured."""
    if op not in (">=", "<="):
        raise ValueError(f"op must be '>=' or '<=', got {op!r}")
    met = None
    if measured is not None:
        measured = float(measured)
        met = measured >= goal if op == ">=" else measured <= goal
    return {
        "name": name,
        "measured": measured,
        "goal": float(goal),
        "op": op,
        "unit": unit,
        "met": met,
        "note": note,
    }


def datasheet_peak_tflops(device=None) -> float | None:
    name = device_name(device).lower()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def device_slug(device: torch.device | str | None = None) -> str:
    return "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")


def git_commit() -> str | None:
    """HEAD of the checkout this bench runs from (None outside a git checkout)."""
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001
        return None


def environment() -> dict:
    def ver(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001
            return None

    return {
        "device": device_name(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": ver("triton"),
        "diffusers": ver("diffusers"),
        "xformers": ver("xformers"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, warmup: int = 3, iters: int = 10, device=None) -> float:
    """Median milliseconds of ``fn()``: CUDA events on GPU, perf_counter on CPU."""
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if use_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def graph_time_us(fn: Callable[[], object], *, calls: int = 50, iters: int = 20) -> float:
    """Device time per call of ``fn`` in µs, from a CUDA graph of ``calls`` back-to-back calls (median replay).

    A graph replays launches without the host in the way, so this is the kernel's own time per launch, the
    number that matters inside the sampler's captured step."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    ms = time_fn(graph.replay, warmup=3, iters=iters)
    return ms * 1e3 / calls


def matmul_tflops(device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n×n×n product on random data: the ceiling MFU is read against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_fn(lambda: a @ b, warmup=3, iters=10, device=device)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_bandwidth_gbs(nbytes: int, device, *, graph: bool = False) -> float:
    """Measured device copy bandwidth (GB/s counting bytes read + written) for a buffer of ``nbytes``.

    ``graph``: device time from a CUDA graph of back-to-back copies (what a kernel timed the same way is
    compared with; a single small copy timed with events mostly measures the launch)."""
    src = torch.empty(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if graph:
        ms = graph_time_us(lambda: dst.copy_(src), calls=20, iters=10) / 1e3
    else:
        ms = time_fn(lambda: dst.copy_(src), device=device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def result_path(suite: str, out_dir: Path | str | None = None) -> Path:
    """``<out_dir>/<suite>-<device>-<date>.json`` (results are named by device and date)."""
    date = _dt.date.today().isoformat()
    return Path(out_dir or RESULTS_DIR) / f"{suite}-{device_slug()}-{date}.json"


def write_results(
    suite: str,
    rows: list[dict],
    extra: dict | None = None,
    out_dir: Path | None = None,
    *,
    complete: bool = True,
    args: dict | None = None,
) -> Path:
    path = result_path(suite, out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "suite": suite,
        "complete": complete,
        "env": environment(),
        "args": args or {},
        "rows": rows,
        **(extra or {}),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)  # a reader (or a kill mid-write) never sees half a file
    return path


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("(no rows)")
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    widths = {k: max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(fmt(r.get(k, "")).ljust(widths[k]) for k in keys))


def plot(suite: str, rows: list[dict], x: str, y: str, series: str, path: Path) -> Path | None:
    """Line plot of ``y`` vs ``x`` for each value of ``series`` (skips quietly without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r[series] for r in rows if series in r):
        pts = [(r[x], r[y]) for r in rows if r.get(series) == name and x in r and y in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=str(name))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{suite} ({device_name()})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
