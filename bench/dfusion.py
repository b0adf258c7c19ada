"""``python -m bench dfusion``: D-Fusion target generation throughput, engine vs the official-style loop, and
the method's premise on the toy world (targets better aligned than their bases).

Throughput rows (random-init UNet; weights don't change FLOPs): ``targets/s`` of

* ``engine`` — :func:`b2diffurl.algos.dfusion.run_fusion`: one batched CFG UNet call per step holding each
  distinct reference once (latent read from its stored Phase-A trajectory) and every target, K/V handed over
  inside the call by ``b2kernels.kv_inject_attention``; starts at the first fused step (earlier steps are the
  base's), masks captured in Phase A;
* ``official`` — :mod:`bench.official_dfusion`: three CFG UNet calls per step (reference — duplicates included —,
  base, target) with materialised attention, every step.

Equal work: same targets, steps, fusion window and fused layers. The engine moves the mask capture into Phase A:
its cost is measured separately (``phase_a_capture_overhead``: Phase A with vs without capture) and charged in
``speedup_incl_capture``. UNets: ``sd21`` (SD-2.1-base shape: 4×64×64 latents, 1024-d text, heads 5/10/20/20,
linear projections; GPU), ``small`` (the SD block layout at 4×32×32, narrow channels; the CPU default),
``tiny`` (``--quick``).

Toy rows (``--toy``, on by default when the toy checkpoint is present): one D-Fusion stage on the pretrained toy
model with the exact toy reward: mean reward of the targets vs their bases (and references), per mask rule.
"""

from __future__ import annotations

import time

import torch

from b2diffurl.config import DFusionConfig
from bench.common import device_name, sync, time_fn

UNETS = {
    "sd21": dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        layers_per_block=2,
        norm_num_groups=32,
    ),
    "small": dict(
        sample_size=32,
        block_out_channels=(32, 64, 64, 64),
        attention_head_dim=(2, 4, 4, 4),
        cross_attention_dim=64,
        use_linear_projection=True,
        layers_per_block=1,
        norm_num_groups=16,
    ),
    "tiny": dict(
        sample_size=16,
        block_out_channels=(16, 16, 32, 32),
        attention_head_dim=(2, 2, 2, 2),
        cross_attention_dim=32,
        use_linear_projection=True,
        layers_per_block=1,
        norm_num_groups=8,
    ),
}


def add_args(p):
    p.add_argument(
        "--unet",
        choices=["auto", *UNETS],
        default="auto",
        help="UNet shape (auto: sd21 on CUDA, small on CPU, tiny with --quick)",
    )
    p.add_argument("--targets", type=int, default=None, help="targets per call (default 8; 4 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps T (default 20; 4 with --quick)")
    p.add_argument("--iters", type=int, default=None, help="timed repetitions (median)")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="UNet dtype (default float16 on CUDA, float32 on CPU)",
    )
    p.add_argument(
        "--toy",
        choices=["auto", "on", "off"],
        default="auto",
        help="toy-world target-vs-base reward rows (auto: on when the toy checkpoint loads)",
    )
    p.add_argument("--toy-prompts", type=int, default=None, help="toy prompts (default 8; 2 with --quick)")
    p.add_argument(
        "--toy-n", type=int, default=None, help="toy images per prompt (default 16; 4 with --quick)"
    )


def _bench_policy(kind: str, device, dtype):
    """Random-init SD-layout UNet of size ``kind`` (77-token text, SD's DDIM scheduler settings), frozen."""
    from b2diffurl.models import random_policy

    spec = dict(
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **UNETS[kind],
    )
    pol = random_policy(spec, device, dtype, seq=77)
    pol.unet.eval().requires_grad_(False)
    return pol


