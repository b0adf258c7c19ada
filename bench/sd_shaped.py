"""A random-init toy checkpoint of Stable Diffusion 1.x's shapes: ``python -m bench.sd_shaped --out DIR``.

``--size sd15 | small | tiny`` (default sd15) writes a diffusers folder that ``b2diffurl train --model DIR`` runs
as a toy-world checkpoint (toy preset, toy prompts and held-out set, full fine-tune), as bench/latent_toy.py's
folders do, but with SD 1.x's layout and nothing trained:

* ``unet/``: ``UNet2DConditionModel`` of SD 1.x's layout (bench.common.SD15_UNET: 4 latent channels,
  CrossAttnDownBlock2D×3 + DownBlock2D, UpBlock2D + CrossAttnUpBlock2D×3, 2 layers per block, 8 heads), widths
  per ``--size`` (:data:`SIZES`), cross-attention as wide as the toy's text encoder (64);
* ``vae/``: ``AutoencoderKL`` of SD's layout (4 latent channels, 8× downsampling, scaling factor 0.18215);
* ``scheduler/``: SD 1.x's DDIM settings (:data:`SD_SCHEDULER`), not the toy's;
* ``text_encoder/``, ``tokenizer/``: copied from the embedded toy (its word-level prompts need them).

======  ====================  ===============  ===============  ==========
size    UNet widths           UNet parameters  VAE parameters   images
======  ====================  ===============  ===============  ==========
tiny    32, 32, 64, 64        2.49 M           0.35 M           64×64
small   64, 128, 256, 256     34.0 M           5.25 M           256×256
sd15    320, 640, 1280, 1280  841.9 M          83.65 M (SD's)   512×512
======  ====================  ===============  ===============  ==========

(SD 1.5's UNet has 859.5 M: its cross-attention reads 768-wide text, this one the toy's 64-wide text.)

One thing is fitted, not random: the decoder's output bias. A random decoder ends in GroupNorm → SiLU → conv, so
every image has about the same mean pixel value (seed 0, toy sampler: tiny 0.478 ± 0.005 over 64 images, small
0.543 ± 0.0002 over 16), and the sparse brightness reward of ``bench.learning sparse_brightness`` (1 when the
mean pixel value > 0.09) would be 1 on every image: no signal. So the build samples ``--calibration-images``
images of the toy's training prompts with the toy preset's sampler (10 DDIM steps, guidance 5, eta 1; neither
the held-out prompts nor their seed) and shifts the bias of ``vae.decoder.conv_out`` so that ``--above`` of them
(default a third, as on the toy) exceed ``--threshold``; the shift and what it gave are in ``model_index.json``
(``b2diffurl_toy.calibration``); ``--above 0`` skips it. The spread left is narrow (after the shift: tiny
0.0889 ± 0.0031, small 0.0896 ± 0.0006), so the reward asks for a small, consistent change of every image. On
tiny, one 12-stage default B² run (seed 42, one CPU thread) took the held-out reward from 0.273 to 0.969 (paired
gain +0.695 ± 0.041; 220 s, or 186 s as the command below with ``model.device=cpu``); the larger sizes have not
been trained here.

The learning check on a GPU: build on the GPU machine (the calibration samples run on CUDA when there is one;
sd15 on one CPU thread takes about 20 s per UNet call on one image, and the calibration makes 1,280 of them),
and write the results outside bench/results (the file is named by suite, so it would replace the CPU result; it
records the model as ``sd_shaped-<size>`` and the GPU's name, which the README table shows, so it can be copied
there under another name)::

    python -m bench.sd_shaped --out /tmp/sd
    python -m bench.learning sparse_brightness --arms b2 --seeds 1 --jobs 1 --out /tmp/learning -- \\
        --model /tmp/sd --set model.device=cuda --set monitor.gold_reward=none

* float32, not ``model.dtype=bfloat16``: a toy checkpoint is fully fine-tuned and the trainer refuses a full
  fine-tune in half precision (AdamW's small steps would round away); ``--set model.lora=on --set
  model.dtype=bfloat16`` trains a bf16 LoRA instead (not the toy path, and not tried here).
* ``monitor.gold_reward=none``: a toy checkpoint's default gold reward is the toy's prompt-following score, whose
  connected-components pass grows with the image side (one CPU thread: 0.005 s per image at 64×64, 0.18 s at
  256×256, 1.6-2.5 s at 512×512; on a GPU not measured) and scores nothing meaningful on random images. It runs
  on every training image and on the held-out images before and after.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from bench.common import SD15_UNET

# Stable Diffusion 1.x's noise schedule and DDIM settings (its scheduler/scheduler_config.json)
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)
SD_VAE_SCALING = 0.18215
VAE_DOWNSAMPLING = 8  # 4 encoder blocks, the first 3 downsample

# --size -> UNet and VAE widths (and the UNet's latent side); the rest is SD 1.x's layout
SIZES = {
    "tiny": dict(
        unet=dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, sample_size=8),
        vae=dict(block_out_channels=(16, 16, 32, 32), norm_num_groups=8),
    ),
    "small": dict(
        unet=dict(block_out_channels=(64, 128, 256, 256), norm_num_groups=32, sample_size=32),
        vae=dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=32),
    ),
    "sd15": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32, sample_size=64),
        vae=dict(block_out_channels=(128, 256, 512, 512), norm_num_groups=32),
    ),
}

# the toy preset's sampler (b2diffurl/config/presets.py) and the sparse reward of bench.learning
TOY_STEPS, TOY_GUIDANCE, TOY_ETA = 10, 5.0, 1.0
THRESHOLD, ABOVE = 0.09, 1 / 3


def text_width() -> int:
    """Hidden size of the embedded toy's text encoder: the UNet's cross-attention width."""
    from b2diffurl.toy import CHECKPOINT_DIR

    return int(json.loads((CHECKPOINT_DIR / "text_encoder" / "config.json").read_text())["hidden_size"])


def unet_config(size: str) -> dict:
    return {**SD15_UNET, **SIZES[size]["unet"], "cross_attention_dim": text_width()}


def vae_config(size: str) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=SIZES[size]["unet"]["sample_size"] * VAE_DOWNSAMPLING,
        scaling_factor=SD_VAE_SCALING,
        **SIZES[size]["vae"],
    )


def build(size: str, seed: int = 0):
    """(unet, vae): random init from ``seed`` on the CPU (the same weights whichever machine builds them)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(size))
    vae = AutoencoderKL(**vae_config(size))
    return unet.eval(), vae.eval()


