"""bench.word_signal's Bayes-optimal denoisers against closed forms: the posterior mean over two points, the
gain of a word when the noise hides everything, and no gain when the swapped prompt's scenes are the
prompt's own."""

import math

import pytest
import torch
from bench_modules import from_checkout


def test_posterior_mean_over_two_points_is_a_tanh():
    ws = from_checkout("bench.word_signal")
    m, a = 0.7, 0.3
    refs = torch.tensor([[m], [-m]], dtype=torch.float64)
    x_t = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    want = m * torch.tanh(math.sqrt(a) * x_t * m / (1 - a))
    torch.testing.assert_close(ws.posterior_mean(x_t, refs, a), want)


def test_gain_is_the_whole_variance_when_the_noise_hides_the_image():
    ws = from_checkout("bench.word_signal")
    m, r, d = 0.5, 8, 6
    known, other = torch.full((r, d), m), torch.full((r, d), -m)
    x0 = torch.full((4, d), m)
    out = ws.word_gain(x0, known, other, 0.0, torch.randn(4, d))
    assert out["mse_knowing"] == pytest.approx(0.0, abs=1e-12)
    assert out["gain"] == pytest.approx(m * m)  # the blind denoiser predicts the mean, 0
    assert out["ess"] == pytest.approx(r)
    assert out["change"] == pytest.approx(2 * m * math.sqrt(d))  # from +m to -m in every value


def test_no_gain_when_the_swap_changes_no_scene():
    ws = from_checkout("bench.word_signal")
    g = torch.Generator().manual_seed(0)
    scenes = torch.rand(16, 12, generator=g) * 2 - 1
    both = torch.cat([scenes, scenes])
    x0 = torch.rand(5, 12, generator=g) * 2 - 1
    out = ws.word_gain(x0, both, both.clone(), 0.2, torch.randn(5, 12, generator=g))
    assert out["gain"] == 0.0
    assert out["change"] == 0.0
    assert out["mse_knowing"] > 0


def test_bad_input_is_a_one_line_error(capsys):
    ws = from_checkout("bench.word_signal")
    with pytest.raises(ValueError, match="alpha_bar"):
        ws.posterior_mean(torch.zeros(1, 2), torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="one shape"):
        ws.word_gain(torch.zeros(1, 2), torch.zeros(4, 2), torch.zeros(2, 2), 0.5, torch.zeros(1, 2))
    with pytest.raises(SystemExit):
        ws.main(["--refs", "2"])
    assert "--refs must be at least 4" in capsys.readouterr().err
