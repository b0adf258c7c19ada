"""b2kernels — reusable fast building blocks for diffusion RL.

* :func:`ddim_step_logprob`, :func:`ddim_step_sample`, :class:`DDIMTable` — fused DDIM step log-probability.
* :func:`kv_inject_attention`, :class:`KVMask` — flash-style attention with mask-blended reference K/V.
* :mod:`b2kernels.buffer` — pinned-memory trajectory arena with branch-tree prefix sharing.
* :mod:`b2kernels.integrations.diffusers` — attention processors for ``UNet2DConditionModel``.

Names are resolved lazily so ``import b2kernels`` stays cheap.
"""

from __future__ import annotations

import importlib
from importlib import metadata

try:
    __version__ = metadata.version("b2diffurl")  # one distribution ships both packages: one version
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "DDIMTable": "b2kernels.ops.ddim_logprob",
    "ddim_step_logprob": "b2kernels.ops.ddim_logprob",
    "ddim_step_sample": "b2kernels.ops.ddim_logprob",
    "kv_inject_attention": "b2kernels.ops.kv_inject_attention",
    "KVMask": "b2kernels.ops.kv_inject_attention",
    "TrajectoryArena": "b2kernels.buffer",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'b2kernels' has no attribute {name!r}")


def __dir__():
    return __all__
