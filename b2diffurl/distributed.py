"""Data-parallel runs on ``torch.distributed``: everything a rank does differently from a single process.

Launch with ``torchrun`` (docs/DISTRIBUTED.md); without its environment variables a run is one process and
every function here is a no-op. N processes compute what one process computes (same global batch, same
numbers up to float summation order) because: every random draw that decides *what* is done (prompt draws,
shuffles, timestep permutations) happens identically on every rank; each tree's noise comes from its own
generator seeded from (run seed, stage, global tree index) (:func:`tree_generators`), whatever rank samples
it; ranks split the work by contiguous global blocks (:func:`shard`) and gather the few numbers a decision
needs (rewards before statistics, selection or pairing; evaluation rewards: :func:`all_gather_cat`);
gradients are summed across ranks just before each optimizer step, each rank's loss being its share of the
global loss (:func:`sum_gradients`); rank 0 writes, after gathering every rank's RNG state
(:func:`gather_rng_states`). Why a gradient all-reduce of our own rather than ``DistributedDataParallel``:
docs/DISTRIBUTED.md.

Failure: a rank that raises logs its traceback with its rank and exits non-zero (:func:`record_failure`);
torchrun then stops the other ranks. Collectives time out after ``B2DIFFURL_DIST_TIMEOUT_S`` seconds (a lost
peer on another node), so no rank waits forever.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

log = logging.getLogger("b2diffurl.distributed")

#: Environment variables read here (torchrun sets the first five).
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "B2DIFFURL_DIST_TIMEOUT_S"
BACKEND_ENV = "B2DIFFURL_DIST_BACKEND"
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """A distributed launch that cannot work (bad environment, device count, world-size mismatch)."""


@dataclass
class CommStats:
    """Wall time and payload bytes of the collectives issued through this module, per kind (for bench/)."""

    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, seconds: float, nbytes: int) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.bytes[kind] = self.bytes.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def reset(self) -> None:
        for d in (self.seconds, self.bytes, self.calls):
            d.clear()


@dataclass(frozen=True)
class World:
    """This process's place in the job. ``size == 1``: a plain single-process run (no process group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


_WORLD = World()
stats = CommStats()


def world() -> World:
    """The current world (single process until :func:`init` joined a process group)."""
    return _WORLD


def rank() -> int:
    return _WORLD.rank


def size() -> int:
    return _WORLD.size


def is_main() -> bool:
    """True on the one process that prints progress and writes files (rank 0; always in a single process)."""
    return _WORLD.rank == 0


def _env_number(name: str, default, kind=int, what: str = "an integer"):
    raw = os.environ.get(name) or ""
    try:
        return kind(raw) if raw else default
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not {what}") from None


def timeout_s() -> float:
    value = _env_number(TIMEOUT_ENV, DEFAULT_TIMEOUT_S, float, "a number of seconds")
    if value <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={value!r} must be > 0 seconds")
    return value


