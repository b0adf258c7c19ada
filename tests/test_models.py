"""b2diffurl.models: the shipped toy checkpoint, an SD-shaped random folder written here, LoRA, errors."""

import json
import string
from pathlib import Path

import pytest
import torch

from b2diffurl.models import ModelError, PixelShuffleCodec, Policy, VAECodec, load_policy
from b2diffurl.toy import CHECKPOINT_DIR


@pytest.fixture(scope="module")
def toy():
    return load_policy("toy")


def test_shipped_checkpoint_layout_and_size():
    for sub, f in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
        ("tokenizer", "tokenizer.json"),
        ("scheduler", "scheduler_config.json"),
    ):
        assert (CHECKPOINT_DIR / sub / f).is_file()
    assert (
        json.loads((CHECKPOINT_DIR / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        == "DDIMScheduler"
    )
    size = sum(p.stat().st_size for p in CHECKPOINT_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20


def test_toy_policy_loads(toy):
    from diffusers import DDIMScheduler, UNet2DConditionModel

    assert isinstance(toy.unet, UNet2DConditionModel) and isinstance(toy.scheduler, DDIMScheduler)
    assert isinstance(toy.codec, PixelShuffleCodec) and toy.latent_shape == (12, 16, 16)
    assert {"circle", "squares"} <= set(toy.object_words)  # the toy world names its objects
    emb = toy.encode_prompts(["a red circle", ""])
    assert emb.shape == (2, 16, 64)
    assert not torch.allclose(emb[0], emb[1])
    # the identity "VAE" is lossless: decode(encode(x)) == x for images in [0, 1]
    img = torch.rand(2, 3, 32, 32)
    assert torch.allclose(toy.decode(toy.encode_images(img)), img, atol=1e-6)


def test_toy_policy_generates(toy):
    from b2diffurl.sampling import sample

    out = sample(toy, ["a red circle", "two blue squares"], num_steps=3, seed=0)
    assert out.images.shape == (2, 3, 32, 32)
    assert torch.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1


def test_shared_sampler_matches_diffusers_ddim_loop(toy):
    """b2diffurl.sampling (fused b2kernels step) against the independent DDIMScheduler.step loop in
    b2diffurl.toy.pretrain, same seed and noise-draw order."""
    from b2diffurl.sampling import sample
    from b2diffurl.toy.pretrain import ddim_sample

    ps = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]
    ours = sample(toy, ps, num_steps=4, guidance_scale=5.0, eta=1.0, seed=3).images
    ref = ddim_sample(toy.unet, toy.text_encoder, toy.tokenizer, toy.scheduler, ps, num_steps=4, seed=3)
    assert torch.allclose(ours, ref, atol=1e-4)


def _tiny_sd_folder(root: Path, scheduler_cls="PNDMScheduler") -> Path:
    """A random SD-1.x-shaped diffusers folder: unet/ text_encoder/ tokenizer/ (CLIP BPE) scheduler/ vae/."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(root / "unet")
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=100,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=52,
            eos_token_id=53,
            pad_token_id=53,
        )
    ).save_pretrained(root / "text_encoder")
    chars = list(string.ascii_lowercase)
    vocab = {
        w: i for i, w in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])
    }
    (root / "v.json").write_text(json.dumps(vocab))
    (root / "m.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "v.json"), str(root / "m.txt"), model_max_length=77).save_pretrained(
        root / "tokenizer"
    )
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16,
    ).save_pretrained(root / "vae")
    getattr(diffusers, scheduler_cls)(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    ).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def test_sd_layout_folder_loads(tmp_path):
    from diffusers import DDIMScheduler

    pol = load_policy(str(_tiny_sd_folder(tmp_path)), dtype=torch.float32, device="cpu")
    assert isinstance(pol.codec, VAECodec) and pol.object_words == () and pol.latent_shape == (4, 8, 8)
    assert isinstance(pol.scheduler, DDIMScheduler)
    assert pol.scheduler.config.beta_schedule == "scaled_linear" and pol.scheduler.config.steps_offset == 1
    assert pol.encode_prompts(["a cat", ""]).shape == (2, 77, 32)
    lat = torch.randn(2, *pol.latent_shape)
    img = pol.decode(lat)
    assert img.shape == (2, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    assert pol.encode_images(img).shape == (2, 4, 8, 8)


def test_missing_and_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*expected 'toy' or a local diffusers folder"):
        load_policy(str(tmp_path / "nope"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file; expected a diffusers folder"):
        load_policy(str(tmp_path / "file.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusers text-to-image folder: missing subfolder.*unet"):
        load_policy(str(tmp_path / "empty"))


def test_non_ddim_compatible_scheduler_is_refused(tmp_path):
    root = _tiny_sd_folder(tmp_path)
    cfg_path = root / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "_class_name": "FlowMatchEulerDiscreteScheduler"}))
    with pytest.raises(ValueError, match="expected a DDPM-family scheduler that DDIMScheduler can replace"):
        load_policy(str(root))
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "flow"}))
    with pytest.raises(ValueError, match="prediction_type"):
        load_policy(str(root))


def test_missing_vae_is_refused(tmp_path):
    import shutil

    root = _tiny_sd_folder(tmp_path)
    shutil.rmtree(root / "vae")
    with pytest.raises(ValueError, match="no vae/ subfolder"):
        load_policy(str(root))


def _unet_out(pol, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *pol.latent_shape, generator=g)
    with torch.no_grad():
        return pol.unet(
            x, torch.tensor([500, 20]), pol.encode_prompts(["a red circle", "two blue squares"])
        ).sample


def test_lora_save_load_round_trip_and_disable(tmp_path):
    pol = load_policy("toy")
    base = _unet_out(pol)
    pol.add_lora(rank=2, alpha=4, targets=("to_q", "to_v"))
    trainable = [p for p in pol.unet.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in pol.unet.named_parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for p in trainable)
    assert torch.allclose(_unet_out(pol), base, atol=1e-6)  # B = 0: starts as the identity
    with torch.no_grad():
        for p in trainable:
            p.add_(0.05 * torch.randn_like(p))
    tuned = _unet_out(pol)
    assert (tuned - base).abs().max() > 1e-3
    with pol.lora_disabled():
        assert torch.allclose(_unet_out(pol), base, atol=1e-6)
    assert torch.allclose(_unet_out(pol), tuned)
    pol.save_lora(tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == ["lora.safetensors", "lora_config.json"]
    fresh = load_policy("toy")
    fresh.load_lora(tmp_path / "lora")
    assert fresh.lora_config["r"] == 2 and fresh.lora_config["target_modules"] == ["to_q", "to_v"]
    assert torch.allclose(_unet_out(fresh), tuned, atol=1e-6)


def test_lora_errors(tmp_path):
    pol = load_policy("toy")
    with pytest.raises(RuntimeError, match="add_lora"):
        pol.save_lora(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected a LoRA folder"):
        pol.load_lora(tmp_path)
    with pytest.raises(ValueError, match="could not attach LoRA"):
        pol.add_lora(targets=("no_such_module",))


def test_from_components_equals_the_loaded_policy(toy):
    """A policy built from in-memory modules (what tests and benches do) behaves as the loaded one; a scheduler
    DDIM cannot replace is refused."""
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    pndm = PNDMScheduler.from_config(toy.scheduler.config)
    pol = Policy.from_components(toy.unet, toy.text_encoder, toy.tokenizer, pndm, PixelShuffleCodec(2))
    assert type(pol.scheduler).__name__ == "DDIMScheduler" and pol.object_words == ()
    assert pol.scheduler.config.prediction_type == toy.scheduler.config.prediction_type
    assert torch.equal(pol.encode_prompts(["a red circle"]), toy.encode_prompts(["a red circle"]))
    lat = torch.randn(2, *toy.latent_shape)
    assert torch.equal(pol.decode(lat), toy.decode(lat))
    flow = EulerDiscreteScheduler.from_config({**toy.scheduler.config, "prediction_type": "flow"})
    with pytest.raises(ValueError, match="prediction_type"):
        Policy.from_components(toy.unet, toy.text_encoder, toy.tokenizer, flow, PixelShuffleCodec(2))


def test_make_trainable_reuses_the_same_adapter_and_refreezes_the_base():
    """A second run on one policy object (e.g. a bench's warm-up stage) keeps the attached adapter instead of
    failing, trains only it again, and a different adapter request is still refused."""
    from types import SimpleNamespace

    pol = load_policy("toy")
    lora = SimpleNamespace(lora_rank=2, lora_alpha=4.0, lora_targets=["to_q", "to_v"])
    first = pol.make_trainable(lora)
    pol.unet.requires_grad_(True)  # something unfroze the base since (the official-style bench loop did)
    second = pol.make_trainable(lora)
    assert [id(p) for p in second] == [id(p) for p in first]
    assert all("lora_" in n for n, p in pol.unet.named_parameters() if p.requires_grad)
    with pytest.raises(RuntimeError, match="already attached"):
        pol.make_trainable(SimpleNamespace(lora_rank=8, lora_alpha=4.0, lora_targets=["to_q", "to_v"]))


def test_a_latent_toy_folder_loads_with_its_vae_and_the_toy_words(tmp_path):
    """bench/latent_toy.py's folder (``b2diffurl_toy.codec = "vae"``): a toy checkpoint (toy preset, toy words)
    whose codec is its AutoencoderKL; built here from a few training steps of each part."""
    from bench_modules import from_checkout

    from b2diffurl.sampling import sample
    from b2diffurl.toy import is_toy_checkpoint
    from b2diffurl.toy.prompts import OBJECT_WORDS

    latent_toy = from_checkout("bench.latent_toy")  # bench/ is in the checkout, not in the installed wheel
    pretrain_latent_unet, save_folder, train_autoencoder = (
        latent_toy.pretrain_latent_unet,
        latent_toy.save_folder,
        latent_toy.train_autoencoder,
    )

    vae, std, report = train_autoencoder(steps=2, seed=0, batch=4)
    assert 0 <= report["reconstruction_success"] <= 1 and std > 0
    unet, steps, _ = pretrain_latent_unet(vae, 1.0 / std, minutes=0.002, seed=0, batch=4, pool_batches=1)
    save_folder(tmp_path / "latent", vae, 1.0 / std, unet, {"train_steps": steps})
    assert is_toy_checkpoint(tmp_path / "latent")
    pol = load_policy(str(tmp_path / "latent"))
    assert isinstance(pol.codec, VAECodec) and pol.object_words == OBJECT_WORDS
    assert pol.latent_shape == (4, 8, 8) and pol.codec.vae.config.scaling_factor == pytest.approx(1.0 / std)
    images = sample(pol, ["a red circle", "two blue squares"], num_steps=2, guidance_scale=5.0, seed=0).images
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    (tmp_path / "latent" / "vae" / "config.json").unlink()
    with pytest.raises(ModelError, match="vae"):
        load_policy(str(tmp_path / "latent"))
