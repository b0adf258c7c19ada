"""Suite ``unet_step``: one sampling step of an SD-1.5-shaped UNet with CFG — eager, ``torch.compile``, ours.

The UNet is a ``UNet2DConditionModel`` built from Stable Diffusion 1.5's config with random weights (no
download: weights don't change FLOPs), latents 4×64×64, ``--images`` images with CFG (UNet batch 2·images), 77
text tokens of width 768. One step = UNet on ``[x; x]`` → CFG combine → DDIM step with its log-prob (η = 1):

* ``eager``    — diffusers' UNet as is, then the pure-torch reference step (what an unfused loop does);
* ``compiled`` — the same two functions under ``torch.compile`` (compile time reported, not timed);
* ``ours``     — the same UNet, the fused DDIM op (CFG combined inside the kernel), the whole step captured in
  one CUDA graph with static buffers (no host sync), as the sampler replays it;
* ``ours+compiled unet`` — ``ours`` around the ``torch.compile``d UNet (not yet an option of the sampler).

FLOPs are counted on one eager UNet call (``torch.utils.flop_counter``; the DDIM step's are negligible). MFU =
FLOPs / time / the datasheet bf16 peak; ``frac_matmul`` reads the same rate against a large bf16 matmul measured in
the run. Targets: ours ≥ 1.0× the compiled step and ≥ 45% MFU.

``python -m bench unet_step [--images 16] [--dtype bf16] [--no-compile]``; ``--model tiny`` is the CPU smoke size.
"""

from __future__ import annotations

import time

import torch

from bench.common import SD15_UNET, TINY_UNET, datasheet_peak_tflops, matmul_tflops, target, time_fn

# tiny: the CPU smoke size (bench.common.TINY_UNET on 4×8×8 latents)
MODELS = {"sd15": SD15_UNET, "tiny": {**TINY_UNET, "sample_size": 8}}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GUIDANCE, STEP = 5.0, 10  # a mid-trajectory step of T = 20


def add_args(p):
    p.add_argument(
        "--model", choices=sorted(MODELS), default="sd15", help="UNet config (tiny: CPU smoke size)"
    )
    p.add_argument("--images", type=int, default=16, help="images per step (UNet batch = 2× with CFG)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (eager: plumbing only, for dry runs)",
    )
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")


def _table(device):
    from b2kernels import DDIMTable

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    ac = torch.cumprod(1 - betas, 0)
    ts = torch.arange(19, -1, -1) * 50 + 1  # T = 20, steps_offset = 1
    return DDIMTable.from_alphas(ac, ts, ac[0], 1000, "epsilon", device=device)


def _step_fn(unet, table, x, t2, embeds, noise, backend, step_impl=None):
    """The sampler's step as one closure over fixed inputs: (x_prev, logp)."""
    from b2kernels import ddim_step_sample

    step = step_impl or (lambda *a, **kw: ddim_step_sample(*a, **kw, backend=backend))

    def fn():
        out = unet(torch.cat([x, x]), t2, encoder_hidden_states=embeds).sample
        uncond, cond = out.chunk(2)
        return step(table, STEP, x, cond, noise, eta=1.0, model_output_uncond=uncond, guidance_scale=GUIDANCE)

    return fn


