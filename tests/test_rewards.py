"""Reward registry: toy, python:, jpeg, weighted multi-rewards and advantage aggregation, spec checks, errors."""

import io
import math
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from b2diffurl.rewards import (
    Reward,
    RewardError,
    RewardResult,
    as_reward,
    check_reward_spec,
    get_reward,
    known_rewards,
)
from b2diffurl.rewards.multi import aggregate_advantages, group_zscores, parse_multi_spec
from b2diffurl.toy.render import render

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]


def test_toy_reward_via_registry():
    fn = get_reward("toy")
    s = fn(render(PROMPTS), PROMPTS)
    assert s.dtype == torch.float32 and s.shape == (3,) and torch.allclose(s, torch.ones(3))
    res = fn.score(render(PROMPTS), PROMPTS)
    assert isinstance(res, RewardResult) and list(res.components) == ["toy"] and torch.equal(res.total, s)
    assert fn.weights == {"toy": 1.0} and fn.aggregate == "reward"
    with pytest.raises(RewardError, match="unknown option.*foo.*it takes no options"):
        get_reward("toy", foo=1)


@pytest.mark.parametrize(
    "spec,match",
    [
        (
            "nope",
            "unknown reward 'nope'; expected one of aesthetic, brightness, clip, foreground, hpsv2, jpeg_compressibility",
        ),
        ("python:nodots", "expected 'python:package.module:function'"),
        ("python:no_such_mod_xyz:f", "cannot import module"),
        ("python:math:no_such_fn", "has no callable 'no_such_fn'"),
        ("clip:0.5,nope:0.5", "unknown reward 'nope'"),
        ("clip:0,toy:1", "weight of 'clip' must be finite and non-zero"),
        ("clip:nan", "weight of 'clip' must be finite"),
        ("toy,toy:2", "'toy' appears twice"),
        ("toy:x:1", "bad term 'toy:x:1'"),
        ("toy,,clip", "empty term"),
    ],
)
def test_registry_errors(spec, match):
    with pytest.raises(RewardError, match=match) as e:
        get_reward(spec)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)


def test_check_reward_spec_is_torch_free_and_agrees_with_get_reward():
    for good in [
        "toy",
        "clip",
        "aesthetic:0.7,clip:0.3",
        "python:m.n:f",
        "python:m:f:0.5,toy",
        "jpeg_compressibility",
    ]:
        assert check_reward_spec(good) is None, good
    for bad in ["nope", "toy:0", "python:x", "", "a b"]:
        assert check_reward_spec(bad), bad
    assert set(known_rewards()) >= {
        "toy",
        "clip",
        "aesthetic",
        "pickscore",
        "hpsv2",
        "jpeg_incompressibility",
    }
    import subprocess
    import sys

    code = "import sys, b2diffurl.rewards as r; r.check_reward_spec('aesthetic:0.7,clip:0.3'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_python_reward(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent("""
        import torch
        def brightness(images, prompts, scale=1.0):
            return images.mean((1, 2, 3)) * scale
        def bad(images, prompts):
            return torch.zeros(len(prompts) + 1)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    imgs = torch.rand(4, 3, 8, 8)
    s = get_reward("python:my_rewards:brightness", scale=2.0)(imgs, ["x"] * 4)
    assert torch.allclose(s, imgs.mean((1, 2, 3)) * 2)
    with pytest.raises(RewardError, match=r"returned shape \(5,\); expected \[4\]"):
        get_reward("python:my_rewards:bad")(imgs, ["x"] * 4)
    with pytest.raises(RewardError, match="N = len"):
        get_reward("python:my_rewards:brightness")(imgs, ["x"] * 3)


