"""K/V-injection attention: ``softmax(Q'·K'ᵀ·scale)·V'`` with K' = m·K_ref + (1−m)·K (V, and optionally Q).

Public API: :func:`kv_inject_attention`, :class:`KVMask`. Backends: ``triton`` (flash-style kernel in
``triton.py``) and ``reference`` (pure torch in ``reference.py``), chosen by :func:`b2kernels._dispatch.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from b2kernels._dispatch import resolve, triton_interpret
from b2kernels.ops.kv_inject_attention.reference import kv_inject_attention_reference

__all__ = ["KVMask", "kv_inject_attention", "kv_inject_attention_reference", "triton_reasons_for"]

_OP = "kv_inject_attention"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256
_MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1, where the Triton kernel puts its B·H programs


@dataclass(frozen=True)
class KVMask:
    """Per-token blend weights, shared by all heads.

    ``values`` is [Bm, N], bool or floating in [0, 1]. Attention batch row b uses ``values[b % Bm]``: Bm = 1
    broadcasts one mask to every row, Bm = B gives one mask per row, and Bm = B/2 shares one mask between the
    two CFG halves of a ``[uncond; cond]`` batch. The kernel reads it with stride 0 over heads and never
    expands it; :meth:`materialize` builds the dense [B, N] float tensor the reference uses.
    """

    values: torch.Tensor

    def __post_init__(self):
        v = self.values
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"KVMask.values must be a torch.Tensor, got {type(v).__name__}")
        if v.dim() != 2:
            raise ValueError(f"KVMask.values must be [batch, tokens] (2-D), got shape {list(v.shape)}")
        if v.dtype != torch.bool and not v.dtype.is_floating_point:
            raise TypeError(f"KVMask.values must be bool or floating (values in [0, 1]), got {v.dtype}")

    @classmethod
    def full(cls, num_tokens: int, value: float = 1.0, *, batch: int = 1, device=None) -> KVMask:
        return cls(torch.full((batch, num_tokens), float(value), dtype=torch.float32, device=device))

    @property
    def batch(self) -> int:
        return self.values.shape[0]

    @property
    def binary(self) -> bool:
        """True for bool masks (values exactly 0/1, known without reading them)."""
        return self.values.dtype == torch.bool

    @property
    def num_tokens(self) -> int:
        return self.values.shape[1]

    def validate(self) -> None:
        """Raise if a float mask leaves [0, 1] or holds NaN. Reads two scalars back: syncs with the device."""
        v = self.values
        if v.dtype == torch.bool or v.numel() == 0:
            return
        lo, hi = torch.aminmax(v.detach())
        lo, hi = float(lo), float(hi)
        if not (lo >= 0.0 and hi <= 1.0):  # NaN fails both comparisons
            raise ValueError(
                f"mask values must lie in [0, 1] (no NaN), got min {lo} and max {hi}; "
                "clamp it (mask.clamp(0, 1)) or pass a bool mask"
            )

    def rows(self) -> torch.Tensor:
        """[Bm, N] float32 contiguous (what the kernel reads)."""
        return self.values.to(torch.float32).contiguous()

    def materialize(self, batch: int | None = None) -> torch.Tensor:
        """Dense [batch, N] float32 mask (row b = ``values[b % Bm]``); ``batch`` defaults to Bm."""
        batch = self.batch if batch is None else batch
        if batch % self.batch:
            raise ValueError(f"mask batch {self.batch} does not divide the attention batch {batch}")
        return self.rows().repeat(batch // self.batch, 1)


_MIN_SCALE, _MAX_SCALE = 1e-30, 1e30


def triton_reasons_for(q: torch.Tensor, *, needs_grad: bool) -> list[str]:
    """Why the Triton kernel can't serve this call (beyond device/installation reasons)."""
    reasons = []
    if q.dtype not in _TRITON_DTYPES:
        reasons.append(
            f"dtype {q.dtype} unsupported by the Triton kernel (supported: float16, bfloat16, float32)"
        )
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        reasons.append(
            f"head dim {q.shape[-1]} unsupported by the Triton kernel (supported: 1..{_TRITON_MAX_HEAD_DIM}, "
            "tuned for 40, 64, 80, 128, 160)"
        )
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        reasons.append(
            f"batch × heads = {q.shape[0]} × {q.shape[1]} exceeds the Triton kernel's {_MAX_GRID_Y} programs on "
            "grid axis 1 (split the batch)"
        )
    if needs_grad:
        reasons.append("the Triton kernel has no backward yet; inputs require grad (use backend='reference')")
    if torch.version.hip is not None:
        # AMD's backend may turn loads into buffer loads with 32-bit offsets inside the base tensor; the bool path
        # addresses K_ref from K's pointer (triton.py, `_pick`). Untested there, so not offered.
        reasons.append(
            "the Triton kernel is untested on ROCm (its bool path addresses K_ref from K's pointer)"
        )
    if triton_interpret() and q.is_cuda:
        # the interpreter copies each argument to the host on its own, which breaks the kernel's addressing of
        # reference rows relative to the own tensor (triton.py, `_pick`)
        reasons.append("under TRITON_INTERPRET the Triton kernel runs on CPU tensors only, not CUDA ones")
    return reasons


