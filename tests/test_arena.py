"""TrajectoryArena (b2kernels.buffer): both backends against a naive oracle of full per-trajectory tensors,
C++ vs python equality, prefix sharing (bytes), save/load (round trip, cross-backend, corrupted files),
concurrency and argument errors. CPU only, tiny shapes.
"""

from __future__ import annotations

import threading

import pytest
import torch

from b2kernels.buffer import TrajectoryArena, cpp_unavailable_reason

CPP_REASON = cpp_unavailable_reason()
BACKENDS = [
    "python",
    pytest.param(
        "cpp", marks=pytest.mark.skipif(CPP_REASON is not None, reason=f"C++ backend: {CPP_REASON}")
    ),
]
needs_cpp = pytest.mark.skipif(CPP_REASON is not None, reason=f"C++ backend: {CPP_REASON}")


class Oracle:
    """Full, unshared per-trajectory tensors: latents [N, T+1, *shape], logp [N, T] — what the arena must return."""

    def __init__(self, shape, T, B, dtype):
        self.shape, self.T, self.B, self.dtype = shape, T, B, dtype
        self.lat = torch.empty(0, T + 1, *shape, dtype=dtype)
        self.logp = torch.empty(0, T)
        self.split, self.prompt = [], []
        self.reward, self.adv = torch.empty(0), torch.empty(0)

    def add_tree(self, gen, prompt, s):
        T, B = self.T, self.B
        lat = torch.randn(B, T + 1, *self.shape, generator=gen).to(self.dtype)
        lat[:, : s + 1] = lat[0, : s + 1].clone()  # shared prefix: latents 0..s
        logp = torch.randn(B, T, generator=gen)
        logp[:, :s] = logp[0, :s].clone()  # steps with both latents in the prefix
        self.lat = torch.cat([self.lat, lat])
        self.logp = torch.cat([self.logp, logp])
        self.split += [s] * B
        self.prompt += [prompt] * B
        self.reward = torch.cat([self.reward, torch.randn(B, generator=gen)])
        self.adv = torch.cat([self.adv, torch.randn(B, generator=gen)])


def fill(arena: TrajectoryArena, oracle: Oracle, gen, trees):
    """Write ``trees`` = [(prompts, split)] the way the sampler does: prefix latents through one id per tree."""
    T, B = oracle.T, oracle.B
    for prompts, s in trees:
        ids = arena.add_trees(prompts, s)
        first = len(oracle.prompt)
        for p in prompts:
            oracle.add_tree(gen, p, s)
        assert torch.equal(ids, torch.arange(first, first + len(prompts) * B))
        for i in range(T + 1):
            rows = ids[::B] if i <= s else ids
            arena.write_latents(rows, i, oracle.lat[rows, i])
        for st in range(T):
            rows = ids[::B] if st < s else ids
            arena.write_logprobs(rows, st, oracle.logp[rows, st])
        arena.set_rewards(ids, oracle.reward[ids])
        arena.set_advantages(ids, oracle.adv[ids])


def random_trees(gen, T, n_calls, max_prompts=3):
    out = []
    for _ in range(n_calls):
        n = int(torch.randint(1, max_prompts + 1, (1,), generator=gen))
        s = int(torch.randint(0, T + 1, (1,), generator=gen))
        out.append((torch.randint(0, 1000, (n,), generator=gen).tolist(), s))
    return out


def tree_latents(T, B, s):
    return (s + 1) + B * (T - s)