def _toy_text():
    from transformers import AutoTokenizer, CLIPTextModel

    from b2diffurl.toy import CHECKPOINT_DIR

    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT_DIR / "tokenizer", local_files_only=True)
    return tokenizer, CLIPTextModel.from_pretrained(CHECKPOINT_DIR / "text_encoder", local_files_only=True)


def calibration_prompts(n: int) -> list[str]:
    """``n`` of the toy's training prompts, spread over the list (never the held-out ones)."""
    from b2diffurl import prompts as P

    train = P.load("toy", "train").prompts
    return [train[(i * 7919) % len(train)] for i in range(n)]


def _mean_pixel(x: torch.Tensor, shift) -> torch.Tensor:
    """Decoder outputs x [N, 3, H, W] in [-1, 1] units, output bias moved by ``shift`` ([N] or scalar) -> the
    images' mean pixel values [N], as VAECodec.decode maps them to [0, 1]."""
    shift = torch.as_tensor(shift, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    return ((x + shift + 1) / 2).clamp(0, 1).mean(dim=(1, 2, 3))


def calibrate(
    unet,
    vae,
    *,
    images: int,
    threshold: float = THRESHOLD,
    above: float = ABOVE,
    seed: int = 0,
    batch: int = 8,
) -> dict:
    """Shift ``vae.decoder.conv_out.bias`` (all 3 channels alike) so that a fraction ``above`` of ``images``
    samples of the toy's training prompts have a mean pixel value > ``threshold``; returns what it did."""
    from diffusers import DDIMScheduler

    from b2diffurl.models import Policy, VAECodec
    from b2diffurl.sampling import sample

    tokenizer, text_encoder = _toy_text()
    policy = Policy.from_components(
        unet, text_encoder, tokenizer, DDIMScheduler(**SD_SCHEDULER), VAECodec(vae), source="calibration"
    )
    prompts = calibration_prompts(images)
    t0 = time.perf_counter()
    res = sample(
        policy,
        prompts,
        num_steps=TOY_STEPS,
        guidance_scale=TOY_GUIDANCE,
        eta=TOY_ETA,
        seed=10_000 + seed,
        batch_size=batch,
        decode=False,
    )
    with torch.no_grad():  # the decoder's output before VAECodec's clamp, float32, batch by batch
        x = torch.cat(
            [
                vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.float()
                for z in res.latents.split(batch)
            ]
        )
    before = _mean_pixel(x, 0.0)
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    # per image, the shift at which its mean pixel value crosses the threshold (monotone in the shift, 0 below
    # lo where every pixel clamps to 0, 1 above hi where every pixel clamps to 1: bisection)
    flat = x.flatten(1)
    lo, hi = -1 - flat.amax(1), 1 - flat.amin(1)
    for _ in range(60):
        mid = (lo + hi) / 2
        up = _mean_pixel(x, mid) > threshold
        hi, lo = torch.where(up, mid, hi), torch.where(up, lo, mid)
    cross = hi.sort().values  # image i is above the threshold iff shift > its crossing
    k = round(above * len(cross))  # images that should end above it
    if k <= 0:
        shift = float(cross[0]) - 1e-3
    elif k >= len(cross):
        shift = float(cross[-1]) + 1e-3
    else:
        shift = float(cross[k - 1] + cross[k]) / 2
    with torch.no_grad():
        vae.decoder.conv_out.bias += shift
    after = _mean_pixel(x, shift)
    return {
        "what": "vae.decoder.conv_out.bias shifted so that `above` of the samples have mean pixel > threshold",
        "threshold": threshold,
        "above_target": above,
        "images": images,
        "sampler": {
            "num_steps": TOY_STEPS,
            "guidance_scale": TOY_GUIDANCE,
            "eta": TOY_ETA,
            "seed": 10_000 + seed,
        },
        "bias_shift": shift,
        "mean_pixel_before": [round(float(before.mean()), 4), round(float(before.std()), 4)],
        "mean_pixel_after": [round(float(after.mean()), 4), round(float(after.std()), 4)],
        "fraction_above": float((after > threshold).float().mean()),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def save_folder(out: Path, unet, vae, recipe: dict) -> None:
    """The toy checkpoint folder (as bench.latent_toy.save_folder, with SD's scheduler): written next to
    ``out`` and renamed into place."""
    from diffusers import DDIMScheduler

    from b2diffurl.toy import CHECKPOINT_DIR

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(CHECKPOINT_DIR / sub, tmp / sub)
    DDIMScheduler(**SD_SCHEDULER).save_pretrained(tmp / "scheduler")
    unet.save_pretrained(tmp / "unet")
    vae.save_pretrained(tmp / "vae")
    latent = int(unet.config.sample_size)
    index = json.loads((CHECKPOINT_DIR / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderKL"]
    index["b2diffurl_toy"] = {
        "latent_shape": [int(unet.config.in_channels), latent, latent],
        "image_size": latent * VAE_DOWNSAMPLING,
        "codec": "vae",
        **recipe,
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sd_shaped", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="toy checkpoint folder to write (replaced)")
    p.add_argument("--size", choices=list(SIZES), default="sd15", help="UNet/VAE widths (tiny: CPU tests)")
    p.add_argument("--seed", type=int, default=0, help="random init (and calibration noise) seed")
    p.add_argument(
        "--device",
        default="auto",
        help="where the calibration samples run: auto (CUDA when present) | cpu | cuda[:N]; sd15 on a CPU "
        "takes hours",
    )
    p.add_argument(
        "--above",
        type=float,
        default=ABOVE,
        help="fraction of calibration samples above --threshold (0: skip)",
    )
    p.add_argument(
        "--threshold", type=float, default=THRESHOLD, help="sparse brightness threshold to calibrate"
    )
    p.add_argument("--calibration-images", type=int, default=64, help="samples the calibration decodes")
    a = p.parse_args(argv)
    if not 0 <= a.above < 1 or not 0 < a.threshold < 1 or a.calibration_images < 1:
        p.error("--above must be in [0, 1), --threshold in (0, 1) and --calibration-images >= 1")
    if a.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(a.device)
    t0 = time.perf_counter()
    unet, vae = build(a.size, a.seed)
    recipe = {
        "train_steps": 0,
        "prediction_type": SD_SCHEDULER["prediction_type"],
        "init_from": None,
        "size": a.size,
        "seed": a.seed,
        "params": {"unet": params(unet), "vae": params(vae)},
        "note": "random init, Stable Diffusion 1.x layout and scheduler (bench/sd_shaped.py); nothing trained",
        "command": f"python -m bench.sd_shaped --size {a.size} --seed {a.seed}",
    }
    if a.above > 0:
        unet, vae = unet.to(device), vae.to(device)
        recipe["calibration"] = calibrate(
            unet,
            vae,
            images=a.calibration_images,
            threshold=a.threshold,
            above=a.above,
            seed=a.seed,
            batch=32 if device.type == "cuda" else 8,
        )
        recipe["calibration"]["device"] = device.type
        recipe["command"] += (
            f" --above {a.above:g} --threshold {a.threshold:g} --calibration-images {a.calibration_images}"
        )
        print(json.dumps(recipe["calibration"]), flush=True)
    save_folder(a.out, unet.cpu(), vae.cpu(), recipe)
    side = unet.config.sample_size * VAE_DOWNSAMPLING
    print(
        f"wrote {a.out} ({a.size}: UNet {params(unet) / 1e6:.1f} M, VAE {params(vae) / 1e6:.1f} M parameters, "
        f"{side}x{side} images) in {time.perf_counter() - t0:.0f} s; run it with b2diffurl train --model {a.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
