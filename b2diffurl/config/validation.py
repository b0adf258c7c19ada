"""Every configuration value checked before any work: before the model loads and before anything is written.

Each problem is reported with the option name, the allowed range and the value given; all problems of a
configuration are reported together. Torch-free and file-light (existence checks only).
"""

from __future__ import annotations

import math
import os
import re

from b2diffurl.config.schema import ALGORITHMS, ConfigError, RunConfig

# Allowed ranges in interval notation ("(0, 1]" excludes 0 and includes 1; "inf" is unbounded).
RANGES = {
    "stages": "[1, inf)",
    "checkpoint_every": "[0, inf)",
    "keep_checkpoints": "[0, inf)",
    "grid_every": "[0, inf)",
    "stop_timeout_s": "(0, inf)",
    "reward_timeout_s": "[0, inf)",
    "reward_max_nonfinite_fraction": "[0, 1]",
    "model.lora_rank": "[1, inf)",
    "model.lora_alpha": "(0, inf)",
    "sample.num_steps": "[1, inf)",
    "sample.eta": "(0, 1]",  # eta = 0 is deterministic DDIM: no step density, no policy gradient
    "sample.guidance_scale": "[1, inf)",  # 1 = classifier-free guidance off
    "sample.prompts_per_stage": "[1, inf)",
    "sample.branches": "[1, inf)",
    "sample.batch_size": "[1, inf)",
    "train.inner_epochs": "[1, inf)",
    "train.lr": "(0, inf)",
    "train.lr_warmup_steps": "[0, inf)",
    "train.adam_beta1": "[0, 1)",
    "train.adam_beta2": "[0, 1)",
    "train.weight_decay": "[0, inf)",
    "train.adam_eps": "(0, inf)",
    "train.max_grad_norm": "(0, inf)",
    "train.micro_batch_size": "[1, inf)",
    "train.grad_accum_steps": "[1, inf)",
    "train.min_step_sigma": "[0, inf)",
    "train.clip_range": "(0, inf)",
    "train.adv_clip": "(0, inf)",
    "b2.history": "[0, inf)",
    "b2.min_std": "[0, inf)",
    "b2.beta1": "[0, inf)",
    "b2.beta2": "[0, inf)",
    "ddpo.buffer_size": "[0, inf)",
    "ddpo.min_count": "[0, inf)",
    "dfusion.mask_threshold": "[0, 1]",
    "dpo.beta": "[0, inf)",
    "eval.num_prompts": "[0, inf)",
    "eval.images_per_prompt": "[1, inf)",
    "eval.every": "[0, inf)",
    "train.kl_coef": "[0, inf)",
    "monitor.kl_samples": "[0, inf)",
    "monitor.window": "[2, inf)",
    "monitor.reward_rise": "[0, inf)",
    "monitor.gold_drop": "[0, inf)",
    "monitor.diversity_drop": "[0, inf)",
    "monitor.min_trend_t": "[0, inf)",
}
CHOICES = {
    "model.dtype": ("float32", "float16", "bfloat16"),
    "model.lora": ("auto", "on", "off"),
    "sample.backend": ("auto", "triton", "reference"),
    "log_with": ("none", "tensorboard"),
    "sample.overlap_reward": ("auto", "on", "off"),
    "sample.cuda_graphs": ("auto", "on", "off"),
}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_range(key: str, value, interval: str) -> str | None:
    """``"<key> must be in <interval>, got <value>"`` when ``value`` is outside ``interval``, else None."""
    lo_s, hi_s = (part.strip() for part in interval[1:-1].split(","))
    lo, hi = float(lo_s), float(hi_s)
    ok = (lo <= value if interval[0] == "[" else lo < value) and (
        value <= hi if interval[-1] == "]" else value < hi
    )
    return None if ok else f"{key} must be in {interval}, got {value!r}"


def check_device(spec: str) -> str | None:
    if isinstance(spec, str) and DEVICE_PATTERN.fullmatch(spec):
        return None
    return f"device {spec!r} is unknown; use auto, cpu, cuda or cuda:N"


def _non_finite(key: str, value) -> list[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{key} must be a finite number, got {value!r}"]
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in _non_finite(f"{key}.{k}", v)]
    if isinstance(value, (list, tuple)):
        return [e for i, v in enumerate(value) for e in _non_finite(f"{key}[{i}]", v)]
    return []


