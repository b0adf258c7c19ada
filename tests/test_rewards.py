"""Reward registry: toy, clip (random-init tiny open_clip, weights-file round trip), python:, errors."""

import textwrap

import pytest
import torch
import torch.nn.functional as F

from b2diffurl.rewards import get_reward
from b2diffurl.toy.render import render

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]


def test_toy_reward_via_registry():
    fn = get_reward("toy")
    s = fn(render(PROMPTS), PROMPTS)
    assert s.dtype == torch.float32 and s.shape == (3,) and torch.allclose(s, torch.ones(3))
    with pytest.raises(TypeError, match="no options"):
        get_reward("toy", foo=1)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nope", "unknown reward 'nope'; expected one of"),
        ("python:nodots", "expected 'python:package.module:function'"),
        ("python:no_such_mod_xyz:f", "cannot import module"),
        ("python:math:no_such_fn", "has no callable 'no_such_fn'"),
    ],
)
def test_registry_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        get_reward(spec)


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
    with pytest.raises(ValueError, match=r"returned shape \(5,\); expected \[4\]"):
        get_reward("python:my_rewards:bad")(imgs, ["x"] * 4)
    with pytest.raises(ValueError, match="N = len"):
        get_reward("python:my_rewards:brightness")(imgs, ["x"] * 3)


def test_clip_needs_a_local_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="needs checkpoint=PATH.*downloads are disabled"):
        get_reward("clip")
    with pytest.raises(FileNotFoundError, match="not found; expected a local weights file for ViT-H-14"):
        get_reward("clip", checkpoint=str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        get_reward("clip", model="NoSuchNet-1", random_init=True)


def test_clip_reward_random_tiny_model_and_weights_round_trip(tmp_path):
    import open_clip

    rand = get_reward("clip", model="tiny-test-clip", model_config=TINY_CLIP, random_init=True, batch_size=2)
    imgs = render(PROMPTS, seed=0)
    s = rand(imgs, PROMPTS)
    assert s.shape == (3,) and s.dtype == torch.float32 and (s.abs() <= 1 + 1e-5).all()
    # independent oracle: open_clip's model run by hand on the same weights
    torch.manual_seed(1)
    net = open_clip.create_model("tiny-test-clip", pretrained=None).eval()
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": net.state_dict()}, path)
    loaded = get_reward("clip", model="tiny-test-clip", checkpoint=str(path), batch_size=2)
    got = loaded(imgs, PROMPTS)
    with torch.no_grad():
        x = F.interpolate(imgs, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        im = F.normalize(net.encode_image((x - mean) / std), dim=-1)
        tx = F.normalize(net.encode_text(open_clip.get_tokenizer("tiny-test-clip")(PROMPTS)), dim=-1)
    assert torch.allclose(got, (im * tx).sum(-1), atol=1e-5)
    assert torch.allclose(loaded(imgs[:1], PROMPTS[:1]), got[:1], atol=1e-6)  # batch and text cache invariant