def _check(name, t, ndim=4):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"kv_inject_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(
            f"kv_inject_attention: expected {name} of shape [B, H, N, D] (4-D), got {list(t.shape)}"
        )


def _validate(q, k, v, k_ref, v_ref, mask, q_ref, ref_index):
    for name, t in (("q", q), ("k", k), ("v", v), ("k_ref", k_ref), ("v_ref", v_ref)):
        _check(name, t)
    if q_ref is not None:
        _check("q_ref", q_ref)
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    if D == 0:
        raise ValueError(f"kv_inject_attention: head dim D must be >= 1, got q of shape {list(q.shape)}")
    if NK == 0:
        raise ValueError(
            f"kv_inject_attention: need at least one key token (Nk >= 1), got k of shape {list(k.shape)}"
        )
    if not q.dtype.is_floating_point:
        raise TypeError(f"kv_inject_attention: q must be floating point, got {q.dtype}")
    named = [("k", k), ("v", v), ("k_ref", k_ref), ("v_ref", v_ref)] + (
        [("q_ref", q_ref)] if q_ref is not None else []
    )
    for name, t in named:
        if t.dtype != q.dtype:
            raise TypeError(
                f"kv_inject_attention: {name} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype"
            )
        if t.device != q.device:
            raise ValueError(
                f"kv_inject_attention: {name} is on {t.device} but q is on {q.device}; move them to one device"
            )
    if k.shape != (B, H, NK, D) or v.shape != (B, H, NK, D):
        raise ValueError(
            f"kv_inject_attention: expected k and v of shape [{B}, {H}, Nk, {D}] (batch, heads and head dim of q), "
            f"got k {list(k.shape)} and v {list(v.shape)}"
        )
    for name, t, n in [("k_ref", k_ref, NK), ("v_ref", v_ref, NK)] + (
        [("q_ref", q_ref, NQ)] if q_ref is not None else []
    ):
        br = t.shape[0]
        ok_batch = (br >= 1) if ref_index is not None else (br == 1 or br == B)
        if t.shape[1:] != (H, n, D) or not ok_batch:
            want = "any batch (indexed by ref_index)" if ref_index is not None else f"batch 1 or {B}"
            raise ValueError(
                f"kv_inject_attention: expected {name} of shape [Br, {H}, {n}, {D}] with {want}, got {list(t.shape)}"
            )
    if k_ref.shape[0] != v_ref.shape[0]:
        raise ValueError(
            f"kv_inject_attention: k_ref and v_ref batches differ ({k_ref.shape[0]} vs {v_ref.shape[0]})"
        )
    if q_ref is not None and q_ref.shape[0] != k_ref.shape[0]:
        # one Br for all references: the kernel picks the reference row of q_ref, k_ref and v_ref alike
        raise ValueError(
            f"kv_inject_attention: q_ref and k_ref batches differ ({q_ref.shape[0]} vs {k_ref.shape[0]}); "
            "pass them with the same Br"
        )
    if q_ref is not None and NQ != NK:
        raise ValueError(
            f"kv_inject_attention: q_ref needs self-attention shapes (one per-token mask for queries and keys), "
            f"got Nq={NQ} and Nk={NK}"
        )
    if mask.num_tokens != NK or B % mask.batch:
        raise ValueError(
            f"kv_inject_attention: expected mask of shape [Bm, {NK}] with Bm dividing the batch {B} "
            f"(1, {B}, or {B // 2} for CFG halves), got {list(mask.values.shape)}"
        )
    if mask.values.device != q.device:
        raise ValueError(f"kv_inject_attention: mask is on {mask.values.device} but q is on {q.device}")
    if ref_index is not None:
        if (
            ref_index.dim() != 1
            or ref_index.shape[0] != B
            or ref_index.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError(
                f"kv_inject_attention: ref_index must be an int32/int64 tensor of shape [{B}], "
                f"got {ref_index.dtype} {list(ref_index.shape)}"
            )
        if ref_index.device != q.device:
            raise ValueError(
                f"kv_inject_attention: ref_index is on {ref_index.device} but q is on {q.device}"
            )


def _validate_ref_index(ref_index, batch_ref: int) -> None:
    """Raise if ``ref_index`` leaves [0, Br) (the Triton kernel would read out of bounds). Syncs with the device."""
    if ref_index.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(ref_index.detach()))
    if lo < 0 or hi >= batch_ref:
        raise IndexError(
            f"kv_inject_attention: ref_index holds {lo if lo < 0 else hi}, out of range for the {batch_ref} rows "
            f"of k_ref/v_ref (valid 0..{batch_ref - 1})"
        )