def errors(run_config: RunConfig) -> list[str]:
    """Every problem of ``run_config``, one line each (empty when it is valid)."""
    from b2diffurl.config.loading import iter_fields
    from b2diffurl.prompts import check_spec
    from b2diffurl.rewards import AGGREGATES, check_reward_spec

    errs: list[str] = []
    values = {key: value for key, _field, value, _type in iter_fields(run_config)}
    for key, value in values.items():
        errs += _non_finite(key, value)
    for key, interval in RANGES.items():
        value = values[key]
        if isinstance(value, (int, float)) and math.isfinite(value):
            errs += filter(None, [check_range(key, value, interval)])
    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            errs.append(f"{key} must be one of {', '.join(allowed)}, got {values[key]!r}")
    if run_config.algo not in ALGORITHMS:
        errs.append(f"algo must be one of {', '.join(sorted(ALGORITHMS))}, got {run_config.algo!r}")
    if problem := check_device(run_config.model.device):
        errs.append(f"model.{problem}")

    sample, b2 = run_config.sample, run_config.b2
    if run_config.algo == "b2":
        if sample.branches < 2:
            errs.append(
                f"B² needs sample.branches >= 2 to compare branches of a prefix, got {sample.branches}"
            )
        if not (1 <= b2.k_left <= b2.k_right):
            errs.append(f"need 1 <= b2.k_left <= b2.k_right, got k_left={b2.k_left}, k_right={b2.k_right}")
        if b2.k_right > sample.num_steps:
            errs.append(
                f"b2.k_right={b2.k_right} exceeds sample.num_steps={sample.num_steps} (at most T steps can "
                "be branched); lower b2.k_right or raise sample.num_steps"
            )
        if b2.neg_threshold > b2.pos_threshold:
            errs.append(
                f"b2.neg_threshold={b2.neg_threshold} is above b2.pos_threshold={b2.pos_threshold}; "
                "need neg_threshold <= pos_threshold (official -0.5 and 0.5)"
            )
    if run_config.algo == "dfusion":
        errs += run_config.dfusion.errors() + run_config.dpo.errors()
        if run_config.train.kl_coef > 0 and run_config.dfusion.objective == "dpo":
            errs.append(
                "train.kl_coef applies to the PPO objectives (b2, ddpo, dfusion.objective=ppo); D3PO is tied to "
                "its reference policy already (raise dpo.beta instead)"
            )
    for word, threshold in run_config.dfusion.item_thresholds.items():
        if not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
            errs.append(f"dfusion.item_thresholds.{word} must be a number in [0, 1], got {threshold!r}")

    model_path = run_config.model.path
    if model_path != "toy" and not os.path.isdir(model_path):
        errs.append(
            f"model.path {model_path!r} is neither 'toy' nor an existing diffusers folder "
            "(nothing is downloaded: pass a local folder with unet/, text_encoder/, tokenizer/, scheduler/)"
        )
    if problem := check_reward_spec(run_config.reward):
        errs.append(f"reward: {problem}")
    if run_config.reward_aggregate not in AGGREGATES:
        errs.append(
            f"reward_aggregate must be one of {', '.join(AGGREGATES)}, got {run_config.reward_aggregate!r}"
        )
    gold = run_config.monitor.gold_reward
    if gold not in ("auto", "none") and (problem := check_reward_spec(gold)):
        errs.append(f"monitor.gold_reward: expected auto, none or a reward spec; {problem}")
    for key, spec, allow_none in (
        ("prompts", run_config.prompts, False),
        ("eval.prompts", run_config.eval.prompts, True),
    ):
        if problem := check_spec(spec, allow_none=allow_none):
            errs.append(f"{key}: {problem}")
    return errs


def validate(run_config: RunConfig) -> None:
    """Raise :class:`ConfigError` listing every problem of ``run_config`` (see :func:`errors`)."""
    errs = errors(run_config)
    if errs:
        raise ConfigError("invalid configuration: " + "; ".join(errs))


# Keys a resumed run may change: they decide how long the run goes on and what it writes, not the numbers
# of the stages already done.
SAFE_ON_RESUME = frozenset(
    {
        "stages",
        "out",
        "progress",
        "checkpoint_every",
        "keep_checkpoints",
        "grid_every",
        "stop_timeout_s",
        "reward_timeout_s",  # NaN scores are dropped either way; these only decide when the run gives up
        "reward_max_nonfinite_fraction",
        "eval.every",
        "dfusion.save_pairs",
        "log_with",
        # the monitors watch the run; none of them changes what it trains on
        "monitor.gold_reward",
        "monitor.gold_reward_options",
        "monitor.diversity_embeddings",
        "monitor.kl_samples",
        "monitor.window",
        "monitor.reward_rise",
        "monitor.gold_drop",
        "monitor.diversity_drop",
        "monitor.min_trend_t",
        "monitor.stop_on_hacking",
    }
)


def resume_differences(saved: RunConfig, wanted: RunConfig) -> list[str]:
    """``key: saved -> wanted`` for every key that differs and is not in :data:`SAFE_ON_RESUME`."""
    from b2diffurl.config.loading import iter_fields

    before = {key: value for key, _f, value, _t in iter_fields(saved)}
    return [
        f"{key}: {before[key]!r} -> {value!r}"
        for key, _f, value, _t in iter_fields(wanted)
        if key not in SAFE_ON_RESUME and before[key] != value
    ]
