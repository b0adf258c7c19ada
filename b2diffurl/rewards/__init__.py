"""Reward registry: ``get_reward(spec, **options)`` -> a :class:`Reward`.

A reward is called as ``reward(images, prompts) -> scores``: ``images`` [N, 3, H, W] float in [0, 1],
``prompts`` a list of N strings, ``scores`` float32 [N] on ``images.device``. ``reward.score(images,
prompts)`` returns a :class:`RewardResult` with the same total plus each component (one for a single reward),
so a weighted multi-reward can be logged term by term.

Specs (every model is read from local files; nothing is ever downloaded):

* ``toy`` - the exact toy-world reward (:mod:`b2diffurl.toy.score`), partial credit in [0, 1];
* ``clip`` - open_clip image-text cosine similarity, B²-DiffuRL's reward (:mod:`.clip`);
* ``aesthetic`` - LAION aesthetic predictor: CLIP ViT-L/14 embedding + MLP head (:mod:`.aesthetic`);
* ``pickscore`` - PickScore, a transformers CLIPModel folder (:mod:`.pickscore`);
* ``hpsv2`` - HPS v2 / v2.1, an open_clip ViT-H-14 checkpoint file (:mod:`.hpsv2`);
* ``jpeg_compressibility`` / ``jpeg_incompressibility`` - DDPO's JPEG size rewards, no weights (:mod:`.jpeg`);
* ``python:pkg.module:function`` - any ``f(images, prompts, **options)`` (:mod:`.python_fn`; ImageReward
  plugs in this way);
* ``name:weight,name:weight`` - a weighted sum of the above (:mod:`.multi`), e.g. ``aesthetic:0.7,clip:0.3``.

Torch is imported lazily so that the torch-free configuration can validate specs with
:func:`check_reward_spec`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


log = logging.getLogger("b2diffurl.rewards")

# how a multi-reward's terms are combined (see b2diffurl.rewards.multi)
AGGREGATES = ("reward", "advantage")


class RewardError(ValueError):
    """A reward that cannot be built or run as asked; the message is one line naming the fix."""


class NonFiniteRewardError(RewardError):
    """More than ``max_nonfinite_fraction`` of one reward call's scores were NaN or infinite."""


class RewardTimeoutError(RewardError):
    """A reward call ran longer than ``timeout_s`` and was abandoned."""


class RewardFileError(RewardError, FileNotFoundError):
    """A local weights/config file or folder the reward needs does not exist (nothing is downloaded)."""