# -- JPEG (DDPO) -----------------------------------------------------------------------------------------------------
def pil_jpeg_kb(img: torch.Tensor) -> float:
    """DDPO's definition: PIL JPEG at quality 95 of the uint8 image, size in kB (1000 bytes)."""
    buf = io.BytesIO()
    arr = (img * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000


def test_brightness_reward_closed_form():
    imgs = torch.zeros(3, 3, 8, 8)
    imgs[1] = 0.25
    imgs[2, :, :4] = 1.0  # top half white: mean 0.5
    want = torch.tensor([0.0, 0.25, 0.5])
    assert torch.allclose(get_reward("brightness")(imgs, ["p"] * 3), want)
    assert torch.allclose(get_reward("brightness", weight=-2)(imgs, ["p"] * 3), -2 * want)
    sparse = get_reward("brightness", threshold=0.3)(imgs, ["p"] * 3)
    assert torch.equal(sparse, torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(RewardError, match="unknown option.*gain.*its options are weight, threshold"):
        get_reward("brightness", gain=1)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        get_reward("brightness", threshold=float("nan"))


def test_foreground_reward_closed_form_and_the_toy_renderer():
    """Fraction of pixels whose brightest channel exceeds ``level``: hand-made images, then a rendered toy scene,
    whose drawn pixels the toy scorer's own foreground rule (brightest channel > 0.4) counts the same way."""
    imgs = torch.zeros(3, 3, 8, 8)
    imgs[1, 0, :2] = 0.9  # a red band, 2 of 8 rows: 0.25
    imgs[2, 2, :, :4] = 0.5  # dim blue left half: 0.5 at level 0.4, 0 at level 0.6
    assert torch.allclose(get_reward("foreground")(imgs, ["p"] * 3), torch.tensor([0.0, 0.25, 0.5]))
    assert torch.allclose(
        get_reward("foreground", level=0.6)(imgs, ["p"] * 3), torch.tensor([0.0, 0.25, 0.0])
    )
    sparse = get_reward("foreground", threshold=0.3)(imgs, ["p"] * 3)
    assert torch.equal(sparse, torch.tensor([0.0, 0.0, 1.0]))
    scene = render(["two red squares"])
    from b2diffurl.toy.score import pixel_classes

    drawn = (pixel_classes(scene) >= 0).float().mean()
    assert get_reward("foreground")(scene, ["two red squares"]).item() == pytest.approx(drawn.item())
    assert 0.02 < drawn.item() < 0.5  # two squares on a black background
    with pytest.raises(ValueError, match="level must be in"):
        get_reward("foreground", level=1.5)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        get_reward("foreground", threshold=float("inf"))


def test_jpeg_rewards():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=g)
    imgs = torch.cat([flat, noise, render(["a red circle"]).expand(1, 3, 32, 32).repeat(1, 1, 2, 2)])
    inc = get_reward("jpeg_incompressibility")(imgs, ["p"] * 3)
    comp = get_reward("jpeg_compressibility")(imgs, ["p"] * 3)
    want = torch.tensor([pil_jpeg_kb(im) for im in imgs])
    torch.testing.assert_close(inc, want)
    torch.testing.assert_close(comp, -want)
    assert inc[1] > 4 * inc[0]  # noise does not compress, a flat image does
    assert inc[0] < 1.5  # a flat 64x64 JPEG is headers + a few blocks: ~1 kB


# -- weighted multi-rewards ------------------------------------------------------------------------------------------
@pytest.fixture
def two_terms(tmp_path, monkeypatch):
    (tmp_path / "terms.py").write_text(
        textwrap.dedent("""
        def bright(images, prompts, gain=1.0):
            return images.mean((1, 2, 3)) * gain
        def red(images, prompts):
            return images[:, 0].mean((1, 2)) * 100   # a term on a 100x larger scale
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_parse_multi_spec():
    assert parse_multi_spec("aesthetic:0.7,clip:0.3") == {"aesthetic": 0.7, "clip": 0.3}
    assert parse_multi_spec("toy, clip:-0.5") == {"toy": 1.0, "clip": -0.5}
    assert parse_multi_spec("python:a.b:f:2,python:c:g") == {"python:a.b:f": 2.0, "python:c:g": 1.0}


def test_multi_reward_total_and_components(two_terms):
    imgs = torch.rand(5, 3, 8, 8)
    r = get_reward("python:terms:bright:0.7,python:terms:red:0.3", **{"python:terms:bright.gain": 2.0})
    assert isinstance(r, Reward) and r.weights == {"python:terms:bright": 0.7, "python:terms:red": 0.3}
    res = r.score(imgs, ["p"] * 5)
    bright, red = imgs.mean((1, 2, 3)) * 2, imgs[:, 0].mean((1, 2)) * 100
    torch.testing.assert_close(res.components["python:terms:bright"], bright)
    torch.testing.assert_close(res.components["python:terms:red"], red)
    torch.testing.assert_close(res.total, 0.7 * bright + 0.3 * red)
    torch.testing.assert_close(r(imgs, ["p"] * 5), res.total)
    # nested options are the same as dotted ones
    r2 = get_reward("python:terms:bright:0.7,python:terms:red:0.3", **{"python:terms:bright": {"gain": 2.0}})
    torch.testing.assert_close(r2(imgs, ["p"] * 5), res.total)


def test_multi_reward_option_errors(two_terms):
    with pytest.raises(
        RewardError, match="reward option 'clip.checkpoint' names no term.*use '<term>.<option>'"
    ):
        get_reward("toy:0.5,python:terms:red:0.5", **{"clip.checkpoint": "x"})
    with pytest.raises(RewardError, match="aggregate='sum'; expected one of reward, advantage"):
        get_reward("toy,python:terms:red", aggregate="sum")
    with pytest.raises(RewardError, match="aggregate='sum'; expected one of reward, advantage"):
        get_reward("toy", aggregate="sum")
    assert get_reward("toy", aggregate="advantage").aggregate == "advantage"  # one term: same either way
    with pytest.raises(RewardError, match="unknown option.*foo"):
        get_reward("toy,python:terms:red", **{"toy.foo": 1})
    assert get_reward("toy,python:terms:red", aggregate="advantage").aggregate == "advantage"


def test_group_zscores_closed_form():
    v = [1.0, 3.0, 10.0, 20.0, 30.0, 7.0]
    prompts = ["a", "a", "b", "b", "b", "c"]
    z = group_zscores(v, prompts)
    s_a = math.sqrt(2.0)  # unbiased std of {1, 3}
    np.testing.assert_allclose(z[:2], [-1 / s_a, 1 / s_a], rtol=1e-6)
    np.testing.assert_allclose(z[2:5], [-1, 0, 1], rtol=1e-6)  # {10, 20, 30}: mean 20, std 10
    assert z[5] == 0  # a single sample has no spread
    np.testing.assert_allclose(group_zscores([1.0, 2.0, 3.0]), [-1, 0, 1], rtol=1e-6)


def test_advantage_aggregation_equalises_scales(two_terms):
    """MixGRPO's point: under reward aggregation the 100x-scale term decides the ranking whatever its weight;
    under advantage aggregation the weights decide."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(6, 3, 4, 4, generator=g)
    prompts = ["p"] * 6
    r = get_reward("python:terms:bright:0.9,python:terms:red:0.1", aggregate="advantage")
    res = r.score(imgs, prompts)
    adv = aggregate_advantages(res.components, r.weights, prompts)
    zb = group_zscores(res.components["python:terms:bright"], prompts)
    zr = group_zscores(res.components["python:terms:red"], prompts)
    np.testing.assert_allclose(adv, 0.9 * zb + 0.1 * zr, rtol=1e-6)
    assert np.corrcoef(adv, zb)[0, 1] > np.corrcoef(adv, zr)[0, 1]
    z_reward_aggr = group_zscores(res.total, prompts)
    assert np.corrcoef(z_reward_aggr, zr)[0, 1] > np.corrcoef(z_reward_aggr, zb)[0, 1]
    # a caller's own normaliser (e.g. one stat tracker per term)
    seen = []
    adv2 = aggregate_advantages(res.components, r.weights, zscore=lambda n, v: seen.append(n) or np.ones(6))
    np.testing.assert_allclose(adv2, np.ones(6)) and seen == list(r.weights)
    with pytest.raises(ValueError, match="name different terms"):
        aggregate_advantages({"a": [1.0]}, {"b": 1.0})


def test_background_scorer_runs_off_the_calling_thread(two_terms):
    """The reward blocks until the caller has moved on: only possible if submit() returned before scoring."""
    import threading

    from b2diffurl.rewards.background import BackgroundScorer

    started, release = threading.Event(), threading.Event()
    inner = get_reward("python:terms:bright:0.5,python:terms:red:0.5")

    def gated(images, prompts):
        started.set()
        assert release.wait(10), "the caller never got control back"
        return inner.score(images, prompts)

    imgs = torch.rand(4, 3, 8, 8)
    with BackgroundScorer(Reward("gated", gated)) as bg:
        fut = bg.submit(imgs, ["p"] * 4)
        assert started.wait(10) and not fut.done()  # scoring is under way while we hold control
        release.set()
        res = fut.result(timeout=10)
    torch.testing.assert_close(res.total, inner(imgs, ["p"] * 4))
    assert set(res.components) == {"python:terms:bright", "python:terms:red"}
    assert get_reward("toy").image_embeddings(imgs) is None


def test_as_reward_wraps_plain_functions():
    def brightness(images, prompts):
        return images.mean((1, 2, 3))

    r = as_reward(brightness)
    imgs = torch.rand(3, 3, 4, 4)
    res = r.score(imgs, ["a", "b", "c"])
    assert r.name == "brightness" and list(res.components) == ["brightness"]
    torch.testing.assert_close(res.total, imgs.mean((1, 2, 3)))
    toy = get_reward("toy")
    assert as_reward(toy) is toy
    with pytest.raises(TypeError, match="must be callable"):
        as_reward(3)
