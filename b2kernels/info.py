"""``python -m b2kernels.info``: versions, devices, and which backend each op's ``auto`` would pick, and why."""

from __future__ import annotations

import importlib
import importlib.metadata
import platform

import torch

from b2kernels import _dispatch

OPS = ("ddim_logprob", "kv_inject_attention")


# module -> distribution (package metadata answers without importing: diffusers/open_clip take seconds to import)
_DISTRIBUTIONS = {"b2kernels": "b2diffurl", "open_clip": "open_clip_torch"}


def _version(mod: str) -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(mod, mod))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(mod), "__version__", "unknown")
    except Exception as exc:  # noqa: BLE001 - report, never crash
        return f"not available ({type(exc).__name__}: {exc})"


def report() -> str:
    lines = ["b2kernels info", "=============="]
    lines.append(f"python      {platform.python_version()} ({platform.machine()})")
    for mod in ("b2kernels", "torch", "triton", "diffusers", "transformers", "open_clip", "peft", "xformers"):
        lines.append(f"{mod:<14}{_version(mod)}")
    try:
        from b2kernels import _C

        lines.append(f"_C          compiled extension {_C.version()}")
    except ImportError as exc:
        lines.append(f"_C          not built ({exc}); b2kernels.buffer uses its python backend")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}      {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
            devices.append(f"cuda:{i}")
    else:
        lines.append("cuda        not available")
    env = {
        k: v
        for k, v in (
            ("TRITON_INTERPRET", _dispatch.triton_interpret()),
            ("B2K_FORCE_REFERENCE", _dispatch.force_reference()),
        )
    }
    lines.append(f"env         {env}")
    lines.append("")
    lines.append("backend='auto' picks:")
    for op in OPS:
        for dev in devices:
            choice, why = _dispatch.explain(op, dev)
            lines.append(f"  {op:<22}{dev:<8}-> {choice:<10}({why})")
    choice, why = _dispatch.explain_arena()
    lines.append(f"  {'TrajectoryArena':<22}{'host':<8}-> {choice:<10}({why})")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
