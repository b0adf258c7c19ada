"""K/V-injection attention: Triton kernel (interpreter on CPU) and reference vs a float64 explicit-softmax oracle.

Oracle: softmax(Q'K'ᵀ·s)V' computed in float64 from the same dtype-rounded inputs, with the blend written out
here (not the package's). Tolerance: ≤ 2× torch's own SDPA error in that dtype, or 2 ulps of the output scale.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import b2kernels
from b2kernels import KVMask, kv_inject_attention

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def oracle(q, k, v, kr, vr, m, qr=None, scale=None):
    """float64 oracle; kr/vr/qr already expanded to B rows, m dense [B, N]."""
    q, k, v, kr, vr = (t.double() for t in (q, k, v, kr, vr))
    m4 = m.double()[:, None, :, None]
    k2 = m4 * kr + (1 - m4) * k
    v2 = m4 * vr + (1 - m4) * v
    if qr is not None:
        q = m4 * qr.double() + (1 - m4) * q
    # the kernel rounds the blend to the input dtype before the dots, like the reference
    s = scale if scale is not None else q.shape[-1] ** -0.5
    scores = (q @ k2.transpose(-1, -2)) * s
    return torch.softmax(scores, -1) @ v2


def torch_attention(q, k, v, kr, vr, m, qr=None):
    """torch's own attention in the inputs' dtype on the blended inputs: the error baseline of the tolerance."""
    m4 = m.to(q.dtype)[:, None, :, None]
    k2, v2 = m4 * kr + (1 - m4) * k, m4 * vr + (1 - m4) * v
    q2 = q if qr is None else m4 * qr + (1 - m4) * q
    return F.scaled_dot_product_attention(q2, k2, v2)


def make(B, H, N, D, dtype, *, ref_batch=None, q_ref=False, mask="soft", nq=None):
    nq = nq or N
    g = torch.Generator().manual_seed(1234 + B + N + D)
    rb = ref_batch or B
    t = lambda b, n: torch.randn(b, H, n, D, generator=g).to(dtype)
    q, k, v = t(B, nq), t(B, N), t(B, N)
    kr, vr = t(rb, N), t(rb, N)
    qr = t(rb, nq) if q_ref else None
    if mask == "soft":
        m = torch.rand(B, N, generator=g)
        m[:, ::5] = 0.0
        m[:, 1::7] = 1.0
    elif mask == "bool":
        m = torch.rand(B, N, generator=g) > 0.5
    else:
        m = torch.full((B, N), float(mask))
    return q, k, v, kr, vr, qr, m


def check_close(out, ref64, torch_out, dtype):
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_out.double() - ref64).abs().max().item()
    tol = max(2 * torch_err, 2 * EPS[dtype] * ref64.abs().max().item(), 1e-12)
    assert err <= tol, f"max error {err:.3g} > tol {tol:.3g} (torch's own error {torch_err:.3g})"


def expand(t, B):
    return t if t is None or t.shape[0] == B else t.expand(B, *t.shape[1:])


# Pairwise-sampled grid: every D, N, B, dtype, mask kind and q-injection flag appears, most pairs covered.
CASES = [
    # D,   N,   B, H, dtype,          mask,   q_ref, ref_batch
    (40, 77, 1, 2, torch.float32, "soft", False, None),
    (40, 257, 1, 1, torch.float16, "bool", True, 1),
    (64, 100, 3, 2, torch.bfloat16, "soft", True, None),
    (64, 1, 3, 2, torch.float16, "bool", False, 1),
    (80, 100, 1, 2, torch.float16, "soft", False, 1),
    (80, 77, 3, 1, torch.float32, "bool", True, None),
    (160, 1, 1, 2, torch.bfloat16, "bool", True, None),
    (160, 257, 1, 1, torch.float32, "soft", False, None),
    (128, 33, 3, 1, torch.bfloat16, "soft", False, 1),
]


@pytest.mark.parametrize(
    "D,N,B,H,dtype,mask,q_ref,ref_batch",
    CASES,
    ids=[f"D{c[0]}-N{c[1]}-B{c[2]}-{str(c[4])[6:]}-{c[5]}-q{int(c[6])}-rb{c[7] or c[2]}" for c in CASES],
)
@pytest.mark.usefixtures("nan_poison")
def test_kernel_matches_oracle(D, N, B, H, dtype, mask, q_ref, ref_batch):
    q, k, v, kr, vr, qr, m = make(B, H, N, D, dtype, ref_batch=ref_batch, q_ref=q_ref, mask=mask)
    out = kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=m, q_ref=qr, backend="triton")
    ref = kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=m, q_ref=qr, backend="reference")
    want = oracle(q, k, v, expand(kr, B), expand(vr, B), m.float(), expand(qr, B))
    assert out.shape == (B, H, N, D)
    torch_out = torch_attention(q, k, v, expand(kr, B), expand(vr, B), m, expand(qr, B))
    check_close(ref, want, torch_out, dtype)  # the reference itself is within torch's error
    check_close(out, want, torch_out, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mask_zero_is_sdpa_and_mask_one_is_reference_sdpa(dtype):
    B, H, N, D = 2, 2, 45, 40
    q, k, v, kr, vr, qr, _ = make(B, H, N, D, dtype, q_ref=True)
    zeros, ones = torch.zeros(B, N), torch.ones(1, N, dtype=torch.bool)
    plain = F.scaled_dot_product_attention(q, k, v)
    onto_ref = F.scaled_dot_product_attention(qr, kr, vr)
    for backend in ("triton", "reference"):
        o0 = kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=zeros, q_ref=qr, backend=backend)
        o1 = kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=ones, q_ref=qr, backend=backend)
        tol = 2e-6 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(o0, plain, atol=tol, rtol=0)
        torch.testing.assert_close(o1, onto_ref, atol=tol, rtol=0)


def test_fully_injected_rows_and_unread_sources():
    """Row 0 fully injected, row 1 untouched; the source a token does not use is never read (NaN there is harmless)."""
    B, H, N, D = 2, 2, 50, 80
    q, k, v, kr, vr, _, _ = make(B, H, N, D, torch.float32)
    m = torch.zeros(B, N)
    m[0] = 1.0
    m[1, 10:20] = 1.0
    want = oracle(q, k, v, kr, vr, m)
    k_poison, v_poison, kr_poison, vr_poison = k.clone(), v.clone(), kr.clone(), vr.clone()
    on = m.bool()[:, None, :, None].expand_as(k)
    k_poison[on] = float("nan")
    v_poison[on] = float("nan")
    kr_poison[~on] = float("inf")
    vr_poison[~on] = float("nan")
    for mm in (m, m.bool()):  # fp32 blend path and the exact binary (add) path
        out = kv_inject_attention(
            q, k_poison, v_poison, k_ref=kr_poison, v_ref=vr_poison, mask=mm, backend="triton"
        )
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=0)
    torch.testing.assert_close(out[0], F.scaled_dot_product_attention(q, kr, vr)[0], atol=2e-6, rtol=0)
    # huge logits: the online softmax must not overflow to NaN
    big = kv_inject_attention(q * 300, k, v, k_ref=kr, v_ref=vr, mask=m, backend="triton")
    big_torch = kv_inject_attention(q * 300, k, v, k_ref=kr, v_ref=vr, mask=m, backend="reference")
    check_close(
        big, oracle(q * 300, k, v, kr, vr, m), big_torch, torch.float32
    )  # logits ~1e3: ill-conditioned


def test_nan_propagates_alike_in_both_backends():
    """A NaN query poisons its own output row and nothing else; a NaN in a used key poisons its (batch, head).
    Both backends agree (torch's CPU SDPA alone would return 0 for the NaN query row)."""
    B, H, N, D = 2, 2, 33, 40
    q, k, v, kr, vr, _, _ = make(B, H, N, D, torch.float32)
    m = torch.zeros(B, N, dtype=torch.bool)
    m[:, :5] = True
    q[0, 1, 7, 3] = float("nan")
    k_bad = k.clone()
    k_bad[1, 0, 20, 0] = float("nan")  # token 20 is not injected: K (not K_ref) is what attention reads
    outs = {}
    for backend in ("reference", "triton"):
        out = kv_inject_attention(q, k_bad, v, k_ref=kr, v_ref=vr, mask=m, backend=backend)
        nan_rows = out.isnan().any(-1)
        want = torch.zeros_like(nan_rows)
        want[0, 1, 7] = True
        want[1, 0] = True
        assert torch.equal(nan_rows, want), backend
        assert not out.isnan().all(-1).logical_xor(nan_rows).any(), (
            backend
        )  # a poisoned row is NaN throughout
        outs[backend] = out
    ok = ~outs["reference"].isnan()
    torch.testing.assert_close(outs["triton"][ok], outs["reference"][ok], atol=2e-6, rtol=0)


def test_ref_index_cfg_mask_and_strided_inputs():
    """References taken in place from rows of the same batch, one mask shared by both CFG halves,
    q/k/v as the transposed [B, N, H, D] views diffusers produces."""
    B, H, N, D = 4, 2, 37, 64
    g = torch.Generator().manual_seed(7)
    qkv = [torch.randn(B, N, H, D, generator=g).transpose(1, 2) for _ in range(3)]
    q, k, v = qkv
    ridx = torch.tensor([0, 0, 2, 2])  # rows 1 and 3 (targets) read rows 0 and 2 (references)
    half = torch.rand(B // 2, N, generator=g)
    half[0] = 0.0  # row 0 / row 2 ("reference" rows) get mask 0
    half[1, :5] = 0.0
    mask = KVMask(torch.stack([torch.zeros(N), half[1]]))  # [uncond_ref, tgt] pattern reused by both halves
    out = kv_inject_attention(q, k, v, k_ref=k, v_ref=v, mask=mask, ref_index=ridx, backend="triton")
    dense = mask.materialize(B)
    want = oracle(q, k, v, k[ridx], v[ridx], dense)
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=0)
    ref = kv_inject_attention(q, k, v, k_ref=k, v_ref=v, mask=mask, ref_index=ridx, backend="reference")
    torch.testing.assert_close(ref.double(), want, atol=2e-6, rtol=0)
    assert out.transpose(1, 2).is_contiguous()  # laid out [B, N, H, D]: diffusers' reshape is free


def test_cross_shapes_nq_ne_nk_and_scale():
    q, k, v, kr, vr, _, m = make(2, 2, 20, 40, torch.float32, nq=9)
    out = kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=m, scale=0.3, backend="triton")
    torch.testing.assert_close(out.double(), oracle(q, k, v, kr, vr, m, scale=0.3), atol=2e-6, rtol=0)


