"""The two denoising loops of a D-Fusion stage, both through the sampler's policy step: Phase A (plain sampling
with per-sample noise, recording the object-token cross-attention of every row and building its object mask per
step) and the fusion (targets replay their bases' noise while the fused self-attention modules blend in the
references' K/V under the mask, references and targets in one batched UNet call per step)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from b2diffurl.algos.dfusion.pairs import RowNoise
from b2diffurl.config import DFusionConfig
from b2kernels.integrations.masks import object_mask


def fusion_block_indices(unet, spec: str) -> tuple[int, ...]:
    """Indices (into the UNet blocks that contain cross-attention, execution order) of the fused blocks.
    ``spec``: 'a-b' inclusive, or 'auto' = the mid block and every cross-attention up block (SD: 3..6)."""
    from b2kernels.integrations.diffusers import cross_attention_blocks

    blocks = cross_attention_blocks(unet)
    if spec == "auto":
        sel = tuple(i for i, b in enumerate(blocks) if not b.startswith("down_blocks"))
        if not sel:
            raise ValueError("fusion_layers='auto': this UNet has no mid/up block with cross-attention")
        return sel
    try:
        a, b = (int(x) for x in spec.split("-"))
    except ValueError:
        raise ValueError(f"fusion_layers must be 'auto' or 'a-b' (e.g. '3-6'), got {spec!r}") from None
    if not 0 <= a <= b < len(blocks):
        raise ValueError(
            f"fusion_layers={spec!r} out of range: this UNet has {len(blocks)} blocks with "
            f"cross-attention (indices 0..{len(blocks) - 1}: {blocks}); e.g. use 'auto'"
        )
    return tuple(range(a, b + 1))


def fused_step_range(cfg: DFusionConfig, num_steps: int) -> list[int]:
    a, b = cfg.fusion_steps
    a = a + num_steps if a < 0 else a
    b = b + num_steps if b < 0 else b
    if not 0 <= a <= b < num_steps:
        raise ValueError(
            f"fusion_steps={tuple(cfg.fusion_steps)} is outside the {num_steps} DDIM steps "
            f"(valid indices 0..{num_steps - 1}, negatives count from the end)"
        )
    return list(range(a, b + 1))


def _injection_config(layers, steps, cfg: DFusionConfig, backend: str, mode: str):
    from b2kernels.integrations.diffusers import InjectionConfig

    return InjectionConfig(
        layers=tuple(layers),
        steps=tuple(steps),
        components=("k", "v"),
        mask_mode=mode,
        mask_grid=cfg.mask_grid,
        threshold=cfg.mask_threshold,
        backend="auto" if backend is None else backend,
    )


def run_phase_a(
    sampler,
    row_cond: torch.Tensor,
    noise: RowNoise,
    *,
    token_cols: torch.Tensor | None,
    selection: torch.Tensor | None,
    thresholds: torch.Tensor | None,
    cfg: DFusionConfig,
    arena=None,
    ids=None,
    progress: Callable | None = None,
):
    """Sample Phase-A trajectories of N rows (``row_cond`` [N, L, D]) with the per-row noise, capturing each
    row's object mask per step. Returns (latents [N, T+1, C, H, W], logps [N, T], masks [N, T, grid²] bool).
    ``token_cols`` [N, J]: token columns to capture; ``selection`` [N, J, I] sums them into items."""
    from b2kernels.integrations.diffusers import InjectionContext, StreamLayout, attach

    unet, T = sampler.policy.unet, sampler.num_steps
    n = row_cond.shape[0]
    x = noise.x_T().to(sampler.dtype)
    embeds = sampler.embeds_for(row_cond)
    guided = sampler.guidance() is not None
    lat, logps, masks = [x], [], []
    if arena is not None:
        arena.write_latents(ids, 0, x)
    ctx = InjectionContext(
        config=_injection_config((), (), cfg, sampler.backend, "captured"),
        layout=StreamLayout.cfg(num_ref=n, cfg=guided),
    )
    capture = token_cols is not None
    if capture:
        ctx.set_objects(token_cols)
    with attach(unet, ctx, capture_cross=capture):
        for i in range(T):
            ctx.step = i
            ctx.cross_maps = None
            x, logp = sampler.policy_step(x, i, embeds, noise=noise.step(i).to(x.dtype))
            if capture:
                if ctx.cross_maps is None:
                    raise ValueError(
                        f"mask_grid={cfg.mask_grid}: no cross-attention layer of this UNet runs at a "
                        f"{cfg.mask_grid}x{cfg.mask_grid} token grid; set dfusion.mask_grid"
                    )
                masks.append(object_mask(ctx.cross_maps, thresholds, items=selection, rule=cfg.mask_rule))
            lat.append(x)
            logps.append(logp)
            if arena is not None:
                arena.write_latents(ids, i + 1, x)
            if progress is not None:
                progress(1)
    logps = torch.stack(logps, 1)
    if arena is not None:
        host = logps.float().cpu()
        for i in range(T):
            arena.write_logprobs(ids, i, host[:, i])
    return torch.stack(lat, 1), logps, (torch.stack(masks, 1) if masks else None)


def run_fusion(
    sampler,
    ref_latents: torch.Tensor,
    ref_cond: torch.Tensor,
    ref_of_target: torch.Tensor,
    target_cond: torch.Tensor,
    start_latent: torch.Tensor,
    noise: RowNoise,
    ref_masks: torch.Tensor,
    fused_steps: Sequence[int],
    layers: Sequence[int],
    cfg: DFusionConfig,
    progress: Callable | None = None,
):
    """Fused denoising of the targets, one batched CFG UNet call per step.

    ``ref_latents`` [R, T+1, ...]: the distinct references' stored trajectories (a reference replays its
    Phase-A trajectory, so its latent at step i is read, not recomputed); ``ref_cond`` [R, L, D];
    ``ref_of_target`` [Nt] indexes the references; ``target_cond`` [Nt, L, D]; ``start_latent`` [Nt, ...] = the
    base latent at the first fused step (earlier steps are the base's); ``ref_masks`` [R, T, gh·gw] per reference
    and step; ``noise`` replays the bases' streams. Returns (latents [Nt, T+1−s0, ...] from latent s0 on,
    logps [Nt, T−s0]).
    """
    from b2kernels.integrations.diffusers import InjectionContext, StreamLayout, attach

    unet, T = sampler.policy.unet, sampler.num_steps
    s0, s1 = fused_steps[0], fused_steps[-1]
    r, nt = ref_latents.shape[0], start_latent.shape[0]
    gh = gw = cfg.mask_grid
    guided = sampler.guidance() is not None
    ctx = InjectionContext(config=_injection_config(layers, fused_steps, cfg, sampler.backend, "given"))
    fused_layout = StreamLayout.cfg(num_ref=r, num_target=nt, pairing=ref_of_target.tolist(), cfg=guided)
    plain_layout = StreamLayout.cfg(num_plain=nt, cfg=guided)
    fused_embeds = sampler.embeds_for(torch.cat([ref_cond, target_cond]))
    plain_embeds = sampler.embeds_for(target_cond)
    x = start_latent.to(sampler.dtype)
    lat, logps = [x], []
    with attach(unet, ctx, capture_cross=False):
        for i in range(s0, T):
            ctx.step = i
            if i <= s1:
                ctx.layout = fused_layout
                ctx.set_mask(ref_masks[:, i].reshape(r, gh, gw).to(x.device))
                rows = torch.cat([ref_latents[:, i].to(x), x])
                x, logp = sampler.policy_step(
                    rows, i, fused_embeds, noise=noise.step(i).to(x.dtype), context_rows=r
                )
            else:
                ctx.layout = plain_layout
                x, logp = sampler.policy_step(x, i, plain_embeds, noise=noise.step(i).to(x.dtype))
            lat.append(x)
            logps.append(logp)
            if progress is not None:
                progress(1)
    return torch.stack(lat, 1), torch.stack(logps, 1)


def capture_columns(selection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From per-prompt selection [P, L, I] to the token columns to capture [P, J] (padded by repeating a
    column) and the per-prompt selection over those columns [P, J, I] (padding columns weigh 0)."""
    cols = [sel.sum(1).nonzero().squeeze(1) for sel in selection]
    j = max(len(c) for c in cols)
    tok = torch.stack([torch.cat([c, c[:1].repeat(j - len(c))]) for c in cols])
    sub = torch.zeros(selection.shape[0], j, selection.shape[2])
    for p, c in enumerate(cols):
        sub[p, : len(c)] = selection[p, c]
    return tok, sub
