"""bench/sd_shaped.py: a random-init toy checkpoint of Stable Diffusion 1.x's layout loads as a toy world with SD's
latent space and DDIM settings, its decoder is calibrated for the sparse brightness reward, and ``b2diffurl train
--model DIR`` runs a stage on it (tiny size, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from bench_modules import from_checkout

from b2diffurl.models import VAECodec, load_policy

sd_shaped = from_checkout("bench.sd_shaped")  # bench/ is in the checkout, not in the installed wheel

# Stable Diffusion 1.x's constants, written out here (the oracle), not imported from the module under test
SD_DDIM = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
)
CALIBRATION_IMAGES = 9  # 3 of them (a third) end above the threshold


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd_shaped") / "tiny"
    argv = ["--out", str(out), "--size", "tiny", "--device", "cpu"]
    assert sd_shaped.main([*argv, "--calibration-images", str(CALIBRATION_IMAGES)]) == 0
    return out


def test_tiny_folder_loads_as_a_toy_checkpoint_of_sd_layout(folder):
    from b2diffurl.config import load_config
    from b2diffurl.toy import CHECKPOINT_DIR, is_toy_checkpoint
    from b2diffurl.toy.prompts import OBJECT_WORDS

    entry = json.loads((folder / "model_index.json").read_text())["b2diffurl_toy"]
    assert entry["codec"] == "vae" and entry["latent_shape"] == [4, 8, 8] and entry["image_size"] == 64
    assert is_toy_checkpoint(folder) and load_config(overrides={"model.path": str(folder)}).preset == "toy"

    pol = load_policy(str(folder))
    assert pol.latent_shape == (4, 8, 8) and pol.object_words == OBJECT_WORDS
    assert isinstance(pol.codec, VAECodec) and pol.codec.vae.config.scaling_factor == 0.18215
    vae = pol.codec.vae.config
    assert vae.latent_channels == 4 and len(vae.down_block_types) == 4  # 3 downsamplings: 8x
    with torch.no_grad():
        assert pol.decode(torch.zeros(2, 4, 8, 8)).shape == (2, 3, 64, 64)

    unet = pol.unet.config
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(unet.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (unet.in_channels, unet.out_channels, unet.layers_per_block, unet.attention_head_dim) == (
        4,
        4,
        2,
        8,
    )
    toy_text = json.loads((CHECKPOINT_DIR / "text_encoder" / "config.json").read_text())
    assert (
        unet.cross_attention_dim == toy_text["hidden_size"] == pol.encode_prompts(["a red circle"]).shape[-1]
    )

    # SD 1.x's DDIM: the saved config holds the literal values, and the loaded scheduler has the same noise
    # schedule as diffusers' DDIMScheduler built from them and as the scaled_linear formula itself
    from diffusers import DDIMScheduler

    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDIMScheduler" and {k: saved[k] for k in SD_DDIM} == SD_DDIM
    assert {k: pol.scheduler.config[k] for k in SD_DDIM} == SD_DDIM
    oracle = DDIMScheduler(**SD_DDIM)
    torch.testing.assert_close(pol.scheduler.alphas_cumprod, oracle.alphas_cumprod, rtol=0, atol=0)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(
        pol.scheduler.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5, atol=1e-7
    )
    assert float(pol.scheduler.final_alpha_cumprod) == float(
        oracle.alphas_cumprod[0]
    )  # set_alpha_to_one=False
    pol.scheduler.set_timesteps(10)
    assert pol.scheduler.timesteps.tolist() == list(range(901, 0, -100))  # leading spacing, steps_offset 1


def test_decoder_calibration_puts_a_third_of_the_samples_above_the_threshold(folder):
    """Re-sampling the calibration's prompts and noise with the saved folder gives the recorded fraction: the
    shifted output bias is what was saved."""
    from b2diffurl.sampling import sample

    cal = json.loads((folder / "model_index.json").read_text())["b2diffurl_toy"]["calibration"]
    assert cal["threshold"] == 0.09 and cal["images"] == CALIBRATION_IMAGES
    assert cal["fraction_above"] == pytest.approx(3 / CALIBRATION_IMAGES)
    before_mean, before_std = cal["mean_pixel_before"]
    assert before_mean > 0.3 and before_std < 0.02  # why calibrate: unshifted, every image would score 1
    s = cal["sampler"]
    pol = load_policy(str(folder))
    images = sample(
        pol,
        sd_shaped.calibration_prompts(CALIBRATION_IMAGES),
        num_steps=s["num_steps"],
        guidance_scale=s["guidance_scale"],
        eta=s["eta"],
        seed=s["seed"],
        batch_size=8,
    ).images
    assert images.shape == (CALIBRATION_IMAGES, 3, 64, 64)
    assert (images.mean(dim=(1, 2, 3)) > 0.09).sum().item() == 3


def test_train_runs_a_stage_on_the_folder_through_the_cli(folder, tmp_path):
    from b2diffurl.cli import main

    run = tmp_path / "run"
    sets = {
        "stages": 1,
        "seed": 3,
        "reward": "brightness",
        "reward_options.threshold": 0.09,
        "sample.num_steps": 2,
        "sample.prompts_per_stage": 2,
        "sample.branches": 2,
        "sample.batch_size": 2,
        "b2.k_left": 2,
        "b2.k_right": 2,
        "train.micro_batch_size": 4,
        "eval.num_prompts": 2,
        "eval.images_per_prompt": 1,
        "monitor.kl_samples": 2,
        "grid_every": 0,
        "checkpoint_every": 1,
        "progress": "false",
    }
    argv = ["train", "--model", str(folder), "--out", str(run)]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stages = [r for r in records if r.get("kind") == "stage"]
    assert len(stages) == 1 and stages[0]["stage"] == 0 and stages[0]["images"] == 4
    assert all(r in (0.0, 1.0) for r in [stages[0]["reward_min"], stages[0]["reward_max"]])
    assert "gold_mean" in stages[0]  # the toy's gold reward on a toy checkpoint with toy prompts
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [e["stage"] for e in evals] == [0, 1] and all(len(e["rewards"]) == 2 for e in evals)
    state = torch.load(run / "checkpoints" / "stage_00001" / "state.pt", weights_only=False)
    assert state["lora"] is False  # a toy checkpoint: the whole UNet is fine-tuned
    assert set(state["model"]) == {n for n, _ in load_policy(str(folder)).unet.named_parameters()}
