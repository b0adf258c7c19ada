"""Test-only oracle: D-Fusion's official pair-generation procedure, reimplemented independently and slowly.

Per DDIM step the official loop runs *three* CFG UNet calls on batches of equal size:

1. the reference pass: each target's reference (duplicates included), replaying the reference's own noise;
   its self-attention Q/K/V are captured in every fused block and its cross-attention probabilities in the
   layers whose token grid is 16×16 (cond half, object-token columns), averaged over those layers and the heads,
   binarised per item (``>= threshold``) and united over items (``> 0.5 any``);
2. the base pass: the base replayed (its output feeds nothing);
3. the target pass: replays the base's noise; inside the fusion window, each fused self-attention uses
   ``K̃ = m·K_ref + (1 − m)·K``, ``Ṽ`` likewise, with the mask nearest-resized (``F.interpolate``) to the layer's
   grid and repeated over both CFG halves.

The three passes are :func:`bench.official_dfusion.three_pass_fusion` (the benchmark's official-style baseline,
one implementation of the official procedure for both); this module adds Phase A, the pairing and the per-prompt
mask rule. Nothing here or there imports b2diffurl's D-Fusion code: attention is materialised (explicit
[N×N] scores), the DDIM update is ``diffusers.DDIMScheduler.step`` with ``variance_noise``, and the log-prob is
the Gaussian density written out with the scheduler's own variance.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def _load_official():
    """bench/official_dfusion.py by file path: the tests import the installed wheel (``python -P``), so the repo
    root — and with it ``bench`` — is deliberately not on sys.path. That module imports only torch."""
    path = Path(__file__).resolve().parents[1] / "bench" / "official_dfusion.py"
    spec = importlib.util.spec_from_file_location("_b2_official_dfusion", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_official = _load_official()
official_attention, three_pass_fusion = _official.official_attention, _official.three_pass_fusion


def row_noise(seed: int, num_steps: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((num_steps + 1, *shape), generator=g, dtype=torch.float32)


def official_targets(
    unet,
    scheduler,
    encode,
    prompts,
    items,
    thresholds,
    *,
    n,
    seeds,
    rewards_fn,
    fused_blocks,
    window,
    guidance_scale,
    latent_shape,
):
    """Run Phase A (plain, per-sample noise) and the official three-pass fusion.

    ``items``: per prompt, the list of object-token columns (one column per item); ``thresholds``: per prompt, one
    per item; ``fused_blocks``: indices into the cross-attention blocks; ``window``: fused step indices.
    Returns dict with phase-A latents [P·n, T+1, ...], target latents [P·n/2, T+1, ...], target log-probs,
    reference/base row indices.
    """
    T = len(scheduler.timesteps)
    P = len(prompts)
    cond_all = encode(prompts)
    uncond = encode([""])
    with torch.no_grad(), official_attention(unet, fused_blocks, 16):
        # ---- Phase A: plain CFG sampling (materialised attention), DDIM step = diffusers' scheduler with the
        # row's noise
        rows = [p for p in range(P) for _ in range(n)]
        noise = torch.stack([row_noise(sd, T, latent_shape) for sd in seeds])
        cond = cond_all[rows]
        enc = torch.cat([uncond.expand(len(rows), -1, -1), cond])
        x = noise[:, 0]
        lat = [x]
        for i, t in enumerate(scheduler.timesteps):
            u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=enc).sample.chunk(2)
            e = u + guidance_scale * (c - u)
            x = scheduler.step(e, t, x, eta=1.0, variance_noise=noise[:, i + 1]).prev_sample
            lat.append(x)
        lat_a = torch.stack(lat, 1)
        scores = rewards_fn(lat_a[:, -1], [prompts[r] for r in rows])
        # ---- pairing: top quarter twice, bottom half
        refs, bases = [], []
        for p in range(P):
            sc = scores[p * n : (p + 1) * n].tolist()
            order = sorted(range(n), key=lambda j: (-sc[j], j))
            refs += [p * n + j for j in order[: n // 4] for _ in range(2)]
            bases += [p * n + j for j in order[n // 2 :]]
    # ---- the official three passes per step; the mask is per target row: its prompt's items and thresholds
    pp = [rows[j] for j in bases]

    def mask_of(maps):  # [b, 16·16, L] → [b, 16·16]
        return torch.stack(
            [
                ((maps[j][:, items[p]] >= torch.tensor(thresholds[p])).float() > 0.5).any(dim=1).float()
                for j, p in enumerate(pp)
            ]
        )

    xr, xb, targets, target_logp = three_pass_fusion(
        unet,
        scheduler,
        cond_all[[rows[j] for j in refs]],
        cond_all[pp],
        uncond,
        noise[refs],
        noise[bases],
        mask_of,
        fused_blocks=fused_blocks,
        window=window,
        guidance_scale=guidance_scale,
        mask_side=16,
    )
    return {
        "phase_a": lat_a,
        "scores": scores,
        "targets": targets,
        "target_logp": target_logp,
        "refs": refs,
        "bases": bases,
        "base_final": xb,
        "ref_final": xr,
    }


# ----------------------------------------------------------------------------------------------- tiny policy
def toy_policy(seed: int = 0, channels=(16, 16, 32)):
    """A random-init toy-world :class:`b2diffurl.models.Policy` small enough for CPU tests (the shipped one comes
    from ``load_policy``): toy tokenizer + text encoder, a tiny UNet with cross-attention at 16×16, 8×8 and the
    4×4 mid block, the toy's pixel codec and object words."""
    from b2diffurl.models import PixelShuffleCodec, Policy
    from b2diffurl.toy import model as tm
    from b2diffurl.toy.prompts import OBJECT_WORDS

    torch.manual_seed(seed)
    unet = tm.build_unet(channels).eval().requires_grad_(False)
    _, ddim = tm.build_schedulers()
    return Policy.from_components(
        unet,
        tm.build_text_encoder(),
        tm.build_tokenizer(),
        ddim,
        PixelShuffleCodec(tm.PATCH),
        object_words=OBJECT_WORDS,
        source="toy-random",
    )


def randomize_lora(policy, std: float = 0.1, seed: int = 0) -> None:
    """Draw the LoRA B matrices (zero at attach) so the adapter really changes the UNet."""
    g = torch.Generator().manual_seed(seed)
    for name, p in policy.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g, dtype=p.dtype) * std


def toy_reward(images: torch.Tensor, prompts) -> torch.Tensor:
    """Deterministic test reward: mean red minus mean blue."""
    return (images[:, 0] - images[:, 2]).mean(dim=(1, 2))
