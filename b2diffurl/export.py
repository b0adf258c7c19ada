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

from pathlib import Path

import torch

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class ExportError(ValueError):
    """The model holds nothing that can be exported as a LoRA (one-line message with the fix)."""


def lora_state_dict(unet, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key format, fp32 on CPU, with alpha / r folded into ``lora_B``."""
    from diffusers.utils import convert_state_dict_to_diffusers
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
    scale = float(cfg.lora_alpha) / float(cfg.r)
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    out = {}
    for k, v in state.items():
        v = v.detach().to("cpu", torch.float32)
        out[k] = (v * scale if ".lora_B." in k else v).contiguous()
    return convert_state_dict_to_diffusers(out)


def export_lora(unet, directory, *, adapter_name: str = "default") -> Path:
    """Write ``directory/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(directory)``.

    ``unet``: the policy's ``UNet2DConditionModel`` with its peft adapter attached (``Policy.unet``).
    Returns the file's path."""
    from diffusers import StableDiffusionPipeline

    layers = lora_state_dict(unet, adapter_name)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(d, unet_lora_layers=layers, weight_name=WEIGHT_NAME)
    return d / WEIGHT_NAME
