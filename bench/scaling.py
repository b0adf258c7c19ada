"""Suite ``scaling``: data-parallel B²/DDPO stages on 1, 2, … processes (torchrun), per rank and stage.

``python -m bench scaling [--worlds 1,2] [--algo b2] [--stages 3] [--model toy] [--prompts 8] [--branches 4]``

For each world size the suite launches ``torchrun --standalone --nproc_per_node W`` on this module's worker,
which runs a real ``Trainer`` (same global batch for every W) and records, per rank and stage: the images this
rank sampled and its images/s, sampling / training / stage seconds, and the time and bytes of every collective
issued through ``b2diffurl.distributed`` (reward all-gather, gradient all-reduce, stop polls, checkpoint RNG
gather). ``comm_fraction`` = collective seconds / stage seconds. A collective returns when the slowest rank
arrives, so its time includes waiting for the slowest rank (load imbalance), not only moving bytes; the bytes
columns are the pure communication volume. Stage 0 is a warm-up (lazy inits) and is left out of the summary.

On CPU the processes share the machine's cores (``OMP_NUM_THREADS=1`` each): with fewer cores than processes the
per-rank rates fall. On GPUs (``--device cuda``) each rank takes ``cuda:LOCAL_RANK`` and NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--worlds", default="1,2", help="comma-separated process counts (default 1,2)")
    p.add_argument("--algo", default="b2", choices=["b2", "ddpo"])
    p.add_argument("--stages", type=int, default=3, help="stages per run; the first is a warm-up (default 3)")
    p.add_argument("--model", default="toy", help="'toy' or a local diffusers folder (default toy)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    p.add_argument("--prompts", type=int, default=8, help="trees (prompts) per stage, global (default 8)")
    p.add_argument("--branches", type=int, default=4, help="branches per tree (default 4)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    p.add_argument("--batch", type=int, default=2, help="trees per sampling batch (default 2)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per world size (default 1800)")


def _overrides(args, out: str) -> dict:
    return {
        "algo": args.algo,
        "model.path": args.model,
        "model.device": args.device,
        "stages": args.stages,
        "sample.num_steps": args.steps,
        "sample.prompts_per_stage": args.prompts,
        "sample.branches": args.branches,
        "sample.batch_size": args.batch,
        "b2.k_left": max(1, args.steps // 2),
        "b2.k_right": args.steps,
        "eval.num_prompts": 0,
        "checkpoint_every": 0,
        "grid_every": 0,
        "progress": False,
        "out": out,
        # the toy reward, as in the committed timings (the toy preset's B² default is now a pixel reward)
        **({"reward": "toy"} if args.model == "toy" else {}),
    }


def worker(args) -> None:
    """One rank (started by torchrun): train, time every stage, gather every rank's rows to rank 0."""
    import torch

    from b2diffurl import config as C
    from b2diffurl import distributed
    from b2diffurl.trainer import Trainer

    torch.set_num_threads(1)
    tr = Trainer(C.load_config(overrides=_overrides(args, args.run_dir)))
    rows, algo = [], tr.algo
    sample_stage, train_stage = algo.sample_stage, algo.train_stage
    timing: dict = {}

    def timed_sample(stage):
        distributed.stats.reset()
        t0 = time.perf_counter()
        data = sample_stage(stage)
        timing.update(stage=stage, sample_s=time.perf_counter() - t0, t0=t0)
        timing["images_here"] = algo.arena.num_trajectories  # the trajectories this rank sampled
        timing["trained_here"] = int(distributed.held(data.payload.ids).sum())
        return data

    def timed_train(stage, data):
        t1 = time.perf_counter()
        out = train_stage(stage, data)
        now = time.perf_counter()
        w = distributed.world()
        images = timing["images_here"]
        st = distributed.stats
        rows.append(
            {
                "world": w.size,
                "rank": w.rank,
                "backend": w.backend or "none",
                "device": str(w.device),
                "stage": stage,
                "images_here": images,
                "images_global": int(data.metrics.get("images", images)),
                "trained_samples_here": timing["trained_here"],
                "sample_s": timing["sample_s"],
                "train_s": now - t1,
                "stage_s": now - timing["t0"],
                "images_per_s_here": images / max(timing["sample_s"], 1e-9),
                "comm_s": st.total_seconds(),
                "comm_bytes": sum(st.bytes.values()),
                "all_gather_s": st.seconds.get("all_gather", 0.0),
                "all_gather_bytes": st.bytes.get("all_gather", 0),
                "grad_all_reduce_s": st.seconds.get("sum_gradients", 0.0),
                "grad_all_reduce_bytes": st.bytes.get("sum_gradients", 0),
                "grad_all_reduce_calls": st.calls.get("sum_gradients", 0),
                "other_comm_s": st.total_seconds()
                - st.seconds.get("all_gather", 0.0)
                - st.seconds.get("sum_gradients", 0.0),
            }
        )
        rows[-1]["comm_fraction"] = rows[-1]["comm_s"] / max(rows[-1]["stage_s"], 1e-9)
        return out

    algo.sample_stage, algo.train_stage = timed_sample, timed_train
    tr.run()
    every = distributed.all_gather_object(rows)
    if distributed.is_main():
        with open(args.json, "w") as fh:
            json.dump([r for part in every for r in part], fh)
    distributed.shutdown()


