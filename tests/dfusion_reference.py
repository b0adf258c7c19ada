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
class TinyPolicy:
    """A random-init toy-world policy small enough for CPU tests (the real one comes from models.load_policy):
    toy tokenizer + tiny CLIP text encoder + a tiny UNet with cross-attention at 16×16, 8×8 and the 4×4 mid
    block. ``lora_disabled`` toggles peft adapters like the real policy."""

    def __init__(self, seed: int = 0, channels=(16, 16, 32), num_steps: int = 6):
        import contextlib

        from b2diffurl.toy import model as tm

        self._tm = tm
        torch.manual_seed(seed)
        self.tokenizer = tm.build_tokenizer()
        self.text_encoder = tm.build_text_encoder().eval()
        self.unet = tm.build_unet(channels).eval()
        self.unet.requires_grad_(False)
        _, self.scheduler = tm.build_schedulers()
        self.scheduler.set_timesteps(num_steps)
        self.latent_shape = tm.LATENT_SHAPE
        self.vae = None
        self.lora_config = None
        self._ctx = contextlib

    def encode_prompts(self, prompts):
        tm = self._tm
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tm.MAX_TOKENS,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def decode(self, latents):
        return self._tm.latents_to_images(latents.float())

    def add_lora(self, rank=4, alpha=4, targets=("to_q", "to_k", "to_v", "to_out.0"), random_b: bool = False):
        from peft import LoraConfig

        self.unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=not random_b)
        )
        self.lora_config = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
        for n_, p in self.unet.named_parameters():
            p.requires_grad_("lora_" in n_)

    def lora_disabled(self):
        unet = self.unet

        @self._ctx.contextmanager
        def cm():
            unet.disable_adapters()
            try:
                yield
            finally:
                unet.enable_adapters()

        return cm()


def toy_reward(images: torch.Tensor, prompts) -> torch.Tensor:
    """Deterministic test reward: mean red minus mean blue."""
    return (images[:, 0] - images[:, 2]).mean(dim=(1, 2))