# --- torch.library custom op: lets torch.compile / CUDA graphs capture the Triton kernel --------------------


@torch.library.custom_op("b2kernels::kv_inject_attention_fwd", mutates_args=())
def _kv_inject_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    mask: torch.Tensor,
    q_ref: torch.Tensor | None,
    ref_index: torch.Tensor | None,
    scale: float,
    binary: bool,
) -> torch.Tensor:
    from b2kernels.ops.kv_inject_attention.triton import kv_inject_attention_triton

    return kv_inject_attention_triton(q, k, v, k_ref, v_ref, mask, q_ref, ref_index, scale, binary)


@_kv_inject_attention_fwd.register_fake
def _(q, k, v, k_ref, v_ref, mask, q_ref, ref_index, scale, binary):
    B, H, NQ, D = q.shape
    return q.new_empty((B, NQ, H, D)).transpose(1, 2)


def kv_inject_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    mask: torch.Tensor | KVMask,
    q_ref: torch.Tensor | None = None,
    scale: float | None = None,
    ref_index: torch.Tensor | None = None,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of q against keys/values blended per token with reference keys/values.

    ``out = softmax(Q'·K'ᵀ·scale)·V'`` with ``K' = m·K_ref + (1−m)·K``, ``V' = m·V_ref + (1−m)·V`` and, when
    ``q_ref`` is given, ``Q' = m·Q_ref + (1−m)·Q`` (same per-token mask on query rows; needs Nq = Nk).

    Args:
        q: [B, H, Nq, D]; k, v: [B, H, Nk, D] — the layout of ``F.scaled_dot_product_attention``.
        k_ref, v_ref: [Br, H, Nk, D], Br ∈ {1, B} (1 broadcasts with stride 0), or any Br with ``ref_index``.
        mask: [Bm, Nk] bool or float in [0, 1] (or a :class:`KVMask`), Bm dividing B; row b uses ``mask[b % Bm]``.
            Shared by all heads, never expanded per head.
        q_ref: optional [Br, H, Nq, D] reference queries.
        scale: softmax scale, default ``D ** -0.5``.
        ref_index: optional int [B]: batch row b takes its reference from row ``ref_index[b]`` of k_ref/v_ref/q_ref
            (e.g. ``k_ref=k`` and reference rows of the same batch — no gather copy).
        validate: check that a float mask lies in [0, 1] and that ``ref_index`` lies in [0, Br) (reads back
            scalars: a device sync). Pass False in hot loops where both are known good (e.g. the binary masks and
            ref_index built by the integration).
        backend: "auto" | "triton" | "reference".

    Returns [B, H, Nq, D] in q's dtype. Triton: its memory is laid out [B, Nq, H, D] (a transposed view).
    ``mask ≡ 0`` reproduces ``SDPA(q, k, v)``; ``mask ≡ 1`` reproduces SDPA against the reference K/V (and Q).
    """
    if not isinstance(mask, KVMask):
        mask = KVMask(mask)
    _validate(q, k, v, k_ref, v_ref, mask, q_ref, ref_index)
    if validate:
        mask.validate()
        if ref_index is not None:
            _validate_ref_index(ref_index, k_ref.shape[0])
    D = q.shape[-1]
    scale = float(scale) if scale is not None else D**-0.5
    # The kernel folds the scale into its running max (needs scale > 0) and takes scale·log2(e) in fp32 (must not
    # underflow or overflow there).
    if not (_MIN_SCALE <= scale <= _MAX_SCALE):
        raise ValueError(
            f"kv_inject_attention: scale must be a positive finite number in [{_MIN_SCALE:g}, {_MAX_SCALE:g}], "
            f"got {scale}"
        )
    tensors = (q, k, v, k_ref, v_ref) + ((q_ref,) if q_ref is not None else ())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    choice = resolve(_OP, backend, q.device, triton_reasons_for(q, needs_grad=needs_grad))
    if choice == "reference":
        return kv_inject_attention_reference(
            q,
            k,
            v,
            k_ref=k_ref,
            v_ref=v_ref,
            mask=mask.materialize(q.shape[0]),
            q_ref=q_ref,
            scale=scale,
            ref_index=ref_index,
        )
    ridx = ref_index.to(torch.int32) if ref_index is not None else None
    # A bool mask lets the kernel read each K/V row from one source (no fp32 blend): see triton.py, `_pick`.
    return _kv_inject_attention_fwd(q, k, v, k_ref, v_ref, mask.rows(), q_ref, ridx, scale, mask.binary)