def run(args) -> list[dict]:
    rows = args.result_rows if hasattr(args, "result_rows") else []
    for world in [int(w) for w in str(args.worlds).split(",") if w.strip()]:
        with tempfile.TemporaryDirectory(prefix="b2-scaling-") as tmp:
            out_json = os.path.join(tmp, "rows.json")
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={world}",
                "-m",
                "bench.scaling",
                "--worker",
                "--json",
                out_json,
                "--run-dir",
                os.path.join(tmp, "run"),
                *_forward(args),
            ]
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, timeout=args.timeout, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise RuntimeError(f"scaling: world {world} failed with exit {proc.returncode}")
            with open(out_json) as fh:
                got = json.load(fh)
            for r in got:
                r["launch_wall_s"] = time.perf_counter() - t0
            rows.extend(got)
    return rows


def _forward(args) -> list[str]:
    keys = ("algo", "stages", "model", "device", "prompts", "branches", "steps", "batch")
    return [x for k in keys for x in (f"--{k}", str(getattr(args, k)))]


def summary(rows: list[dict]) -> dict:
    """Per world size, stages after the warm-up: mean per-rank images/s, the global images/s (all images of a
    stage over the slowest rank's stage time), communication seconds and bytes per stage and their fraction."""
    out = {}
    for world in sorted({r["world"] for r in rows}):
        mine = [r for r in rows if r["world"] == world and r["stage"] > 0] or [
            r for r in rows if r["world"] == world
        ]
        stages = sorted({r["stage"] for r in mine})
        per_stage = [[r for r in mine if r["stage"] == s] for s in stages]
        slowest = [max(r["stage_s"] for r in rs) for rs in per_stage]
        out[f"world{world}"] = {
            "per_rank_images_per_s": sum(r["images_per_s_here"] for r in mine) / len(mine),
            "global_images_per_s": sum(rs[0]["images_global"] for rs in per_stage) / sum(slowest),
            "stage_s": sum(slowest) / len(slowest),
            "all_gather_s_per_stage": sum(r["all_gather_s"] for r in mine) / len(mine),
            "grad_all_reduce_s_per_stage": sum(r["grad_all_reduce_s"] for r in mine) / len(mine),
            "comm_bytes_per_stage": sum(r["comm_bytes"] for r in mine) / len(mine),
            "comm_fraction": sum(r["comm_fraction"] for r in mine) / len(mine),
        }
    return out


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaling")
    add_args(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        from b2diffurl import distributed

        with distributed.record_failure():
            worker(args)
        return 0
    rows = run(args)
    print(json.dumps(summary(rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
