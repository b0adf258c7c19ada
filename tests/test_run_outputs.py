"""What a LoRA run leaves behind, end to end: `b2diffurl sample --lora RUN_DIR` samples the newest checkpoint's
adapter (the same images as the trained policy), and the run's lora_diffusers/ loads in a diffusers pipeline."""

from __future__ import annotations

import pytest
import torch
from test_export import fresh_pipeline, train_tiny_sd_lora, unet_out

from b2diffurl.cli import main


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_run")
    return train_tiny_sd_lora(tmp, ["a cat", "two dogs"], stages=2, checkpoint_every=1)


def _sampled(monkeypatch, argv) -> torch.Tensor:
    """The images `b2diffurl sample` writes (caught on their way to the grid)."""
    import b2diffurl.report as report

    caught = {}
    real = report.save_grid

    def catch(images, path, *a, **kw):
        caught["images"] = images.detach().clone()
        return real(images, path, *a, **kw)

    monkeypatch.setattr(report, "save_grid", catch)
    assert main(argv) == 0
    return caught["images"]


def test_sample_lora_run_dir_gives_the_trained_policy(lora_run, tmp_path, monkeypatch):
    from b2diffurl.sampling import sample

    root, run, trainer = lora_run
    common = ["sample", "--model", str(root), "--prompt", "a cat", "--n", "2", "--steps", "4", "--cfg", "2"]
    out = str(tmp_path / "g.png")
    with_run = _sampled(monkeypatch, [*common, "--lora", str(run), "--out", out])
    newest = run / "checkpoints" / "stage_00002"
    for path in (newest, newest / "lora"):  # a checkpoint, or its adapter folder, names the same weights
        torch.testing.assert_close(
            _sampled(monkeypatch, [*common, "--lora", str(path), "--out", out]), with_run
        )
    base = _sampled(monkeypatch, [*common, "--out", out])
    trained = sample(trainer.policy, ["a cat"] * 2, num_steps=4, guidance_scale=2.0, eta=1.0, seed=0).images
    torch.testing.assert_close(with_run, trained.float().cpu(), atol=1e-5, rtol=1e-5)
    assert (with_run - base).abs().max() > 1e-4  # the adapter was applied


def test_run_exports_lora_for_diffusers(lora_run):
    root, run, trainer = lora_run
    emb = trainer.policy.encode_prompts(["a cat", "two dogs"])
    pipe = fresh_pipeline(root)
    pipe.load_lora_weights(run / "lora_diffusers")
    torch.testing.assert_close(
        unet_out(pipe.unet, emb), unet_out(trainer.policy.unet, emb), atol=1e-5, rtol=1e-5
    )


def test_sample_lora_without_adapter_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    rc = main(
        [
            "sample",
            "--prompt",
            "a red circle",
            "--lora",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "g.png"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "no LoRA adapter" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()
