"""Backend choice for every public op and for the trajectory arena, with reasons.

Each op takes ``backend="auto" | "triton" | "reference"``:

* ``"auto"`` picks Triton for CUDA tensors and the pure-torch reference elsewhere (quietly), except for the ops
  in ``AUTO_PICKS_REFERENCE``, whose kernel measured slower than the reference on a GPU.
* ``"triton"`` must be served by the Triton kernels or raise, listing every reason it can't.
* ``"reference"`` always runs the pure-torch reference (the CPU path and the test oracle).

Environment switches (documented in ENVs.md):

* ``B2K_FORCE_REFERENCE=1`` — master switch: ``auto`` never picks Triton, ``triton`` raises.
* ``TRITON_INTERPRET=1`` — Triton's interpreter; lets ``backend="triton"`` run on CPU tensors (tests only,
  ~10⁴× slower than a GPU). ``auto`` still picks the reference on CPU.

The arena (:class:`b2kernels.buffer.TrajectoryArena`) takes ``backend="auto" | "cpp" | "python"`` with the same
rules: ``auto`` picks the compiled core when ``b2kernels._C`` imports and falls back quietly, ``cpp`` raises
with the reason. Both cores are exact (byte copies), so the master switch above does not apply to it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable

import torch

BACKENDS = ("auto", "triton", "reference")

# op -> why ``auto`` runs the reference on CUDA too; ``backend="triton"`` still runs the kernel
AUTO_PICKS_REFERENCE = {
    "kv_inject_attention": (
        "the Triton kernel measured 0.56-0.78x the speed of blend + SDPA on an H200 (bench kv_inject_attention, "
        "SD 1.5 head dims; before its bool path read each K/V tile straight into the dots, not yet re-measured); "
        "backend='triton' still runs it"
    ),
}


def force_reference() -> bool:
    return os.environ.get("B2K_FORCE_REFERENCE", "0") not in ("", "0", "false", "False")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_reasons(device: torch.device | str) -> list[str]:
    """Why Triton cannot run on ``device`` (empty list: it can)."""
    device = torch.device(device)
    reasons = []
    if force_reference():
        reasons.append("B2K_FORCE_REFERENCE=1 forces the reference backend")
    if not triton_installed():
        reasons.append("triton is not installed")
    if device.type != "cuda" and not triton_interpret():
        reasons.append(
            f"tensors are on '{device.type}': the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 to run them slowly on CPU for debugging)"
        )
    return reasons


def resolve(op: str, backend: str, device: torch.device | str, extra_reasons: Iterable[str] = ()) -> str:
    """Return ``"triton"`` or ``"reference"`` for ``op`` on ``device``.

    ``extra_reasons`` are op-specific reasons the Triton kernel can't serve this call (dtype, head dim, ...).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    reasons = triton_reasons(device) + list(extra_reasons)
    if backend == "triton":
        if reasons:
            raise RuntimeError(f"{op}: backend='triton' cannot serve this call: " + "; ".join(reasons))
        return "triton"
    # auto: Triton only on CUDA (the interpreter is a debugging aid, never an automatic choice).
    if reasons or torch.device(device).type != "cuda" or op in AUTO_PICKS_REFERENCE:
        return "reference"
    return "triton"


def explain(op: str, device: torch.device | str) -> tuple[str, str]:
    """(choice, why) that ``backend="auto"`` makes for ``op`` on ``device`` — used by ``b2kernels.info``."""
    device = torch.device(device)
    reasons = triton_reasons(device)
    choice = resolve(op, "auto", device)
    if choice == "triton":
        return choice, f"CUDA device {device} and triton available"
    if not reasons and device.type == "cuda" and op in AUTO_PICKS_REFERENCE:
        reasons = [AUTO_PICKS_REFERENCE[op]]
    if not reasons:
        reasons = [f"auto picks the reference on '{device.type}' (Triton is only picked for CUDA tensors)"]
    return choice, "; ".join(reasons)


ARENA_BACKENDS = ("auto", "cpp", "python")


def cpp_arena_reasons() -> list[str]:
    """Why the C++ arena core can't be used (empty list: it can)."""
    try:
        from b2kernels import _C
    except ImportError as exc:
        return [
            f"b2kernels._C is not built or failed to import ({exc}); build it with "
            "`python setup.py build_ext --inplace` or `pip install .`"
        ]
    if not hasattr(_C, "Arena"):
        return ["b2kernels._C was built without the arena (rebuild it)"]
    return []


def resolve_arena(backend: str) -> str:
    """Return ``"cpp"`` or ``"python"`` for a ``TrajectoryArena(backend=...)``."""
    if backend not in ARENA_BACKENDS:
        raise ValueError(f"TrajectoryArena: backend must be one of {ARENA_BACKENDS}, got {backend!r}")
    if backend == "python":
        return "python"
    reasons = cpp_arena_reasons()
    if backend == "cpp" and reasons:
        raise RuntimeError("TrajectoryArena: backend='cpp' unavailable: " + "; ".join(reasons))
    return "python" if reasons else "cpp"


def explain_arena() -> tuple[str, str]:
    """(choice, why) that ``TrajectoryArena(backend="auto")`` makes — used by ``b2kernels.info``."""
    reasons = cpp_arena_reasons()
    if reasons:
        return "python", "; ".join(reasons)
    return "cpp", "b2kernels._C imports (threaded gather with the GIL released)"
