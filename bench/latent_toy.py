"""A toy world in a learned latent space, for the learning experiments: ``python -m bench.latent_toy --out DIR``.

The embedded toy diffuses in pixel space (a lossless 12×16×16 "latent", 3,072 numbers per DDIM action). This
builds the same world SD-style instead:

1. a tiny ``AutoencoderKL`` (channels 16/32/32, 4 latent channels: 32×32 images ↔ 4×8×8 latents, 256 numbers)
   trained on rendered scenes with MSE + a small KL term; it reports the toy reward of its reconstructions;
2. the toy's UNet architecture on those latents, pretrained (v-prediction, cosine schedule, EMA) from a pool of
   encoded renders, with the toy's frozen text encoder, tokenizer and scheduler copied from the embedded model;
3. a toy checkpoint folder (``model_index.json`` with ``b2diffurl_toy.codec = "vae"``) that ``b2diffurl train
   --model DIR`` runs as the toy world (toy preset, full fine-tune, toy gold reward).

Measured once (2026-11-28, 2 shared CPU cores; README "Does training improve the toy reward?"): the autoencoder
(1,500 steps, 10 min) keeps 98% binary success on reconstructions; the UNet (4,484 steps in 33 min, 2 threads)
gives held-out reward 0.768 and 12-stage default runs of ~205 s, but no run on it learned.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def build_autoencoder():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def train_autoencoder(steps: int, seed: int, batch: int = 32, kl_weight: float = 1e-4):
    """-> (autoencoder, latent std, report). Images in [-1, 1]; the KL term is per pixel-channel."""
    from b2diffurl.toy.pretrain import sample_prompts
    from b2diffurl.toy.render import render
    from b2diffurl.toy.score import toy_score, toy_success

    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = build_autoencoder()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    t0, losses = time.time(), []
    for step in range(steps):
        x = render(sample_prompts(rng, batch), seed=seed * 1_000_000 + step) * 2 - 1
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.sample()).sample, x) + kl_weight * post.kl().mean() / x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"autoencoder step {step}: loss {sum(losses[-100:]) / len(losses[-100:]):.5f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        prompts = sample_prompts(random.Random(seed + 123), 256)
        x = render(prompts, seed=999_999)
        z = vae.encode(x * 2 - 1).latent_dist.mode()
        rec = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
        report = {
            "steps": steps,
            "minutes": round((time.time() - t0) / 60, 1),
            "reconstruction_score": float(toy_score(rec, prompts).mean()),
            "reconstruction_success": float(toy_success(rec, prompts).float().mean()),
            "latent_mean": float(z.mean()),
            "latent_std": float(z.std()),
        }
    print(json.dumps(report), flush=True)
    return vae, report["latent_std"], report


def pretrain_latent_unet(
    vae, scale: float, minutes: float, seed: int, batch: int = 64, pool_batches: int = 384
):
    """The toy UNet on 4×8×8 latents (``scale``·posterior samples of a fixed pool of renders) -> (EMA UNet,
    steps, minutes)."""
    from b2diffurl.toy import model as M
    from b2diffurl.toy.pretrain import P_UNCOND, PromptEmbeddings, denoising_loss, sample_prompts, update
    from b2diffurl.toy.render import render

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer, text_encoder = M.build_tokenizer(), M.build_text_encoder()
    ddpm, _ = M.build_schedulers()
    unet = M.build_unet(latent_shape=(4, 8, 8))
    ema = copy.deepcopy(unet).requires_grad_(False)
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    pool_prompts, pool = [], []
    with torch.no_grad():
        for b in range(pool_batches):
            prompts = sample_prompts(rng, batch)
            pool_prompts += prompts
            pool.append(vae.encode(render(prompts, seed=10_000_000 + b) * 2 - 1).latent_dist.sample() * scale)
    pool = torch.cat(pool)
    embed = PromptEmbeddings(tokenizer, text_encoder)
    acp, t0, losses, step = ddpm.alphas_cumprod, time.time(), [], 0
    while time.time() - t0 < 60 * minutes:
        ix = torch.randint(0, len(pool_prompts), (batch,))
        prompts = ["" if rng.random() < P_UNCOND else pool_prompts[i] for i in ix.tolist()]
        loss = denoising_loss(unet, pool[ix], embed(prompts), acp, "v_prediction")
        update(loss, opt, sched, params, ema_params, step, 0.999)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            print(f"unet step {step}: v-MSE {sum(losses[-100:]) / 100:.4f}", flush=True)
    return ema, step, round((time.time() - t0) / 60, 1)


def save_folder(out: Path, vae, scale: float, unet, recipe: dict) -> None:
    """A toy checkpoint folder: the embedded toy's text encoder, tokenizer and scheduler, this UNet and VAE."""
    from b2diffurl.toy import CHECKPOINT_DIR

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for sub in ("text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(CHECKPOINT_DIR / sub, tmp / sub)
    unet.save_pretrained(tmp / "unet")
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(tmp / "vae")
    index = json.loads((CHECKPOINT_DIR / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderKL"]
    index["b2diffurl_toy"] = {"latent_shape": [4, 8, 8], "image_size": 32, "codec": "vae", **recipe}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latent_toy", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="toy checkpoint folder to write")
    p.add_argument("--ae-steps", type=int, default=1500, help="autoencoder steps (batch 32)")
    p.add_argument("--minutes", type=float, default=33.0, help="UNet pretraining wall time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.ae_steps < 1 or a.minutes <= 0 or a.threads < 1:
        p.error("--ae-steps, --minutes and --threads must be positive")
    torch.set_num_threads(a.threads)
    vae, std, ae_report = train_autoencoder(a.ae_steps, a.seed)
    unet, steps, minutes = pretrain_latent_unet(vae, 1.0 / std, a.minutes, a.seed)
    recipe = {
        "train_steps": steps,
        "prediction_type": "v_prediction",
        "init_from": None,
        "wall_minutes": minutes,
        "autoencoder": ae_report,
        "command": f"python -m bench.latent_toy --ae-steps {a.ae_steps} --minutes {a.minutes} --seed {a.seed}",
    }
    save_folder(a.out, vae, 1.0 / std, unet, recipe)
    print(f"wrote {a.out}: {steps} UNet steps in {minutes} min; run it with b2diffurl train --model {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
