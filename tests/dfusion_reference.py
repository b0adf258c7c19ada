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

Nothing here imports b2diffurl's D-Fusion code: attention is written out with explicit softmax, the DDIM update
is ``diffusers.DDIMScheduler.step`` with ``variance_noise``, and the log-prob is the Gaussian density written
out with the scheduler's own variance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def row_noise(seed: int, num_steps: int, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((num_steps + 1, *shape), generator=g, dtype=torch.float32)


class _State:
    def __init__(self):
        self.mode = "plain"  # plain | ref | target
        self.fuse = False
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cross: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # [b, 16*16] binary (reference pass result)
        self.mask_side = 16
        self.latent_side = 16


class OfficialProcessor:
    def __init__(self, state: _State, name: str, fused: bool, is_cross: bool):
        self.s, self.name, self.fused, self.is_cross = state, name, fused, is_cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        s = self.s
        b, seq, _ = hidden_states.shape
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        h = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        d = q.shape[-1] // h
        split = lambda t: (
            t.reshape(b, -1, h, d).permute(0, 2, 1, 3).reshape(b * h, -1, d)
        )  # head_to_batch_dim
        q, k, v = split(q), split(k), split(v)
        if not self.is_cross and self.fused and s.fuse and s.mode == "target":
            k_ref, v_ref = s.kv[self.name]
            side = int(math.isqrt(seq))
            m = (s.mask > 0.5).float().reshape(-1, 1, s.mask_side, s.mask_side)
            m = F.interpolate(m, (side, side)).reshape(-1, seq)  # nearest (default mode)
            m = torch.cat([m, m])  # both CFG halves
            m = m[:, None, :].repeat(1, h, 1).reshape(b * h, seq, 1)
            k = k_ref * m + k * (1 - m)
            v = v_ref * m + v * (1 - m)
        probs = torch.softmax(q @ k.transpose(1, 2) * attn.scale, dim=-1)
        out = probs @ v
        if not self.is_cross and self.fused and s.mode == "ref":
            s.kv[self.name] = (k, v)
        if self.is_cross and s.mode == "ref" and seq == s.mask_side**2:
            s.cross.append(probs)
        out = out.reshape(b, h, -1, d).permute(0, 2, 1, 3).reshape(b, -1, h * d)
        out = attn.to_out[1](attn.to_out[0](out))
        return out


def _cross_blocks(unet):
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
    state = _State()
    blocks = _cross_blocks(unet)
    fused_prefixes = tuple(blocks[i] for i in fused_blocks)
    saved = dict(unet.attn_processors)
    procs = {}
    for name in saved:
        is_cross = ".attn2." in name
        procs[name] = OfficialProcessor(state, name, name.startswith(fused_prefixes), is_cross)
    unet.set_attn_processor(procs)
    cond_all = encode(prompts)
    uncond = encode([""])

    def eps(x, t, cond):
        bsz = x.shape[0]
        out = unet(
            torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond.expand(bsz, -1, -1), cond])
        ).sample
        u, c = out.chunk(2)
        return u + guidance_scale * (c - u)

    def step(e, t, x, z):
        return scheduler.step(e, t, x, eta=1.0, variance_noise=z).prev_sample

    def logprob(e, t, x, x_prev):
        mean = scheduler.step(e, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        std = scheduler._get_variance(t, prev_t) ** 0.5
        lp = -((x_prev - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
        return lp.mean(dim=tuple(range(1, x.dim())))

    try:
        with torch.no_grad():
            # ---- Phase A
            rows = [p for p in range(P) for _ in range(n)]
            noise = torch.stack([row_noise(sd, T, latent_shape) for sd in seeds])
            cond = cond_all[rows]
            x = noise[:, 0]
            lat = [x]
            for i, t in enumerate(scheduler.timesteps):
                x = step(eps(x, t, cond), t, x, noise[:, i + 1])
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
            # ---- three passes per step
            xr, xb, xt = noise[refs, 0], noise[bases, 0], noise[bases, 0]
            zr, zb = noise[refs], noise[bases]
            pp = [rows[j] for j in bases]
            cref, cbase = cond_all[[rows[j] for j in refs]], cond_all[pp]
            tl, tlp = [xt], []
            for i, t in enumerate(scheduler.timesteps):
                state.fuse = i in window
                state.mode, state.cross, state.kv = "ref", [], {}
                er = eps(xr, t, cref)
                maps = torch.stack([c.chunk(2)[1] for c in state.cross]).mean(0)  # cond half, layers
                heads = maps.shape[0] // xr.shape[0]
                maps = maps.reshape(xr.shape[0], heads, maps.shape[1], -1).mean(1)  # heads -> [b, HW, L]
                state.mask = torch.stack(
                    [
                        ((maps[j][:, items[p]] >= torch.tensor(thresholds[p])).float() > 0.5)
                        .any(dim=1)
                        .float()
                        for j, p in enumerate(pp)
                    ]
                )
                state.mode = "plain"
                eb = eps(xb, t, cbase)
                state.mode = "target"
                et = eps(xt, t, cbase)
                xr = step(er, t, xr, zr[:, i + 1])
                xb = step(eb, t, xb, zb[:, i + 1])
                xt_next = step(et, t, xt, zb[:, i + 1])
                tlp.append(logprob(et, t, xt, xt_next))
                xt = xt_next
                tl.append(xt)
    finally:
        unet.set_attn_processor(saved)
    return {
        "phase_a": lat_a,
        "scores": scores,
        "targets": torch.stack(tl, 1),
        "target_logp": torch.stack(tlp, 1),
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
