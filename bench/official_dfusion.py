"""Official-style D-Fusion target generation, reimplemented for a fair side-by-side benchmark.

What D-Fusion's released sampler does per DDIM step (its mechanics, not its code): three CFG UNet calls of the
same batch size — the reference pass (every target's reference, duplicates recomputed, capturing self-attention
Q/K/V in every fused block and the 16×16 cross-attention probabilities that become the mask), the base pass
(replays the base; its output feeds nothing but itself) and the target pass, whose fused self-attention
materialises ``K̃ = m·K_ref + (1−m)·K``, ``Ṽ`` likewise (per head, as ``head_to_batch_dim`` tensors) and runs
``softmax(Q K̃ᵀ)·Ṽ`` with an explicit [N×N] score matrix. Each pass ends with the DDIM step + log-prob.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class _State:
    def __init__(self, mask_side: int, items: list[int], threshold: float):
        self.mode, self.fuse = "plain", False
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cross: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None
        self.mask_side, self.items, self.threshold = mask_side, items, threshold


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


def _cross_blocks(unet) -> list[str]:
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
def official_style_targets(
    unet,
    scheduler,
    cond_ref,
    cond_base,
    uncond,
    noise_ref,
    noise_base,
    *,
    fused_blocks,
    window,
    guidance_scale,
    mask_side,
    items,
    threshold,
):
    """Three CFG UNet passes per step for b targets. noise_*: [b, T+1, C, H, W] (x_T then per-step noise).
    Returns (target latents [b, C, H, W], target log-probs [b, T])."""
    state = _State(mask_side, items, threshold)
    blocks = _cross_blocks(unet)
    prefixes = tuple(blocks[i] for i in fused_blocks)
    saved = dict(unet.attn_processors)
    unet.set_attn_processor(
        {
            n: OfficialStyleProcessor(state, n, n.startswith(prefixes) and ".attn1." in n, ".attn2." in n)
            for n in saved
        }
    )
    b = cond_ref.shape[0]
    enc_ref = torch.cat([uncond.expand(b, -1, -1), cond_ref])
    enc_base = torch.cat([uncond.expand(b, -1, -1), cond_base])

    def eps(x, t, enc):
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=enc).sample
        u, c = out.chunk(2)
        return u + guidance_scale * (c - u)

    try:
        xr, xb, xt = noise_ref[:, 0], noise_base[:, 0], noise_base[:, 0]
        logps = []
        for i, t in enumerate(scheduler.timesteps):
            state.fuse = i in window
            state.mode, state.cross = "ref", []
            er = eps(xr, t, enc_ref)
            maps = torch.stack([c.chunk(2)[1] for c in state.cross]).mean(0)
            maps = maps.reshape(b, -1, maps.shape[1], maps.shape[2]).mean(1)[:, :, items]
            state.mask = (maps >= threshold).any(dim=2).float()
            state.mode = "plain"
            eb = eps(xb, t, enc_base)
            state.mode = "target"
            et = eps(xt, t, enc_base)
            xr, _ = _ddim_with_logprob(scheduler, er, t, xr, noise_ref[:, i + 1])
            xb, _ = _ddim_with_logprob(scheduler, eb, t, xb, noise_base[:, i + 1])
            xt, lp = _ddim_with_logprob(scheduler, et, t, xt, noise_base[:, i + 1])
            logps.append(lp)
    finally:
        unet.set_attn_processor(saved)
    return xt, torch.stack(logps, 1)
