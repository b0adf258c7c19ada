"""Trajectory arena for diffusion RL: branch trees with shared prefixes, in one (pinned) host arena.

``TrajectoryArena`` is the public API (docs/CONTRACTS.md). Backends: the C++ core ``b2kernels._C.Arena``
(multithreaded gather with the GIL released, C++ save/load) and a pure-torch core with the same layout and
file format (fallback and test oracle). ``backend="auto"`` picks C++ when ``b2kernels._C`` imports;
``cpp_unavailable_reason()`` says why not.
"""

from b2kernels.buffer.arena import (
    BACKENDS,
    DTYPE_CODES,
    TrajectoryArena,
    TrajectoryBatch,
    cpp_unavailable_reason,
)

__all__ = ["BACKENDS", "DTYPE_CODES", "TrajectoryArena", "TrajectoryBatch", "cpp_unavailable_reason"]