def test_kvmask_type():
    m = KVMask(torch.tensor([[0.0, 1.0, 0.5]]))
    assert (m.batch, m.num_tokens) == (1, 3)
    assert m.materialize(4).shape == (4, 3) and torch.equal(
        m.materialize(4)[3], torch.tensor([0.0, 1.0, 0.5])
    )
    assert torch.equal(KVMask.full(3, 1.0).values, torch.ones(1, 3))
    with pytest.raises(ValueError, match="does not divide"):
        KVMask(torch.zeros(2, 3)).materialize(3)
    with pytest.raises(ValueError, match="2-D"):
        KVMask(torch.zeros(3))
    with pytest.raises(TypeError, match="bool or floating"):
        KVMask(torch.zeros(1, 3, dtype=torch.int64))


def test_bad_inputs_raise_clear_errors():
    q, k, v, kr, vr, qr, m = make(2, 2, 10, 40, torch.float32, q_ref=True)
    kw = dict(k_ref=kr, v_ref=vr, mask=m)
    with pytest.raises(ValueError, match=r"expected k and v of shape"):
        kv_inject_attention(q, k[:, :, :5], v, **kw)
    with pytest.raises(ValueError, match=r"expected k_ref of shape"):
        kv_inject_attention(q, k, v, k_ref=kr[:, :1], v_ref=vr, mask=m)
    z = lambda t: t[..., :0]  # noqa: E731
    with pytest.raises(ValueError, match=r"head dim D must be >= 1"):
        kv_inject_attention(z(q), z(k), z(v), k_ref=z(kr), v_ref=z(vr), mask=m)
    with pytest.raises(ValueError, match=r"at least one key token"):
        kv_inject_attention(
            q, k[:, :, :0], v[:, :, :0], k_ref=kr[:, :, :0], v_ref=vr[:, :, :0], mask=m[:, :0]
        )
    with pytest.raises(ValueError, match=r"expected k_ref of shape .* batch 1 or 2"):
        kv_inject_attention(q, k, v, k_ref=torch.cat([kr, kr]), v_ref=vr, mask=m)
    with pytest.raises(TypeError, match=r"k has dtype torch.float16 but q has torch.float32"):
        kv_inject_attention(q, k.half(), v, **kw)
    with pytest.raises(ValueError, match=r"is on meta but q is on cpu"):
        kv_inject_attention(q, k, v, k_ref=kr.to("meta"), v_ref=vr, mask=m)
    with pytest.raises(ValueError, match=r"expected mask of shape \[Bm, 10\]"):
        kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=m[:, :4])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=m * 2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=torch.full_like(m, float("nan")))
    with pytest.raises(ValueError, match=r"q_ref needs self-attention shapes"):
        kv_inject_attention(q[:, :, :4], k, v, k_ref=kr, v_ref=vr, mask=m, q_ref=qr[:, :, :4])
    with pytest.raises(ValueError, match="backend must be one of"):
        kv_inject_attention(q, k, v, **kw, backend="cuda")
    for bad in (0.0, -0.1, 1e-40, 1e39, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"scale must be a positive finite number in \[1e-30, 1e\+30\]"):
            kv_inject_attention(q, k, v, **kw, scale=bad)
    big = torch.randn(1, 1, 4, 320)
    with pytest.raises(RuntimeError, match=r"head dim 320 unsupported"):
        kv_inject_attention(big, big, big, k_ref=big, v_ref=big, mask=torch.ones(1, 4), backend="triton")
    # auto falls back to the reference quietly (here: CPU, or head dim 320 on CUDA)
    out = kv_inject_attention(big, big, big, k_ref=big, v_ref=big, mask=torch.ones(1, 4))
    assert out.shape == big.shape
    qg = q.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="no backward"):
        kv_inject_attention(qg, k, v, **kw, backend="triton")


