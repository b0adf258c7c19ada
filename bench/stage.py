"""Suite ``stage``: one B² stage (sampling + scoring + selection + training), ours vs an official-style loop.

``python -m bench stage [--quick] [--models tiny,small,toy,sd15] [--prompts P] [--branches B] [--steps T] [--k K]``

Equal work on both sides: the same policy, P prompts × B branches, T steps, k branched/trained steps, the same
number of trained samples (selection thresholds are opened so every branch group gives its best and worst
branch: 2P samples), 2 inner epochs. Ours: the batched tree sampler (one UNet call per step for all prompts and
branches, fused DDIM step, prefix stored once in the arena) and arena-gathered training micro-batches
(``--micro-batch``). Official-style: ``bench/official_b2.py`` (per-branch UNet calls, unfused step, duplicated
latents, host gathers, train batch 2, ``.item()`` per micro-step).

Models: ``tiny``/``small`` random-init UNets (CPU-sized), ``toy`` (the embedded checkpoint, if present),
``sd15`` an SD-1.5-shaped random-init UNet at 4×64×64 latents (weights don't change FLOPs: honest for speed;
CUDA only unless ``--force-sd15``; bfloat16 weights with a rank-4 LoRA adapter trained on both sides, as in the
official recipe). Rows: images/s of the whole stage, per-phase seconds, peak device memory
(CUDA), trajectory storage (host bytes of stored latents) and, for ours, the reward-hacking monitors' share of
the stage (``monitor_frac``: ``monitor_time_s`` + ``kl_time_s``, which are included in the stage time).
"""

from __future__ import annotations

import contextlib
import tempfile
import time

import torch

from bench.common import SD15_UNET, TINY_UNET, sync
from bench.official_b2 import official_stage

UNETS = {
    "tiny": TINY_UNET,
    "small": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    ),
    "sd15": SD15_UNET,
}


def _dense_reward(images, prompts):
    return (images[:, 0] - images[:, 2]).mean(dim=(1, 2)).float()


def add_args(p):
    p.add_argument(
        "--models",
        default=None,
        help="comma list of tiny,small,toy,sd15 (default: quick tiny,toy; full tiny,small,toy,+sd15 on CUDA)",
    )
    p.add_argument("--prompts", type=int, default=None, help="P prompts per stage")
    p.add_argument("--branches", type=int, default=None, help="B branches")
    p.add_argument("--steps", type=int, default=None, help="T DDIM steps")
    p.add_argument("--k", type=int, default=None, help="branched/trained steps")
    p.add_argument("--micro-batch", type=int, default=None, help="our training micro-batch (official: 2)")
    p.add_argument("--force-sd15", action="store_true", help="run sd15 on CPU too (very slow)")
    p.add_argument(
        "--no-warmup", action="store_true", help="skip the untimed warm-up stage of each implementation"
    )


def _policy(name, device):
    from b2diffurl.models import load_policy, random_policy

    if name == "toy":
        return load_policy("toy", device=device), "toy"
    # sd15 as the official recipe runs it: half-precision weights, a LoRA adapter on the attention projections
    if name == "sd15":
        return random_policy(UNETS[name], device, torch.bfloat16, seq=77), "dense"
    return random_policy(UNETS[name], device, seq=8), "dense"


def _ours(policy, reward_fn, prompts, P, B, T, k, mb, device, lora=False):
    from b2diffurl import config as C
    from b2diffurl.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = C.load_config(
            overrides={
                "preset": "official",
                "stages": 1,
                "sample.num_steps": T,
                "sample.prompts_per_stage": P,
                "sample.branches": B,
                "sample.batch_size": P,
                "b2.k_left": k,
                "b2.k_right": k,
                "train.micro_batch_size": mb,
                "train.grad_accum_steps": 64,
                "eval.prompts": "none",
                "out": out,
                "progress": False,
                "model.lora": "on" if lora else "off",
                "model.dtype": str(policy.dtype).removeprefix("torch."),
                "reward": "toy",
                "model.device": str(device),
            }
        )
        tr = Trainer(cfg, policy=policy, reward_fn=reward_fn, train_prompts=prompts)
        # equal work with the official loop: every group gives its best branch and its worst, whatever the z-scores
        # (thresholds a run would refuse: set after validation, for this measurement only)
        cfg.b2.pos_threshold, cfg.b2.neg_threshold = -1e9, 1e9
        sync(device)
        t0 = time.perf_counter()
        tr.watch.start_stage()  # the reward-hacking monitors, as a run has them (timed on their own too)
        data = tr.algo.sample_stage(0)
        sync(device)
        t1 = time.perf_counter()
        m = tr.algo.train_stage(0, data)
        monitors = tr.watch.end_stage()
        sync(device)
        t2 = time.perf_counter()
        return {
            # StageMonitor.add/metrics (reward terms, gold reward, diversity, image statistics) and the KL estimate
            # to the starting policy (part of train_time_s)
            "monitor_time_s": monitors.get("monitor_time_s", 0.0),
            "kl_time_s": m.get("kl_time_s", 0.0),
            # scoring, and the part of it sampling did not hide (sample.overlap_reward: on CUDA by default)
            "reward_time_s": data.metrics.get("reward_time_s", 0.0),
            "reward_wait_time_s": data.metrics.get("reward_wait_time_s", 0.0),
            "sample_time_s": t1 - t0,
            "train_time_s": t2 - t1,
            "train_samples": m["train_samples"],
            "micro_steps": m["micro_steps"],
            "traj_storage_mb": tr.algo.arena.bytes_used / 2**20,
            "ratio_dev_max": m["ratio_dev_max"],
        }


