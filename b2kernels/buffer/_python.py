"""Pure-torch arena core: the fallback backend and the test oracle of the C++ core (``b2kernels._C.Arena``).

Same layout and file format as the C++ core. Latents are raw bytes (``latent_nbytes`` per latent) in one
``uint8`` tensor of ``capacity_slots`` rows; a tree with split ``s`` owns one contiguous segment::

    [prefix: latents 0..s] [branch 0: latents s+1..T] [branch 1: ...] ... [branch B-1: ...]

allocated by a bump pointer (``reset`` rewinds it). Trajectory ``j`` is branch ``j % B`` of tree ``j // B``.
The capacity is the worst case, ``max_trees * (1 + B*T)`` latents (split 0).
Every method validates its arguments before changing anything: an index out of range (trajectory id, latent
index, step) raises ``IndexError`` (as the ops do for ``step_idx``), any other bad argument ``ValueError``, and
reading a latent not written since its tree was added ``RuntimeError`` (the slot would hold stale bytes of an
earlier tree). One lock serialises every method, as the C++ core's lock does for writes: a gather running while
another thread writes latents never sees a half-written row.
"""

from __future__ import annotations

import functools
import os
import threading

import torch

from b2kernels.buffer import _format


def _locked(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class PythonArenaCore:
    backend = "python"

    def __init__(
        self,
        shape,
        elem_size: int,
        dtype_code: int,
        num_steps: int,
        max_trees: int,
        branches: int,
        pin_memory: bool = False,
    ):
        self.shape = tuple(int(d) for d in shape)
        self.elem_size, self.dtype_code = int(elem_size), int(dtype_code)
        self.num_steps, self.max_trees, self.branches = int(num_steps), int(max_trees), int(branches)
        if not self.shape or any(d <= 0 for d in self.shape) or self.elem_size <= 0:
            raise ValueError(f"latent shape must be positive, got {self.shape} (elem_size {self.elem_size})")
        if self.num_steps <= 0 or self.max_trees <= 0 or self.branches <= 0:
            raise ValueError(
                f"num_steps, max_trees and branches must be >= 1, got "
                f"{self.num_steps}, {self.max_trees}, {self.branches}"
            )
        self.latent_nbytes = self.elem_size
        for d in self.shape:
            self.latent_nbytes *= d
        self.capacity_slots = self.max_trees * (1 + self.branches * self.num_steps)
        self._mem = torch.zeros(
            self.capacity_slots, self.latent_nbytes, dtype=torch.uint8, pin_memory=pin_memory
        )
        self._written = torch.zeros(self.capacity_slots, dtype=torch.bool)
        self._lock = threading.RLock()
        n = self.max_trees * self.branches
        self._tree_prompt = torch.zeros(self.max_trees, dtype=torch.int64)
        self._tree_split = torch.zeros(self.max_trees, dtype=torch.int64)
        self._tree_offset = torch.zeros(self.max_trees, dtype=torch.int64)
        self._reward = torch.full((n,), float("nan"))
        self._adv = torch.full((n,), float("nan"))
        self._logp = torch.full((n, self.num_steps), float("nan"))
        self.num_trees = 0
        self.used_slots = 0

    # ---- sizes -------------------------------------------------------------------------------------------
    @property
    def num_trajectories(self) -> int:
        return self.num_trees * self.branches

    def memory(self) -> torch.Tensor:
        """The whole arena as a flat uint8 tensor (a view, no copy)."""
        return self._mem.view(-1)

    # ---- validation --------------------------------------------------------------------------------------
    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_trajectories):
            bad = ids[(ids < 0) | (ids >= self.num_trajectories)][0].item()
            raise IndexError(
                f"trajectory id {bad} out of range: the arena holds {self.num_trajectories} "
                f"trajectories (ids 0..{self.num_trajectories - 1})"
            )

    def _check_rows(self, name: str, t: torch.Tensor, m: int, width: int | None = None, dtype=None) -> None:
        want = (m,) if width is None else (m, width)
        if tuple(t.shape) != want or (dtype is not None and t.dtype != dtype):
            raise ValueError(f"{name}: expected {dtype} of shape {list(want)}, got {t.dtype} {list(t.shape)}")

    # ---- layout ------------------------------------------------------------------------------------------
    def _check_written(self, ids: torch.Tensor, slots: torch.Tensor, latent_idx: torch.Tensor) -> None:
        stale = ~self._written[slots]
        if bool(stale.any()):
            k = int(torch.nonzero(stale)[0])
            raise RuntimeError(
                f"latent {int(latent_idx[k])} of trajectory {int(ids[k])} was not written since its tree was "
                "added (the slot holds stale data); write_latents it before reading or gathering"
            )

    @_locked
    def slots(self, ids: torch.Tensor, latent_idx: torch.Tensor) -> torch.Tensor:
        """Slot (row of ``memory().view(capacity_slots, latent_nbytes)``) of latent ``latent_idx[k]`` of ``ids[k]``."""
        self._check_ids(ids)
        if latent_idx.numel() and (int(latent_idx.min()) < 0 or int(latent_idx.max()) > self.num_steps):
            raise IndexError(
                f"latent index out of range: expected 0..{self.num_steps} (T={self.num_steps}), "
                f"got {latent_idx.min().item()}..{latent_idx.max().item()}"
            )
        tree = ids // self.branches
        b = ids % self.branches
        s = self._tree_split[tree]
        off = self._tree_offset[tree]
        branch_slot = off + (s + 1) + b * (self.num_steps - s) + (latent_idx - s - 1)
        return torch.where(latent_idx <= s, off + latent_idx, branch_slot)

    @_locked
    def add_trees(self, prompt_ids: torch.Tensor, split_step: int) -> int:
        p, s, T, B = prompt_ids.numel(), int(split_step), self.num_steps, self.branches
        if not 0 <= s <= T:
            raise ValueError(f"split_step must be in [0, T={T}], got {s}")
        if self.num_trees + p > self.max_trees:
            raise ValueError(
                f"arena full: it holds {self.num_trees} of max_trees={self.max_trees} trees and "
                f"cannot add {p} more; call reset() or build a larger arena"
            )
        size = (s + 1) + B * (T - s)
        if (
            self.used_slots + p * size > self.capacity_slots
        ):  # unreachable with worst-case sizing; kept as a guard
            raise ValueError(f"arena full: {self.used_slots} of {self.capacity_slots} latent slots used")
        t0, t1 = self.num_trees, self.num_trees + p
        self._tree_prompt[t0:t1] = prompt_ids
        self._tree_split[t0:t1] = s
        self._tree_offset[t0:t1] = self.used_slots + size * torch.arange(p, dtype=torch.int64)
        self._reward[t0 * B : t1 * B] = float("nan")
        self._adv[t0 * B : t1 * B] = float("nan")
        self._logp[t0 * B : t1 * B] = float("nan")
        self._written[self.used_slots : self.used_slots + p * size] = False
        self.num_trees, self.used_slots = t1, self.used_slots + p * size
        return t0 * B

    @_locked
    def reset(self) -> None:
        self.num_trees = 0
        self.used_slots = 0

    # ---- writes ------------------------------------------------------------------------------------------
    @_locked
    def write_latents(self, ids: torch.Tensor, latent_idx: int, src: torch.Tensor) -> None:
        self._check_rows("latents", src, ids.numel(), self.latent_nbytes, torch.uint8)
        slots = self.slots(ids, torch.full_like(ids, int(latent_idx)))
        self._mem.index_copy_(0, slots, src)
        self._written[slots] = True

    @_locked
    def mark_written(self, slots: torch.Tensor) -> None:
        """Record that the caller filled these slots itself (the facade's asynchronous device copies)."""
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.used_slots):
            raise IndexError(f"slot out of range: {self.used_slots} slots in use, got {slots.tolist()}")
        self._written[slots] = True

    @_locked
    def read_latents(self, ids: torch.Tensor, latent_idx: int, dst: torch.Tensor) -> None:
        self._check_rows("out", dst, ids.numel(), self.latent_nbytes, torch.uint8)
        idx = torch.full_like(ids, int(latent_idx))
        slots = self.slots(ids, idx)
        self._check_written(ids, slots, idx)
        torch.index_select(self._mem, 0, slots, out=dst)

    @_locked
    def write_logprobs(self, ids: torch.Tensor, step: int, values: torch.Tensor) -> None:
        self._check_ids(ids)
        self._check_rows("logprob", values, ids.numel(), None, torch.float32)
        step = int(step)
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step must be in [0, T={self.num_steps}), got {step}")
        B = self.branches
        tree = ids // B
        shared = step < self._tree_split[tree]  # both latents of the step are in the shared prefix
        rows = torch.where(shared.unsqueeze(1), tree.unsqueeze(1) * B + torch.arange(B), ids.unsqueeze(1))
        self._logp[rows.reshape(-1), step] = values.unsqueeze(1).expand(-1, B).reshape(-1)

    @_locked
    def _set(self, name: str, target: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
        self._check_ids(ids)
        self._check_rows(name, values, ids.numel(), None, torch.float32)
        target[ids] = values

    def set_rewards(self, ids, values):
        self._set("rewards", self._reward, ids, values)

    def set_advantages(self, ids, values):
        self._set("advantages", self._adv, ids, values)

    # ---- reads -------------------------------------------------------------------------------------------
    @_locked
    def prompt_ids(self, ids):
        self._check_ids(ids)
        return self._tree_prompt[ids // self.branches].clone()

    @_locked
    def split_steps(self, ids):
        self._check_ids(ids)
        return self._tree_split[ids // self.branches].clone()

    @_locked
    def rewards(self, ids):
        self._check_ids(ids)
        return self._reward[ids].clone()

    @_locked
    def advantages(self, ids):
        self._check_ids(ids)
        return self._adv[ids].clone()

    @_locked
    def logprobs(self, ids):
        self._check_ids(ids)
        return self._logp[ids].clone()

    @_locked
    def gather(
        self, ids, steps, out_xt, out_xprev, out_logp, out_reward, out_adv, out_step, out_prompt
    ) -> None:
        """Rows ``k``: latent[steps[k]], latent[steps[k]+1], logprob, reward, advantage, step, prompt id."""
        m = ids.numel()
        self._check_ids(ids)
        self._check_rows("steps", steps, m, None, torch.int64)
        if m and (int(steps.min()) < 0 or int(steps.max()) >= self.num_steps):
            raise IndexError(
                f"step out of range: expected 0..{self.num_steps - 1} (T={self.num_steps}), "
                f"got {steps.min().item()}..{steps.max().item()}"
            )
        for name, t, w, dt in (
            ("out_xt", out_xt, self.latent_nbytes, torch.uint8),
            ("out_xprev", out_xprev, self.latent_nbytes, torch.uint8),
            ("out_logp", out_logp, None, torch.float32),
            ("out_reward", out_reward, None, torch.float32),
            ("out_adv", out_adv, None, torch.float32),
            ("out_step", out_step, None, torch.int64),
            ("out_prompt", out_prompt, None, torch.int64),
        ):
            self._check_rows(name, t, m, w, dt)
        slots_t, slots_prev = self.slots(ids, steps), self.slots(ids, steps + 1)
        self._check_written(ids, slots_t, steps)
        self._check_written(ids, slots_prev, steps + 1)
        torch.index_select(self._mem, 0, slots_t, out=out_xt)
        torch.index_select(self._mem, 0, slots_prev, out=out_xprev)
        out_logp.copy_(self._logp[ids, steps])
        out_reward.copy_(self._reward[ids])
        out_adv.copy_(self._adv[ids])
        out_step.copy_(steps)
        out_prompt.copy_(self._tree_prompt[ids // self.branches])

    # ---- persistence -------------------------------------------------------------------------------------
    def _header(self) -> _format.Header:
        h = _format.Header(
            self.dtype_code,
            self.elem_size,
            self.shape,
            self.num_steps,
            self.max_trees,
            self.branches,
            self.num_trees,
            self.used_slots,
            0,
        )
        h.payload_len = h.expected_payload_len()
        return h

    @_locked
    def save(self, path) -> None:
        nt, n = self.num_trees, self.num_trajectories
        arrays = (
            self._tree_prompt[:nt],
            self._tree_split[:nt],
            self._tree_offset[:nt],
            self._reward[:n],
            self._adv[:n],
            self._logp[:n],
            self._mem[: self.used_slots],
        )
        chunks = [self._header().pack()] + [memoryview(a.contiguous().numpy()).cast("B") for a in arrays]
        _format.write_atomic(path, chunks)

    @_locked
    def load(self, path) -> None:
        path = os.fspath(path)
        with open(path, "rb") as f:
            data = f.read()
        h, off = _format.parse(data, path)
        self._check_compatible(h, path)
        nt, n, T = h.num_trees, h.num_trees * h.branches, h.num_steps

        def take(count, dtype, itemsize):
            nonlocal off
            t = (
                torch.frombuffer(bytearray(data[off : off + count * itemsize]), dtype=dtype)
                if count
                else torch.empty(0, dtype=dtype)
            )
            off += count * itemsize
            return t

        prompt, split, offset = take(nt, torch.int64, 8), take(nt, torch.int64, 8), take(nt, torch.int64, 8)
        reward, adv, logp = (
            take(n, torch.float32, 4),
            take(n, torch.float32, 4),
            take(n * T, torch.float32, 4),
        )
        check_tree_table(split, offset, T, h.branches, h.used_slots, path)
        lat = take(h.used_slots * self.latent_nbytes, torch.uint8, 1)
        # everything validated: commit
        self._tree_prompt[:nt], self._tree_split[:nt], self._tree_offset[:nt] = prompt, split, offset
        self._reward[:n], self._adv[:n], self._logp[:n] = reward, adv, logp.view(n, T)
        self._mem[: h.used_slots] = lat.view(h.used_slots, self.latent_nbytes)
        self._written[: h.used_slots] = (
            True  # no per-slot flags in the file: what it carries counts as written
        )
        self.num_trees, self.used_slots = nt, h.used_slots

    def _check_compatible(self, h: _format.Header, path: str) -> None:
        mine = (self.dtype_code, self.elem_size, self.shape, self.num_steps, self.branches)
        theirs = (h.dtype_code, h.elem_size, h.shape, h.num_steps, h.branches)
        if mine != theirs:
            raise ValueError(
                f"{path}: arena file has (dtype code, elem size, latent shape, T, B) = {theirs}, "
                f"this arena has {mine}"
            )
        if h.num_trees > self.max_trees or h.used_slots > self.capacity_slots:
            raise ValueError(
                f"{path}: file holds {h.num_trees} trees, this arena fits max_trees={self.max_trees}"
            )


def check_tree_table(split, offset, T, B, used_slots, path) -> None:
    """Segments must lie inside the used slots and not overlap (a corrupted-but-checksummed file is still bad)."""
    if split.numel() == 0:
        return
    size = (split + 1) + B * (T - split)
    end = offset + size
    ok = bool(((split >= 0) & (split <= T) & (offset >= 0) & (end <= used_slots)).all())
    if ok and split.numel() > 1:
        order = torch.argsort(offset)
        ok = bool((offset[order][1:] >= end[order][:-1]).all())
    if not ok:
        raise ValueError(f"{path}: inconsistent tree table (split steps / segment offsets out of range)")