def test_reference_batches_and_indices_are_checked():
    # q_ref with another batch than k_ref: the kernel picks one reference row for all three, so it read past
    # q_ref's single row (|triton - reference| was 3.05 here before the check).
    q, k, v, kr, vr, qr, m = make(2, 1, 8, 16, torch.float32, q_ref=True)
    with pytest.raises(ValueError, match=r"q_ref and k_ref batches differ \(1 vs 2\)"):
        kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=m, q_ref=qr[:1], backend="triton")
    # ref_index outside [0, Br): the kernel would read out of bounds
    for bad, held in (([0, 2], 2), ([-1, 0], -1)):
        ridx = torch.tensor(bad, dtype=torch.int32)
        with pytest.raises(IndexError, match=rf"ref_index holds {held}, out of range for the 2 rows"):
            kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=m, ref_index=ridx, backend="triton")
    # B·H beyond CUDA's grid-axis-1 limit: the Triton backend refuses instead of failing to launch
    wide = torch.empty(65536, 1, 4, 16, device="meta")
    reasons = b2kernels.ops.kv_inject_attention.triton_reasons_for(wide, needs_grad=False)
    assert any("exceeds the Triton kernel's 65535 programs" in r for r in reasons)
    assert b2kernels.ops.kv_inject_attention.triton_reasons_for(wide[:65535], needs_grad=False) == []


