"""Options of the toy pretraining script: the prompt mix, the high-noise share of timesteps (against the
schedule's halves and a default that draws exactly as before) and their one-line errors."""

import argparse
import random

import pytest
import torch

from b2diffurl.toy import pretrain
from b2diffurl.toy.prompts import prompt_category


class _Recorder(torch.nn.Module):
    """A stand-in UNet that records the timesteps it was called with and predicts zeros."""

    def forward(self, x, t, cond):
        self.t = t.clone()
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def _loss_timesteps(high_noise, n_t=1000, batch=4096, seed=0, high_from=None):
    unet = _Recorder()
    torch.manual_seed(seed)
    loss = pretrain.denoising_loss(
        unet,
        torch.zeros(batch, 1, 1, 1),
        None,
        torch.linspace(0.99, 0.01, n_t),
        "v_prediction",
        high_noise,
        high_from,
    )
    return unet.t, loss


def test_high_noise_from_sets_where_the_range_starts():
    t0, _ = _loss_timesteps(0.0)
    t1, _ = _loss_timesteps(0.5, high_from=850)
    k = 2048
    assert (t1[:k] >= 850).all() and (t1[:k] < 1000).all()
    assert torch.equal(t1[k:], t0[k:])
    # the same uniform draws, mapped onto 850..999: floor(850 + u * 150 / 1000)
    torch.testing.assert_close(t1[:k], 850 + t0[:k] * 150 // 1000)
    counts = torch.bincount(t1[:k] - 850, minlength=150).view(10, 15).sum(1)
    assert counts.min() >= 150 and counts.max() <= 260  # flat: ~205 each
    # the default start is the noisier half, drawn exactly as before the option existed
    assert torch.equal(_loss_timesteps(0.25)[0], _loss_timesteps(0.25, high_from=500)[0])
    with pytest.raises(ValueError, match="high_from"):
        _loss_timesteps(0.5, high_from=1000)


def test_high_noise_moves_that_share_of_the_batch_to_the_noisier_half():
    t0, loss0 = _loss_timesteps(0.0)
    t1, loss1 = _loss_timesteps(0.25)
    k = 1024
    assert (t1[:k] >= 500).all() and (t1[:k] < 1000).all()
    assert torch.equal(t1[k:], t0[k:])  # the rest of the batch is untouched
    counts = torch.bincount(t1[:k] - 500, minlength=500).view(10, 50).sum(1)  # ten bins over 500..999
    assert counts.min() >= 60 and counts.max() <= 150  # flat: ~102 each
    # the default draws exactly what the recipe always drew: uniform over all timesteps, then the noise
    torch.manual_seed(0)
    ref_t = torch.randint(0, 1000, (4096,))
    ref_noise = torch.randn(4096, 1, 1, 1)
    assert torch.equal(t0, ref_t)
    a = torch.linspace(0.99, 0.01, 1000)[ref_t].view(-1, 1, 1, 1)
    assert loss0.item() == pytest.approx(((a.sqrt() * ref_noise) ** 2).mean().item(), rel=1e-6)


def test_category_weights_parse_and_steer_the_prompt_mix():
    w = pretrain._category_weights("single=0,count=0.25,relation=0.75")
    assert w == {"single": 0.0, "count": 0.25, "relation": 0.75}
    cats = [prompt_category(p) for p in pretrain.sample_prompts(random.Random(0), 4000, w)]
    assert "single" not in cats
    assert cats.count("relation") / len(cats) == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize(
    "text", ["single=1,count=1", "single=1,count=1,relation=x", "single=-1,count=1,relation=1", "a=1", ""]
)
def test_category_weights_reject_bad_input(text):
    with pytest.raises(argparse.ArgumentTypeError, match="single|weight"):
        pretrain._category_weights(text)


def test_bad_high_noise_is_a_one_line_error_before_any_work(capsys):
    with pytest.raises(SystemExit):
        pretrain.main(["--high-noise", "1.5", "--out", "/nonexistent/never-written"])
    assert "--high-noise must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.main(["--high-noise-from", "1000", "--out", "/nonexistent/never-written"])
    assert "--high-noise-from must be in [0, 1000)" in capsys.readouterr().err


@pytest.mark.parametrize("train_te", [False, True])
def test_text_encoder_stays_frozen_unless_asked(tmp_path, train_te):
    """Two pretraining steps from scratch: the saved text encoder equals the seed-0 encoder bit for bit, and
    differs from it only with --train-text-encoder (which the checkpoint's recipe then records)."""
    import json

    from transformers import CLIPTextModel

    from b2diffurl.toy import model as M

    out = tmp_path / "ckpt"
    args = ["--steps", "2", "--batch", "4", "--warmup", "1", "--threads", "1", "--no-eval", "--out", str(out)]
    pretrain.main(args + (["--train-text-encoder"] if train_te else []))
    saved = CLIPTextModel.from_pretrained(out / "text_encoder").state_dict()
    seed = M.build_text_encoder().state_dict()
    same = all(torch.equal(saved[k], seed[k]) for k in seed)
    assert same is not train_te
    recipe = json.loads((out / "model_index.json").read_text())["b2diffurl_toy"]
    assert recipe["text_encoder"].startswith("trained" if train_te else "frozen")
