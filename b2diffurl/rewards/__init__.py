"""Reward registry: ``get_reward(spec, **options)`` -> ``reward_fn(images, prompts) -> scores``.

``images`` [N, 3, H, W] float in [0, 1], ``prompts`` a list of N strings; ``scores`` float32 [N] on
``images.device``. Specs:

* ``"toy"``  — the exact toy-world reward (:mod:`b2diffurl.toy.score`), partial credit in [0, 1];
* ``"clip"`` — open_clip image–text cosine similarity (B²-DiffuRL's reward); options ``model``
  (default ``"ViT-H-14"``), ``checkpoint`` (local weights file, required), ``device``, ``dtype``,
  ``batch_size``; see :mod:`b2diffurl.rewards.clip`;
* ``"python:pkg.module:function"`` — any function ``f(images, prompts, **options)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

RewardFn = Callable[[torch.Tensor, list], torch.Tensor]
_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str, factory: Callable[..., RewardFn]) -> None:
    """Make ``get_reward(name, **options)`` return ``factory(**options)``."""
    _REGISTRY[name] = factory


def _checked(fn: RewardFn, name: str) -> RewardFn:
    def reward(images: torch.Tensor, prompts) -> torch.Tensor:
        prompts = list(prompts)
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise ValueError(
                f"reward {name!r}: expected images [N,3,H,W] with N = len(prompts) = {len(prompts)}, "
                f"got {tuple(images.shape)}"
            )
        out = torch.as_tensor(fn(images, prompts))
        if out.shape != (len(prompts),):
            raise ValueError(f"reward {name!r} returned shape {tuple(out.shape)}; expected [{len(prompts)}]")
        return out.to(device=images.device, dtype=torch.float32)

    reward.__name__ = f"reward_{name.replace(':', '_').replace('.', '_')}"
    return reward


def _python_reward(spec: str, options: dict) -> RewardFn:
    target = spec[len("python:") :]
    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"bad reward spec {spec!r}; expected 'python:package.module:function'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {mod_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: module {mod_name!r} has no callable {fn_name!r}")
    return (lambda images, prompts: fn(images, prompts, **options)) if options else fn


def get_reward(spec: str, **options) -> RewardFn:
    """Build a batched reward function from ``spec`` (see module docs); unknown specs raise ValueError."""
    if not isinstance(spec, str):
        raise TypeError(f"reward spec must be a string, got {type(spec).__name__}")
    if spec.startswith("python:"):
        return _checked(_python_reward(spec, options), spec)
    if spec not in _REGISTRY:
        raise ValueError(
            f"unknown reward {spec!r}; expected one of {sorted(_REGISTRY)} or 'python:package.module:function'"
        )
    return _checked(_REGISTRY[spec](**options), spec)


def _toy_factory(**options) -> RewardFn:
    if options:
        raise TypeError(f"the toy reward takes no options, got {sorted(options)}")
    from b2diffurl.toy.score import toy_score

    return toy_score


def _clip_factory(**options) -> RewardFn:
    from b2diffurl.rewards.clip import ClipReward

    return ClipReward(**options)


register_reward("toy", _toy_factory)
register_reward("clip", _clip_factory)

__all__ = ["get_reward", "register_reward"]