def test_reference_backend_has_gradients():
    q, k, v, kr, vr, _, m = make(1, 1, 6, 16, torch.float64)
    q.requires_grad_()
    kr.requires_grad_()
    ok = torch.autograd.gradcheck(
        lambda q_, kr_: kv_inject_attention(q_, k, v, k_ref=kr_, v_ref=vr, mask=m, backend="reference"),
        (q, kr),
    )
    assert ok


def test_custom_op_fake_and_schema():
    q, k, v, kr, vr, _, m = make(1, 1, 8, 16, torch.float32)
    op = torch.ops.b2kernels.kv_inject_attention_fwd.default
    torch.library.opcheck(
        op,
        (q, k, v, kr, vr, m.float(), None, None, 0.25, False),
        test_utils=("test_schema", "test_faketensor"),
    )
    assert b2kernels.kv_inject_attention is kv_inject_attention


def test_auto_runs_the_reference_on_cuda_where_the_kernel_measured_slower():
    """The K/V kernel measured 0.56-0.78x blend + SDPA on an H200, so ``auto`` serves CUDA tensors with the
    reference; ``backend="triton"`` still runs the kernel, and the DDIM op (faster than its reference) keeps it.
    Decided from the device only: no CUDA tensor is created."""
    from b2kernels import _dispatch

    if _dispatch.triton_reasons("cuda"):
        pytest.skip(f"triton cannot serve CUDA here: {_dispatch.triton_reasons('cuda')}")
    assert _dispatch.resolve("kv_inject_attention", "auto", "cuda") == "reference"
    assert _dispatch.resolve("kv_inject_attention", "triton", "cuda") == "triton"
    assert _dispatch.resolve("ddim_logprob", "auto", "cuda") == "triton"
    choice, why = _dispatch.explain("kv_inject_attention", "cuda")
    assert choice == "reference" and "blend + SDPA" in why


