"""LoRA export: a policy's LoRA loads into a plain diffusers StableDiffusionPipeline and gives the same outputs."""

import pytest
import torch
from test_models import _tiny_sd_folder

from b2diffurl.export import WEIGHT_NAME, ExportError, export_lora, export_lora_folder
from b2diffurl.models import load_policy

pytestmark = pytest.mark.usefixtures("one_thread")


def fresh_pipeline(root):
    """A StableDiffusionPipeline built from the folder's components (base weights, no LoRA)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(root / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(root / "unet"),
        scheduler=DDIMScheduler.from_pretrained(root / "scheduler", clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def unet_out(unet, emb):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([900, 15]), emb).sample


@pytest.mark.parametrize(
    "rank,alpha,route",
    [(2, 8.0, "unet"), (4, 4.0, "unet"), (2, 8.0, "saved")],
    ids=["scale4", "scale1", "saved"],
)
def test_exported_lora_loads_in_diffusers_and_matches_policy(tmp_path, rank, alpha, route):
    """route 'unet': from the live adapter; 'saved': from the run's saved lora/ folder (Policy.save_lora)."""
    root = _tiny_sd_folder(tmp_path / "sd")
    policy = load_policy(str(root))
    emb = policy.encode_prompts(["a cat", "two dogs"])
    base = unet_out(policy.unet, emb)
    policy.add_lora(rank=rank, alpha=alpha)  # the project's default targets: to_q, to_k, to_v, to_out.0
    torch.manual_seed(1)
    with torch.no_grad():
        for p in [q for q in policy.unet.parameters() if q.requires_grad]:  # the adapter weights
            p.add_(0.1 * torch.randn_like(p))
    tuned = unet_out(policy.unet, emb)
    assert (tuned - base).abs().max() > 1e-2  # the LoRA changes the model, so equality below means something

    if route == "unet":
        path = export_lora(policy.unet, tmp_path / "export")
    else:
        policy.save_lora(tmp_path / "run_lora")
        path = export_lora_folder(tmp_path / "run_lora", tmp_path / "export")
    assert path == tmp_path / "export" / WEIGHT_NAME and path.is_file()
    from safetensors.torch import load_file

    keys = list(load_file(str(path)))
    assert keys and all(k.startswith("unet.") for k in keys)

    pipe = fresh_pipeline(root)
    torch.testing.assert_close(unet_out(pipe.unet, emb), base)
    pipe.load_lora_weights(tmp_path / "export")
    torch.testing.assert_close(unet_out(pipe.unet, emb), tuned, atol=1e-5, rtol=1e-5)

    # the whole pipeline: our LoRA'd UNet and the loaded file give the same latents from the same seed
    ours = fresh_pipeline(root)
    ours.unet = policy.unet
    kw = dict(num_inference_steps=2, guidance_scale=3.0, output_type="latent", height=16, width=16)
    a = pipe("a cat", generator=torch.Generator().manual_seed(5), **kw).images
    b = ours("a cat", generator=torch.Generator().manual_seed(5), **kw).images
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_export_without_lora_is_refused(tmp_path):
    policy = load_policy(str(_tiny_sd_folder(tmp_path / "sd")))
    with pytest.raises(ExportError, match="no LoRA adapter 'default'.*model.lora=on") as e:
        export_lora(policy.unet, tmp_path / "out")
    assert isinstance(e.value, ValueError) and not (tmp_path / "out").exists()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "lora.safetensors").write_bytes(b"")
    with pytest.raises(
        ExportError, match="is not a saved LoRA folder: expected lora.safetensors and lora_config.json"
    ):
        export_lora_folder(tmp_path / "half", tmp_path / "out")


def train_tiny_sd_lora(tmp, prompts, **over):
    """`b2diffurl train` with LoRA (rank 2) on a tiny SD-layout folder under ``tmp``, mean-brightness reward.
    Returns (model folder, run directory, the finished Trainer)."""
    import json

    from b2diffurl import config as C
    from b2diffurl.trainer import Trainer

    root = _tiny_sd_folder(tmp / "sd")
    sched = root / "scheduler" / "scheduler_config.json"
    sched.write_text(
        json.dumps({**json.loads(sched.read_text()), "clip_sample": False})
    )  # as SD's own config
    cfg = C.load_config(
        overrides={
            "model.path": str(root),
            "model.lora": "on",
            "model.lora_rank": 2,
            "model.lora_alpha": 8.0,
            "stages": 1,
            "sample.num_steps": 4,
            "sample.prompts_per_stage": 2,
            "sample.branches": 2,
            "sample.batch_size": 2,
            "b2.k_left": 2,
            "b2.k_right": 2,
            "eval.prompts": "none",
            "train.micro_batch_size": 2,
            "train.grad_accum_steps": 1,
            "train.lr": 0.05,
            "out": str(tmp / "run"),
            "progress": False,
            "grid_every": 0,
            "preset": "toy",
            **over,
        }
    )
    trainer = Trainer(cfg, reward_fn=lambda images, prompts: images.mean((1, 2, 3)), train_prompts=prompts)
    assert trainer.run()["status"] == "finished"
    return root, tmp / "run", trainer


def test_lora_trained_by_the_trainer_loads_in_diffusers(tmp_path):
    """`b2diffurl train` on an SD-layout folder with LoRA: the adapter of its final checkpoint, exported, gives a
    plain diffusers pipeline the trained UNet."""
    from b2diffurl import checkpoint

    root, _, trainer = train_tiny_sd_lora(tmp_path, ["a cat", "two dogs", "a fox"])
    emb = trainer.policy.encode_prompts(["a cat", "two dogs"])
    trained = unet_out(trainer.policy.unet, emb)
    pipe = fresh_pipeline(root)
    base = unet_out(pipe.unet, emb)
    assert (trained - base).abs().max() > 1e-5  # training moved the adapter off its zero init

    export_lora_folder(checkpoint.find(tmp_path / "run") / "lora", tmp_path / "export")
    pipe.load_lora_weights(tmp_path / "export")
    torch.testing.assert_close(unet_out(pipe.unet, emb), trained, atol=1e-5, rtol=1e-5)
