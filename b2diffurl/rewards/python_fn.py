"""``python:package.module:function`` rewards: any ``f(images, prompts, **options) -> [N]``.

This is also how rewards whose packages pin old stacks plug in. ImageReward, for example, ships its own
BLIP code written against transformers 4.2x, so it is not built in. Where the ``image-reward`` package
works with the installed transformers, a module such as this sketch (ImageReward's own ``load`` /
``score(prompt, image)`` API)::

    # my_rewards.py
    import ImageReward as RM
    import torch
    import torchvision.transforms.functional as TF

    _model = {}

    def imagereward(images, prompts, checkpoint, med_config):
        if "m" not in _model:  # local files only: the .pt weights and the med_config.json next to them
            _model["m"] = RM.load(checkpoint, med_config=med_config, device=images.device)
        pil = [TF.to_pil_image(im) for im in images.float().cpu()]
        return torch.tensor([float(_model["m"].score(p, im)) for p, im in zip(prompts, pil)])

is used as ``--reward python:my_rewards:imagereward`` with ``reward_options`` ``checkpoint`` (the local
``ImageReward.pt``) and ``med_config`` (its ``med_config.json``).
"""

from __future__ import annotations

import importlib

from b2diffurl.rewards import RewardError


def split_python_spec(spec: str) -> tuple[str, str]:
    """``'python:pkg.mod:fn'`` -> ``('pkg.mod', 'fn')``; a malformed spec raises RewardError."""
    mod_name, sep, fn_name = spec[len("python:") :].partition(":")
    if not mod_name or not sep or not fn_name or ":" in fn_name:
        raise RewardError(f"bad reward spec {spec!r}; expected 'python:package.module:function'")
    return mod_name, fn_name


def python_reward(spec: str, options: dict):
    """Import the function named by ``spec`` and bind ``options`` as keyword arguments."""
    mod_name, fn_name = split_python_spec(spec)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise RewardError(f"reward {spec!r}: cannot import module {mod_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: module {mod_name!r} has no callable {fn_name!r}")
    return (lambda images, prompts: fn(images, prompts, **options)) if options else fn
