"""The toy world's exact reward, through the registry (``--reward toy``)."""

from __future__ import annotations


def toy_reward():
    """``(images, prompts) -> [N]`` partial-credit score in [0, 1] (:func:`b2diffurl.toy.score.toy_score`)."""
    from b2diffurl.toy.score import toy_score

    return toy_score
