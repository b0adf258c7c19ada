"""Weighted multi-rewards (``aesthetic:0.7,clip:0.3``) and the two ways to combine their terms.

MixGRPO offers both and so do we (``aggregate=``):

* ``"reward"`` - the weighted sum of the raw scores is the reward; the algorithm normalises it as usual.
  A term with a large spread (PickScore's ~20-25 vs CLIP's ~0.3) then dominates whatever its weight says.
* ``"advantage"`` - each term is normalised on its own (per-prompt z-scores), then the z-scores are summed
  with the weights (:func:`aggregate_advantages`), so the weights mean what they say whatever the scales.

Either way :class:`~b2diffurl.rewards.RewardResult` carries every term, so each one is logged separately.
Terms are ``name`` or ``name:weight`` (weight 1 by default); ``python:pkg.mod:fn:0.5`` works too.
Options per term are nested (``{"clip": {"checkpoint": ...}}``) or dotted (``{"clip.checkpoint": ...}``).
"""

from __future__ import annotations

import math

from b2diffurl.rewards import Reward, RewardError, RewardResult


def parse_multi_spec(spec: str) -> dict[str, float]:
    """``'aesthetic:0.7,clip:0.3'`` -> ``{'aesthetic': 0.7, 'clip': 0.3}``; checks every name and weight."""
    from b2diffurl.rewards import check_single_spec

    terms: dict[str, float] = {}
    for raw in spec.split(","):
        term = raw.strip()
        name, weight = term, 1.0
        head, sep, tail = term.rpartition(":")
        if sep:
            try:
                name, weight = head, float(tail)
            except ValueError:
                pass  # 'python:mod:fn' - the last field is the function, not a weight
        if not name:
            raise RewardError(f"reward spec {spec!r}: empty term; expected e.g. 'aesthetic:0.7,clip:0.3'")
        if not math.isfinite(weight) or weight == 0:
            raise RewardError(
                f"reward spec {spec!r}: weight of {name!r} must be finite and non-zero, got {tail}"
            )
        if name in terms:
            raise RewardError(f"reward spec {spec!r}: {name!r} appears twice")
        if "," in name or (":" in name and not name.startswith("python:")):
            raise RewardError(f"reward spec {spec!r}: bad term {term!r}; expected 'name' or 'name:weight'")
        try:
            check_single_spec(name)
        except RewardError as e:
            raise RewardError(f"reward spec {spec!r}: {e}") from None
        terms[name] = weight
    return terms


def split_term_options(terms, options: dict) -> dict[str, dict]:
    """Per-term keyword options from nested ``{term: {...}}`` or dotted ``{'term.key': v}`` entries."""
    out: dict[str, dict] = {t: {} for t in terms}
    for key, value in options.items():
        if key in out:
            if not isinstance(value, dict):
                raise RewardError(
                    f"reward option {key!r} must be a mapping of that term's options, got {value!r}"
                )
            out[key].update(value)
            continue
        owner = max((t for t in out if key.startswith(t + ".")), key=len, default=None)
        if owner is None:
            raise RewardError(
                f"reward option {key!r} names no term of the multi-reward ({', '.join(out)}); "
                f"use '<term>.<option>', e.g. '{next(iter(out))}.checkpoint'"
            )
        out[owner][key[len(owner) + 1 :]] = value
    return out


def build_multi_reward(spec: str, options: dict, aggregate: str = "reward") -> Reward:
    from b2diffurl.rewards import get_reward

    weights = parse_multi_spec(spec)
    per_term = split_term_options(weights, options)
    terms = {name: get_reward(name, **per_term[name]) for name in weights}

    return Reward(spec, _WeightedSum(terms, weights), weights=weights, aggregate=aggregate, terms=terms)


class _WeightedSum:
    def __init__(self, terms: dict[str, Reward], weights: dict[str, float]):
        self.terms, self.weights = terms, weights

    def __call__(self, images, prompts) -> RewardResult:
        comps = {name: r(images, prompts) for name, r in self.terms.items()}
        total = sum(self.weights[n] * c for n, c in comps.items())
        return RewardResult(total=total, components=comps)


def group_zscores(values, prompts=None):
    """Per-prompt z-scores of ``values`` [N] (whole batch if ``prompts`` is None), with the conventions of
    the algorithms' per-prompt stat tracker: unbiased std, ``(r - mean) / (std + 1e-8)``, 0 for a prompt
    with a single sample. Returns float64 numpy [N]."""
    import numpy as np

    v = np.asarray(_numpy(values), dtype=np.float64).reshape(-1)
    keys = [0] * v.size if prompts is None else list(prompts)
    if len(keys) != v.size:
        raise ValueError(f"{len(keys)} prompts for {v.size} values")
    z = np.zeros_like(v)
    groups: dict = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    for idx in groups.values():
        if len(idx) > 1:
            g = v[idx]
            z[idx] = (g - g.mean()) / (g.std(ddof=1) + 1e-8)
    return z


def aggregate_advantages(components: dict, weights: dict[str, float], prompts=None, zscore=None):
    """MixGRPO's ``advantage_aggr``: ``Σ_k w_k · z_k`` where ``z_k`` normalises component ``k`` on its own.

    ``components`` {name: [N]} (e.g. ``RewardResult.components``), ``weights`` {name: w} (``Reward.weights``).
    ``zscore(name, values) -> [N]`` lets an algorithm use its own normaliser (e.g. one per-prompt stat
    tracker per component, pooling past stages); by default :func:`group_zscores` over ``prompts``.
    Returns float64 numpy [N]."""
    import numpy as np

    if set(components) != set(weights):
        raise ValueError(
            f"components {sorted(components)} and weights {sorted(weights)} name different terms"
        )
    total = None
    for name, w in weights.items():
        z = zscore(name, components[name]) if zscore is not None else group_zscores(components[name], prompts)
        z = np.asarray(_numpy(z), dtype=np.float64).reshape(-1)
        total = w * z if total is None else total + w * z
    return total


def _numpy(x):
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else x
