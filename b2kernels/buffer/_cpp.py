"""Adapter: ``b2kernels._C.Arena`` behind the same torch-tensor interface as ``PythonArenaCore``.

Tensors cross as zero-copy numpy views (uint8 for latent bytes, so fp16/bf16 need no numpy dtype).
"""

from __future__ import annotations

import os

import torch

from b2kernels import _C


def _np(t: torch.Tensor):
    return t.numpy()


class CppArenaCore:
    backend = "cpp"

    def __init__(
        self,
        shape,
        elem_size: int,
        dtype_code: int,
        num_steps: int,
        max_trees: int,
        branches: int,
        num_threads: int | None = None,
    ):
        self._a = _C.Arena(
            list(shape),
            int(elem_size),
            int(dtype_code),
            int(num_steps),
            int(max_trees),
            int(branches),
            int(num_threads or 0),
        )
        self.latent_nbytes = self._a.latent_nbytes
        self.capacity_slots = self._a.capacity_slots
        self.branches = int(branches)

    num_trees = property(lambda self: self._a.num_trees)
    num_trajectories = property(lambda self: self._a.num_trajectories)
    used_slots = property(lambda self: self._a.used_slots)

    @property
    def num_threads(self) -> int:
        return self._a.num_threads

    @num_threads.setter
    def num_threads(self, n: int) -> None:
        self._a.num_threads = n

    def memory(self) -> torch.Tensor:
        # torch.frombuffer keeps a reference to the Arena, so the view can outlive this adapter safely
        return torch.frombuffer(self._a, dtype=torch.uint8)

    def slots(self, ids, latent_idx) -> torch.Tensor:
        return torch.from_numpy(self._a.slots(_np(ids), _np(latent_idx)))

    def add_trees(self, prompt_ids, split_step: int) -> int:
        return self._a.add_trees(_np(prompt_ids), int(split_step))

    def reset(self) -> None:
        self._a.reset()

    def write_latents(self, ids, latent_idx: int, src) -> None:
        self._a.write_latents(_np(ids), int(latent_idx), _np(src))

    def mark_written(self, slots) -> None:
        self._a.mark_written(_np(slots))

    def read_latents(self, ids, latent_idx: int, dst) -> None:
        self._a.read_latents(_np(ids), int(latent_idx), _np(dst))

    def write_logprobs(self, ids, step: int, values) -> None:
        self._a.write_logprobs(_np(ids), int(step), _np(values))

    def set_rewards(self, ids, values) -> None:
        self._a.set_rewards(_np(ids), _np(values))

    def set_advantages(self, ids, values) -> None:
        self._a.set_advantages(_np(ids), _np(values))

    def prompt_ids(self, ids):
        return torch.from_numpy(self._a.prompt_ids(_np(ids)))

    def split_steps(self, ids):
        return torch.from_numpy(self._a.split_steps(_np(ids)))

    def rewards(self, ids):
        return torch.from_numpy(self._a.rewards(_np(ids)))

    def advantages(self, ids):
        return torch.from_numpy(self._a.advantages(_np(ids)))

    def logprobs(self, ids):
        return torch.from_numpy(self._a.logprobs(_np(ids)))

    def gather(self, ids, steps, *outs) -> None:
        self._a.gather(_np(ids), _np(steps), *(_np(o) for o in outs))

    def save(self, path) -> None:
        self._a.save(os.fspath(path))

    def load(self, path) -> None:
        self._a.load(os.fspath(path))
