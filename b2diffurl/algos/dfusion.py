"""D-Fusion: mask-guided self-attention K/V fusion that turns poorly aligned "base" samples into visually
consistent, better aligned "target" samples (and keeps the targets' denoising trajectories for RL).

One stage = :func:`generate_pairs`:

1. **Phase A** — ``n`` samples per prompt. Every sample owns a ``torch.Generator`` seeded from (run seed, epoch,
   sample index) that draws ``x_T`` and every step's noise in one fixed draw (:class:`RowNoise`), so any trajectory
   replays from (prompt, seed). While sampling, the conditional cross-attention probabilities of the layers whose
   token grid is ``mask_grid``² are captured and turned into each sample's binary object mask per step (small:
   ``[N, T, grid²]`` bools). A reference replays its own Phase-A trajectory exactly, so this *is* the mask the
   official reference pass computes at the same step — and having it before the fusion call is what lets the
   reference and target rows share one UNet call (the official mask also reads layers that run after the first
   fused layer, so it cannot come from inside the same call).
2. **Pairing** (:func:`pair_indices`) — per prompt, best first: references = top quarter each used twice, bases =
   bottom half.
3. **Fusion** — targets replay their bases' seeds. Per step, *one* batched CFG UNet call holds each distinct
   reference once (its latent read back from the Phase-A trajectory: no DDIM update needed) and every target; the
   fused self-attention modules hand K/V from reference rows to target rows (``K̃ = m·K_ref + (1−m)·K_tgt``, same
   for V; Q is the target's own; both CFG halves). No base pass. Steps before the fusion window are identical to
   the base's (same latent, model and noise), so targets start from the base latent at the first fused step.
4. Targets are scored; (preferred, dispreferred) = (target, base) by reward, ties dropped.

Attention processors: :mod:`b2kernels.integrations.diffusers` — in Phase A a "captured" context on the
cross-attention modules only (all rows are reference streams, no fused layers), during fusion a "given"-mask
context whose fused self-attention calls :func:`b2kernels.kv_inject_attention` with the reference rows of the
same batch (no gather copy).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from b2diffurl.config import DFusionConfig, DPOConfig  # noqa: F401  (re-exported: the config lives torch-free)
from b2diffurl.config import dfusion_pairing_sizes as pairing_sizes

# --------------------------------------------------------------------------------------------------- pairing


def pair_indices(
    scores: torch.Tensor, ref_fraction: float = 0.25, base_fraction: float = 0.5, reuse: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair references with bases per prompt.

    ``scores`` [P, n] (row = prompt). Returns ``(ref_idx, base_idx)``, both [P, n_base] LongTensors of sample
    indices within the prompt's row: sorted best first (stable: ties keep the lower index first), references are
    the top ``n·ref_fraction`` each repeated ``reuse`` times in order [o₁, o₁, o₂, o₂, …]; bases are the last
    ``n·base_fraction`` of the order. Pair i = (ref_idx[:, i], base_idx[:, i]).
    """
    p, n = scores.shape
    n_ref, n_base = pairing_sizes(n, ref_fraction, base_fraction, reuse)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    refs = order[:, :n_ref].repeat_interleave(reuse, dim=1)
    bases = order[:, n - n_base :]
    return refs, bases


# --------------------------------------------------------------------------------------------------- tokens


def _token_ids(tokenizer, text: str, special: bool) -> list[int]:
    out = tokenizer(text, add_special_tokens=special)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out.input_ids
    if torch.is_tensor(ids):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


