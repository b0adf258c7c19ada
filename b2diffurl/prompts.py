"""The one prompt-set grammar, shared by ``train`` (``prompts``, ``eval.prompts``) and ``b2diffurl eval``.

A prompt set is written as:

* ``toy`` — the toy world's prompts of the default split for the use (``train`` for training, ``heldout``
  for evaluation); ``toy:<split>`` picks a split (``train | heldout | all``), ``toy:<category>`` a category
  (``single | count | relation``) of the default split, ``toy:<split>:<category>`` both;
* a ``.txt`` file (one prompt per line, blank lines ignored) or a ``.json`` file (a list of strings);
* ``none`` — no prompts (only where a set is optional: ``eval.prompts``).

A source that knows its prompts' groups (the toy world: categories) hands back ``group_of`` so evaluation
can report the reward per group without knowing what the groups mean. Torch-free: the config validator
calls :func:`check_spec` before anything heavy is imported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "heldout", "all")


class PromptSetError(ValueError):
    """A prompt-set spec that names nothing usable; the message says what is accepted."""


@dataclass(frozen=True)
class PromptSet:
    spec: str
    prompts: list[str]
    group_of: Callable[[str], str] | None = None  # prompt -> group name, for per-group reward means


GRAMMAR = (
    "'toy', 'toy:<split>', 'toy:<category>', 'toy:<split>:<category>' (split: train|heldout|all), "
    "a .txt (one prompt per line) or .json (list of strings) file"
)


def _toy(spec: str, default_split: str) -> PromptSet:
    from b2diffurl.toy import prompts as toy_prompts

    parts = spec.split(":")[1:]
    split = parts.pop(0) if parts and parts[0] in SPLITS else default_split
    category = parts.pop(0) if parts else None
    if parts or (category is not None and category not in toy_prompts.CATEGORIES):
        raise PromptSetError(
            f"prompt set {spec!r}: toy categories are {', '.join(toy_prompts.CATEGORIES)}, splits "
            f"{', '.join(SPLITS)}; expected {GRAMMAR}"
        )
    name = split + (f":{category}" if category else "")
    return PromptSet(spec, list(toy_prompts.get_prompts(name)), toy_prompts.prompt_category)


def _file(spec: str) -> PromptSet:
    path = Path(spec)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptSetError(f"prompt file {spec!r} cannot be read ({exc}); expected {GRAMMAR}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"prompt file {spec!r} is not valid JSON ({exc})") from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise PromptSetError(f"prompt file {spec!r}: expected a JSON list of prompt strings")
        return PromptSet(spec, data)
    return PromptSet(spec, [ln.strip() for ln in text.splitlines() if ln.strip()])


def load(spec: str, default_split: str = "train") -> PromptSet:
    """The prompts ``spec`` names (see module docs); ``default_split`` is what a bare ``toy`` means."""
    if spec == "none":
        return PromptSet(spec, [])
    if spec == "toy" or spec.startswith("toy:"):
        return _toy(spec, default_split)
    if Path(spec).is_file():
        return _file(spec)
    raise PromptSetError(f"prompt set {spec!r} is unknown or the file does not exist; expected {GRAMMAR}")


def check_spec(spec: str, allow_none: bool = False) -> str | None:
    """The one-line problem with ``spec`` without reading large files, or None."""
    if spec == "none":
        return None if allow_none else "'none' is not allowed here: training needs prompts"
    if spec == "toy" or spec.startswith("toy:"):
        try:
            _toy(spec, "train")
        except PromptSetError as exc:
            return str(exc)
        return None
    if not Path(spec).is_file():
        return f"prompt set {spec!r} is unknown or the file does not exist; expected {GRAMMAR}"
    return None