def _graphed(fn, device):
    """Capture ``fn`` (reading only static tensors) in a CUDA graph; returns its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up outside the capture: autotuning, lazy inits, cuDNN plans
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run(args) -> list[dict]:
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from b2kernels._dispatch import triton_reasons
    from b2kernels.ops.ddim_logprob import reference

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    cfg = MODELS[args.model]
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: seconds instead of a minute of CPU init for 860 M
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to(dtype).eval().requires_grad_(False)
    n = args.images
    size = cfg["sample_size"]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, 4, size, size, device=device, dtype=dtype, generator=g)
    noise = torch.randn(n, 4, size, size, device=device, dtype=dtype, generator=g)
    embeds = torch.randn(2 * n, 77, cfg["cross_attention_dim"], device=device, dtype=dtype, generator=g)
    table = _table(device)
    t2 = table.timesteps[STEP].expand(2 * n).contiguous()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.cat([x, x]), t2, encoder_hidden_states=embeds)
    flops = counter.get_total_flops()
    peak = datasheet_peak_tflops(device) if cuda else None
    ceiling = matmul_tflops(device, 8192 if cuda else 256, dtype if cuda else torch.float32)
    rows = args.result_rows if isinstance(getattr(args, "result_rows", None), list) else []
    base = dict(
        model=args.model,
        images=n,
        unet_batch=2 * n,
        dtype=str(dtype)[6:],
        gflops_per_step=flops / 1e9,
        matmul_tflops=ceiling,
        peak_tflops=peak,
    )

    def measure(method, fn, **extra):
        row = dict(base, method=method, **extra)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                ms = time_fn(fn, warmup=args.warmup, iters=args.iters, device=device)
        except Exception as exc:  # noqa: BLE001 - one method failing must not lose the others' rows
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(row)
            return
        tflops = flops / (ms * 1e-3) / 1e12
        row.update(ms=ms, images_per_s=n / (ms * 1e-3), tflops=tflops, frac_matmul=tflops / ceiling)
        if peak:
            row["mfu"] = tflops / peak
        if cuda:
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        rows.append(row)

    ours_backend = "triton" if not triton_reasons(device) else "reference"

    def measure_ours(method, step_unet):
        """Our step (fused DDIM op) around ``step_unet``, replayed from one CUDA graph where there is CUDA."""
        fn = _step_fn(step_unet, table, x, t2, embeds, noise, ours_backend)
        if not cuda:
            measure(method, fn, step_backend=ours_backend, cuda_graph=False, note="no CUDA: no graph")
            return
        try:
            with torch.no_grad():
                replay = _graphed(fn, device)
        except Exception as exc:  # noqa: BLE001 - a failed capture is a result; keep the suite's other rows
            err = f"capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            rows.append(dict(base, method=method, step_backend=ours_backend, error=err))
            return
        measure(method, replay, step_backend=ours_backend, cuda_graph=True)

    measure("eager", _step_fn(unet, table, x, t2, embeds, noise, "reference"))
    measure_ours("ours", unet)
    if not args.no_compile:  # last: its compile is the slowest part of the suite
        opts = dict(backend=args.compile_backend, mode=args.compile_mode)
        cunet = torch.compile(unet, **opts)
        cstep = torch.compile(reference.ddim_step_sample, **opts)
        fn = _step_fn(cunet, table, x, t2, embeds, noise, None, step_impl=cstep)
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        if cuda:
            torch.cuda.synchronize()
        measure("compiled", fn, compile_s=time.perf_counter() - t0, compile_backend=args.compile_backend)
        # Not yet what the sampler does: our graphed step around torch.compile's UNet (the compiled UNet was
        # faster than diffusers' eager one by more than our graph and fused step gained on an H200).
        measure_ours("ours+compiled unet", cunet)
    return rows


def summary(rows: list[dict]) -> dict:
    by = {r["method"]: r for r in rows if "ms" in r}
    ours, comp, both = by.get("ours"), by.get("compiled"), by.get("ours+compiled unet")
    speedup = comp["ms"] / ours["ms"] if ours and comp else None
    return {
        "targets": [
            target("UNet step: ours vs torch.compile", speedup, 1.0, unit="x"),
            target(
                "UNet step: ours around the compiled UNet vs torch.compile",
                comp["ms"] / both["ms"] if both and comp else None,
                1.0,
                unit="x",
                note="not yet the sampler's path (it runs diffusers' UNet eagerly inside the graph)",
            ),
            target(
                "UNet step: ours MFU (bf16 datasheet peak)",
                ours.get("mfu") if ours else None,
                0.45,
                note="" if ours and ours.get("mfu") is not None else "needs a GPU with a known peak",
            ),
        ]
    }