def _official(policy, reward_fn, prompts, P, B, T, k, device):
    params = [p for p in policy.unet.parameters() if p.requires_grad]  # the LoRA adapter when one is attached
    if not params:
        policy.unet.requires_grad_(True)
        params = list(policy.unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    sync(device)
    r = official_stage(
        policy,
        prompts,
        branches=B,
        k=k,
        num_steps=T,
        reward_fn=reward_fn,
        optimizer=opt,
        params=params,
        batch_size=min(8, P),
        pos_threshold=-1e9,
        neg_threshold=1e9,
        generator=gen,
    )
    sync(device)
    r["sample_time_s"] += r.pop("select_time_s")
    return r


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = getattr(args, "quick", False)
    names = (
        args.models.split(",")
        if args.models
        else (
            ["tiny", "toy"]
            if quick
            else ["tiny", "small", "toy"] + (["sd15"] if device.type == "cuda" else [])
        )
    )
    P = args.prompts or (4 if quick else 8)
    B = args.branches or (4 if quick else 5)
    T = args.steps or (10 if quick else 20)
    k = args.k or (6 if quick else 17)
    mb = args.micro_batch or (8 if device.type == "cpu" else 16)
    # rows go straight into the runner's list: a suite stopped at its time limit keeps the ones it finished
    rows = args.result_rows if isinstance(getattr(args, "result_rows", None), list) else []
    for name in names:
        if name == "sd15" and device.type != "cuda" and not args.force_sd15:
            print("skipping sd15 on CPU (pass --force-sd15 to run it anyway)")
            continue
        try:
            policy, kind = _policy(name, device)
        except Exception as exc:  # noqa: BLE001 - e.g. the toy checkpoint is not there yet
            print(f"skipping {name}: {exc}")
            continue
        if kind == "toy":
            from b2diffurl.rewards import get_reward
            from b2diffurl.toy.prompts import train_prompts

            reward_fn, prompts = get_reward("toy"), train_prompts()[:P]
        else:
            reward_fn, prompts = _dense_reward, [f"prompt number {i}" for i in range(P)]
        prompts = (prompts * P)[:P]

        def one(impl, policy=policy, reward_fn=reward_fn, prompts=prompts, lora=name == "sd15"):
            with contextlib.suppress(Exception):
                policy.unet.zero_grad(set_to_none=True)
            return (
                _ours(policy, reward_fn, prompts, P, B, T, k, mb, device, lora=lora)
                if impl == "ours"
                else _official(policy, reward_fn, prompts, P, B, T, k, device)
            )

        if not args.no_warmup:  # one untimed stage each (lazy inits, kernel/primitive caches, autotuning)
            for impl in ("ours", "official"):
                one(impl)
        for impl in ("ours", "official"):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            r = one(impl)
            stage = r["sample_time_s"] + r["train_time_s"]
            row = {
                "model": name,
                "impl": impl,
                "P": P,
                "B": B,
                "T": T,
                "k": k,
                "images": P * B,
                "stage_s": stage,
                "images_per_s": P * B / stage,
                **r,
            }
            if impl == "ours":  # the monitors' share of our stage (the official loop has none)
                row["monitor_frac"] = (r["monitor_time_s"] + r["kl_time_s"]) / stage
            if device.type == "cuda":
                row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            rows.append(row)
            print({kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}, flush=True)
        del policy, one
    return rows


def summary(rows: list[dict]) -> dict:
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        o = {r["impl"]: r for r in rows if r["model"] == name}
        if "ours" in o and "official" in o:
            out[name] = {
                "stage_speedup": o["official"]["stage_s"] / o["ours"]["stage_s"],
                "sample_speedup": o["official"]["sample_time_s"] / o["ours"]["sample_time_s"],
                "train_speedup": o["official"]["train_time_s"] / max(o["ours"]["train_time_s"], 1e-9),
                "storage_ratio": o["official"]["traj_storage_mb"] / max(o["ours"]["traj_storage_mb"], 1e-9),
                "monitor_frac": o["ours"].get("monitor_frac", 0.0),
            }
    for name, s in out.items():
        print(
            f"{name}: stage speedup {s['stage_speedup']:.2f}× (sampling {s['sample_speedup']:.2f}×, training "
            f"{s['train_speedup']:.2f}×), trajectory storage {s['storage_ratio']:.2f}× smaller; monitors "
            f"{s['monitor_frac']:.1%} of our stage"
        )
    return {"speedup": out}
