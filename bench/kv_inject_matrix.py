"""Suite ``kv_inject_matrix``: every tile of the K/V-injection kernel checked on the device against an fp32 oracle.

``python -m bench kv_inject_matrix [--quick] [--workers W]``

Cases: head dims 8/16 (the toy model) and 40/64/80/160 (SD 1.5) at their token counts; per head dim every tile
the autotuner may pick (``_CONFIGS_BY_HEAD_DIM``) at its own pipeline depth and at one stage; bool mask (the
exact path: one load per row, from K or K_ref) and soft mask (the fp32 blend); fp16, plus fp32 (exact dots) for
the small dims; and the autotuned launch itself. (Results from before the two-chunk head-dim split was removed also carry a ``split``
column.)

Each case runs with ``CUDA_LAUNCH_BLOCKING=1`` in a worker process, so an illegal memory access is pinned to
the case that made it: the worker dies, the case is recorded as ``crash`` with the error's last line, and a new
worker takes the rest of the shard. A case whose output differs from the oracle beyond the dtype's tolerance is
``wrong`` (a kernel that reads the wrong memory without faulting shows up here). Rows: one per case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# (D, N): the self-attention token counts the head dim meets (toy 16×16 latents; SD 1.5 at 512²)
SHAPES = ((8, 256), (16, 256), (40, 4096), (64, 1024), (80, 1024), (160, 256))
QUICK_SHAPES = ((40, 64),)
TOL = {"float16": 5e-3, "bfloat16": 4e-2, "float32": 2e-4}


def add_args(p):
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: 8 on CUDA, 2 on CPU)"
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--worker", nargs=2, metavar=("CASES", "RESULTS"), help=argparse.SUPPRESS)  # internal


def cases(quick: bool, batch: int, heads: int) -> list[dict]:
    from b2kernels._dispatch import triton_interpret
    from b2kernels.ops.kv_inject_attention.triton import _tiles_for

    out = []
    interp = triton_interpret()
    for d, n in QUICK_SHAPES if quick else SHAPES:
        dtypes = ["float16"] + (["float32"] if d <= 40 and not quick else [])
        base = dict(D=d, N=n, B=batch, H=heads)
        for dtype in dtypes:
            for binary in (True, False):
                # the tiles the autotuner may pick for this head dim, element size and mask kind
                tiles = (
                    [(32, 32, 4, 1)]
                    if interp
                    else list(_tiles_for(d, 4 if dtype == "float32" else 2, binary))
                )
                out.append(dict(base, dtype=dtype, binary=binary, config=None))  # autotuned
                for bm, bn, warps, stages in tiles:
                    for st in sorted({stages, 1}):
                        out.append(dict(base, dtype=dtype, binary=binary, config=[bm, bn, warps, st]))
    return out


def run_case(c: dict, device) -> dict:
    import torch.nn.functional as F

    from b2kernels.ops.kv_inject_attention.triton import kv_inject_attention_triton

    g = torch.Generator().manual_seed(c["D"] * 7919 + c["N"])
    dt = getattr(torch, c["dtype"])
    B, H, N, D = c["B"], c["H"], c["N"], c["D"]
    t = lambda b: torch.randn(b, H, N, D, generator=g).to(dt).to(device)  # noqa: E731
    q, k, v, kr, vr = t(B), t(B), t(B), t(1), t(1)
    m = torch.rand(B, N, generator=g)
    m = (m > 0.5).float() if c["binary"] else m
    m = m.to(device)
    t0 = time.perf_counter()
    out = kv_inject_attention_triton(
        q,
        k,
        v,
        kr,
        vr,
        m,
        None,
        None,
        D**-0.5,
        c["binary"],
        config=tuple(c["config"]) if c["config"] else None,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    m4 = m[:, None, :, None]
    # the kernel rounds the blend to the input dtype before its dots (as the reference does)
    k2 = (m4 * kr.float() + (1 - m4) * k.float()).to(dt).float()
    v2 = (m4 * vr.float() + (1 - m4) * v.float()).to(dt).float()
    want = F.scaled_dot_product_attention(q.float(), k2, v2)
    err = float((out.float() - want).abs().max())
    ok = err <= TOL[c["dtype"]]
    return {"status": "ok" if ok else "wrong", "max_abs_err": err, "first_call_s": secs}


def _worker(cases_path: str, results_path: str) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    todo = json.loads(Path(cases_path).read_text())
    with open(results_path, "a") as f:
        for c in todo:
            f.write(json.dumps({"id": c["id"], "started": True}) + "\n")
            f.flush()
            try:
                r = run_case(c, device)
            except Exception as exc:  # noqa: BLE001 - a compile error is a result too; a fault ends the process
                r = {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                if device.type == "cuda" and ("CUDA error" in str(exc) or "illegal" in str(exc).lower()):
                    f.write(json.dumps({"id": c["id"], "status": "crash", "error": r["error"]}) + "\n")
                    f.flush()
                    return 3  # the context is poisoned: let a fresh worker go on
            f.write(json.dumps({"id": c["id"], **r}) + "\n")
            f.flush()
    return 0


def _label(c: dict) -> dict:
    return {
        "D": c["D"],
        "N": c["N"],
        "dtype": c["dtype"],
        "mask": "bool" if c["binary"] else "soft",
        "tile": "autotuned" if c["config"] is None else "x".join(map(str, c["config"])),
    }


def run(args) -> list[dict]:
    if args.worker:
        sys.exit(_worker(*args.worker))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    all_cases = cases(getattr(args, "quick", False) or device.type != "cuda", args.batch, args.heads)
    for i, c in enumerate(all_cases):
        c["id"] = i
    rows = args.result_rows if isinstance(getattr(args, "result_rows", None), list) else []
    workers = args.workers or (8 if device.type == "cuda" else 2)
    shards = [all_cases[i::workers] for i in range(workers)]
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", PYTHONUNBUFFERED="1")
    tmp = Path(tempfile.mkdtemp(prefix="kvmatrix-"))
    procs: dict[int, tuple] = {}
    done: dict[int, dict] = {}

    def start(w: int, todo: list[dict]):
        cp, rp = tmp / f"cases{w}.json", tmp / f"results{w}.jsonl"
        cp.write_text(json.dumps(todo))
        p = subprocess.Popen(
            [sys.executable, "-m", "bench", "kv_inject_matrix", "--worker", str(cp), str(rp)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / f"stderr{w}.txt", "a"),
        )
        procs[w] = (p, todo, rp)

    def collect(w: int, rc: int):
        _, todo, rp = procs.pop(w)
        lines = [json.loads(x) for x in rp.read_text().splitlines()] if rp.exists() else []
        results = {x["id"]: x for x in lines if "status" in x}
        started = [x["id"] for x in lines if x.get("started")]
        if rc != 0 and started and started[-1] not in results:  # died inside a case: that case faulted
            err = (tmp / f"stderr{w}.txt").read_text().strip().splitlines()
            results[started[-1]] = {"id": started[-1], "status": "crash", "error": (err or ["?"])[-1][:300]}
        by_id = {c["id"]: c for c in todo}
        for i, r in results.items():
            if i in by_id and i not in done:
                done[i] = r
                row = {**_label(by_id[i]), **{k: v for k, v in r.items() if k != "id"}}
                rows.append(row)
                print(row, flush=True)
        rest = [c for c in todo if c["id"] not in done]
        rp.unlink(missing_ok=True)
        if rest:
            start(w, rest)

    try:
        for w, shard in enumerate(shards):
            if shard:
                start(w, shard)
        while procs:
            for w in list(procs):
                rc = procs[w][0].poll()
                if rc is not None:
                    collect(w, rc)
            time.sleep(0.2)
    finally:
        for p, _, _ in procs.values():
            p.kill()
    rows.sort(key=lambda r: (r["D"], r["dtype"], r["mask"], r["tile"]))
    return rows


def summary(rows: list[dict]) -> dict:
    from bench.common import target

    bad = [r for r in rows if r.get("status") != "ok"]
    return {
        "failing": [
            {k: r.get(k) for k in ("D", "N", "dtype", "mask", "tile", "status", "error")} for r in bad
        ],
        "targets": [
            target(
                "K/V-injection cases matching the fp32 oracle (fraction)",
                1 - len(bad) / max(len(rows), 1),
                1.0,
            )
        ],
    }