def _throughput_rows(args, device, rows: list[dict]) -> None:
    from b2diffurl.algos import dfusion as D
    from b2diffurl.sampling import TreeSampler
    from bench.official_dfusion import shared_items_mask, three_pass_fusion

    quick = args.quick
    kind = (
        args.unet
        if args.unet != "auto"
        else ("tiny" if quick else ("sd21" if device.type == "cuda" else "small"))
    )
    T = args.steps or (4 if quick else 20)
    nt = args.targets or (4 if quick else 8)
    iters = args.iters or (1 if (quick or device.type == "cpu") else 5)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    pol = _bench_policy(kind, device, dtype)
    sampler = TreeSampler(pol, num_steps=T, guidance_scale=5.0, eta=1.0)
    mask_grid = pol.latent_shape[-1] // 4  # SD: 64 → 16×16 mask layers
    cfg = DFusionConfig(samples_per_prompt=4, fusion_layers="3-6", mask_grid=mask_grid)
    fused = D.fused_step_range(cfg, T)
    layers = D.fusion_block_indices(pol.unet, cfg.fusion_layers)
    r = nt // 2
    shape = pol.latent_shape
    g = mask_grid
    cond_ref = pol.encode_prompts([f"ref {i}" for i in range(r)])
    cond_t = pol.encode_prompts([f"ref {i // 2}" for i in range(nt)])
    ref_lat = torch.randn(r, T + 1, *shape, device=device, dtype=dtype)
    gm = torch.Generator().manual_seed(1)
    masks = (torch.rand(r, T, g * g, generator=gm) < 0.5).to(device)
    noise_t = D.RowNoise([D.sample_seed(0, 0, j) for j in range(nt)], T, shape, device, dtype)
    ref_of = torch.arange(r).repeat_interleave(2)
    start = noise_t.noise[:, 0]

    def engine():
        D.run_fusion(sampler, ref_lat, cond_ref, ref_of, cond_t, start, noise_t, masks, fused, layers, cfg)

    noise_r = torch.randn(nt, T + 1, *shape, device=device, dtype=dtype)
    uncond = pol.encode_prompts([""])

    def official():
        three_pass_fusion(
            pol.unet,
            pol.scheduler,
            cond_t,
            cond_t,
            uncond,
            noise_r,
            noise_t.noise,
            shared_items_mask([3, 5], 0.05),
            fused_blocks=layers,
            window=set(fused),
            guidance_scale=5.0,
            mask_side=g,
        )

    # Phase-A capture overhead: n = 2·nt rows (a prompt's samples), with vs without the mask capture
    rows_a = 2 * nt
    noise_a = D.RowNoise([D.sample_seed(0, 1, j) for j in range(rows_a)], T, shape, device, dtype)
    cond_a = pol.encode_prompts(["phase a"] * rows_a)
    tok = torch.tensor([[3, 5]] * rows_a)
    sel = torch.eye(2)[None].repeat(rows_a, 1, 1)
    thr = torch.full((rows_a, 2), 0.05)

    def phase_a(capture):
        D.run_phase_a(
            sampler,
            cond_a,
            noise_a,
            token_cols=tok if capture else None,
            selection=sel,
            thresholds=thr,
            cfg=cfg,
        )

    warm = 0 if device.type == "cpu" else 1  # the first call compiles and autotunes; one more is noise
    common = dict(
        unet=kind,
        device=device_name(device),
        dtype=str(dtype).replace("torch.", ""),
        T=T,
        targets=nt,
        fused_steps=f"{fused[0]}-{fused[-1]}",
        fused_blocks=str(list(layers)),
    )
    # each row goes into ``rows`` as soon as it is measured: a suite stopped at its time limit keeps it
    ms_engine = time_fn(engine, warmup=warm, iters=iters, device=device)
    eng = dict(
        common,
        impl="engine (1 call/step)",
        ms=ms_engine,
        targets_per_s=nt / ms_engine * 1e3,
        unet_rows_per_step=3 * nt,
    )
    rows.append(eng)
    ms_official = time_fn(official, warmup=warm, iters=iters, device=device)
    rows.append(
        dict(
            common,
            impl="official (3 calls/step)",
            ms=ms_official,
            targets_per_s=nt / ms_official * 1e3,
            unet_rows_per_step=6 * nt,
        ),
    )
    eng["speedup"] = ms_official / ms_engine
    for _ in range(warm):  # compile both variants before timing
        phase_a(True)
        phase_a(False)
    # interleaved (ABAB…) so that load drift on a shared machine hits both alike; medians
    a_cap, a_plain = [], []
    for _ in range(max(iters, 2)):
        a_cap.append(time_fn(lambda: phase_a(True), warmup=0, iters=1, device=device))
        a_plain.append(time_fn(lambda: phase_a(False), warmup=0, iters=1, device=device))
    ms_a_cap, ms_a = sorted(a_cap)[len(a_cap) // 2], sorted(a_plain)[len(a_plain) // 2]
    # capture overhead per target: one Phase-A image per target and a half (n = 16: 8 bases + 4 refs + 4 others)
    overhead_ms = max(ms_a_cap - ms_a, 0.0) / rows_a * nt * 2
    eng["speedup_incl_capture"] = ms_official / (ms_engine + overhead_ms)
    eng["phase_a_capture_overhead"] = (ms_a_cap - ms_a) / ms_a


def _toy_rows(args) -> list[dict]:
    from b2diffurl.algos import dfusion as D
    from b2diffurl.models import load_policy
    from b2diffurl.rewards import get_reward
    from b2diffurl.sampling import TreeSampler
    from b2diffurl.toy import prompts as TP
    from b2kernels.buffer import TrajectoryArena

    quick = args.quick
    policy = load_policy("toy")
    reward = get_reward("toy")
    T = 20
    P = args.toy_prompts or (2 if quick else 8)
    n = args.toy_n or (4 if quick else 16)
    gen = torch.Generator().manual_seed(0)
    train = TP.train_prompts()
    prompts = [train[i] for i in torch.randperm(len(train), generator=gen)[:P].tolist()]
    sampler = TreeSampler(policy, num_steps=T, guidance_scale=5.0, eta=1.0)
    rows = []
    for rule, thr in (("threshold", 0.05), ("mean", 0.05)):
        cfg = DFusionConfig(samples_per_prompt=n, mask_rule=rule, mask_threshold=thr)
        arena = TrajectoryArena(policy.latent_shape, num_steps=T, max_trees=P * n * 2, branches=1)
        t0 = time.perf_counter()
        st = D.generate_pairs(
            sampler,
            prompts,
            cfg,
            reward_fn=reward,
            arena=arena,
            run_seed=0,
            epoch=0,
            prompts_per_call=max(1, 64 // n),
        )
        sync()
        m = st.metrics
        rows.append(
            dict(
                toy=True,
                mask_rule=rule,
                threshold=thr if rule == "threshold" else "mean",
                prompts=P,
                n=n,
                pairs=int(st.target_ids.numel()),
                reward_ref=m["reward_ref_mean"],
                reward_base=m["reward_base_mean"],
                reward_target=m["reward_target_mean"],
                target_minus_base=m["target_minus_base"],
                target_beats_base=m["target_beats_base"],
                target_loses=float((st.target_rewards < st.base_rewards).float().mean()),
                mask_coverage=m["mask_coverage"],
                s=time.perf_counter() - t0,
            )
        )
    return rows


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # rows go straight into the runner's list: a suite stopped at its time limit keeps the ones it finished
    rows = args.result_rows if isinstance(getattr(args, "result_rows", None), list) else []
    _throughput_rows(args, device, rows)
    toy = args.toy
    if toy == "auto":
        try:
            from b2diffurl.models import load_policy

            load_policy("toy")
            toy = "on"
        except Exception as exc:  # noqa: BLE001 - no checkpoint yet: skip the toy rows with the reason
            print(f"toy rows skipped: {type(exc).__name__}: {exc}")
            toy = "off"
    if toy == "on":
        rows += _toy_rows(args)
    return rows


def summary(rows):
    eng = [r for r in rows if str(r.get("impl", "")).startswith("engine")]
    toy = [r for r in rows if r.get("toy")]
    out = {}
    if eng:  # a run stopped early may lack the later columns
        out.update({k: eng[0][k] for k in ("speedup", "speedup_incl_capture") if k in eng[0]})
    if toy:
        out["toy_target_minus_base"] = {r["mask_rule"]: r["target_minus_base"] for r in toy}
    return out
