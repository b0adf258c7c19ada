"""Command-line pieces for a run's outputs and monitors: ``train --log-with`` / ``--stop-on-hacking`` and the
``--lora`` folder of ``sample`` / ``eval`` (a run directory, a checkpoint or a saved adapter folder).

Kept apart from :mod:`b2diffurl.cli` so that the entry point stays a readable size.
"""

from __future__ import annotations

from pathlib import Path

# exit code of `b2diffurl train` when monitor.stop_on_hacking ended the run (2 is a usage error, 75 a stop
# request): a scheduler can tell "cut short on purpose, checkpoint saved" from a crash
EXIT_HACKING = 3

# train flag (argparse dest) -> config key
TRAIN_FLAGS = (("log_with", "log_with"), ("stop_on_hacking", "monitor.stop_on_hacking"))


def add_train_output_args(p) -> None:
    p.add_argument(
        "--log-with",
        metavar="LOGGER",
        help="also log the metrics to: none | tensorboard (<out>/tensorboard; config key log_with, default none)",
    )
    p.add_argument(
        "--stop-on-hacking",
        action="store_true",
        default=None,
        help="end the run when the reward-hacking alarm fires: checkpoint saved, status 'hacking', "
        f"exit code {EXIT_HACKING} (config key monitor.stop_on_hacking)",
    )


def add_lora_arg(p) -> None:
    p.add_argument(
        "--lora",
        metavar="DIR",
        help="LoRA of a training run: its run directory (the newest checkpoint's adapter), a checkpoint "
        "directory, or an adapter folder (lora.safetensors + lora_config.json)",
    )


def exit_code(status: str, interrupted_code: int) -> int:
    """The train command's exit code for a run summary's ``status``."""
    return {"interrupted": interrupted_code, "hacking": EXIT_HACKING}.get(status, 0)


def resolve_lora(path: str) -> tuple[str, str | None]:
    """(adapter folder, None) for ``--lora PATH``, or (path, one-line problem).

    PATH may be the adapter folder itself (``lora.safetensors`` + ``lora_config.json``), a checkpoint
    directory holding ``lora/``, or a run directory: then the checkpoint ``--resume`` would pick (the one
    ``checkpoints/LATEST`` names, else the newest intact one), so ``sample --lora runs/latest`` samples the
    newest trained adapter."""
    from b2diffurl.checkpoint import CheckpointError, find
    from b2diffurl.models import _LORA_CONFIG, _LORA_WEIGHTS

    def is_adapter(d: Path) -> bool:
        return (d / _LORA_WEIGHTS).is_file() and (d / _LORA_CONFIG).is_file()

    p = Path(path)
    if not p.is_dir():
        return path, f"--lora {path!r} is not a folder (expected a run directory, a checkpoint or its lora/)"
    if is_adapter(p):
        return str(p), None
    if is_adapter(p / "lora"):
        return str(p / "lora"), None
    try:
        ckpt = find(p)
    except CheckpointError:
        ckpt = None
    if ckpt is not None and is_adapter(ckpt / "lora"):
        return str(ckpt / "lora"), None
    where = f"its checkpoint {ckpt.name} has no lora/ folder" if ckpt is not None else "no checkpoint found"
    return path, (
        f"--lora {path!r}: no LoRA adapter ({_LORA_WEIGHTS} + {_LORA_CONFIG}) there and {where}; train with "
        "model.lora=on (or a real model), or pass a checkpoint's lora/ folder"
    )