def require_file(path, what: str, hint: str) -> Path:
    """``Path(path)`` if it is an existing file, else :class:`RewardFileError` naming ``what`` and ``hint``."""
    if path is None:
        raise RewardError(f"{what}: no path given; {hint} (downloads are disabled)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise RewardFileError(f"{what} {str(p)!r} not found; {hint} (nothing is downloaded)")
    return p


def require_dir(path, what: str, hint: str, needs: tuple[str, ...] = ()) -> Path:
    """``Path(path)`` if it is a folder holding every file in ``needs``, else :class:`RewardFileError`."""
    if path is None:
        raise RewardError(f"{what}: no folder given; {hint} (downloads are disabled)")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise RewardFileError(f"{what} {str(p)!r} is not a folder; {hint} (nothing is downloaded)")
    missing = [n for n in needs if not (p / n).is_file()]
    if missing:
        raise RewardFileError(f"{what} {str(p)!r} has no {', '.join(missing)}; {hint}")
    return p


@dataclasses.dataclass
class RewardResult:
    """``total`` [N] float32 (what training uses under reward aggregation) and ``components`` {name: [N]}
    (the unweighted score of every term; a single reward has one component equal to ``total``)."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]


RewardFn = Callable[["torch.Tensor", list], "torch.Tensor"]


class Reward:
    """A checked, batched reward. ``weights`` maps component name -> weight; ``aggregate`` is ``"reward"``
    (weighted sum of scores, then normalisation) or ``"advantage"`` (normalise each component, then weighted
    sum: :func:`b2diffurl.rewards.multi.aggregate_advantages`). ``name`` is the spec it was built from;
    ``terms`` the sub-rewards of a multi-reward.

    :meth:`score` is the one boundary where scores enter the project: it checks their shape [N] and
    floating dtype, and turns every non-finite score into NaN, which downstream means "no score" (statistics,
    selection and pairing leave such rows out). Each such call is warned about and counted in ``nonfinite``;
    a call with more than ``max_nonfinite_fraction`` of its rows non-finite raises
    :class:`NonFiniteRewardError` (a broken reward, not an odd image). ``timeout_s`` > 0 abandons a call that
    runs longer (:class:`RewardTimeoutError`)."""

    timeout_s: float = 0.0  # 0: wait as long as the reward takes
    max_nonfinite_fraction: float = 1.0  # the trainer sets reward_max_nonfinite_fraction

    def __init__(
        self,
        name: str,
        fn,
        *,
        weights: dict[str, float] | None = None,
        aggregate: str = "reward",
        terms: dict[str, Reward] | None = None,
    ):
        self.name, self._fn = name, fn
        self.terms = dict(terms) if terms else {}
        self.weights = dict(weights) if weights else {name: 1.0}
        self.aggregate = aggregate
        self.__name__ = f"reward_{name.replace(':', '_').replace('.', '_').replace(',', '_')}"
        self.nonfinite = 0  # non-finite scores returned so far (as NaN)

    def limit(self, *, timeout_s: float = 0.0, max_nonfinite_fraction: float = 1.0) -> Reward:
        """Set the call timeout (0 = none) and the largest tolerated non-finite fraction of one call."""
        self.timeout_s, self.max_nonfinite_fraction = float(timeout_s), float(max_nonfinite_fraction)
        return self

    def _check(self, images, prompts: list):
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
            raise RewardError(
                f"reward {self.name!r}: expected images [N,3,H,W] with N = len(prompts) = {len(prompts)}, "
                f"got {tuple(images.shape)}"
            )

    def _as_scores(self, out, images, label: str):
        """``out`` as float32 [N] on the images' device, non-finite entries NaN; a wrong shape or a
        non-floating dtype is a RewardError naming the reward."""
        import torch

        out = torch.as_tensor(out)
        if out.shape != (images.shape[0],):
            raise RewardError(
                f"reward {label!r} returned shape {tuple(out.shape)}; expected [{images.shape[0]}]"
            )
        if not out.is_floating_point():
            raise RewardError(
                f"reward {label!r} returned {out.dtype} scores; expected floating point (e.g. float32)"
            )
        out = out.to(device=images.device, dtype=torch.float32)
        return torch.where(torch.isfinite(out), out, torch.full_like(out, float("nan")))

    def _call(self, images, prompts):
        """The reward function, in a worker thread when ``timeout_s`` > 0. Python cannot kill a thread: an
        abandoned call keeps running in the background (a daemon thread, so it does not hold the process
        open), and the error ends the run."""
        if not self.timeout_s > 0:
            return self._fn(images, prompts)
        import torch

        box: dict = {}
        grad = torch.is_grad_enabled()  # grad mode is per thread: the worker inherits the caller's

        def work():
            try:
                with torch.set_grad_enabled(grad):
                    box["out"] = self._fn(images, prompts)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                box["err"] = e

        worker = threading.Thread(target=work, name=f"reward {self.name}", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise RewardTimeoutError(
                f"reward {self.name!r} did not return within reward_timeout_s={self.timeout_s:g} s; the "
                "call was abandoned (raise reward_timeout_s, or fix what the reward waits for)"
            )
        if "err" in box:
            raise box["err"]
        return box["out"]

    def score(self, images, prompts) -> RewardResult:
        prompts = list(prompts)
        self._check(images, prompts)
        out = self._call(images, prompts)
        if isinstance(out, RewardResult):  # a multi-reward scores its own components (each term checked)
            total = self._as_scores(out.total, images, self.name)
            result = RewardResult(total=total, components=out.components)
        else:
            total = self._as_scores(out, images, self.name)
            result = RewardResult(total=total, components={self.name: total})
        self._count_nonfinite(total)
        return result

    def _count_nonfinite(self, total) -> None:
        # one host sync per reward call: the scores are small, and a broken reward must stop the run now
        bad = int(total.isnan().sum())
        if not bad:
            return
        self.nonfinite += bad
        n = total.numel()
        if bad > self.max_nonfinite_fraction * n:
            raise NonFiniteRewardError(
                f"reward {self.name!r} returned {bad} non-finite scores out of {n}, more than "
                f"reward_max_nonfinite_fraction={self.max_nonfinite_fraction:g}; fix the reward (or raise "
                "the limit)"
            )
        log.warning(
            "reward %r returned %d non-finite score(s) out of %d: those samples are left out of statistics "
            "and training",
            self.name,
            bad,
            n,
        )

    def __call__(self, images, prompts):
        return self.score(images, prompts).total

    def image_embeddings(self, images):
        """L2-normalised image embeddings [N, D] from the reward's own image encoder (clip, hpsv2, aesthetic,
        pickscore; a multi-reward's first such term), or None when it has none. The diversity monitor uses
        them instead of pixels; they cost one extra image-encoder pass."""
        for term in self.terms.values():
            out = term.image_embeddings(images)
            if out is not None:
                return out
        embed = getattr(self._fn, "embed_images", None)  # model scorers have one; plain functions do not
        return embed(images) if embed is not None else None

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, aggregate={self.aggregate!r})"


def as_reward(fn, name: str | None = None) -> Reward:
    """``fn`` itself if it is a :class:`Reward`, else a Reward around the plain ``fn(images, prompts) -> [N]``
    (an injected reward in tests or notebooks), so callers can always use ``.score`` / ``.weights``."""
    if isinstance(fn, Reward):
        return fn
    if not callable(fn):
        raise TypeError(f"a reward must be callable as fn(images, prompts), got {type(fn).__name__}")
    return Reward(name or getattr(fn, "__name__", "reward"), fn)


_REGISTRY: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str, factory: Callable[..., RewardFn]) -> None:
    """Make ``get_reward(name, **options)`` return a :class:`Reward` around ``factory(**options)``."""
    if any(c in name for c in ":,"):
        raise ValueError(
            f"reward names cannot contain ':' or ',' (they separate multi-reward terms): {name!r}"
        )
    _REGISTRY[name] = factory


def known_rewards() -> list[str]:
    return sorted(_REGISTRY)


def check_reward_spec(spec: str) -> str | None:
    """The one-line problem with ``spec`` (unknown name, bad weight, bad ``python:`` target), or None.
    Torch-free and file-free, for configuration checks before anything loads."""
    from b2diffurl.rewards.multi import parse_multi_spec

    if not isinstance(spec, str) or not spec:
        return f"reward spec must be a non-empty string, got {spec!r}"
    try:
        parse_multi_spec(spec) if _is_multi(spec) else check_single_spec(spec)
    except RewardError as e:
        return str(e)
    return None


def check_single_spec(name: str) -> None:
    """RewardError unless ``name`` is a registered reward or a well-formed ``python:`` target."""
    if name.startswith("python:"):
        from b2diffurl.rewards.python_fn import split_python_spec

        split_python_spec(name)
    elif name not in _REGISTRY:
        raise RewardError(_unknown(name))


def _is_multi(spec: str) -> bool:
    """Weighted terms: a comma, or a colon that is not one of the two in a lone ``python:mod:fn``."""
    if "," in spec:
        return True
    return spec.count(":") >= 3 if spec.startswith("python:") else ":" in spec


def _unknown(name: str) -> str:
    return (
        f"unknown reward {name!r}; expected one of {', '.join(known_rewards())}, "
        "'python:package.module:function' or weighted terms like 'aesthetic:0.7,clip:0.3'"
    )


def get_reward(spec: str, *, aggregate: str = "reward", **options) -> Reward:
    """Build a batched reward from ``spec`` (see module docs). Problems raise :class:`RewardError` (a
    ValueError; :class:`RewardFileError` for a missing local file) with a one-line message.

    ``aggregate`` (``"reward"`` | ``"advantage"``) says how the algorithm should combine a multi-reward's
    terms; any spec takes it, so a config can set it once (one term: both mean the same). A multi-reward
    spec takes per-term options either nested (``clip={"checkpoint": ...}``) or dotted
    (``**{"clip.checkpoint": ...}``)."""
    if not isinstance(spec, str):
        raise TypeError(f"reward spec must be a string, got {type(spec).__name__}")
    if aggregate not in AGGREGATES:
        raise RewardError(f"reward aggregate={aggregate!r}; expected one of {', '.join(AGGREGATES)}")
    if _is_multi(spec):
        from b2diffurl.rewards.multi import build_multi_reward

        return build_multi_reward(spec, options, aggregate)
    if spec.startswith("python:"):
        from b2diffurl.rewards.python_fn import python_reward

        return Reward(spec, python_reward(spec, options), aggregate=aggregate)
    if spec not in _REGISTRY:
        raise RewardError(_unknown(spec))
    return Reward(spec, _REGISTRY[spec](**options), aggregate=aggregate)


def _lazy(module: str, attr: str) -> Callable[..., RewardFn]:
    """Import the reward's module only when it is built (open_clip, transformers and PIL are heavy), and
    reject unknown options by name instead of with a TypeError from deep inside a constructor."""

    def factory(**options):
        import importlib
        import inspect

        target = getattr(importlib.import_module(f"b2diffurl.rewards.{module}"), attr)
        params = inspect.signature(target).parameters
        takes = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = sorted(set(options) - set(takes))
        if unknown:
            allowed = f"its options are {', '.join(takes)}" if takes else "it takes no options"
            raise RewardError(f"reward {attr}: unknown option(s) {', '.join(unknown)}; {allowed}")
        return target(**options)

    return factory


register_reward("toy", _lazy("toy", "toy_reward"))
register_reward("clip", _lazy("clip", "ClipReward"))
register_reward("aesthetic", _lazy("aesthetic", "AestheticReward"))
register_reward("pickscore", _lazy("pickscore", "PickScoreReward"))
register_reward("hpsv2", _lazy("hpsv2", "HPSv2Reward"))
register_reward("jpeg_compressibility", _lazy("jpeg", "jpeg_compressibility"))
register_reward("jpeg_incompressibility", _lazy("jpeg", "jpeg_incompressibility"))
register_reward("brightness", _lazy("pixel", "brightness"))
register_reward("foreground", _lazy("pixel", "foreground"))

__all__ = [
    "AGGREGATES",
    "Reward",
    "as_reward",
    "NonFiniteRewardError",
    "RewardError",
    "RewardFileError",
    "RewardTimeoutError",
    "RewardResult",
    "check_reward_spec",
    "get_reward",
    "known_rewards",
    "register_reward",
]