def object_token_columns(tokenizer, prompt: str, words: Sequence[str], *, required: bool) -> list[list[int]]:
    """Token columns (positions in the encoded prompt, BOS included) of each object word found in ``prompt``.

    Words are located by tokenising the word alone and searching that id sequence in the tokenised prompt, so
    multi-token words give several columns and nothing depends on word positions. Returns one list per word that
    occurs (all occurrences). ``required``: a word that does not occur raises ValueError.
    """
    prompt_ids = _token_ids(tokenizer, prompt, special=True)
    items = []
    for word in words:
        wid = _token_ids(tokenizer, word, special=False)
        if not wid:
            raise ValueError(f"object word {word!r} tokenises to nothing")
        cols = [
            i + j
            for i in range(len(prompt_ids) - len(wid) + 1)
            if prompt_ids[i : i + len(wid)] == wid
            for j in range(len(wid))
        ]
        if cols:
            items.append(cols)
        elif required:
            raise ValueError(
                f"object word {word!r} is not in prompt {prompt!r} (its tokens {wid} do not occur in "
                f"the prompt's {prompt_ids}); set dfusion.object_words to words every prompt contains"
            )
    return items


def default_object_words() -> tuple[str, ...]:
    from b2diffurl.toy.prompts import OBJECT_WORDS

    return tuple(OBJECT_WORDS)


