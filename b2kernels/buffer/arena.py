"""``TrajectoryArena``: the public facade over the trajectory arena cores.

The core (``b2kernels._C.Arena`` or the pure-torch ``PythonArenaCore``) owns the byte layout, the indices and
the per-trajectory metadata; this facade owns dtypes, devices, CUDA streams/events, pinning and the staging
block of ``gather``. See docs/CONTRACTS.md for the API and ``_python.py`` for the layout.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from dataclasses import dataclass

import torch

from b2kernels import _dispatch
from b2kernels.buffer._python import PythonArenaCore

# dtype <-> code stored in saved files (never renumber).
DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4, torch.uint8: 5}
BACKENDS = _dispatch.ARENA_BACKENDS
_ALIGN = 64  # byte alignment of each section of the gather staging block


def cpp_unavailable_reason() -> str | None:
    """Why the C++ backend can't be used (None: it can). The choice itself is ``b2kernels._dispatch``'s."""
    return "; ".join(_dispatch.cpp_arena_reasons()) or None


@dataclass
class TrajectoryBatch:
    """A training batch of M (trajectory, step) rows. Tensors share one staging block / one device buffer."""

    x_t: torch.Tensor  # [M, C, H, W]  latent[step]
    x_prev: torch.Tensor  # [M, C, H, W]  latent[step + 1]
    logprob: torch.Tensor  # [M] float32, the sampling-time log-prob of the step
    step: torch.Tensor  # [M] int64
    advantage: torch.Tensor  # [M] float32
    reward: torch.Tensor  # [M] float32
    prompt_id: torch.Tensor  # [M] int64

    def __len__(self) -> int:
        return self.step.shape[0]


def _cudart_unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001  (interpreter shutdown: nothing useful to do)
        pass


class TrajectoryArena:
    """Host arena of branch-tree trajectories (prompt → shared prefix → B branches) for diffusion RL.

    ``latent_shape`` (C, H, W), ``num_steps`` T, ``max_trees`` (prompts per stage), ``branches`` B and
    ``dtype`` fix the sizes at construction. Latents ``0..s`` of a tree with split ``s`` are stored once;
    ``x_prev`` of step ``i`` is the stored latent ``i + 1``. ``pin_memory=None`` pins when CUDA is available.
    ``backend``: "auto" (C++ when ``b2kernels._C`` imports, else python; see ``backend_reason``), "cpp",
    "python". ``num_threads`` (C++ only): threads of ``gather``; default min(8, cores).
    """

    def __init__(
        self,
        latent_shape,
        *,
        num_steps: int,
        max_trees: int,
        branches: int,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        pin_memory: bool | None = None,
        num_threads: int | None = None,
    ):
        if dtype not in DTYPE_CODES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CODES)}, got {dtype}")
        shape = tuple(int(d) for d in latent_shape)
        if not shape or any(d <= 0 for d in shape):
            raise ValueError(
                f"latent_shape must be a non-empty tuple of positive sizes, got {latent_shape!r}"
            )
        self.latent_shape, self.dtype = shape, dtype
        self._numel = math.prod(shape)
        self.num_steps, self.max_trees, self.branches = int(num_steps), int(max_trees), int(branches)
        self.backend = _dispatch.resolve_arena(backend)
        self.backend_reason = cpp_unavailable_reason() if self.backend == "python" else None
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        elif pin_memory and not torch.cuda.is_available():
            raise ValueError(
                "pin_memory=True needs a CUDA device (none is visible); pass pin_memory=None or False"
            )
        self.pinned = bool(pin_memory)
        itemsize = torch.empty((), dtype=dtype).element_size()
        args = (shape, itemsize, DTYPE_CODES[dtype], self.num_steps, self.max_trees, self.branches)
        if self.backend == "cpp":
            from b2kernels.buffer._cpp import CppArenaCore

            self._core = CppArenaCore(*args, num_threads=num_threads)
            if self.pinned:
                self._pin(self._core.memory())
        else:
            self._core = PythonArenaCore(*args, pin_memory=self.pinned)
        mem = self._core.memory()
        self._view = (
            mem.view(self._core.capacity_slots, self._core.latent_nbytes)
            .view(dtype)
            .view(self._core.capacity_slots, *shape)
        )
        self._pending: list[torch.cuda.Event] = []
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._staging_lock = threading.Lock()

    def _pin(self, mem: torch.Tensor) -> None:
        ptr, nbytes = mem.data_ptr(), mem.numel()
        err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(
                f"cudaHostRegister of the {nbytes}-byte arena failed with error {int(err)}; "
                "pass pin_memory=False to use pageable memory"
            )
        # runs when the facade dies, before its core (still referenced from __dict__ then) frees the memory
        weakref.finalize(self, _cudart_unregister, ptr).atexit = False

    # ---- argument helpers --------------------------------------------------------------------------------
    @staticmethod
    def _ids(ids, name: str = "ids") -> torch.Tensor:
        t = torch.as_tensor(ids)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be integer trajectory ids, got dtype {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {list(t.shape)}")
        return t.to("cpu", torch.int64).contiguous()

    def _values(self, values, m: int, name: str) -> torch.Tensor:
        t = torch.as_tensor(values)
        if t.dim() != 1 or t.shape[0] != m or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name}: expected a float tensor of shape [{m}], got {t.dtype} {list(t.shape)}")
        return t.detach().to("cpu", torch.float32).contiguous()

    def _check_latents(self, latents: torch.Tensor, m: int) -> None:
        want = (m, *self.latent_shape)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != want:
            got = list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents: expected shape {list(want)}, got {got}")
        if latents.dtype != self.dtype:
            raise ValueError(
                f"latents: expected dtype {self.dtype} (the arena's dtype), got {latents.dtype}; "
                "cast with .to(arena.dtype)"
            )

    # ---- building ----------------------------------------------------------------------------------------
    def add_trees(self, prompt_ids, split_step: int) -> torch.Tensor:
        """Add one tree per prompt; returns trajectory ids [len(prompt_ids) * B], tree-major."""
        prompts = self._ids(prompt_ids, "prompt_ids")
        if isinstance(split_step, bool) or not isinstance(split_step, int):
            raise ValueError(f"split_step must be an int in [0, T={self.num_steps}], got {split_step!r}")
        self.synchronize()
        first = self._core.add_trees(prompts, split_step)
        return torch.arange(first, first + prompts.numel() * self.branches, dtype=torch.int64)

    def write_latents(self, ids, latent_idx: int, latents: torch.Tensor) -> None:
        """Store ``latents`` [M, C, H, W] as latent ``latent_idx`` of trajectories ``ids`` [M].

        CUDA tensors are snapshotted on the current stream, then copied to the host asynchronously on a side
        stream, so the caller may reuse or overwrite ``latents`` right away; ``synchronize()`` (called by every
        read) waits for the copies.
        """
        ids = self._ids(ids)
        self._check_latents(latents, ids.numel())
        if latents.device.type == "cuda":
            slots = self._core.slots(ids, torch.full_like(ids, int(latent_idx)))
            if ids.numel():
                # a private copy (device-to-device, on the current stream): the caller may overwrite its tensor
                # in place (e.g. a CUDA-graph static buffer on the next replay) before the D2H copy has run
                self._write_async(slots, latents.detach().clone(memory_format=torch.contiguous_format))
                self._core.mark_written(slots)  # reads synchronize() first, so the copy lands before any read
            return
        self.synchronize()
        src = latents.detach().contiguous().view(ids.numel(), self._numel).view(torch.uint8)
        self._core.write_latents(ids, int(latent_idx), src)

    def _write_async(self, slots: torch.Tensor, src: torch.Tensor) -> None:
        dev = src.device
        stream = self._copy_streams.get(dev)
        if stream is None:
            stream = self._copy_streams[dev] = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        # one D2H per run of consecutive slots (a tree's branches are not adjacent across trees)
        m = slots.numel()
        breaks = (torch.nonzero(slots[1:] != slots[:-1] + 1).flatten() + 1).tolist()
        starts, ends = [0, *breaks], [*breaks, m]
        first = slots[starts].tolist()
        with torch.cuda.stream(stream):
            for r0, r1, s0 in zip(starts, ends, first):
                self._view[s0 : s0 + (r1 - r0)].copy_(src[r0:r1], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        src.record_stream(stream)
        self._pending.append(ev)

    def write_logprobs(self, ids, step: int, logp) -> None:
        ids = self._ids(ids)
        self._core.write_logprobs(ids, int(step), self._values(logp, ids.numel(), "logp"))

    def set_rewards(self, ids, rewards) -> None:
        ids = self._ids(ids)
        self._core.set_rewards(ids, self._values(rewards, ids.numel(), "rewards"))

    def set_advantages(self, ids, adv) -> None:
        ids = self._ids(ids)
        self._core.set_advantages(ids, self._values(adv, ids.numel(), "advantages"))

    # ---- reading -----------------------------------------------------------------------------------------
    def latents(self, ids, latent_idx: int) -> torch.Tensor:
        """Host copy [M, C, H, W] of latent ``latent_idx`` of trajectories ``ids``."""
        ids = self._ids(ids)
        self.synchronize()
        out = torch.empty((ids.numel(), *self.latent_shape), dtype=self.dtype)
        self._core.read_latents(ids, int(latent_idx), out.view(ids.numel(), self._numel).view(torch.uint8))
        return out

    def prompt_ids(self, ids) -> torch.Tensor:
        return self._core.prompt_ids(self._ids(ids))

    def split_steps(self, ids) -> torch.Tensor:
        return self._core.split_steps(self._ids(ids))

    def rewards(self, ids) -> torch.Tensor:
        return self._core.rewards(self._ids(ids))

    def advantages(self, ids) -> torch.Tensor:
        return self._core.advantages(self._ids(ids))

    def logprobs(self, ids) -> torch.Tensor:
        """Stored log-probs [M, T] float32 (NaN where never written)."""
        return self._core.logprobs(self._ids(ids))

    def gather(self, ids, steps, device=None) -> TrajectoryBatch:
        """Training rows k = (ids[k], steps[k]); one staging block, one H2D copy when ``device`` is CUDA."""
        ids, steps = self._ids(ids), self._ids(steps, "steps")
        m = ids.numel()
        if steps.numel() != m:
            raise ValueError(f"ids and steps must have the same length, got {m} and {steps.numel()}")
        self.synchronize()
        L = self._core.latent_nbytes
        sizes = [m * L, m * L, 4 * m, 4 * m, 4 * m, 8 * m, 8 * m]
        offs, total = [], 0
        for s in sizes:
            offs.append(total)
            total += -(-s // _ALIGN) * _ALIGN
        device = torch.device(device) if device is not None else torch.device("cpu")
        to_cuda = device.type == "cuda"
        block = self._staging_block(total) if to_cuda else torch.empty(total, dtype=torch.uint8)

        def sections(buf):
            sec = [buf[o : o + s] for o, s in zip(offs, sizes)]
            return (
                sec[0].view(m, L),
                sec[1].view(m, L),
                sec[2].view(torch.float32),
                sec[3].view(torch.float32),
                sec[4].view(torch.float32),
                sec[5].view(torch.int64),
                sec[6].view(torch.int64),
            )

        self._core.gather(ids, steps, *sections(block))
        if to_cuda:
            dev_block = block.to(device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(device))
            self._release_staging(block, ev)
            block = dev_block
        elif device.type != "cpu":
            block = block.to(device)
        xt, xp, lp, rw, adv, st, pr = sections(block)
        shape = (m, *self.latent_shape)
        return TrajectoryBatch(
            x_t=xt.view(self.dtype).view(shape),
            x_prev=xp.view(self.dtype).view(shape),
            logprob=lp,
            step=st,
            advantage=adv,
            reward=rw,
            prompt_id=pr,
        )

    def _staging_block(self, nbytes: int) -> torch.Tensor:
        """A pinned block of >= nbytes whose previous H2D copy has finished (a small pool, reused)."""
        with self._staging_lock:
            for i, (buf, ev) in enumerate(self._staging):
                if buf.numel() >= nbytes and (ev is None or ev.query()):
                    self._staging.pop(i)
                    return buf[:nbytes]
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _release_staging(self, block: torch.Tensor, ev) -> None:
        base = block._base if block._base is not None else block
        with self._staging_lock:
            self._staging.append((base, ev))
            del self._staging[:-4]

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def num_trajectories(self) -> int:
        return self._core.num_trajectories

    @property
    def num_trees(self) -> int:
        return self._core.num_trees

    @property
    def bytes_used(self) -> int:
        """Latent bytes stored (shared prefixes counted once)."""
        return self._core.used_slots * self._core.latent_nbytes

    @property
    def capacity_bytes(self) -> int:
        """Latent bytes allocated: max_trees * (1 + B*T) latents, the worst case (split 0)."""
        return self._core.capacity_slots * self._core.latent_nbytes

    @property
    def memory(self) -> torch.Tensor:
        """The arena's latent storage as a [capacity_slots, C, H, W] tensor view (zero-copy, also DLPack-able).

        Writes through this view are not recorded as written: ``latents``/``gather`` raise for slots that
        ``write_latents`` never stored since their tree was added."""
        return self._view

    def reset(self) -> None:
        """Forget every tree (keeps the allocation)."""
        self.synchronize()
        self._core.reset()

    def save(self, path) -> None:
        self.synchronize()
        self._core.save(path)

    def load(self, path) -> None:
        """Replace the contents with a saved arena; a bad file raises ValueError and changes nothing."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no arena file at {os.fspath(path)!r}")
        self.synchronize()
        self._core.load(path)

    def synchronize(self) -> None:
        """Wait for pending asynchronous device→host writes."""
        pending, self._pending = self._pending, []
        for ev in pending:
            ev.synchronize()

    def __repr__(self) -> str:
        return (
            f"TrajectoryArena(latent_shape={self.latent_shape}, dtype={self.dtype}, T={self.num_steps}, "
            f"B={self.branches}, trees={self.num_trees}/{self.max_trees}, backend={self.backend!r}, "
            f"bytes_used={self.bytes_used}/{self.capacity_bytes}, pinned={self.pinned})"
        )
