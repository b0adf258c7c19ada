"""Triton forward kernel of K/V-injection attention (flash-style, blend in registers).

Order: autotune configs → ``_kv_inject_fwd_kernel`` → launcher ``kv_inject_attention_triton``.

One program computes a [BLOCK_M, D] tile of the output for one (batch row, head). It streams key blocks and
builds the blended K'/V' tile in registers, then runs the usual online softmax (exp2, running max/sum in fp32).
Neither an N×N score matrix nor a blended K/V copy ever touches memory.

* Bool mask (D-Fusion; what the diffusers processors pass): each K/V row is read from K or from K_ref, by one
  load through per-row offsets that point into either tensor (``_pick``). The tile lands in shared memory by
  asynchronous copy and the tensor-core dots read it there: the data path of plain flash attention, with the
  same memory traffic, no blend arithmetic, exact. Two earlier forms were slower on sm_90: a select between two
  row *pointers* compiled to scalar 2-byte loads with no cp.async; two masked loads and a select in registers
  pipelined the loads but wrote every selected tile back to shared memory before its dot, and kept the dots
  synchronous (tests/test_triton_compile_report.py checks the TTGIR for both).
* Float mask: K is read only where m < 1 and K_ref only where m > 0, blended ``m·K_ref + (1−m)·K`` in fp32 and
  cast back to the input dtype (as the reference does).
* Key blocks: when N is a multiple of BLOCK_N (SD's 4096/1024/256 tokens), ``EVEN_N`` drops every bounds mask
  from the key loop. The softmax scale is folded into the exponent (one multiply-add per score).
* ``ALIGN8``: when every stride is a multiple of 8 elements and every pointer 16-byte aligned (checked by the
  launcher), the row offsets carry that hint, so D = 40 (a token stride that is not a multiple of 16) still gets
  16-byte loads.

The mask is read per (batch row, token) with no head dimension (broadcast over heads by construction);
reference rows come from ``ref_index[b]`` or ``b % Br`` (stride-0 broadcast of a batch-1 reference).
The head dim is read as one power-of-two chunk (≥ 16) with masked loads: 40 → 64, 80 → 128, 160 → 256. A split
into two chunks (40 → 32+16, 160 → 128+32; fewer padded FLOPs) was tried and removed: on an H200 (Triton 3.6) some
split tiles gave wrong fp16 outputs and two faulted, in both device runs, while every one-chunk case matched the
fp32 oracle (bench/kv_inject_matrix.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from b2kernels._dispatch import triton_interpret

_empty = torch.empty  # tests swap in a NaN-filled allocator to catch unwritten output


# (BLOCK_M, BLOCK_N, warps, stages) per head-dim range, for the one padded head-dim chunk (64/128/256 lanes).
# tests/test_triton_compile_report.py compiles each for sm_90 (ptxas -v): none spills, with the bool mask or
# the soft mask with injected queries, and the bool-mask tiles feed the tensor-core dots straight from their
# asynchronous copies. Searched and left out because they spill at 255 registers: 128×64×4 at D ≤ 128,
# 64×64×4 at D > 128. Left out at exactly 255 registers with Triton 3.8 (too close to spilling under another
# version): 128×128×8×2 at D = 80, 128×64×8×2 at D = 160 (when N is not a multiple of the key block). Short
# lists keep autotuning on a fresh machine to a few compiles per shape.
_CONFIGS_BY_HEAD_DIM = (
    (64, ((128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3))),
    (128, ((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 8, 3), (128, 32, 8, 3))),
    (256, ((128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3), (64, 16, 8, 3))),
)

#: shared memory per block on sm_90 (H100/H200: 227 KB)
SMEM_LIMIT = 227 * 1024


def smem_estimate(tile: tuple, head_dim: int, element_size: int, binary: bool = True) -> int:
    """Shared memory a tile needs: the Q tile (Q and Q_ref on the soft path) plus at least two pipelined buffers
    of each streamed tensor (K and V on the bool path; K, K_ref, V and V_ref on the soft path). Checked against
    the compiled kernels on sm_90 (bf16, D = 40/80/160; tests/test_triton_compile_report.py): the mask's own
    few hundred bytes are all it leaves out."""
    bm, bn, _, stages = tile
    bd = head_dim_block(head_dim)
    q_tiles, streams = (1, 2) if binary else (2, 4)
    return (q_tiles * bm * bd + max(stages - 1, 2) * streams * bn * bd) * element_size


def _tiles_for(head_dim: int, element_size: int = 2, binary: bool = True) -> tuple:
    """The tiles for this head dim whose shared memory fits an H100/H200, never none: the smallest tile if none
    fits. fp32 inputs (exact IEEE dots, no tensor cores: the correctness path, not a speed path) get the smallest
    tile only, since larger ones spill (and the estimate overstates fp32, whose dots stage differently)."""
    tiles = next(tiles for max_d, tiles in _CONFIGS_BY_HEAD_DIM if head_dim <= max_d)
    smem = lambda t: smem_estimate(t, head_dim, element_size, binary)  # noqa: E731
    smallest = (min(tiles, key=smem),)
    if element_size > 2:
        return smallest
    return tuple(t for t in tiles if smem(t) <= SMEM_LIMIT) or smallest


def _config(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


def _configs():
    if triton_interpret():
        # The interpreter runs every program in numpy: few, large-ish blocks are fastest and still
        # exercise the boundary masks for odd N.
        return [_config(32, 32, 4, 1)]
    tiles = dict.fromkeys(t for _, ts in _CONFIGS_BY_HEAD_DIM for t in ts)
    return [_config(*t) for t in tiles]


def _prune(configs, named_args, **kwargs):
    """Keep the tiles listed for this head dim, element size and mask kind (see ``_tiles_for``)."""
    d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
    binary = kwargs.get("BINARY", named_args.get("BINARY", True))
    q = named_args.get("Q")
    allowed = set(_tiles_for(d, q.element_size() if hasattr(q, "element_size") else 2, binary))
    key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    keep = [c for c in configs if key(c) in allowed]
    return keep or configs  # none kept only under the interpreter, whose one config is its own


@triton.jit
def _blend_soft(own, ref, own_off, ref_off, offs_d, d_ok, use_own, use_ref, m2):
    """[rows, d] tile of ``m·ref + (1−m)·own`` for a soft mask, blended in fp32 and cast back to the input dtype;
    ``*_off`` are per-row element offsets. K is read only where m < 1 and K_ref only where m > 0 (complementary
    predicates, so a row that is not read costs no memory traffic)."""
    a = tl.load(own + own_off[:, None] + offs_d[None, :], mask=use_own[:, None] & d_ok[None, :], other=0.0)
    r = tl.load(ref + ref_off[:, None] + offs_d[None, :], mask=use_ref[:, None] & d_ok[None, :], other=0.0)
    return (m2 * r.to(tl.float32) + (1.0 - m2) * a.to(tl.float32)).to(a.dtype)


@triton.jit
def _pick(use_ref, ref_base, ref_stride, own_base, own_stride, rows, ALIGN8: tl.constexpr):
    """Bool mask: each row's element offset from the *own* tensor's pointer, to its own row or, where the mask
    is set, to the reference row (``ref_base`` already holds the reference tensor's distance from the own one).

    One load through these offsets reads the blended tile directly, and Triton copies it asynchronously into the
    shared-memory buffer that the tensor-core dot reads (compiled for sm_90: the same data path as plain flash
    attention). Two masked loads and a select in registers (the earlier form) cost a shared-memory round trip
    per tile and kept the dots synchronous; a select between two *pointers* loses Triton's contiguity analysis
    (scalar 2-byte loads, no cp.async). ``ALIGN8`` marks the offsets as multiples of 8 (see ``_rows``)."""
    off = tl.where(use_ref, ref_base + rows * ref_stride, own_base + rows * own_stride)
    if ALIGN8:
        off = tl.multiple_of(off, 8)
    return off


@triton.jit
def _select_rows(base, off, offs_d, row_ok, d_ok):
    return tl.load(base + off[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _kv_tile(own, ref, delta, own_bh, own_stride, ref_bh, ref_stride, rows, offs_d, row_ok, d_ok, use_own, use_ref, m2,
             BINARY: tl.constexpr, ALIGN8: tl.constexpr):  # fmt: skip
    """A [rows, d] tile of K' or V' (one key block), or of Q' (the query block): rows ``rows`` of ``own`` or
    ``ref`` (``delta``: ref's pointer minus own's, in elements), selected by a bool mask, or blended by a soft one."""
    if BINARY:
        return _select_rows(own, _pick(use_ref, delta + ref_bh, ref_stride, own_bh, own_stride, rows, ALIGN8), offs_d,
                            row_ok, d_ok)  # fmt: skip
    else:
        own_off = _rows(own_bh, rows, own_stride, ALIGN8)
        ref_off = _rows(ref_bh, rows, ref_stride, ALIGN8)
        return _blend_soft(own, ref, own_off, ref_off, offs_d, d_ok, use_own, use_ref, m2)


@triton.jit
def _rows(base, rows, stride, ALIGN8: tl.constexpr):
    """Per-row element offsets ``base + rows·stride``, marked as multiples of 8 when the launcher checked every
    stride (so that 16-byte vector loads are allowed even when a stride like D = 40 is not a multiple of 16).
    The sum is computed here: the hint attaches to the op that defines the value, not to a function argument."""
    off = base + rows * stride
    if ALIGN8:
        off = tl.multiple_of(off, 8)
    return off


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


# Stride triplets are grouped per tensor (batch, head, token; the last dim is unit-stride).
# fmt: off
@triton.autotune(
    configs=_configs(),
    key=["NQ_BUCKET", "NK_BUCKET", "HEAD_DIM", "HAS_QREF", "BINARY"],  # the mask kind prunes differently
    prune_configs_by={"early_config_prune": _prune},
)
@triton.heuristics({"EVEN_N": lambda args: args["NK"] % args["BLOCK_N"] == 0})
@triton.jit
def _kv_inject_fwd_kernel(
    Q, K, V, QR, KR, VR, M, RIDX, O,
    sqb, sqh, sqn,
    skb, skh, skn,
    svb, svh, svn,
    sqrb, sqrh, sqrn,
    skrb, skrh, skrn,
    svrb, svrh, svrn,
    smb, smn,
    sob, soh, son,
    H, NQ, NK, BR, MB,
    qk_scale,
    QR_DELTA, KR_DELTA, VR_DELTA,
    NQ_BUCKET, NK_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_QREF: tl.constexpr,
    HAS_RIDX: tl.constexpr,
    BINARY: tl.constexpr,
    IEEE: tl.constexpr,
    ALIGN8: tl.constexpr,
    EVEN_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # fmt: on
    # Head dim as one padded chunk [0, BLOCK_D). HEAD_DIM is constexpr: the d-mask folds to a constant and the
    # loads stay vectorised.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    if HAS_RIDX:
        r64 = tl.load(RIDX + b).to(tl.int64)
    else:
        r64 = (b % BR).to(tl.int64)
    mrow = (b % MB).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < NQ
    rows64 = offs_m.to(tl.int64)

    q_bh = b64 * sqb + h64 * sqh
    qr_bh = r64 * sqrb + h64 * sqrh
    if HAS_QREF:
        mq = tl.load(M + mrow * smb + offs_m * smn, mask=m_ok, other=0.0)
        q_own = m_ok & (mq < 1.0)
        q_ref = m_ok & (mq > 0.0)
        q = _kv_tile(Q, QR, QR_DELTA, q_bh, sqn, qr_bh, sqrn, rows64, offs_d, m_ok, d_ok, q_own, q_ref, mq[:, None],
                     BINARY, ALIGN8)  # fmt: skip
    else:
        q = _select_rows(Q, _rows(q_bh, rows64, sqn, ALIGN8), offs_d, m_ok, d_ok)

    # Finite start for the running max: a row whose scores were all -inf would give 0, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_bh = b64 * skb + h64 * skh
    v_bh = b64 * svb + h64 * svh
    kr_bh = r64 * skrb + h64 * skrh
    vr_bh = r64 * svrb + h64 * svrh
    m_base = M + mrow * smb

    for start_n in range(0, NK, BLOCK_N):
        cols = start_n + offs_n
        cols64 = cols.to(tl.int64)
        if EVEN_N:  # every key block is full: no bounds masks on the loads or the scores
            n_ok = offs_n >= 0
            mk = tl.load(m_base + cols * smn)
        else:
            n_ok = cols < NK
            mk = tl.load(m_base + cols * smn, mask=n_ok, other=0.0)
        use_ref = n_ok & (mk > 0.0)
        use_own = n_ok & (mk < 1.0)
        mk2 = mk[:, None]

        k = _kv_tile(K, KR, KR_DELTA, k_bh, skn, kr_bh, skrn, cols64, offs_d, n_ok, d_ok, use_own, use_ref, mk2,
                     BINARY, ALIGN8)  # fmt: skip
        s = _dot(q, tl.trans(k), IEEE)
        if not EVEN_N:
            s = tl.where(n_ok[None, :], s, float("-inf"))

        # scale folded into the exponent: one multiply-add per score (qk_scale = scale·log2 e, scale > 0)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(V.dtype.element_ty)

        v = _kv_tile(V, VR, VR_DELTA, v_bh, svn, vr_bh, svrn, cols64, offs_d, n_ok, d_ok, use_own, use_ref, mk2,
                     BINARY, ALIGN8)  # fmt: skip
        acc = acc * alpha[:, None] + _dot(p, v, IEEE)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o_off = _rows(b64 * sob + h64 * soh, rows64, son, ALIGN8)
    tl.store(
        O + o_off[:, None] + offs_d[None, :],
        (acc / l_safe[:, None]).to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


def head_dim_block(d: int) -> int:
    """The padded head-dim chunk the kernel reads: the power of two ≥ max(d, 16) (40 → 64, 160 → 256)."""
    return max(16, triton.next_power_of_2(d))


def _aligned8(*tensors: torch.Tensor) -> bool:
    """Every data pointer 16-byte aligned and every non-unit stride a multiple of 8 elements: then each row's
    element offset is a multiple of 8 (the kernel's ``ALIGN8`` hint)."""
    return all(t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st in t.stride()[:-1]) for t in tensors)


def _elements_between(own: torch.Tensor, ref: torch.Tensor) -> int:
    """``ref``'s data pointer minus ``own``'s, in elements (the bool-mask path addresses reference rows from
    the own tensor's pointer; see ``_pick``)."""
    delta = ref.data_ptr() - own.data_ptr()
    if delta % own.element_size():  # cannot happen for two tensors of one dtype; never address a torn element
        raise ValueError("kv_inject_attention: reference and own tensors are not element-aligned to each other")
    return delta // own.element_size()


def _bucket(n: int) -> int:
    # Autotune key: powers of two, so N=4095 and N=4096 share a tuned config.
    return 1 << max(n - 1, 1).bit_length()


def kv_inject_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    mask: torch.Tensor,
    q_ref: torch.Tensor | None,
    ref_index: torch.Tensor | None,
    scale: float,
    binary: bool = False,
    *,
    config: tuple | None = None,
) -> torch.Tensor:
    """Launch the kernel. Inputs are already validated by the public function.

    ``config`` = (BLOCK_M, BLOCK_N, warps, stages) launches that one tile without autotuning: for
    bench/kv_inject_matrix.py, which checks every tile on a GPU.

    q [B,H,Nq,D], k/v [B,H,Nk,D], k_ref/v_ref [Br,H,Nk,D], q_ref [Br,H,Nq,D] or None, mask float32
    [Bm, Nk] with B % Bm == 0 (``binary``: its values are exactly 0 or 1, e.g. it came from a bool mask), ref_index int32 [B] or None. Any strides with a unit last-dim stride.
    Returns [B,H,Nq,D] whose memory is laid out [B,Nq,H,D] (what diffusers reshapes into next, for free).
    """
    B, H, NQ, D = q.shape
    NK = k.shape[2]

    def unit_last(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k, v, k_ref, v_ref = (unit_last(t) for t in (q, k, v, k_ref, v_ref))
    if q_ref is not None:
        q_ref = unit_last(q_ref)
    mask = mask.contiguous()
    out = _empty((B, NQ, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    qr = q_ref if q_ref is not None else q
    ridx = ref_index if ref_index is not None else mask  # dummy pointer when unused
    deltas = (_elements_between(q, qr), _elements_between(k, k_ref), _elements_between(v, v_ref))
    grid = lambda meta: (triton.cdiv(NQ, meta["BLOCK_M"]), B * H)
    kernel, meta = _kv_inject_fwd_kernel, {}
    if config is not None:
        bm, bn, warps, stages = config
        kernel, meta = _kv_inject_fwd_kernel.fn, dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    # fmt: off
    kernel[grid](
        q, k, v, qr, k_ref, v_ref, mask, ridx, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        qr.stride(0), qr.stride(1), qr.stride(2),
        k_ref.stride(0), k_ref.stride(1), k_ref.stride(2),
        v_ref.stride(0), v_ref.stride(1), v_ref.stride(2),
        mask.stride(0), mask.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        H, NQ, NK, k_ref.shape[0], mask.shape[0],
        float(scale) * math.log2(math.e),
        *deltas,
        _bucket(NQ), _bucket(NK),
        HEAD_DIM=D,
        BLOCK_D=head_dim_block(D),
        HAS_QREF=q_ref is not None,
        HAS_RIDX=ref_index is not None,
        BINARY=binary,
        # the reference-row offsets start from a pointer distance, which must keep the multiple of 8 too (fp32:
        # 16-byte-aligned pointers are only 4 elements apart at the least)
        ALIGN8=_aligned8(q, k, v, qr, k_ref, v_ref, out) and all(d % 8 == 0 for d in deltas),
        # fp32 inputs: exact fp32 dots (no TF32), like torch's default. The interpreter's bf16 dot is broken
        # (numpy has no bf16), so interpreted bf16 runs its dots in fp32 on bf16-rounded operands.
        IEEE=q.dtype == torch.float32 or (triton_interpret() and q.dtype == torch.bfloat16),
        **meta,
    )
    # fmt: on
    return out