def item_selection(
    tokenizer, prompts: Sequence[str], cfg: DFusionConfig, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: selection matrix S [P, L, I] (1 at each item's token columns) and thresholds [P, I]
    (+inf on padded items, so they never switch a token on)."""
    words = tuple(cfg.object_words) or default_object_words()
    per_prompt = []
    for p in prompts:
        present = [w for w in words if w in p.lower().split()] if not cfg.object_words else list(words)
        if not present:
            raise ValueError(f"no object word of {list(words)} in prompt {p!r}: set dfusion.object_words")
        cols = object_token_columns(tokenizer, p, present, required=True)
        per_prompt.append((present, cols))
    n_items = max(len(c) for _, c in per_prompt)
    sel = torch.zeros(len(prompts), seq_len, n_items)
    thr = torch.full((len(prompts), n_items), math.inf)
    for pi, (present, cols) in enumerate(per_prompt):
        for ii, (w, c) in enumerate(zip(present, cols)):
            if max(c) >= seq_len:
                raise ValueError(
                    f"object word {w!r} of prompt {prompt_preview(prompts[pi])} sits at token "
                    f"{max(c)} beyond the encoder's {seq_len} tokens"
                )
            sel[pi, c, ii] = 1.0
            thr[pi, ii] = cfg.item_thresholds.get(w, cfg.mask_threshold)
    return sel, thr


def prompt_preview(p: str) -> str:
    return repr(p if len(p) < 60 else p[:57] + "...")


# --------------------------------------------------------------------------------------------------- masks


def object_mask(
    probs: torch.Tensor, selection: torch.Tensor, thresholds: torch.Tensor, rule: str = "threshold"
) -> torch.Tensor:
    """Binary object mask from cross-attention probabilities.

    ``probs`` [B, HW, L]: conditional-half cross-attention probabilities already averaged over the mask layers and
    heads; ``selection`` [B, L, I]; ``thresholds`` [B, I]. Per item the token map is the attention mass on the
    item's token columns (one column for a single-token word); it is binarised (``>= threshold``, or ``>=`` its
    spatial mean with ``rule='mean'``), then the union over items is taken. Returns [B, HW] float {0, 1}.
    """
    a = torch.bmm(probs.float(), selection.to(probs.device, torch.float32))  # [B, HW, I]
    thr = thresholds.to(probs.device, torch.float32)
    if rule == "mean":
        thr = torch.where(torch.isinf(thr), thr, a.mean(dim=1))
    elif rule != "threshold":
        raise ValueError(f"mask rule must be 'threshold' or 'mean', got {rule!r}")
    return (a >= thr[:, None, :]).any(dim=2).float()


def resize_mask(mask: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of flattened masks [B, h·w] from ``src_hw`` to ``dst_hw`` -> [B, H·W]
    (``F.interpolate`` nearest: source index = floor(dst · src / dst), as the official code)."""
    if tuple(src_hw) == tuple(dst_hw):
        return mask
    b = mask.shape[0]
    out = F.interpolate(mask.reshape(b, 1, *src_hw).float(), size=tuple(dst_hw), mode="nearest")
    return out.reshape(b, dst_hw[0] * dst_hw[1])


# --------------------------------------------------------------------------------------------------- noise


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    """Seed of sample ``index`` of stage ``epoch`` (distinct for index < 2²⁴ and epoch < 2²⁴)."""
    return (int(run_seed) * 2**48 + int(epoch) * 2**24 + int(index)) % (2**63 - 1)


class RowNoise:
    """Per-sample noise: one CPU ``torch.Generator`` per row, seeded by :func:`sample_seed`, draws a single
    [T+1, C, H, W] standard normal tensor: slot 0 is x_T, slot i+1 the noise of DDIM step i. Drawing on CPU makes
    the stream independent of device and batch composition, so a row replays bit-identically from its seed."""

    def __init__(
        self, seeds: Sequence[int], num_steps: int, latent_shape: Sequence[int], device, dtype=torch.float32
    ):
        self.seeds = [int(s) for s in seeds]
        draws = []
        for s in self.seeds:
            g = torch.Generator(device="cpu").manual_seed(s)
            draws.append(torch.randn((num_steps + 1, *latent_shape), generator=g, dtype=torch.float32))
        self.noise = torch.stack(draws).to(device=device, dtype=dtype)  # [N, T+1, C, H, W]

    def x_T(self) -> torch.Tensor:
        return self.noise[:, 0]

    def step(self, i: int) -> torch.Tensor:
        return self.noise[:, i + 1]


# --------------------------------------------------------------------------------------------------- layers


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


# --------------------------------------------------------------------------------------------------- sampling


@dataclass
class DFusionStage:
    """What one stage of pair generation produced. Trajectory ids point into the arena."""

    prompts: list[str]  # unique prompts of the stage (arena prompt id = index here)
    sample_ids: torch.Tensor  # [P·n] Phase-A trajectory ids (prompt-major)
    sample_rewards: torch.Tensor  # [P·n]
    ref_ids: torch.Tensor  # [P·nb] reference trajectory id of each pair
    base_ids: torch.Tensor  # [P·nb]
    target_ids: torch.Tensor  # [P·nb]
    base_rewards: torch.Tensor  # [P·nb]
    target_rewards: torch.Tensor  # [P·nb]
    pair_prompt: torch.Tensor  # [P·nb] prompt index of each pair
    masks: torch.Tensor  # [P·nb, T, grid²] bool: the mask used at each step (zeros outside window)
    fused_steps: list[int]
    preferred: torch.Tensor  # [K] ids of the preferred member of each decisive pair
    dispreferred: torch.Tensor  # [K]
    metrics: dict
    images: torch.Tensor | None = None  # a few (reference, base, target) images for grids
    cond: torch.Tensor | None = None  # [P, L, D] prompt embeddings (arena prompt id indexes them)

    @property
    def num_pairs(self) -> int:
        return int(self.preferred.numel())


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
                masks.append(object_mask(ctx.cross_maps, selection, thresholds, cfg.mask_rule).bool())
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


def _capture_tokens(selection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From per-prompt selection [P, L, I] to the token columns to capture [P, J] (padded by repeating a
    column) and the per-prompt selection over those columns [P, J, I] (padding columns weigh 0)."""
    cols = [sel.sum(1).nonzero().squeeze(1) for sel in selection]
    j = max(len(c) for c in cols)
    tok = torch.stack([torch.cat([c, c[:1].repeat(j - len(c))]) for c in cols])
    sub = torch.zeros(selection.shape[0], j, selection.shape[2])
    for p, c in enumerate(cols):
        sub[p, : len(c)] = selection[p, c]
    return tok, sub


@torch.no_grad()
def _generate_chunk(
    sampler,
    prompts,
    cond,
    selection,
    thresholds,
    p0,
    cfg,
    *,
    reward_fn,
    arena,
    run_seed,
    epoch,
    decode_batch,
    progress,
) -> dict:
    """Phase A + pairing + fusion + scoring for prompts p0 … p0+len(prompts)−1 of the stage."""
    policy, T, device = sampler.policy, sampler.num_steps, sampler.device
    shape = tuple(policy.latent_shape)
    fused_steps = fused_step_range(cfg, T)
    layers = fusion_block_indices(policy.unet, cfg.fusion_layers)
    n = cfg.samples_per_prompt
    _, n_base = pairing_sizes(n, cfg.ref_fraction, cfg.base_fraction, cfg.ref_reuse)
    P = len(prompts)
    tok, sub = _capture_tokens(selection)

    # ---- Phase A (per-sample generators; masks captured for every row, references chosen afterwards)
    row_prompt = torch.arange(P).repeat_interleave(n)
    seeds = [sample_seed(run_seed, epoch, p0 * n + j) for j in range(P * n)]
    ids_a = arena.add_trees((row_prompt + p0).tolist(), T)
    lat_a, logp_a, masks_a = run_phase_a(
        sampler,
        cond[row_prompt.to(device)],
        RowNoise(seeds, T, shape, device),
        token_cols=tok[row_prompt],
        selection=sub[row_prompt],
        thresholds=thresholds[row_prompt],
        cfg=cfg,
        arena=arena,
        ids=ids_a,
        progress=progress,
    )
    rewards_a = _score(
        policy, reward_fn, lat_a[:, -1], [prompts[i] for i in row_prompt.tolist()], decode_batch
    )
    rewards_a = rewards_a.float().cpu()
    arena.set_rewards(ids_a, rewards_a)

    # ---- pairing (indices local to each prompt -> rows of this chunk)
    ref_local, base_local = pair_indices(
        rewards_a.reshape(P, n), cfg.ref_fraction, cfg.base_fraction, cfg.ref_reuse
    )
    offs = (torch.arange(P) * n)[:, None]
    ref_rows, base_rows = (ref_local + offs).reshape(-1), (base_local + offs).reshape(-1)
    uniq_refs = (ref_local[:, :: cfg.ref_reuse] + offs).reshape(-1)  # each reference once
    ref_of_target = torch.arange(uniq_refs.numel()).repeat_interleave(cfg.ref_reuse)
    pair_prompt = torch.arange(P).repeat_interleave(n_base)

    # ---- fusion: targets replay the bases' noise streams
    s0 = fused_steps[0]
    step_on = torch.zeros(T, dtype=torch.bool, device=masks_a.device)
    step_on[fused_steps] = True
    ref_masks = masks_a[uniq_refs.to(masks_a.device)] & step_on[None, :, None]
    lat_f, logp_f = run_fusion(
        sampler,
        lat_a[uniq_refs],
        cond[row_prompt[uniq_refs].to(device)],
        ref_of_target,
        cond[pair_prompt.to(device)],
        lat_a[base_rows, s0],
        RowNoise([seeds[j] for j in base_rows.tolist()], T, shape, device),
        ref_masks,
        fused_steps,
        layers,
        cfg,
        progress=progress,
    )

    ids_t = arena.add_trees((pair_prompt + p0).tolist(), T)
    for i in range(s0 + 1):  # identical to the base up to the first fused step
        arena.write_latents(ids_t, i, lat_a[base_rows, i])
    for k, i in enumerate(range(s0, T)):
        arena.write_latents(ids_t, i + 1, lat_f[:, k + 1])
    logp_t = torch.cat([logp_a[base_rows, :s0], logp_f], 1).float().cpu()
    for i in range(T):
        arena.write_logprobs(ids_t, i, logp_t[:, i])
    rewards_t = _score(
        policy, reward_fn, lat_f[:, -1], [prompts[i] for i in pair_prompt.tolist()], decode_batch
    )
    rewards_t = rewards_t.float().cpu()
    arena.set_rewards(ids_t, rewards_t)
    return {
        "sample_ids": ids_a.cpu(),
        "sample_rewards": rewards_a,
        "ref_ids": ids_a[ref_rows].cpu(),
        "base_ids": ids_a[base_rows].cpu(),
        "target_ids": ids_t.cpu(),
        "base_rewards": rewards_a[base_rows],
        "target_rewards": rewards_t,
        "ref_rewards": rewards_a[ref_rows],
        "pair_prompt": pair_prompt + p0,
        "masks": ref_masks[ref_of_target.to(ref_masks.device)].cpu(),
        "final": (lat_a[ref_rows, -1], lat_a[base_rows, -1], lat_f[:, -1]),
    }


@torch.no_grad()
def generate_pairs(
    sampler,
    prompts: Sequence[str],
    cfg: DFusionConfig,
    *,
    reward_fn,
    arena,
    run_seed: int = 0,
    epoch: int = 0,
    prompts_per_call: int | None = None,
    decode_batch: int = 64,
    save_dir: str | None = None,
    progress: Callable | None = None,
) -> DFusionStage:
    """One D-Fusion stage on ``sampler.policy``: Phase A for ``prompts`` (each ``cfg.samples_per_prompt``
    times), pairing, fusion, scoring, ``prompts_per_call`` prompts per batched UNet call (default: all).
    Every trajectory (Phase A and targets) goes into ``arena`` (branches=1, prompt id = index into ``prompts``;
    a prompt listed twice is two groups), with rewards; target log-probs are the fused sampling log-probs.
    ``save_dir``: write the reference | base | target | mask grid there."""
    cfg.validate()
    policy = sampler.policy
    prompts = list(prompts)
    T = sampler.num_steps
    fused_steps = fused_step_range(cfg, T)
    fusion_block_indices(policy.unet, cfg.fusion_layers)  # fail on a bad layer range before sampling
    cond = policy.encode_prompts(prompts).to(sampler.device, sampler.dtype)
    selection, thresholds = item_selection(policy.tokenizer, prompts, cfg, cond.shape[1])
    step = prompts_per_call or len(prompts)
    parts = [
        _generate_chunk(
            sampler,
            prompts[a : a + step],
            cond[a : a + step],
            selection[a : a + step],
            thresholds[a : a + step],
            a,
            cfg,
            reward_fn=reward_fn,
            arena=arena,
            run_seed=run_seed,
            epoch=epoch,
            decode_batch=decode_batch,
            progress=progress,
        )
        for a in range(0, len(prompts), step)
    ]
    arena.synchronize()
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "final"}
    rb, rt = cat["base_rewards"], cat["target_rewards"]
    win, lose = rt > rb, rt < rb
    decisive = win | lose
    preferred = torch.where(win, cat["target_ids"], cat["base_ids"])[decisive]
    dispreferred = torch.where(win, cat["base_ids"], cat["target_ids"])[decisive]
    metrics = {
        "images": int(cat["sample_ids"].numel() + cat["target_ids"].numel()),
        "reward_mean": float(cat["sample_rewards"].mean()),
        "reward_std": float(cat["sample_rewards"].std()) if cat["sample_rewards"].numel() > 1 else 0.0,
        "reward_ref_mean": float(cat["ref_rewards"].mean()),
        "reward_base_mean": float(rb.mean()),
        "reward_target_mean": float(rt.mean()),
        "target_minus_base": float((rt - rb).mean()),
        "target_beats_base": float(win.float().mean()),
        "pairs": int(decisive.sum()),
        "pairs_tied": int((~decisive).sum()),
        "mask_coverage": float(cat["masks"][:, fused_steps].float().mean()),
    }
    ref_f, base_f, tgt_f = parts[0]["final"]
    k = min(8, tgt_f.shape[0])
    images = torch.stack(
        [policy.decode(x[:k]).float().clamp(0, 1).cpu() for x in (ref_f, base_f, tgt_f)], 1
    ).flatten(0, 1)
    stage = DFusionStage(
        prompts=prompts,
        sample_ids=cat["sample_ids"],
        sample_rewards=cat["sample_rewards"],
        ref_ids=cat["ref_ids"],
        base_ids=cat["base_ids"],
        target_ids=cat["target_ids"],
        base_rewards=rb,
        target_rewards=rt,
        pair_prompt=cat["pair_prompt"],
        masks=cat["masks"],
        fused_steps=fused_steps,
        preferred=preferred,
        dispreferred=dispreferred,
        metrics=metrics,
        images=images,
        cond=cond,
    )
    if save_dir:
        import os

        path = os.path.join(save_dir, f"pairs-stage{epoch:05d}.png")
        save_pair_grid(
            path,
            policy,
            ref_f,
            base_f,
            tgt_f,
            parts[0]["masks"][:, fused_steps[len(fused_steps) // 2]],
            cfg.mask_grid,
        )
        stage.metrics["pairs_png"] = path
    return stage


def _score(policy, reward_fn, latents, prompts, batch):
    out = []
    for i in range(0, latents.shape[0], batch):
        images = policy.decode(latents[i : i + batch])
        out.append(reward_fn(images, prompts[i : i + batch]).float())
    return torch.cat(out)


def save_pair_grid(
    path: str, policy, ref_lat, base_lat, tgt_lat, masks, grid: int, max_rows: int = 16
) -> str:
    """PNG grid, one row per pair: reference | base | target | mask (nearest-upsampled to the image size)."""
    import os

    import numpy as np
    from PIL import Image

    k = min(max_rows, ref_lat.shape[0])
    imgs = [policy.decode(x[:k]).float().clamp(0, 1).cpu() for x in (ref_lat, base_lat, tgt_lat)]
    h, w = imgs[0].shape[-2:]
    m = resize_mask(masks[:k].float().cpu(), (grid, grid), (h, w)).reshape(k, 1, h, w).expand(k, 3, h, w)
    tiles = torch.stack(imgs + [m], 1)  # [k, 4, 3, h, w]
    up = max(1, 96 // h)  # small toy images: enlarge
    if up > 1:
        tiles = tiles.repeat_interleave(up, dim=3).repeat_interleave(up, dim=4)
        h, w = h * up, w * up
    canvas = tiles.permute(0, 3, 1, 4, 2).reshape(k * h, 4 * w, 3)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray((canvas.numpy() * 255).round().astype(np.uint8)).save(path)
    return path


# --------------------------------------------------------------------------------------------------- trainer plug-in


class DFusionAlgorithm:
    """``b2diffurl train --algo dfusion``: each stage draws ``sample.prompts_per_stage`` prompts, builds D-Fusion
    pairs (:func:`generate_pairs`) and trains on them with D3PO (``dfusion.objective='dpo'``, π_ref = LoRA
    off, ℓ^ref once per stage, steps from the first fused one on) or with DDPO-style PPO-clip (``'ppo'``:
    targets and bases, per-prompt z-scored rewards). Sampling noise derives from (run seed, stage, sample index), so a resumed run replays it
    without generator state."""

    name = "dfusion"
    needs_reference_policy = True  # DPO's π_ref is this UNet with LoRA off: model.lora=auto turns LoRA on

    def __init__(self, ctx):
        from b2kernels.buffer import TrajectoryArena

        c = ctx.cfg
        self.ctx, self.dcfg, self.pcfg = ctx, c.dfusion, c.dpo
        self.dcfg.validate()
        self.pcfg.validate()
        self.T = c.sample.num_steps
        n = self.dcfg.samples_per_prompt
        _, nb = pairing_sizes(n, self.dcfg.ref_fraction, self.dcfg.base_fraction, self.dcfg.ref_reuse)
        P = c.sample.prompts_per_stage
        self.prompts_per_call = max(1, c.sample.batch_size * c.sample.branches // n)
        fused_step_range(self.dcfg, self.T)
        fusion_block_indices(ctx.policy.unet, self.dcfg.fusion_layers)
        if self.dcfg.objective == "dpo" and getattr(ctx.policy, "lora_config", "n/a") is None:
            raise ValueError(
                "dfusion with objective='dpo' needs π_ref = the UNet with LoRA disabled: set "
                "model.lora=on (or auto)"
            )
        self.arena = TrajectoryArena(
            tuple(ctx.policy.latent_shape),
            num_steps=self.T,
            max_trees=P * (n + nb),
            branches=1,
            dtype=ctx.sampler.dtype,
        )

    def sample_stage(self, stage: int):
        from b2diffurl.algos.api import StageData

        ctx = self.ctx
        t0 = time.perf_counter()
        prompts = ctx.draw_prompts(ctx.cfg.sample.prompts_per_stage)
        self.arena.reset()
        save_dir = os.path.join(ctx.cfg.out, "pairs") if self.dcfg.save_pairs else None
        T = self.T
        calls = -(-len(prompts) // self.prompts_per_call) * (2 * T - fused_step_range(self.dcfg, T)[0])
        bar = ctx.progress and ctx.progress(
            range(calls), desc=f"stage {stage}: D-Fusion UNet steps", leave=False
        )
        st = generate_pairs(
            ctx.sampler,
            prompts,
            self.dcfg,
            reward_fn=ctx.reward_fn,
            arena=self.arena,
            run_seed=ctx.cfg.seed,
            epoch=stage,
            prompts_per_call=self.prompts_per_call,
            save_dir=save_dir,
            progress=getattr(bar, "update", None),
        )
        if hasattr(bar, "close"):
            bar.close()
        dt = time.perf_counter() - t0
        m = dict(
            st.metrics,
            sample_time_s=dt,
            sample_images_per_s=st.metrics["images"] / max(dt, 1e-9),
            n_selected=st.num_pairs,
        )
        k = st.images.shape[0] // 3
        captions = [
            f"{role} {float(r):.2f}"
            for i in range(k)
            for role, r in (
                ("ref", st.sample_rewards[st.sample_ids == st.ref_ids[i]][0]),
                ("base", st.base_rewards[i]),
                ("target", st.target_rewards[i]),
            )
        ]
        return StageData(metrics=m, images=st.images, captions=captions, payload=st)

    def train_stage(self, stage: int, data) -> dict:
        st: DFusionStage = data.payload
        ctx = self.ctx
        s = ctx.sampler
        if self.dcfg.objective == "ppo":
            return self._train_ppo(st)
        from b2diffurl.algos.dpo import train_dpo

        return train_dpo(
            s,
            self.arena,
            st.preferred,
            st.dispreferred,
            # target == base before the first fused step (zero gradient: skipped); every later step can differ,
            # including any after a window that ends early
            list(range(st.fused_steps[0], self.T)),
            st.cond,
            self.pcfg,
            inner_epochs=ctx.cfg.train.inner_epochs,
            pairs_per_batch=ctx.cfg.train.micro_batch_size,
            optimizer_step=ctx.optimizer_step,
            generator=ctx.cpu_gen,
        )

    def _train_ppo(self, st: DFusionStage) -> dict:
        """D-Fusion pairs into DDPO: targets and bases, advantage = per-prompt z-score of their rewards; the
        targets' old log-probs are re-evaluated under the plain policy (they were sampled by the fused one)."""
        from b2diffurl.algos.ppo import ppo_update

        ctx = self.ctx
        ids = torch.cat([st.target_ids, st.base_ids])
        r = torch.cat([st.target_rewards, st.base_rewards]).double()
        g = torch.cat([st.pair_prompt, st.pair_prompt])
        adv = torch.zeros_like(r)
        for p in g.unique():
            sel = g == p
            v = r[sel]
            adv[sel] = (v - v.mean()) / (v.std() + 1e-8) if v.numel() > 1 else 0.0
        adv = adv.clamp(-ctx.cfg.train.adv_clip, ctx.cfg.train.adv_clip).float()
        self.arena.set_advantages(ids, adv)
        tid = st.target_ids
        with torch.no_grad():
            for i in range(self.T):
                b = self.arena.gather(tid, torch.full_like(tid, i), device=ctx.device)
                self.arena.write_logprobs(tid, i, ctx.sampler.batch_logprob(b, st.cond).float().cpu())
        return ppo_update(ctx, self.arena, ids, torch.arange(self.T), st.cond)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
