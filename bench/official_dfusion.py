"""Official-style D-Fusion target generation, reimplemented for a fair side-by-side benchmark.

What D-Fusion's released sampler does per DDIM step (its mechanics, not its code): three CFG UNet calls of the
same batch size — the reference pass (every target's reference, duplicates recomputed, capturing self-attention
Q/K/V in every fused block and the 16×16 cross-attention probabilities that become the mask), the base pass
(replays the base; its output feeds nothing but itself) and the target pass, whose fused self-attention
materialises ``K̃ = m·K_ref + (1−m)·K``, ``Ṽ`` likewise (per head, as ``head_to_batch_dim`` tensors) and runs
``softmax(Q K̃ᵀ)·Ṽ`` with an explicit [N×N] score matrix. Each pass ends with the DDIM step + log-prob.

:func:`three_pass_fusion` is that loop; the test oracle (tests/dfusion_reference.py) runs its fusion through it
too. Nothing here imports b2diffurl: the loop is independent of the engine it is compared with.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F


class _State:
    def __init__(self, mask_side: int):
        self.mode, self.fuse = "plain", False  # mode: plain | ref | target
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cross: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [b, mask_side²] binary float (reference pass result)
        self.mask_side = mask_side


class OfficialStyleProcessor:
    """Materialised attention (explicit scores) with the three pass modes of the official loop."""

    def __init__(self, state: _State, name: str, fused: bool, is_cross: bool):
        self.s, self.name, self.fused, self.is_cross = state, name, fused, is_cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        s = self.s
        b, seq, _ = hidden_states.shape
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        q, k, v = attn.head_to_batch_dim(q), attn.head_to_batch_dim(k), attn.head_to_batch_dim(v)
        if not self.is_cross and self.fused and s.fuse and s.mode == "target":
            k_ref, v_ref = s.kv[self.name]
            side = math.isqrt(seq)
            m = s.mask.reshape(-1, 1, s.mask_side, s.mask_side)
            m = F.interpolate(m, (side, side)).reshape(-1, seq)
            m = torch.cat([m, m])[:, None, :].repeat(1, attn.heads, 1).reshape(-1, seq, 1).to(k.dtype)
            k = k_ref * m + k * (1 - m)
            v = v_ref * m + v * (1 - m)
        probs = attn.get_attention_scores(q, k, None)
        out = torch.bmm(probs, v)
        if not self.is_cross and self.fused and s.mode == "ref" and s.fuse:
            s.kv[self.name] = (k, v)
        if self.is_cross and s.mode == "ref" and seq == s.mask_side**2:
            s.cross.append(probs)
        out = attn.batch_to_head_dim(out)
        return attn.to_out[1](attn.to_out[0](out))


def cross_blocks(unet) -> list[str]:
    """Module-name prefixes of the UNet's cross-attention blocks (down, mid, up order)."""
    out = [
        f"down_blocks.{i}."
        for i, blk in enumerate(unet.down_blocks)
        if getattr(blk, "has_cross_attention", 0)
    ]
    if getattr(unet.mid_block, "has_cross_attention", 0):
        out.append("mid_block.")
    out += [
        f"up_blocks.{i}." for i, blk in enumerate(unet.up_blocks) if getattr(blk, "has_cross_attention", 0)
    ]
    return out


@contextlib.contextmanager
def official_attention(unet, fused_blocks, mask_side: int):
    """Installs :class:`OfficialStyleProcessor` in every attention layer (self-attention fused in the
    cross-attention blocks ``fused_blocks`` index) for the duration; yields their shared state (mode ``plain``:
    materialised attention, nothing fused or captured)."""
    state = _State(mask_side)
    blocks = cross_blocks(unet)
    prefixes = tuple(blocks[i] for i in fused_blocks)
    saved = dict(unet.attn_processors)
    unet.set_attn_processor(
        {
            n: OfficialStyleProcessor(state, n, n.startswith(prefixes) and ".attn1." in n, ".attn2." in n)
            for n in saved
        }
    )
    try:
        yield state
    finally:
        unet.set_attn_processor(saved)


def _ddim_with_logprob(scheduler, eps, t, x, z):
    mean = scheduler.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    std = scheduler._get_variance(t, prev_t) ** 0.5
    x_prev = mean + std * z
    lp = (
        -((x_prev.float() - mean.float()) ** 2) / (2 * std**2)
        - torch.log(std)
        - math.log(math.sqrt(2 * math.pi))
    )
    return x_prev, lp.mean(dim=tuple(range(1, x.dim())))


@torch.no_grad()
def three_pass_fusion(
    unet,
    scheduler,
    cond_ref,
    cond_base,
    uncond,
    noise_ref,
    noise_base,
    mask_of,
    *,
    fused_blocks,
    window,
    guidance_scale,
    mask_side,
):
    """The official loop: per DDIM step a reference, a base and a target CFG UNet pass of b rows each.

    ``noise_*`` [b, T+1, C, H, W] (x_T then per-step noise; the target replays the base's); ``mask_of`` maps the
    reference pass's cross-attention probabilities (cond half, averaged over the ``mask_side``² layers and the
    heads: [b, mask_side², L]) to the binary float mask [b, mask_side²]. Returns (reference final latents,
    base final latents, target latents [b, T+1, ...], target log-probs [b, T])."""
    b = cond_ref.shape[0]
    enc_ref = torch.cat([uncond.expand(b, -1, -1), cond_ref])
    enc_base = torch.cat([uncond.expand(b, -1, -1), cond_base])

    def eps(x, t, enc):
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=enc).sample
        u, c = out.chunk(2)
        return u + guidance_scale * (c - u)

    with official_attention(unet, fused_blocks, mask_side) as state:
        xr, xb, xt = noise_ref[:, 0], noise_base[:, 0], noise_base[:, 0]
        lat, logps = [xt], []
        for i, t in enumerate(scheduler.timesteps):
            state.fuse = i in window
            state.mode, state.cross = "ref", []
            er = eps(xr, t, enc_ref)
            maps = torch.stack([c.chunk(2)[1] for c in state.cross]).mean(0)
            maps = maps.reshape(b, -1, maps.shape[1], maps.shape[2]).mean(1)
            state.mask = mask_of(maps)
            state.mode = "plain"
            eb = eps(xb, t, enc_base)
            state.mode = "target"
            et = eps(xt, t, enc_base)
            xr, _ = _ddim_with_logprob(scheduler, er, t, xr, noise_ref[:, i + 1])
            xb, _ = _ddim_with_logprob(scheduler, eb, t, xb, noise_base[:, i + 1])
            xt, lp = _ddim_with_logprob(scheduler, et, t, xt, noise_base[:, i + 1])
            lat.append(xt)
            logps.append(lp)
    return xr, xb, torch.stack(lat, 1), torch.stack(logps, 1)


def shared_items_mask(items: list[int], threshold: float):
    """``mask_of`` for :func:`three_pass_fusion` with one object-token list and one threshold for all rows:
    a pixel is on where any item's probability reaches ``threshold``."""
    return lambda maps: (maps[:, :, items] >= threshold).any(dim=2).float()
