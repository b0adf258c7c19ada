"""Data-parallel runs on CPU with gloo: the primitives of ``b2diffurl.distributed`` against single-process
oracles (concatenation, sums, autograd on the full batch), the failure path under torchrun, and whole training
stages of 2 ranks × half the batch against 1 rank × the full batch.

Workers are forked from the test process (no re-import of torch: seconds, not tens of seconds, on a loaded
CI machine) and join a gloo group through the same environment variables torchrun sets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch
import torch.multiprocessing as mp

from b2diffurl import distributed as dist

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, fn, port, out_dir, args):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        B2DIFFURL_DIST_TIMEOUT_S="60",
    )
    torch.set_num_threads(1)
    dist.init("cpu")
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.shutdown()


def run_ranks(fn, tmp_path, *args) -> list:
    """``fn(*args)`` on 2 forked gloo ranks; the list of each rank's return value."""
    out = tempfile.mkdtemp(prefix=f"ranks-{fn.__name__}-", dir=tmp_path)
    mp.start_processes(
        _worker, args=(fn, _free_port(), str(out), args), nprocs=WORLD, join=True, start_method="fork"
    )
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------------------------- pure helpers
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_shard_partitions_in_order(world, block):
    for n in range(0, 11):
        parts = [dist.shard(n, r, world, block=block) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))
        # whole blocks of the single-process batching: every part starts on a block boundary
        assert all(p.start % block == 0 for p in parts if len(p))
        blocks = [-(-len(p) // block) for p in parts]
        assert max(blocks) - min(blocks) <= 1


def test_localize_keeps_global_order():
    owned = range(4, 8)
    local_ids = torch.tensor([10, 11, 12, 13])
    got = dist.localize(torch.tensor([7, 0, 4, 9, 5]), owned, local_ids)
    assert got.tolist() == [13, -1, 10, -1, 11]
    assert dist.held(got).tolist() == [True, False, True, False, True]


def test_single_process_is_a_no_op():
    assert dist.world().size == 1 and dist.is_main()
    t = torch.arange(3.0)
    assert dist.all_gather_cat(t) is t
    assert dist.all_reduce(t.clone(), "max").tolist() == [0.0, 1.0, 2.0]
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    dist.check_world_size(1)
    with pytest.raises(dist.DistributedError, match="written by 2 process"):
        dist.check_world_size(2)


def test_tree_generators_depend_on_tree_not_on_batch():
    a = dist.tree_generators(5, 3, [0, 1, 2, 3], "cpu")
    b = dist.tree_generators(5, 3, [2, 3], "cpu")
    draws_a = [torch.randn(4, generator=g) for g in a]
    draws_b = [torch.randn(4, generator=g) for g in b]
    assert torch.equal(draws_a[2], draws_b[0]) and torch.equal(draws_a[3], draws_b[1])
    assert not torch.equal(draws_a[0], draws_a[1])
    other_stage = torch.randn(4, generator=dist.tree_generators(5, 4, [2], "cpu")[0])
    assert not torch.equal(other_stage, draws_a[2])


def test_bad_environment_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(dist.DistributedError, match="RANK"):
        dist.init("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(dist.DistributedError, match="MASTER_ADDR"):
        dist.init("cpu")
    monkeypatch.setenv(dist.TIMEOUT_ENV, "-3")
    with pytest.raises(dist.DistributedError, match="> 0"):
        dist.timeout_s()
    assert dist.world().size == 1


# ----------------------------------------------------------------------------------------------- collectives
def _collectives():
    r = dist.rank()
    rows = 3 if r == 0 else 1  # uneven shards
    mine = torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 100 * r
    gathered = dist.all_gather_cat(mine)
    maxed = dist.all_reduce(torch.tensor([float(r), -float(r)]), "max")
    summed = dist.all_reduce(torch.tensor([1.0 + r]), "sum")
    flag = dist.any_rank(r == 1)
    objs = dist.all_gather_object({"rank": r})
    return gathered, maxed, summed, flag, objs, dist.shard(7)


def test_collectives_match_single_process_oracles(tmp_path):
    res = run_ranks(_collectives, tmp_path)
    want = torch.cat(
        [torch.arange(6.0).reshape(3, 2), torch.arange(2.0).reshape(1, 2) + 100]
    )  # concatenation in rank order
    for gathered, maxed, summed, flag, objs, _shard in res:
        assert torch.equal(gathered, want)
        assert maxed.tolist() == [1.0, 0.0] and summed.tolist() == [3.0]
        assert flag is True
        assert objs == [{"rank": 0}, {"rank": 1}]
    assert [list(res[r][5]) for r in range(WORLD)] == [[0, 1, 2], [3, 4, 5, 6]]


def _model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(7, 3, dtype=torch.float64)
    return model.double(), x


def _summed_gradients():
    model, x = _model_and_batch()
    part = dist.shard(x.shape[0])
    # each rank's share of the global mean: its rows' sum / the global row count
    loss = model(x[part.start : part.stop]).pow(2).sum() / x.shape[0]
    loss.backward()
    partial = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # a gradient on rank 1 only
    if dist.rank() == 1:
        partial.grad = torch.ones(2, dtype=torch.float64)
    unused = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))  # no gradient on any rank
    dist.sum_gradients([*model.parameters(), partial, unused])
    return [p.grad.clone() for p in model.parameters()], partial.grad.clone(), unused.grad


def test_sum_gradients_equals_full_batch_autograd(tmp_path):
    model, x = _model_and_batch()
    model(x).pow(2).mean().backward()
    want = [p.grad for p in model.parameters()]
    for grads, partial, unused in run_ranks(_summed_gradients, tmp_path):
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
        assert partial.tolist() == [1.0, 1.0]  # a missing gradient counts as zeros
        assert unused is None  # as in one process: the optimizer skips it


def _rng_round_trip():
    torch.manual_seed(1000 + dist.rank())
    states = dist.gather_rng_states({"torch": torch.get_rng_state()})
    mine = dist.my_rng_state(states)
    torch.set_rng_state(mine["torch"])
    return torch.rand(2), len(states)


def test_rng_states_gathered_per_rank(tmp_path):
    res = run_ranks(_rng_round_trip, tmp_path)
    for r, (draw, n) in enumerate(res):
        torch.manual_seed(1000 + r)
        assert n == WORLD and torch.equal(draw, torch.rand(2))
    assert not torch.equal(res[0][0], res[1][0])


# ----------------------------------------------------------------------------------------------- failure
FAILING_SCRIPT = """
import sys, time
from b2diffurl import distributed as dist

dist.init("cpu")
with dist.record_failure():
    if dist.rank() == 1:
        raise RuntimeError("rank one fails on purpose")
    dist.barrier()  # rank 0 waits for a peer that never comes
    time.sleep(600)
"""


def test_a_rank_that_raises_ends_the_job_nonzero(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(FAILING_SCRIPT))
    env = dict(os.environ, OMP_NUM_THREADS="1", B2DIFFURL_DIST_TIMEOUT_S="120")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={WORLD}",
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert "rank 1/2] failed" in proc.stderr and "rank one fails on purpose" in proc.stderr
    # well before the collective timeout: torchrun stopped rank 0 when rank 1 exited
    assert elapsed < 110, elapsed