SHAPES = [
    ((3, 5, 7), torch.float16),
    ((4, 8, 8), torch.float32),
    ((1, 3, 1), torch.bfloat16),
    ((2, 3, 5), torch.float64),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("shape,dtype", SHAPES, ids=lambda v: str(v).replace(" ", ""))
def test_round_trip_random_trees(backend, B, shape, dtype):
    T = 6
    gen = torch.Generator().manual_seed(hash((B, shape)) % 1000)
    trees = random_trees(gen, T, 3) + [([7], 0), ([8], T)]  # splits 0 and T always covered
    arena = TrajectoryArena(
        shape, num_steps=T, max_trees=sum(len(p) for p, _ in trees), branches=B, dtype=dtype, backend=backend
    )
    oracle = Oracle(shape, T, B, dtype)
    fill(arena, oracle, gen, trees)
    n = arena.num_trajectories
    assert n == len(oracle.prompt)
    ids = torch.arange(n)
    for i in range(T + 1):
        assert torch.equal(arena.latents(ids, i), oracle.lat[:, i])
    tid, st = torch.meshgrid(ids, torch.arange(T), indexing="ij")
    tid, st = tid.flatten(), st.flatten()
    perm = torch.randperm(tid.numel(), generator=gen)
    tid, st = tid[perm], st[perm]
    b = arena.gather(tid, st)
    assert b.x_t.dtype == dtype and b.x_t.shape == (tid.numel(), *shape)
    assert torch.equal(b.x_t, oracle.lat[tid, st])
    assert torch.equal(b.x_prev, oracle.lat[tid, st + 1])
    assert torch.equal(b.logprob, oracle.logp[tid, st])
    assert torch.equal(b.step, st)
    assert torch.equal(b.reward, oracle.reward[tid]) and torch.equal(b.advantage, oracle.adv[tid])
    assert b.prompt_id.tolist() == [oracle.prompt[j] for j in tid.tolist()]
    assert torch.equal(arena.logprobs(ids), oracle.logp)
    assert arena.split_steps(ids).tolist() == oracle.split
    assert arena.prompt_ids(ids).tolist() == oracle.prompt
    assert torch.equal(arena.rewards(ids), oracle.reward) and torch.equal(arena.advantages(ids), oracle.adv)


@needs_cpp
@pytest.mark.parametrize("B", [1, 5])
def test_cpp_equals_python(B):
    T, shape, dtype = 5, (2, 3, 3), torch.float16
    gen = torch.Generator().manual_seed(B)
    trees = random_trees(gen, T, 4)
    arenas, oracles = [], []
    for backend in ("python", "cpp"):
        a = TrajectoryArena(shape, num_steps=T, max_trees=16, branches=B, dtype=dtype, backend=backend)
        o = Oracle(shape, T, B, dtype)
        fill(a, o, torch.Generator().manual_seed(1), trees)
        arenas.append(a)
        oracles.append(o)
    py, cpp = arenas
    assert py.bytes_used == cpp.bytes_used and py.capacity_bytes == cpp.capacity_bytes
    assert torch.equal(py.memory, cpp.memory)  # same byte layout, not just the same answers
    m = 50
    tid = torch.randint(0, py.num_trajectories, (m,), generator=gen)
    st = torch.randint(0, T, (m,), generator=gen)
    bp, bc = py.gather(tid, st), cpp.gather(tid, st)
    for f in ("x_t", "x_prev", "logprob", "step", "advantage", "reward", "prompt_id"):
        assert torch.equal(getattr(bp, f), getattr(bc, f)), f
    assert torch.equal(py._core.slots(tid, st), cpp._core.slots(tid, st))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_stored_once(backend):
    T, B, shape = 8, 5, (4, 6, 6)
    nbytes = 4 * 6 * 6 * 4
    arena = TrajectoryArena(shape, num_steps=T, max_trees=6, branches=B, backend=backend)
    assert arena.bytes_used == 0
    assert arena.capacity_bytes == 6 * (1 + B * T) * nbytes
    arena.add_trees([0, 1], 3)
    arena.add_trees([2], 0)
    ids = arena.add_trees([3, 4, 5], T)
    expect = 2 * (4 + B * 5) + 1 * (1 + B * 8) + 3 * (T + 1)
    assert arena.bytes_used == expect * nbytes
    assert arena.bytes_used < 2 * T * B * 6 * nbytes * 0.55  # vs latents + next_latents per branch
    # a prefix latent written through branch 3 is what every branch of that tree reads
    x = torch.randn(1, *shape)
    arena.write_latents(ids[3:4], 2, x)
    assert torch.equal(arena.latents(ids[:B], 2), x.expand(B, *shape))
    arena.reset()
    assert arena.bytes_used == 0 and arena.num_trajectories == 0
    arena.add_trees([9], 8)
    assert arena.bytes_used == (T + 1) * nbytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_unset_metadata_is_nan(backend):
    arena = TrajectoryArena((2, 2), num_steps=3, max_trees=2, branches=2, backend=backend)
    ids = arena.add_trees([4], 1)
    arena.set_rewards(ids[:1], [0.5])
    assert arena.rewards(ids)[0] == 0.5 and torch.isnan(arena.rewards(ids)[1])
    assert torch.isnan(arena.advantages(ids)).all() and torch.isnan(arena.logprobs(ids)).all()


@pytest.mark.parametrize("saver", BACKENDS)
@pytest.mark.parametrize("loader", BACKENDS)
def test_save_load_round_trip(saver, loader, tmp_path):
    T, B, shape, dtype = 4, 5, (3, 5, 7), torch.float16
    gen = torch.Generator().manual_seed(3)
    a = TrajectoryArena(shape, num_steps=T, max_trees=8, branches=B, dtype=dtype, backend=saver)
    oracle = Oracle(shape, T, B, dtype)
    fill(a, oracle, gen, [([1, 2], 1), ([3], 4), ([5], 0)])
    path = tmp_path / "arena.b2k"
    a.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["arena.b2k"]  # temp file renamed away
    b = TrajectoryArena(shape, num_steps=T, max_trees=10, branches=B, dtype=dtype, backend=loader)
    b.add_trees([99], 2)  # replaced by the load
    b.load(path)
    assert b.num_trajectories == a.num_trajectories and b.bytes_used == a.bytes_used
    ids = torch.arange(b.num_trajectories)
    tid = ids.repeat_interleave(T)
    st = torch.arange(T).repeat(ids.numel())
    got = b.gather(tid, st)
    assert torch.equal(got.x_t, oracle.lat[tid, st]) and torch.equal(got.x_prev, oracle.lat[tid, st + 1])
    assert torch.equal(got.logprob, oracle.logp[tid, st]) and torch.equal(got.reward, oracle.reward[tid])
    assert b.prompt_ids(ids).tolist() == oracle.prompt and b.split_steps(ids).tolist() == oracle.split
    # appending after a load continues the bump allocator where the file left it
    new = b.add_trees([42], 2)
    assert b.bytes_used == a.bytes_used + tree_latents(T, B, 2) * 3 * 5 * 7 * 2
    b.write_latents(new[:1], 0, torch.ones(1, *shape, dtype=dtype))
    assert torch.equal(b.gather(tid, st).x_t, oracle.lat[tid, st])


@needs_cpp
def test_saved_files_identical_across_backends(tmp_path):
    files = []
    for backend in ("python", "cpp"):
        a = TrajectoryArena((2, 3), num_steps=3, max_trees=4, branches=2, backend=backend)
        fill(
            a, Oracle((2, 3), 3, 2, torch.float32), torch.Generator().manual_seed(0), [([1, 2], 1), ([3], 0)]
        )
        a.save(tmp_path / backend)
        files.append((tmp_path / backend).read_bytes())
    assert files[0] == files[1]


def _snapshot(arena):
    ids = torch.arange(arena.num_trajectories)
    return arena.bytes_used, arena.memory.clone(), arena.logprobs(ids), arena.rewards(ids)


def _same(a, b):  # bitwise, so unset (NaN) metadata compares equal to itself
    bits = lambda t: t.contiguous().view(torch.uint8)
    return a[0] == b[0] and all(torch.equal(bits(x), bits(y)) for x, y in zip(a[1:], b[1:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_rejects_bad_files_and_leaves_arena_unchanged(backend, tmp_path):
    T, B, shape = 3, 2, (2, 3)
    src = TrajectoryArena(shape, num_steps=T, max_trees=4, branches=B, backend="python")
    fill(src, Oracle(shape, T, B, torch.float32), torch.Generator().manual_seed(0), [([1, 2], 1)])
    good = tmp_path / "good"
    src.save(good)
    data = good.read_bytes()

    arena = TrajectoryArena(shape, num_steps=T, max_trees=4, branches=B, backend=backend)
    fill(arena, Oracle(shape, T, B, torch.float32), torch.Generator().manual_seed(5), [([7], 2)])
    before = _snapshot(arena)

    def bad(name, content, match):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError, match=match):
            arena.load(p)
        assert _same(before, _snapshot(arena)), name

    bad("truncated", data[: len(data) // 2], "truncated")
    bad("truncated_header", data[:20], "truncated")
    bad("empty", b"", "not a b2kernels arena file")
    flipped = bytearray(data)
    flipped[len(data) - 30] ^= 0x10  # inside the latent payload
    bad("flipped", bytes(flipped), "checksum mismatch")
    bad("foreign", b"PK\x03\x04" + bytes(200), "not a b2kernels arena file")
    newer = bytearray(data)
    newer[8] = 99  # version field
    bad("version", bytes(newer), "version 99")
    # a valid file of another arena geometry
    other = TrajectoryArena((3, 2), num_steps=T, max_trees=4, branches=B, backend="python")
    other.add_trees([1], 0)
    other.save(tmp_path / "other")
    with pytest.raises(ValueError, match="latent shape"):
        arena.load(tmp_path / "other")
    small = TrajectoryArena(shape, num_steps=T, max_trees=1, branches=B, backend=backend)
    with pytest.raises(ValueError, match="max_trees=1"):
        small.load(good)
    with pytest.raises(FileNotFoundError, match="no arena file"):
        arena.load(tmp_path / "missing")
    assert _same(before, _snapshot(arena))


@needs_cpp
def test_concurrent_gather_two_threads():
    T, B, shape = 6, 5, (4, 16, 16)  # 1 KiB latents x 2 x 2000 rows: big enough for the threaded copy path
    arena = TrajectoryArena(shape, num_steps=T, max_trees=8, branches=B, backend="cpp", num_threads=2)
    oracle = Oracle(shape, T, B, torch.float32)
    fill(arena, oracle, torch.Generator().manual_seed(0), [([0, 1, 2, 3], 2), ([4, 5, 6, 7], 0)])
    errors = []

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for _ in range(5):
                tid = torch.randint(0, arena.num_trajectories, (2000,), generator=g)
                st = torch.randint(0, T, (2000,), generator=g)
                b = arena.gather(tid, st)
                if not (
                    torch.equal(b.x_t, oracle.lat[tid, st]) and torch.equal(b.x_prev, oracle.lat[tid, st + 1])
                ):
                    errors.append(f"thread {seed}: wrong rows")
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise_index_or_value_error(backend):
    """Out-of-range indices raise IndexError (as the ops do for step_idx), other bad arguments ValueError;
    neither changes the arena."""
    T, B, shape = 4, 2, (2, 3, 3)
    arena = TrajectoryArena(shape, num_steps=T, max_trees=2, branches=B, dtype=torch.float16, backend=backend)
    ids = arena.add_trees([0], 1)
    x = torch.zeros(2, *shape, dtype=torch.float16)
    out_of_range = [
        (lambda: arena.gather([2], [0]), r"trajectory id 2 out of range.*ids 0\.\.1"),
        (lambda: arena.gather([-1], [0]), "trajectory id -1 out of range"),
        (lambda: arena.gather([0], [T]), "step out of range"),
        (lambda: arena.write_latents(ids, T + 1, x), "latent index out of range"),
        (lambda: arena.write_latents([0, 5], 0, x), "trajectory id 5 out of range"),
        (lambda: arena.latents(ids, -1), "latent index out of range"),
        (lambda: arena.write_logprobs(ids, T, torch.zeros(2)), r"step must be in \[0, T=4\)"),
        (lambda: arena.rewards([7]), "trajectory id 7 out of range"),
    ]
    cases = [
        (lambda: arena.gather([0, 1], [0]), "same length"),
        (lambda: arena.gather(torch.tensor([0.0]), [0]), "integer trajectory ids"),
        (lambda: arena.write_latents(ids, 0, x.float()), "expected dtype torch.float16"),
        (lambda: arena.write_latents(ids, 0, x[:, :1]), r"expected shape \[2, 2, 3, 3\]"),
        (lambda: arena.write_logprobs(ids, 0, torch.zeros(3)), r"expected a float tensor of shape \[2\]"),
        (lambda: arena.set_rewards(ids, torch.zeros(1)), "rewards"),
        (lambda: arena.add_trees([1], T + 1), r"split_step must be in \[0, T=4\]"),
        (lambda: arena.add_trees([1, 2], 0), "arena full"),
        (
            lambda: TrajectoryArena((0, 3), num_steps=T, max_trees=1, branches=1, backend=backend),
            "latent_shape",
        ),
        (
            lambda: TrajectoryArena(
                shape, num_steps=T, max_trees=1, branches=1, dtype=torch.int32, backend=backend
            ),
            "dtype",
        ),
    ]
    before = _snapshot(arena)
    for fn, match in out_of_range:
        with pytest.raises(IndexError, match=match):
            fn()
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    assert _same(before, _snapshot(arena))
    assert arena.num_trajectories == B


def test_backend_choice():
    with pytest.raises(ValueError, match="backend must be one of"):
        TrajectoryArena((2,), num_steps=2, max_trees=1, branches=1, backend="rust")
    a = TrajectoryArena((2,), num_steps=2, max_trees=1, branches=1)
    assert a.backend == ("python" if CPP_REASON else "cpp")
    assert (a.backend_reason is None) == (CPP_REASON is None)


@needs_cpp
def test_cpp_memory_is_zero_copy():
    import numpy as np

    from b2kernels import _C

    core = _C.Arena([2, 2], 4, 1, 2, 1, 1)
    view = np.frombuffer(core, dtype=np.float32)  # buffer protocol: no copy, keeps `core` alive
    assert view.size == core.capacity_slots * 4
    first = core.add_trees(np.array([0]), 2)
    core.write_latents(np.array([first]), 1, np.arange(4, dtype=np.float32))
    core.write_latents(np.array([first]), 2, np.zeros(4, dtype=np.float32))
    assert view[4:8].tolist() == [0.0, 1.0, 2.0, 3.0]
    view[8:12] = 7.0  # writes through the view land in the arena
    out = np.empty(4, dtype=np.float32)
    core.read_latents(np.array([first]), 2, out)
    assert out.tolist() == [7.0] * 4
    del core
    assert view[5] == 1.0  # still valid: the view holds a reference


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_async_write_and_gather(backend):
    T, B, shape = 4, 3, (4, 8, 8)
    arena = TrajectoryArena(shape, num_steps=T, max_trees=4, branches=B, dtype=torch.float16, backend=backend)
    assert arena.pinned
    oracle = Oracle(shape, T, B, torch.float16)
    gen = torch.Generator().manual_seed(0)
    for prompts, s in [([1, 2], 1), ([3], 0)]:
        ids = arena.add_trees(prompts, s)
        for p in prompts:
            oracle.add_tree(gen, p, s)
        for i in range(T + 1):
            rows = ids[::B] if i <= s else ids
            arena.write_latents(rows, i, oracle.lat[rows, i].cuda())
    tid = torch.arange(arena.num_trajectories).repeat_interleave(T)
    st = torch.arange(T).repeat(arena.num_trajectories)
    b = arena.gather(tid, st, device="cuda")
    assert b.x_t.is_cuda and torch.equal(b.x_t.cpu(), oracle.lat[tid, st])
    assert torch.equal(b.x_prev.cpu(), oracle.lat[tid, st + 1])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_write_then_overwrite_source_in_place(backend):
    """The caller may overwrite its tensor right after write_latents (CUDA-graph static buffers do): the arena
    must store the values at call time, not whatever the buffer holds when the async D2H copy runs."""
    shape, T = (4, 64, 64), 2
    arena = TrajectoryArena(
        shape, num_steps=T, max_trees=64, branches=1, dtype=torch.float32, backend=backend
    )
    ids = arena.add_trees(list(range(64)), 0)
    buf = torch.empty((64, *shape), device="cuda")
    for i in range(T + 1):
        buf.fill_(float(i))
        torch.cuda._sleep(1_000_000)  # the side-stream copy can only start once this is done ...
        arena.write_latents(ids, i, buf)
        buf.fill_(
            -1.0
        )  # ... and this fill runs right then on the current stream: a race without the snapshot
    for i in range(T + 1):
        assert torch.all(arena.latents(ids, i) == float(i))


def test_out_of_range_index_is_the_same_error_in_ops_and_arena():
    """One exception type for an index out of range, whichever component checks it."""
    from b2kernels import DDIMTable, ddim_step_logprob

    arena = TrajectoryArena((2,), num_steps=2, max_trees=1, branches=1, backend="python")
    arena.add_trees([0], 0)
    table = DDIMTable.from_alphas(torch.linspace(0.99, 0.1, 10), [9, 4], 1.0, 10)
    x = torch.zeros(1, 2)
    with pytest.raises(IndexError):
        arena.gather([3], [0])
    with pytest.raises(IndexError):
        ddim_step_logprob(table, 5, x, x, x, backend="reference")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reading_unwritten_latents_raises_instead_of_returning_stale_ones(backend):
    T, B, shape = 2, 2, (3,)
    arena = TrajectoryArena(shape, num_steps=T, max_trees=2, branches=B, backend=backend)
    ids = arena.add_trees([0], 0)
    for i in range(T + 1):
        arena.write_latents(ids, i, torch.full((B, *shape), float(i + 1)))
    arena.gather(ids, [0, 1])  # fully written: fine
    arena.reset()
    ids = arena.add_trees([1], 0)  # the same slots as before the reset, still holding the old bytes
    arena.write_latents(ids, 0, torch.zeros(B, *shape))
    with pytest.raises(RuntimeError, match="latent 1 of trajectory 0 was not written"):
        arena.gather(ids, [0, 0])
    with pytest.raises(RuntimeError, match="not written"):
        arena.latents(ids, 2)
    arena.write_latents(ids, 1, torch.ones(B, *shape))
    b = arena.gather(ids, [0, 0])
    assert torch.equal(b.x_prev, torch.ones(B, *shape))
    assert torch.equal(arena.latents(ids, 0), torch.zeros(B, *shape))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_during_write_never_sees_a_torn_row(backend):
    """Every write stores rows of one constant; a gather that overlaps a write must see each row whole."""
    shape, T, n = (4, 64, 64), 1, 32
    arena = TrajectoryArena(shape, num_steps=T, max_trees=n, branches=1, backend=backend)
    ids = arena.add_trees(list(range(n)), 0)
    arena.write_latents(ids, 0, torch.zeros(n, *shape))
    arena.write_latents(ids, 1, torch.zeros(n, *shape))
    stop, torn = threading.Event(), []

    def writer():
        v = 0.0
        while not stop.is_set():
            v += 1.0
            arena.write_latents(ids, 1, torch.full((n, *shape), v))

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(60):
            xp = arena.gather(ids, torch.zeros(n, dtype=torch.long)).x_prev.reshape(n, -1)
            bad = (xp != xp[:, :1]).any(dim=1)
            if bool(bad.any()):
                torn.append(int(bad.sum()))
    finally:
        stop.set()
        t.join()
    assert torn == []
