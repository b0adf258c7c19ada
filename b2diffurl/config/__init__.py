"""Run configuration: one dataclass tree with a help string per field, YAML and ``--set key=value``
overrides, presets, and a validator that checks every value before any work.

No torch import here, so ``b2diffurl train --help`` is fast and complete. The package holds the schema
(:mod:`.schema`), reading and help text (:mod:`.loading`) and the checks (:mod:`.validation`).

Two presets fill every field the user did not set explicitly (in YAML or with ``--set``):

* ``official`` — the values of the official B²-DiffuRL run script (SD 1.4, T = 20, η = 1, CFG 5, 100 stages,
  256 prompts × 5 branches per stage, k 14 → 20, H = 8, thresholds ±0.5, 2 inner epochs, AdamW 1e-4 wd 1e-4,
  clip 1.0, micro-batch 2 × 64 accumulated micro-steps, LoRA rank 4). These are the dataclass defaults; the
  preset only switches the reward to ``clip`` and turns off the toy held-out evaluation.
* ``toy`` — small CPU-friendly values so ``b2diffurl train`` with no arguments runs B² on the embedded toy world
  in minutes on 2 CPU cores (fewer stages and prompts, bigger micro-batches, full fine-tune of the tiny UNet);
  B² and DDPO train a sparse pixel reward there (``ALGO_PRESETS``), D-Fusion the toy's prompt-following one.

``preset: auto`` (default) picks ``toy`` when ``model.path`` is ``toy`` and ``official`` otherwise.
Precedence, lowest first: dataclass defaults (official) → preset → a resumed run's saved config → YAML file →
``--set`` overrides (YAML and ``--set`` values always win). A preset's or a saved run's ``reward_options``
belong to its reward: naming a ``reward`` leaves them out.
"""

from b2diffurl.config.loading import (
    flatten,
    from_dict,
    help_text,
    iter_fields,
    load_config,
    parse_set,
    read_yaml,
    resolve_preset,
    set_value,
    to_dict,
)
from b2diffurl.config.presets import ALGO_PRESETS, PRESETS
from b2diffurl.config.schema import (
    ALGORITHMS,
    B2Config,
    ConfigError,
    DDPOConfig,
    DFusionConfig,
    DPOConfig,
    EvalConfig,
    ModelConfig,
    MonitorConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    dfusion_pairing_sizes,
    switch,
)
from b2diffurl.config.validation import check_device, check_range, resume_differences, validate

__all__ = [
    "ALGO_PRESETS",
    "ALGORITHMS",
    "PRESETS",
    "B2Config",
    "ConfigError",
    "DDPOConfig",
    "DFusionConfig",
    "DPOConfig",
    "EvalConfig",
    "ModelConfig",
    "MonitorConfig",
    "RunConfig",
    "SampleConfig",
    "TrainConfig",
    "check_device",
    "check_range",
    "dfusion_pairing_sizes",
    "flatten",
    "from_dict",
    "help_text",
    "iter_fields",
    "load_config",
    "parse_set",
    "read_yaml",
    "resolve_preset",
    "resume_differences",
    "set_value",
    "switch",
    "to_dict",
    "validate",
]
