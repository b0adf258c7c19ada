"""Prompt-conditional sanity rewards for the toy world: can training make the model act on one word?

Each reward is ±(mean pixel value): +1 × brightness for prompts with one value of a word, −1 × for the other,
so no single direction raises it for every prompt. A policy raises it on held-out prompts only by reading that
word through the text encoder and cross-attention. Comparing a colour word (which the toy follows) with a
relation word (which it ignores when drawing) tells whether the relation word reaches the UNet at all.

Used as ``--set reward=python:bench.sanity_rewards:FUNCTION`` from the repository root
(``python -m b2diffurl.cli train ...`` puts the current folder on the import path).
"""

from __future__ import annotations

import torch

from b2diffurl.rewards.pixel import mean_brightness
from b2diffurl.toy.prompts import parse

# the first relation of each pair brightens, the second darkens
_REL_SIGN = {"to the left of": 1.0, "above": 1.0, "to the right of": -1.0, "below": -1.0}
# colour of the first named object: red/green brighten, blue/yellow darken
_COLOUR_SIGN = {"red": 1.0, "green": 1.0, "blue": -1.0, "yellow": -1.0}


def _signs(prompts, sign_of) -> torch.Tensor:
    return torch.tensor([sign_of(parse(p)) for p in prompts], dtype=torch.float32)


def relation_brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    """+brightness for 'to the left of' / 'above', −brightness for 'to the right of' / 'below', 0 without a
    relation."""
    s = _signs(prompts, lambda sc: _REL_SIGN.get(sc.relation, 0.0))
    return s.to(images.device) * mean_brightness(images)


def colour_brightness(images: torch.Tensor, prompts) -> torch.Tensor:
    """+brightness when the first named object is red or green, −brightness when it is blue or yellow."""
    s = _signs(prompts, lambda sc: _COLOUR_SIGN[sc.objects[0][0]])
    return s.to(images.device) * mean_brightness(images)
