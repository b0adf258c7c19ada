"""Monitors: diversity, image statistics and KL against closed forms; the hacking alarm on a hacked and a clean run."""

import math

import pytest
import torch

from b2diffurl.monitors import (
    StageMonitor,
    hacking_alarm,
    image_diversity,
    image_statistics,
    kl_estimate,
    pairwise_distances,
    pixel_features,
    prompt_diversity,
    trend_change,
)
from b2diffurl.toy.prompts import heldout_prompts, train_prompts
from b2diffurl.toy.render import render
from b2diffurl.toy.score import toy_score


# -- diversity -----------------------------------------------------------------------------------------------------
def test_pairwise_distances_closed_form():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    # rms: ‖a−b‖/√2 for the pairs (0,1), (0,2), (1,2)
    torch.testing.assert_close(
        pairwise_distances(x, "rms"), torch.tensor([1, 2, math.sqrt(5)]) / math.sqrt(2)
    )
    y = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])
    torch.testing.assert_close(pairwise_distances(y, "cosine"), torch.tensor([1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="metric must be"):
        pairwise_distances(x, "l1")


def test_prompt_diversity_closed_form():
    black, white, grey = torch.zeros(3, 8, 8), torch.ones(3, 8, 8), torch.full((3, 8, 8), 0.5)
    images = torch.stack([black, white, grey, grey, black])
    prompts = ["a", "a", "b", "b", "c"]  # 'c' has one image: no pairs, left out
    # 'a': black vs white, rms distance 1; 'b': identical images, 0 -> mean 0.5
    assert image_diversity(images, prompts) == pytest.approx(0.5)
    assert math.isnan(prompt_diversity(pixel_features(images[:1]), ["x"]))
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    assert image_diversity(images, prompts, embeddings=emb) == pytest.approx(0.5)  # (1 + 0) / 2
    assert pixel_features(torch.rand(2, 3, 64, 48)).shape == (2, 3 * 16 * 16)


# -- image statistics ----------------------------------------------------------------------------------------------
def test_image_statistics_closed_forms():
    grey = torch.full((1, 3, 16, 16), 0.5)
    s = image_statistics(grey)
    assert s["saturation"] == 0 and s["contrast"] == 0 and s["high_freq_energy"] == 0
    assert s["brightness"] == pytest.approx(0.5)
    pinkish = torch.tensor([1.0, 0.5, 0.5]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert image_statistics(pinkish)["saturation"] == pytest.approx(0.5)  # (1 − 0.5) / 1
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert image_statistics(red)["saturation"] == pytest.approx(1.0)
    assert image_statistics(red)["brightness"] == pytest.approx(0.299)
    ii, jj = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((ii + jj) % 2).float().expand(1, 3, 16, 16)
    c = image_statistics(checker)
    assert c["contrast"] == pytest.approx(0.5)  # luma 0/1 half each: std 0.5
    assert c["high_freq_energy"] == pytest.approx(1.0)  # all energy at (0.5, 0.5) cycles/pixel
    wave = (0.5 + 0.5 * torch.cos(2 * math.pi * jj / 16)).float().expand(1, 3, 16, 16)
    w = image_statistics(wave)
    assert w["high_freq_energy"] == pytest.approx(0.0, abs=1e-9)  # one frequency, 1/16 cycles/pixel
    assert w["contrast"] == pytest.approx(0.5 / math.sqrt(2), rel=1e-5)  # std of 0.5·cos
    # odd sizes (no Nyquist column) against the full-spectrum definition computed here with fft2
    g = torch.Generator().manual_seed(0)
    for h, w_ in [(15, 17), (16, 13), (9, 10)]:
        img = torch.rand(2, 3, h, w_, generator=g)
        luma = (img * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
        p = torch.fft.fft2(luma - luma.mean((1, 2), keepdim=True)).abs() ** 2
        f = (torch.fft.fftfreq(h).view(-1, 1) ** 2 + torch.fft.fftfreq(w_).view(1, -1) ** 2).sqrt()
        want = ((p * (f > 0.25)).sum((1, 2)) / p.sum((1, 2))).mean()
        assert image_statistics(img)["high_freq_energy"] == pytest.approx(float(want), rel=1e-5)
    both = image_statistics(torch.cat([checker, wave]))
    assert both["high_freq_energy"] == pytest.approx(0.5)  # batch mean of per-image fractions


# -- KL ---------------------------------------------------------------------------------------------------------------
def test_kl_estimate_gaussians_closed_form():
    """x ~ N(0, 1) (policy), reference N(μ, 1): KL = μ²/2."""
    g = torch.Generator().manual_seed(0)
    mu, n = 0.5, 200_000
    x = torch.randn(n, generator=g, dtype=torch.float64)
    logp = -0.5 * x**2 - 0.5 * math.log(2 * math.pi)
    logp_ref = -0.5 * (x - mu) ** 2 - 0.5 * math.log(2 * math.pi)
    kl = kl_estimate(logp.view(-1, 10), logp_ref.view(-1, 10))
    se = mu / math.sqrt(n)  # std of log π − log π_ref = μ
    assert kl["kl_k1"] == pytest.approx(mu**2 / 2, abs=4 * se)
    assert kl["kl_k3"] == pytest.approx(mu**2 / 2, abs=8 * se)
    same = kl_estimate(logp, logp)
    assert same == {"kl_k1": 0.0, "kl_k3": 0.0}
    with pytest.raises(ValueError, match="must match"):
        kl_estimate(logp, logp[:-1])


# -- alarm -----------------------------------------------------------------------------------------------------------
def test_trend_change_closed_form_and_gaps():
    assert trend_change([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0]) == pytest.approx((3.0, 1.0))
    assert trend_change([0, 1, 2], [1.0, None, 3.0]) == pytest.approx((2.0, 1.0))
    assert trend_change([0, 1], [1.0, float("nan")]) is None


def brightness(images, prompts=None):
    """The trivially hackable proxy."""
    return images.mean((1, 2, 3))


def stage_record(stage, train_images, train_prompts_, heldout_images, heldout_prompts_, reward_fn):
    return {
        "stage": stage,
        "reward": float(reward_fn(train_images, train_prompts_).mean()),
        "gold": float(toy_score(heldout_images, heldout_prompts_).mean()),
        "diversity": image_diversity(train_images, train_prompts_),
        **image_statistics(train_images),
    }


def test_alarm_fires_when_mean_brightness_is_hacked():
    """Gradient ascent on mean brightness, applied to the toy world's correct renders (a policy that has learnt
    the task and now chases the proxy): brightness rises, the exact toy reward (gold) and the per-prompt
    diversity fall, and the alarm fires with those numbers."""
    tp = [p for p in train_prompts()[:6] for _ in range(4)]
    hp = [p for p in heldout_prompts()[:6] for _ in range(4)]
    logits = [torch.logit(render(ps, seed=1).clamp(1e-3, 1 - 1e-3)).requires_grad_() for ps in (tp, hp)]
    history = []
    for stage in range(8):
        images = [torch.sigmoid(z) for z in logits]
        history.append(stage_record(stage, images[0].detach(), tp, images[1].detach(), hp, brightness))
        for z, im in zip(
            logits, images
        ):  # one sign-gradient ascent step of the proxy on the "policy" outputs
            (g,) = torch.autograd.grad(brightness(im).sum(), z)
            with torch.no_grad():
                z += g.sign()
    assert history[-1]["reward"] > history[0]["reward"] + 0.1  # the proxy went up
    assert history[-1]["gold"] < history[0]["gold"] - 0.1  # the task got worse
    assert history[-1]["saturation"] < history[0]["saturation"]  # washed out
    alarm = hacking_alarm(history, window=5)
    assert alarm.fired, alarm
    assert alarm.changes["reward"] > 0.02 and (
        alarm.changes["gold"] < -0.05 or alarm.changes["diversity"] < -0.1
    )
    assert alarm.stages == (3, 7) and "reward hacking suspected over stages 3-7" in alarm.message
    assert "\n" not in alarm.message
    # not before enough stages exist, and not with margins wider than what happened
    assert not hacking_alarm(history[:4], window=5).fired
    big = max(-alarm.changes["gold"], -alarm.changes["diversity"]) + 0.01
    assert not hacking_alarm(history, window=5, gold_drop=big, diversity_drop=big).fired


def test_alarm_silent_on_a_clean_run():
    """A run that learns the task: each stage a larger share of the images are correct renders (the rest are
    renders of a different prompt). The toy reward and gold both rise, diversity holds: no alarm."""
    tp = [p for p in train_prompts()[:6] for _ in range(4)]
    hp = [p for p in heldout_prompts()[:6] for _ in range(4)]
    history = []
    for stage in range(8):
        right = stage / 7
        batch = []
        for ps in (tp, hp):
            wrong_prompts = ps[4:] + ps[:4]  # a different prompt's scene
            good, bad = render(ps, seed=stage), render(wrong_prompts, seed=stage)
            use = (torch.arange(len(ps)) % 4 < round(right * 4)).view(-1, 1, 1, 1)
            batch.append(torch.where(use, good, bad))
        history.append(stage_record(stage, batch[0], tp, batch[1], hp, toy_score))
        assert not hacking_alarm(history, window=5).fired, (stage, history[-1])
    assert (
        history[-1]["reward"] > history[0]["reward"] + 0.2 and history[-1]["gold"] > history[0]["gold"] + 0.2
    )
    assert (
        hacking_alarm(history, window=5).changes["reward"] > 0.02
    )  # the reward did rise; it was not hacking


def test_alarm_arguments():
    with pytest.raises(ValueError, match="window must be >= 2"):
        hacking_alarm([], window=1)
    flat = [{"stage": s, "reward": 1.0 + s, "gold": None} for s in range(5)]
    a = hacking_alarm(flat, window=5)
    assert not a.fired and a.changes["gold"] is None and a.changes["diversity"] is None


def test_stage_monitor_batches_equal_one_pass():
    """Two batches through StageMonitor give the same numbers as the functions on the whole stage at once."""
    from b2diffurl.rewards import get_reward

    prompts = [p for p in train_prompts()[:4] for _ in range(3)]
    images = render(prompts, seed=2)
    reward = get_reward("toy:0.5,jpeg_compressibility:0.5")
    mon = StageMonitor(gold_fn=toy_score)
    for a, b in ((0, 5), (5, 12)):
        mon.add(images[a:b], prompts[a:b], reward.score(images[a:b], prompts[a:b]))
    m = mon.metrics()
    whole = reward.score(images, prompts)
    assert m["reward_toy_mean"] == pytest.approx(float(whole.components["toy"].mean()))
    assert m["reward_jpeg_compressibility_mean"] == pytest.approx(
        float(whole.components["jpeg_compressibility"].mean())
    )
    assert m["gold_mean"] == pytest.approx(float(toy_score(images, prompts).mean()))
    assert m["diversity"] == pytest.approx(image_diversity(images, prompts))
    for k, v in image_statistics(images).items():
        assert m[k] == pytest.approx(v, rel=1e-5), k
    assert m["monitor_time_s"] > 0
    torch.testing.assert_close(mon.components()["toy"], whole.components["toy"])
    # embeddings, when given, replace pixels (cosine distance)
    emb = StageMonitor(embed_fn=lambda im: im.mean((2, 3)))
    emb.add(images, prompts)
    assert emb.metrics()["diversity"] == pytest.approx(
        image_diversity(images, prompts, embeddings=images.mean((2, 3)))
    )
    assert "gold_mean" not in emb.metrics()
    single = StageMonitor()
    single.add(images, prompts, get_reward("toy").score(images, prompts))
    assert not any(
        k.startswith("reward_") for k in single.metrics()
    )  # one term: the stage's reward_mean says it


def test_trend_t_closed_form():
    """Slope / s.e. for y = 2x + (+1, −1, −1, +1) at x = 0..3: slope 2 + 0 (the residual pattern is orthogonal
    to x − 1.5), residuals ±1 (RSS 4, 2 degrees of freedom), Sxx = 5, so s.e. = √(4/2/5) and t = 2/√0.4."""
    from b2diffurl.monitors import trend_t

    xs = [0, 1, 2, 3]
    assert trend_t(xs, [1, 1, 3, 7]) == pytest.approx(2 / 0.4**0.5)
    assert trend_t(xs, [0, -2, -4, -6]) == -math.inf  # exactly on a falling line
    assert trend_t(xs, [5, 5, 5, 5]) is None and trend_t(xs[:2], [0, 1]) is None  # flat; too few points
    assert trend_t(xs, [1, None, 3, float("nan")]) is None  # two finite points left


def test_min_trend_t_keeps_noise_from_firing_and_lets_a_clear_fall_through():
    """The same 12% gold fall over the window fires on a steady decline but not when it comes from one noisy
    stage among flat ones - the case of a gold reward that swings with each stage's prompts."""
    rising = [0.1, 0.2, 0.3, 0.4, 0.5]
    steady = [1.0, 0.97, 0.94, 0.91, 0.88]
    noisy = [1.0, 1.06, 0.94, 1.02, 0.87]

    def history(gold):
        return [{"stage": s, "reward": r, "gold": g} for s, (r, g) in enumerate(zip(rising, gold))]

    for gold in (steady, noisy):
        assert hacking_alarm(history(gold), window=5).fired  # margins alone fire on both
    assert hacking_alarm(history(steady), window=5, min_trend_t=2).fired
    quiet = hacking_alarm(history(noisy), window=5, min_trend_t=2)
    assert not quiet.fired and quiet.changes["gold"] < -0.05  # the change is still reported
