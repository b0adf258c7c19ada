"""Registers and spills of every Triton kernel compiled for an H100 (sm_90), without a GPU.

The interpreter never runs Triton's compiler, so on a CPU-only machine nothing else would notice a kernel that
spills registers to local memory at Stable Diffusion's head dims (40/80/160) — a slowdown that only a GPU run
would show. Triton compiles for a named target without a device: TTIR → PTX, then ``ptxas -v`` (bundled with
Triton) reports registers, stack and spill bytes per kernel. Every autotune config that the kernel may pick for
a head dim is compiled, since the autotuner can choose any of them.

Run it as a script for the whole table: ``python tests/test_triton_compile_report.py``.
The tests run the compiler in a fresh process: ``TRITON_INTERPRET=1`` (set for the test session) turns every
``@triton.jit`` into an interpreter stub.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SD_HEAD_DIMS = (40, 80, 160)
SM = 90


def _ptxas_path() -> str:
    from triton.backends.nvidia import compiler as nv

    if hasattr(nv, "get_ptxas"):  # triton >= 3.3
        return nv.get_ptxas(SM).path
    return str(Path(nv.__file__).parent / "bin" / "ptxas")


def _ptxas_report(ptx: str, kernel: str) -> dict:
    """registers / spill bytes / stack of ``kernel`` from ``ptxas -v`` on its PTX (sm_90a, as Triton builds)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run(
            [_ptxas_path(), "-v", f"--gpu-name=sm_{SM}a", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            timeout=300,
        )
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed for {kernel}:\n{log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not regs or not spill:
        raise RuntimeError(f"unexpected ptxas -v output for {kernel}:\n{log[-2000:]}")
    return {
        "registers": int(regs.group(1)),
        "stack_bytes": int(spill.group(1)),
        "spill_store_bytes": int(spill.group(2)),
        "spill_load_bytes": int(spill.group(3)),
    }


def _compile(jit_fn, types: dict, const: dict, num_warps: int, num_stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = jit_fn.arg_names
    sig = {n: ("constexpr" if n in const else types[n]) for n in names}
    # pointers 16-byte aligned, as the launcher specialises torch allocations (integers left unmarked)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    src = ASTSource(jit_fn, sig, {(names.index(k),): v for k, v in const.items()}, attrs)
    return triton.compile(
        src, target=GPUTarget("cuda", SM, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )


def kv_inject_cases(head_dims=SD_HEAD_DIMS):
    """(name, compile kwargs) of the attention kernel: every autotune config kept for each head dim, for the
    binary mask with ``ref_index`` (what the diffusers processors launch) and the soft mask with injected queries."""
    import triton

    from b2kernels.ops.kv_inject_attention import triton as kt

    jf = kt._kv_inject_fwd_kernel
    while not isinstance(jf, triton.runtime.JITFunction):  # autotuner → heuristics → the jitted kernel
        jf = jf.fn
    ptrs = {"Q", "K", "V", "QR", "KR", "VR", "O"}
    types = {
        n: "*bf16" if n in ptrs else "*fp32" if n == "M" else "*i32" if n == "RIDX" else "i32"
        for n in jf.arg_names
    }
    types["qk_scale"] = "fp32"
    types.update(QR_DELTA="i64", KR_DELTA="i64", VR_DELTA="i64")  # pointer distances may exceed 32 bits
    # the bool mask (what the processors launch) with and without full key blocks; the soft mask with full ones
    for D in head_dims:
        for binary, q_ref, even_n in ((True, False, True), (True, False, False), (False, True, True)):
            # the configs the autotuner may pick for this head dim (its own pruning rule)
            configs = kt._prune(kt._kv_inject_fwd_kernel.configs, {"HEAD_DIM": D}, HEAD_DIM=D, BINARY=binary)
            for c in configs:
                const = dict(
                    HEAD_DIM=D,
                    BLOCK_D=kt.head_dim_block(D),  # what the launcher uses
                    HAS_QREF=q_ref,
                    HAS_RIDX=binary,
                    BINARY=binary,
                    IEEE=False,
                    ALIGN8=True,  # SD layouts: D = 40/80/160 and H·D are multiples of 8
                    EVEN_N=even_n,  # SD token counts (4096/1024/256) are multiples of every BLOCK_N
                    **c.kwargs,
                )
                name = (
                    f"kv_inject D={D} {'bool' if binary else 'soft+qref'}{'' if even_n else ' ragged'} "
                    f"M{c.kwargs['BLOCK_M']}xN{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"
                )
                tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                yield (
                    name,
                    dict(jit_fn=jf, types=types, const=const, num_warps=c.num_warps, num_stages=c.num_stages),
                    D,
                    kt.smem_estimate(tile, D, 2, binary),
                )


def ddim_cases():
    """The DDIM step kernels at the SD latent size (4×64×64): forward log-prob / sample, backward, with CFG."""
    from b2kernels.ops.ddim_logprob import triton as dt

    block, warps = 1024, 4  # what _block() picks on a GPU for a 16384-element row
    for kernel, sample in (
        (dt._ddim_fwd_kernel, False),
        (dt._ddim_fwd_kernel, True),
        (dt._ddim_bwd_kernel, False),
    ):
        jf = kernel  # plain @triton.jit (no autotuner around it)
        f32 = {"a_t_ptr", "a_p_ptr", "partial_ptr", "grad_logp_ptr"}
        types = {
            n: "*fp32"
            if n in f32
            else "*i64"
            if n == "step_ptr"
            else "*bf16"
            if n.endswith("_ptr")
            else "i32"
            for n in jf.arg_names
        }
        types.update({n: "fp32" for n in ("eta", "w", "log_const") if n in types})
        const = dict(PRED=0, HAS_STEP=True, CFG=True, SAMPLE=sample, BLOCK=block)
        kind = "bwd" if "bwd" in jf.__name__ else ("sample" if sample else "logprob")
        yield (
            f"ddim_step {kind} BLOCK={block} w{warps}",
            dict(jit_fn=jf, types=types, const=const, num_warps=warps, num_stages=1),
            None,
            None,
        )


def report(head_dims=SD_HEAD_DIMS) -> list[dict]:
    rows = []
    for name, kw, D, smem_estimate in [*kv_inject_cases(head_dims), *ddim_cases()]:
        compiled = _compile(**kw)
        row = {"kernel": name, "D": D, **_ptxas_report(compiled.asm["ptx"], name)}
        row["shared_bytes"] = int(getattr(compiled.metadata, "shared", 0))
        row["smem_estimate"] = smem_estimate
        row["wgmma"] = "wgmma" in compiled.asm["ptx"]
        row["cp_async"] = len(re.findall(r"cp\.async\.c[ag]", compiled.asm["ptx"]))
        row.update(_loop_data_path(compiled.asm["ttgir"]))
        rows.append(row)
    return rows


def _first_loop_body(ttgir: str) -> str:
    """The text of the first ``scf.for`` region (braces matched, so nested regions stay inside)."""
    start = ttgir.find("scf.for")
    if start < 0:
        return ""
    line_end = ttgir.index("\n", start)
    open_at = ttgir.rindex("{", start, line_end)  # the region opens at the end of the loop's line
    depth = 0
    for i in range(open_at, len(ttgir)):
        depth += {"{": 1, "}": -1}.get(ttgir[i], 0)
        if depth == 0:
            return ttgir[open_at : i + 1]
    raise ValueError("unbalanced braces in the TTGIR")


def _loop_data_path(ttgir: str) -> dict:
    """What the key loop (the first ``scf.for``) does with its K/V tiles, from the TTGIR: asynchronous global →
    shared copies of 2-D half-precision tiles (the mask's 1-D copy is not counted), and register → shared writes
    (``ttg.local_alloc %value`` or ``ttg.local_store``: a tile computed in registers and written back to shared
    memory before a tensor-core dot can read it)."""
    if "ttg." not in ttgir:
        raise ValueError("TTGIR without the ttg dialect (Triton < 3.2?): this report cannot read it")
    body = _first_loop_body(ttgir)
    tile_copy = r"ttg\.async_copy_global_to_local [^\n]*tensor<\d+x\d+x!tt\.ptr<(?:bf16|f16)>"
    return {
        "loop_async_copies": len(re.findall(tile_copy, body)),
        "loop_reg_to_smem": len(re.findall(r"ttg\.local_alloc %|ttg\.local_store ", body)),
    }


def _run_report_subprocess() -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run(
        [sys.executable, __file__, "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500
    )
    if r.returncode == 3:
        pytest.skip(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compile_report():
    return _run_report_subprocess()


@pytest.mark.slow
def test_no_kernel_spills_at_sd_head_dims_on_sm90(compile_report):
    print("\n" + _table(compile_report))
    spilling = [r for r in compile_report if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilling, "kernels spill registers on sm_90:\n" + _table(spilling)


@pytest.mark.slow
def test_attention_uses_hopper_tensor_cores(compile_report):
    """wgmma (Hopper's warpgroup MMA), not a scalar or mma.sync fallback, for every attention config."""
    no_wgmma = [r for r in compile_report if r["kernel"].startswith("kv_inject") and not r["wgmma"]]
    assert not no_wgmma, _table(no_wgmma)


@pytest.mark.slow
def test_attention_loads_are_pipelined(compile_report):
    """Every bool-mask attention config (SD layouts, ALIGN8) copies its K/V tiles asynchronously (cp.async, so
    ``num_stages`` overlaps the loads with the dots), and the dots read those copies where they land: no tile
    goes register → shared memory inside the key loop. History: a load through a per-row selected *pointer*
    compiled to scalar 2-byte loads with no cp.async; two masked loads and a select in registers pipelined the
    loads but stored each selected tile back to shared memory before its dot."""
    bool_rows = [r for r in compile_report if r["kernel"].startswith("kv_inject") and "bool" in r["kernel"]]
    assert bool_rows
    serial = [r for r in bool_rows if r["loop_async_copies"] < 2 or r["cp_async"] == 0]
    assert not serial, "attention K/V loads not pipelined:\n" + _table(serial)
    round_trip = [r for r in bool_rows if r["loop_reg_to_smem"]]
    assert not round_trip, "attention K/V tiles pass through registers before the dot:\n" + _table(round_trip)


@pytest.mark.slow
def test_attention_smem_estimate_bounds_the_compiled_kernels(compile_report):
    """``smem_estimate`` (which prunes tiles that would not fit an H100/H200) is within 2 KB of what each
    compiled kernel allocates, so a tile the autotuner may pick cannot raise OutOfResources on the device."""
    rows = [r for r in compile_report if r["smem_estimate"]]
    assert rows
    under = [r for r in rows if r["shared_bytes"] > r["smem_estimate"] + 2048]
    assert not under, "shared memory above the estimate:\n" + _table(under)


def _table(rows: list[dict]) -> str:
    head = (
        f"{'kernel':<51}{'regs':>5}{'stack':>6}{'spill st':>9}{'spill ld':>9}{'smem':>8}{'est.':>8}"
        f"{'cp.async':>9}{'loop copies':>12}{'reg→smem':>9}  wgmma"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['kernel']:<51}{r['registers']:>5}{r['stack_bytes']:>6}{r['spill_store_bytes']:>9}"
            f"{r['spill_load_bytes']:>9}{r['shared_bytes']:>8}{r.get('smem_estimate') or '':>8}"
            f"{r.get('cp_async', 0):>9}{r.get('loop_async_copies', 0):>12}{r.get('loop_reg_to_smem', 0):>9}"
            f"  {'yes' if r['wgmma'] else 'no'}"
        )
    return "\n".join(lines)


def _main(argv) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "SKIP: TRITON_INTERPRET is set; run with TRITON_INTERPRET=0 (the compiler is not used under it)"
        )
        return 3
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401

        _ptxas_path()
    except Exception as exc:  # noqa: BLE001 - any missing piece means: cannot compile here
        print(f"SKIP: this triton cannot compile for sm_{SM} offline ({type(exc).__name__}: {exc})")
        return 3
    sys.path.insert(0, str(ROOT))
    rows = report()
    if "--json" in argv:
        print(json.dumps(rows))
    else:
        import triton

        print(f"triton {triton.__version__}, target sm_{SM}a\n" + _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
