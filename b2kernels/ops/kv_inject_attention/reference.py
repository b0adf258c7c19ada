"""Pure-torch K/V-injection attention: the CPU path and the test oracle (users may call it too).

Same semantics as the Triton kernel, but it materialises the blended K/V (and Q) and lets
``scaled_dot_product_attention`` (or an explicit float64 softmax, ``upcast=True``) do the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_rows(x: torch.Tensor, batch: int, ref_index: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` [Br, ...] as seen by attention batch rows 0..batch-1.

    With ``ref_index`` [batch] row b reads ``x[ref_index[b]]``; otherwise row b reads ``x[b % Br]``
    (``Br`` = 1 broadcasts, ``Br`` = batch is the identity).
    """
    if ref_index is not None:
        return x.index_select(0, ref_index.to(device=x.device, dtype=torch.long))
    br = x.shape[0]
    if br == batch:
        return x
    return x.repeat(batch // br, *([1] * (x.dim() - 1)))


def blend(x: torch.Tensor, x_ref: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``m·x_ref + (1−m)·x`` in (at least) float32, returned in ``x.dtype``; ``m`` broadcasts as [B, 1, N, 1].

    Written as two products (not ``x + m·(x_ref − x)``) so that m = 0 and m = 1 reproduce x and x_ref exactly.
    """
    ct = torch.promote_types(x.dtype, torch.float32)
    m4 = m[:, None, :, None].to(ct)
    return (m4 * x_ref.to(ct) + (1.0 - m4) * x.to(ct)).to(x.dtype)


def kv_inject_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    mask: torch.Tensor,
    q_ref: torch.Tensor | None = None,
    scale: float | None = None,
    ref_index: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """softmax(Q'·K'ᵀ·scale)·V' with K' = m·K_ref + (1−m)·K (same for V, and Q when ``q_ref`` is given).

    Shapes: q [B, H, Nq, D], k/v [B, H, Nk, D], k_ref/v_ref [Br, H, Nk, D], q_ref [Br, H, Nq, D],
    ``mask`` a dense float [B, Nk] (already expanded to B rows, values in [0, 1]).
    ``upcast=True`` computes in float64 with an explicit softmax (the accuracy oracle of the tests) and
    returns float64. Returns [B, H, Nq, D] in q's dtype otherwise.
    """
    batch = q.shape[0]
    m = mask.to(device=q.device)
    kr = expand_rows(k_ref, batch, ref_index)
    vr = expand_rows(v_ref, batch, ref_index)
    k2, v2 = blend(k, kr, m), blend(v, vr, m)
    q2 = q if q_ref is None else blend(q, expand_rows(q_ref, batch, ref_index), m)
    if upcast:
        q2, k2, v2 = (t.to(torch.float64) for t in (q2, k2, v2))
        s = scale if scale is not None else q.shape[-1] ** -0.5
        scores = torch.matmul(q2, k2.transpose(-1, -2)) * s
        return torch.matmul(torch.softmax(scores, dim=-1), v2)
    out = F.scaled_dot_product_attention(q2, k2, v2, scale=scale)
    # NaN propagates as in the explicit formula (and the Triton kernel): a NaN query poisons its own row, a NaN key
    # or value every row of its (batch, head). torch's CPU SDPA returns 0 for a NaN query row instead.
    nan_rows = (
        q2.isnan().any(-1, keepdim=True) | (k2.isnan().any(-1) | v2.isnan().any(-1)).any(-1)[..., None, None]
    )
    return out.masked_fill(nan_rows, float("nan"))