# ------------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("D,N", [(40, 4096), (64, 1024), (80, 1024), (160, 256)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_sd_shapes(D, N, dtype):
    B, H = 4, 8
    q, k, v, kr, vr, _, m = (
        t.cuda() if t is not None else None for t in make(B, H, N, D, dtype, ref_batch=1)
    )
    m = m > 0.5
    out = kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=m, backend="triton")
    ref = kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=m, backend="reference")
    want = oracle(q, k, v, expand(kr, B), expand(vr, B), m.float())
    check_close(out, want, ref, dtype)


@pytest.mark.gpu
def test_gpu_torch_compile_captures_op():
    q, k, v, kr, vr, _, m = (t.cuda() if t is not None else None for t in make(2, 8, 256, 64, torch.float16))
    # not fullgraph: the backend resolution reads the environment / importlib (a graph break at most); the
    # custom op itself is what must be capturable.
    f = torch.compile(
        lambda *a: kv_inject_attention(
            *a[:3], k_ref=a[3], v_ref=a[4], mask=a[5], validate=False, backend="triton"
        )
    )
    torch.testing.assert_close(
        f(q, k, v, kr, vr, m),
        kv_inject_attention(q, k, v, k_ref=kr, v_ref=vr, mask=m, backend="triton"),
        atol=0,
        rtol=0,
    )
    assert math.isfinite(f(q, k, v, kr, vr, m).float().sum().item())


def test_tile_lists_fit_shared_memory_and_are_never_empty():
    """Every head dim and mask kind gets tiles; half-precision ones fit 227 KB by the estimate that
    tests/test_triton_compile_report.py checks against compiled kernels; fp32 gets its smallest tile only."""
    from b2kernels.ops.kv_inject_attention import triton as kt

    for d in (1, 16, 40, 64, 80, 128, 160, 256):
        for binary in (True, False):
            half = kt._tiles_for(d, 2, binary)
            assert half and all(kt.smem_estimate(t, d, 2, binary) <= kt.SMEM_LIMIT for t in half), (d, binary)
            (only,) = kt._tiles_for(d, 4, binary)
            assert kt.smem_estimate(only, d, 4, binary) == min(
                kt.smem_estimate(t, d, 4, binary) for t in kt._tiles_for(d, 2, binary) + (only,)
            )
    # the soft path stages four K/V streams and two Q tiles: at D = 160 the big bool tiles do not fit it
    assert (128, 32, 8, 3) in kt._tiles_for(160, 2, True)
    assert (128, 32, 8, 3) not in kt._tiles_for(160, 2, False)
