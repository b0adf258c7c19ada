"""Export a trained UNet LoRA in the format ``StableDiffusionPipeline.load_lora_weights`` reads.

The run's own checkpoints keep peft's key names (``Policy.save_lora``); tools built on diffusers expect
``pytorch_lora_weights.safetensors`` with diffusers' ``unet.``-prefixed keys. diffusers writes that file
itself (``save_lora_weights`` after ``convert_state_dict_to_diffusers``), so the layout follows whatever
diffusers version is installed.

The LoRA scale alpha / r is folded into the up-projection (``lora_B``) before saving: a loader that
finds no alpha in the file assumes alpha = r (scale 1), and older diffusers releases, other UIs and
kohya-style converters do not read adapter metadata at all. Folding makes the file mean the same
thing to every reader.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class ExportError(ValueError):
    """The model holds nothing that can be exported as a LoRA (one-line message with the fix)."""


def to_diffusers_layers(
    peft_state: dict[str, torch.Tensor], rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """peft LoRA weights (``...to_q.lora_A.weight``) -> diffusers' keys (``...to_q.lora.down.weight``), fp32 on
    CPU, with the scale alpha / rank folded into the up-projection."""
    from diffusers.utils import convert_state_dict_to_diffusers

    scale = float(alpha) / float(rank)
    out = {}
    for k, v in peft_state.items():
        v = v.detach().to("cpu", torch.float32)
        out[k] = (v * scale if ".lora_B." in k else v).contiguous()
    return convert_state_dict_to_diffusers(out)


def lora_state_dict(unet, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The UNet's adapter in diffusers' key format (see :func:`to_diffusers_layers`)."""
    from peft.utils import get_peft_model_state_dict

    configs = getattr(unet, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ExportError(
            f"the UNet has no LoRA adapter {adapter_name!r} (adapters: {sorted(configs) or 'none'}); "
            "export needs a run trained with LoRA (model.lora=on), a full fine-tune is saved with unet.save_pretrained"
        )
    cfg = configs[adapter_name]
    if (
        getattr(cfg, "rank_pattern", None)
        or getattr(cfg, "alpha_pattern", None)
        or getattr(cfg, "use_dora", False)
    ):
        raise ExportError(
            f"LoRA adapter {adapter_name!r} uses rank/alpha patterns or DoRA; export supports one rank and alpha"
        )
    return to_diffusers_layers(
        get_peft_model_state_dict(unet, adapter_name=adapter_name), cfg.r, cfg.lora_alpha
    )


def _write(layers: dict[str, torch.Tensor], directory) -> Path:
    from diffusers import StableDiffusionPipeline

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(d, unet_lora_layers=layers, weight_name=WEIGHT_NAME)
    return d / WEIGHT_NAME


def export_lora(unet, directory, *, adapter_name: str = "default") -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(directory)``.

    ``unet``: the policy's ``UNet2DConditionModel`` with its peft adapter attached (``Policy.unet``).
    Returns the file's path."""
    return _write(lora_state_dict(unet, adapter_name), directory)


def export_run_lora(unet, run_dir) -> Path:
    """A finished run's adapters for diffusers, in ``run_dir/lora_diffusers`` (logged with the load line)."""
    path = export_lora(unet, Path(run_dir) / "lora_diffusers")
    logging.getLogger("b2diffurl.export").info(
        "LoRA for diffusers: %s - load with pipe.load_lora_weights(%r)", path, str(path.parent.resolve())
    )
    return path


def export_lora_folder(lora_dir, directory) -> Path:
    """The same file from a run's saved adapter (a checkpoint's ``lora/`` folder written by
    ``Policy.save_lora``), without loading any model."""
    import json

    from safetensors.torch import load_file

    from b2diffurl.models import _LORA_CONFIG, _LORA_WEIGHTS

    src = Path(lora_dir)
    weights, config = src / _LORA_WEIGHTS, src / _LORA_CONFIG
    if not weights.is_file() or not config.is_file():
        raise ExportError(
            f"{str(src)!r} is not a saved LoRA folder: expected {_LORA_WEIGHTS} and {_LORA_CONFIG}"
        )
    try:
        cfg = json.loads(config.read_text())
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{config}: cannot read the LoRA rank and alpha ({e})") from None
    return _write(to_diffusers_layers(load_file(str(weights)), rank, alpha), directory)
