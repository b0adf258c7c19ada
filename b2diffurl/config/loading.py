"""Reading a configuration: dotted keys, YAML and ``--set key=value`` overrides, presets, help text.

Precedence, lowest first: dataclass defaults (official) → preset → algorithm preset → YAML → ``--set``.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

from b2diffurl.config.presets import ALGO_PRESETS, PRESETS, preset_items
from b2diffurl.config.schema import ConfigError, RunConfig
from b2diffurl.config.validation import validate


# ----------------------------------------------------------------------------------------------- tree helpers
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def iter_fields(run_config=None, prefix: str = ""):
    """Yield (dotted key, field, value-or-default, owner dataclass) for every leaf field."""
    cls = type(run_config) if run_config is not None else RunConfig
    obj = run_config if run_config is not None else RunConfig()
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(value, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, value, hints[f.name]


def _lookup(run_config, key: str):
    parts = key.split(".")
    obj = run_config
    for p in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
            raise ConfigError(_unknown(key))
        obj = getattr(obj, p)
    if not dataclasses.is_dataclass(obj) or parts[-1] not in {f.name for f in dataclasses.fields(obj)}:
        raise ConfigError(_unknown(key))
    f = next(f for f in dataclasses.fields(obj) if f.name == parts[-1])
    if dataclasses.is_dataclass(getattr(obj, f.name)):
        raise ConfigError(f"config key {key!r} is a section; set one of its fields (e.g. {key}.<field>)")
    return obj, f, _hints(type(obj))[f.name]


def _unknown(key: str) -> str:
    keys = [k for k, *_ in iter_fields()]
    import difflib

    close = difflib.get_close_matches(key, keys, n=3)
    hint = (
        f" Did you mean {', '.join(close)}?" if close else " Run `b2diffurl train --help` for the full list."
    )
    return f"unknown config key {key!r}.{hint}"


def _coerce(key: str, value: Any, typ) -> Any:
    origin = typing.get_origin(typ) or typ
    if isinstance(value, str) and origin is not str:
        if origin is bool:
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
        if origin in (list, dict, tuple):
            import yaml

            value = yaml.safe_load(value)
    try:
        if origin is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if origin is int:
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if origin is float:
            return float(value)
        if origin is str:
            # YAML 1.1 reads on/off as booleans (and older run configs stored true/false)
            if isinstance(value, bool):
                return "on" if value else "off"
            return str(value)
        if origin is list:
            return list(value) if not isinstance(value, str) else [value]
        if origin is tuple:
            return tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected {getattr(origin, '__name__', origin)}, got {value!r}") from None
    return value


# Keys that were renamed: the saved config.yaml of an older run still resumes.
RENAMED = {"train.cfg": "train.use_guidance"}


# Mapping fields whose entries are options of a reward: ``--set reward_options.clip.checkpoint=X`` sets the entry
# "clip.checkpoint" (the dotted form a multi-reward reads), and flatten keeps them whole.
OPTION_MAPS = ("reward_options", "monitor.gold_reward_options")


def set_value(run_config: RunConfig, key: str, value: Any) -> None:
    key = RENAMED.get(key, key)
    owner = next((m for m in OPTION_MAPS if key.startswith(m + ".")), None)
    if owner is not None:
        obj, f, _typ = _lookup(run_config, owner)
        if isinstance(value, str):
            import yaml

            try:  # numbers and booleans as YAML reads them; anything else stays the string given
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
            value = parsed if isinstance(parsed, (int, float, bool)) else value
        getattr(obj, f.name)[key[len(owner) + 1 :]] = value
        return
    obj, f, typ = _lookup(run_config, key)
    setattr(obj, f.name, _coerce(key, value, typ))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and (prefix + k) not in OPTION_MAPS:
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def resolve_preset(run_config: RunConfig) -> str:
    if run_config.preset == "auto":
        from b2diffurl.toy import is_toy_checkpoint

        return "toy" if is_toy_checkpoint(run_config.model.path) else "official"
    if run_config.preset not in PRESETS:
        raise ConfigError(f"preset must be one of auto, {', '.join(PRESETS)}; got {run_config.preset!r}")
    return run_config.preset


def read_yaml(path: str | os.PathLike, what: str = "config file") -> dict:
    """The mapping a YAML config file holds (nested sections or dotted keys); ConfigError naming the problem."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read as YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{what} {str(path)!r} must hold a mapping of config keys, got {type(data).__name__}"
        )
    return data


def load_config(
    yaml_path: str | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    saved: dict[str, Any] | None = None,
) -> RunConfig:
    """Defaults → preset → ``saved`` (a resumed run's config.yaml) → the user's YAML and overrides (one layer,
    overrides last), then :func:`validate`.

    Each layer replaces the keys it sets. When the user's layer names a reward, the preset's and the saved
    run's reward options are left out: they belong to the reward it replaces (see :func:`preset_items`).
    Unknown keys raise :class:`ConfigError`."""
    if isinstance(overrides, list):
        overrides = parse_set(overrides)
    user = {**(flatten(read_yaml(yaml_path)) if yaml_path else {}), **(overrides or {})}
    saved = flatten(saved or {})

    run_config = RunConfig()
    for layer in (saved, user):  # first pass: learn model.path / preset / algo, and reject unknown keys early
        for k, v in layer.items():
            set_value(run_config, k, v)
    preset = resolve_preset(run_config)
    layers = [PRESETS[preset], ALGO_PRESETS.get((preset, run_config.algo), {}), saved, user]
    run_config = RunConfig()
    for i, layer in enumerate(layers):
        for k, v in preset_items(layer, {k: v for above in layers[i + 1 :] for k, v in above.items()}):
            set_value(run_config, k, v)
    run_config.preset = preset
    validate(run_config)
    return run_config


# ----------------------------------------------------------------------------------------------- I/O, help
def to_dict(run_config: RunConfig) -> dict:
    return dataclasses.asdict(run_config)


def from_dict(d: dict) -> RunConfig:
    run_config = RunConfig()
    for k, v in flatten(d).items():
        set_value(run_config, k, v)
    return run_config


def help_text() -> str:
    """One line per field: key, default (official), toy preset value, help."""
    lines = []
    toy = PRESETS["toy"]
    for key, f, value, _ in iter_fields():
        extra = f" [toy: {toy[key]}]" if key in toy else ""
        lines.append(f"  {key} (default {value!r}{extra})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