def init(device: torch.device | str = "cpu") -> World:
    """Join the process group that torchrun's environment describes and pick this rank's device.

    ``device``: the device the run asked for. Under torchrun a CUDA request becomes ``cuda:LOCAL_RANK`` with
    the NCCL backend; a CPU run uses gloo (``B2DIFFURL_DIST_BACKEND`` overrides). Without ``WORLD_SIZE`` (or
    with ``WORLD_SIZE=1``) nothing is initialised and the device is returned unchanged. Idempotent.
    """
    global _WORLD
    device = torch.device(device)
    world_size = _env_number("WORLD_SIZE", 1)
    if world_size <= 1:
        _WORLD = World(device=device)
        return _WORLD
    rank_, local = _env_number("RANK", -1), _env_number("LOCAL_RANK", 0)
    if not 0 <= rank_ < world_size:
        raise DistributedError(
            f"WORLD_SIZE={world_size} but RANK={os.environ.get('RANK')!r}: launch with torchrun, which sets both"
        )
    if unset := [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]:
        raise DistributedError(f"WORLD_SIZE={world_size} but {unset[0]} is unset: launch with torchrun")
    if device.type == "cuda":
        n_gpu = torch.cuda.device_count()
        if local >= n_gpu:
            raise DistributedError(
                f"LOCAL_RANK={local} but this machine shows {n_gpu} CUDA device(s): start at most {n_gpu} "
                "processes per node (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if device.type == "cuda" else "gloo")
    if tdist.is_initialized():
        if tdist.get_world_size() != world_size or tdist.get_rank() != rank_:
            raise DistributedError("a process group of another shape is already initialised")
    else:
        tdist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s()),
            device_id=device if device.type == "cuda" else None,
        )
    _WORLD = World(rank=rank_, size=world_size, local_rank=local, backend=backend, device=device)
    # every rank says once where it runs (the only line non-main ranks print unless something goes wrong)
    print(
        f"[b2diffurl rank {rank_}/{world_size}] device {device}, backend {backend}, local rank {local}, "
        f"host {os.uname().nodename}, collective timeout {timeout_s():.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return _WORLD


def shutdown() -> None:
    """Leave the process group (a no-op in a single process)."""
    global _WORLD
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _WORLD = World(device=_WORLD.device)


def quiet_other_ranks() -> None:
    """Only rank 0 logs below WARNING; other ranks' warnings and errors carry their rank."""
    if not _WORLD.distributed:
        return
    tag = f"[rank {_WORLD.rank}] "
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter._fmt if handler.formatter is not None else "%(message)s"  # noqa: SLF001
        if not fmt.startswith("[rank"):
            handler.setFormatter(logging.Formatter(tag + fmt))
    if not _WORLD.is_main:
        logging.getLogger("b2diffurl").setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------- work split
def shard(n: int, rank: int | None = None, size: int | None = None, *, block: int = 1) -> range:
    """The global indices ``[start, stop)`` of ``n`` items rank ``rank`` (default: this one) handles: a
    contiguous range, rank order = index order (gathered shards concatenate to the global order).

    Items go in whole blocks of ``block`` (a sampling batch: each rank runs exactly one process's batches, so
    kernels round the same way), block counts differing by at most one; with fewer blocks than ranks, items
    are split evenly so that no rank idles (results then agree up to float rounding)."""
    r = _WORLD.rank if rank is None else int(rank)
    w = _WORLD.size if size is None else int(size)
    block = max(1, int(block))
    if -(-n // block) < w:
        block = 1
    blocks = -(-n // block)
    return range(min(n, blocks * r // w * block), min(n, blocks * (r + 1) // w * block))


def localize(global_rows: torch.Tensor, owned: range, local_ids: torch.Tensor) -> torch.Tensor:
    """Map global row indices to this rank's ids (``local_ids[row − owned.start]``), −1 for rows another rank
    holds. The result keeps the global length and order, so every rank iterates the same global batch and
    picks its own rows out of it (:func:`held`)."""
    g = torch.as_tensor(global_rows, dtype=torch.long).reshape(-1)
    mine = (g >= owned.start) & (g < owned.stop)
    out = torch.full_like(g, -1)
    out[mine] = local_ids.to(torch.long).cpu()[g[mine] - owned.start]
    return out


def spread(local_ids: torch.Tensor) -> torch.Tensor:
    """This rank's ids at their places in the rank-order concatenation of every rank's list, −1 at the places
    of other ranks' items: a global list every rank iterates the same way (e.g. D-Fusion's pairs, whose
    prompts are sharded in order). A collective; ``local_ids`` itself in a single process."""
    local_ids = torch.as_tensor(local_ids, dtype=torch.long).reshape(-1).cpu()
    if not _WORLD.distributed:
        return local_ids
    counts = all_gather_cat(torch.tensor([local_ids.numel()], dtype=torch.long)).tolist()
    start = sum(counts[: _WORLD.rank])
    out = torch.full((sum(counts),), -1, dtype=torch.long)
    out[start : start + local_ids.numel()] = local_ids
    return out


def held(ids: torch.Tensor) -> torch.Tensor:
    """Bool mask of the rows of a global batch that this process holds (ids from :func:`localize`)."""
    return ids >= 0


def tree_generators(seed: int, stage: int, trees: Sequence[int], device) -> list[torch.Generator]:
    """One generator per tree, seeded from (run seed, stage, global tree index): a tree's x_T and step noise
    do not depend on which rank samples it or on which other trees share its batch."""
    from b2diffurl.algos.dfusion import sample_seed

    return [torch.Generator(device=device).manual_seed(sample_seed(seed, stage, int(t))) for t in trees]


# ----------------------------------------------------------------------------------------------- collectives
def _comm_tensor(t: torch.Tensor) -> torch.Tensor:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors (and CUDA for a few ops): use the rank's device
    for NCCL, the CPU otherwise."""
    target = _WORLD.device if _WORLD.backend == "nccl" else torch.device("cpu")
    return t.detach().to(target).contiguous()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0 in rank order (row counts may differ; other dims must
    match). Returns a tensor on ``t``'s device; a single process gets ``t`` back."""
    if not _WORLD.distributed:
        return t
    t0 = time.perf_counter()
    x = _comm_tensor(t)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(_WORLD.size)]
    tdist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    rows = max(counts)
    if x.shape[0] < rows:  # all_gather needs equal shapes: pad, then cut each part back
        pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    parts = [torch.empty_like(x) for _ in range(_WORLD.size)]
    tdist.all_gather(parts, x)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)
    stats.add("all_gather", time.perf_counter() - t0, out.numel() * out.element_size())
    return out


def all_gather_object(obj) -> list:
    """Every rank's (picklable) ``obj`` in rank order; ``[obj]`` in a single process."""
    if not _WORLD.distributed:
        return [obj]
    t0 = time.perf_counter()
    out = [None] * _WORLD.size
    tdist.all_gather_object(out, obj)
    stats.add("all_gather_object", time.perf_counter() - t0, 0)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (e.g. a run directory named after the clock); ``obj`` in one process."""
    if not _WORLD.distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` reduced over ranks (``op``: sum | max | min), in place when possible; returned for chaining."""
    if not _WORLD.distributed:
        return t
    ops = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
    t0 = time.perf_counter()
    x = _comm_tensor(t)
    tdist.all_reduce(x, op=ops[op])
    if x.data_ptr() != t.data_ptr():
        t.copy_(x.to(t.device))
    stats.add("all_reduce", time.perf_counter() - t0, x.numel() * x.element_size())
    return t


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank (e.g. a stop request only some ranks received)."""
    if not _WORLD.distributed:
        return bool(flag)
    return bool(all_reduce(torch.tensor([int(bool(flag))]), "max").item())


def barrier() -> None:
    if _WORLD.distributed:
        tdist.barrier()


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum the ``.grad`` of ``params`` over ranks in one coalesced all-reduce per dtype. A rank without a
    gradient for a parameter (it held no row of the batch) contributes zeros; a parameter without a gradient
    on every rank keeps ``grad = None``, as in one process (the optimizer then skips it, weight decay too).

    Each rank's loss must be its share of the global loss (its rows' sum divided by the global row count), so
    the sum is the single-process gradient. A no-op in a single process."""
    if not _WORLD.distributed:
        return
    t0 = time.perf_counter()
    nbytes = 0
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        grads = [p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in group]
        present = torch.tensor(
            [p.grad is not None for p in group], dtype=group[0].dtype, device=group[0].device
        )
        flat = _comm_tensor(torch.cat([*grads, present]))
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        nbytes += flat.numel() * flat.element_size()
        flat = flat.to(group[0].device)
        anywhere = flat[-len(group) :] > 0
        offset = 0
        for p, has in zip(group, anywhere.tolist()):
            n = p.numel()
            if has:
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                p.grad.copy_(flat[offset : offset + n].view_as(p))
            offset += n
    stats.add("sum_gradients", time.perf_counter() - t0, nbytes)


# ----------------------------------------------------------------------------------------------- run state
def gather_rng_states(local_state: dict) -> list[dict]:
    """Every rank's RNG state in rank order (rank 0 writes them all into the checkpoint)."""
    return all_gather_object(local_state)


def my_rng_state(saved: list[dict], where: str = "the checkpoint") -> dict:
    """This rank's entry of the per-rank RNG states ``saved``, refusing another world size."""
    check_world_size(len(saved), where)
    return saved[_WORLD.rank]


def check_world_size(saved_size: int, where: str = "the checkpoint") -> None:
    if int(saved_size) != _WORLD.size:
        raise DistributedError(
            f"{where} was written by {saved_size} process(es) but this run has {_WORLD.size}: resume with the "
            f"same number of processes (torchrun --nnodes × --nproc_per_node = {saved_size}); each rank's random "
            "streams are part of the exact-resume state"
        )


# ----------------------------------------------------------------------------------------------- failures
@contextlib.contextmanager
def record_failure(expected: tuple[type[BaseException], ...] = ()):
    """Around a rank's main work. In a multi-process job an exception is printed with the rank's identity and
    the process exits with status 1 at once (``os._exit``: no interpreter teardown, which could block on a
    collective whose peers still wait), so torchrun stops the other ranks within its grace period.

    ``expected`` exceptions (user errors, which every rank hits identically before any collective) and a
    ``SystemExit`` pass through, as does everything in a single process."""
    try:
        yield
    except BaseException as exc:
        if not _WORLD.distributed or isinstance(exc, (SystemExit, *expected)):
            raise
        print(
            f"[b2diffurl rank {_WORLD.rank}/{_WORLD.size}] failed:\n{traceback.format_exc()}",
            file=sys.stderr,
            flush=True,
        )
        logging.shutdown()
        os._exit(1)
