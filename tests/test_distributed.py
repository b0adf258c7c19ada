"""Data-parallel runs on CPU with gloo: the primitives of ``b2diffurl.distributed`` against single-process
oracles (concatenation, sums, autograd on the full batch), the failure path under torchrun, and whole training
stages of 2 ranks × half the batch against 1 rank × the full batch.

Workers are forked from the test process (no re-import of torch: seconds, not tens of seconds, on a loaded
CI machine) and join a gloo group through the same environment variables torchrun sets."""

from __future__ import annotations

import json
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
        if -(-n // block) >= world:  # whole blocks of the single-process batching
            assert all(p.start % block == 0 for p in parts)
            blocks = [-(-len(p) // block) for p in parts]
            assert max(blocks) - min(blocks) <= 1
        else:  # fewer batches than ranks: an even split, no idle rank while there are items
            assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


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
    spread = dist.spread(torch.tensor([10, 11, 12]) if r == 0 else torch.tensor([20]))
    return gathered, maxed, summed, flag, objs, dist.shard(7), spread


def test_collectives_match_single_process_oracles(tmp_path):
    res = run_ranks(_collectives, tmp_path)
    want = torch.cat(
        [torch.arange(6.0).reshape(3, 2), torch.arange(2.0).reshape(1, 2) + 100]
    )  # concatenation in rank order
    for gathered, maxed, summed, flag, objs, _shard, _spread in res:
        assert torch.equal(gathered, want)
        assert maxed.tolist() == [1.0, 0.0] and summed.tolist() == [3.0]
        assert flag is True
        assert objs == [{"rank": 0}, {"rank": 1}]
    assert [list(res[r][5]) for r in range(WORLD)] == [[0, 1, 2], [3, 4, 5, 6]]
    assert res[0][6].tolist() == [10, 11, 12, -1] and res[1][6].tolist() == [-1, -1, -1, 20]


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


# ----------------------------------------------------------------------------------------------- training runs
T = 4
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "three yellow circles"]
HELDOUT = ["one red square", "a blue circle", "two green circles"]


def _config(out, algo, stages):
    from b2diffurl import config as C

    return C.load_config(
        overrides={
            "algo": algo,
            "stages": stages,
            "sample.num_steps": T,
            "sample.prompts_per_stage": 5,  # 5 trees over 2 ranks: uneven shards
            "sample.branches": 3,
            "sample.batch_size": 2,
            "b2.k_left": 2,
            "b2.k_right": 4,
            "eval.prompts": "none",
            "eval.num_prompts": 3,
            "eval.images_per_prompt": 1,
            "eval.every": 1,
            "model.lora": "off",
            "train.micro_batch_size": 2,
            "train.grad_accum_steps": 2,
            "train.lr": 1e-3,
            # Adam's first steps are sign-like: with a tiny eps a gradient element near zero turns float
            # rounding (batch composition) into a full lr step; eps 1e-4 bounds that gain by lr/eps
            "train.adam_eps": 1e-4,
            "out": str(out),
            "progress": True,  # rank 0 draws the bars, the others none
            "grid_every": 1,
            "checkpoint_every": 1,
            "preset": "toy",
            # the KL monitor estimates on a per-rank subsample by design (not a single-process number)
            "monitor.kl_samples": 0,
        }
    )


def _train(out, algo, stages, resume=None, kill_at=None):
    """A run on the tiny policy; returns per-stage selections (positions held here, their final latents and
    advantages), the final parameters and the metrics this process logged."""
    from tiny_policy import brightness_reward, tiny_policy

    from b2diffurl.trainer import Trainer

    tr = Trainer(
        _config(out, algo, stages),
        policy=tiny_policy(),
        reward_fn=brightness_reward,
        train_prompts=PROMPTS,
        heldout_prompts=HELDOUT,
        resume=resume,
    )
    seen, sample_stage = [], tr.algo.sample_stage

    def recording(stage):
        if stage == kill_at:
            os._exit(3)  # killed: no clean-up, no checkpoint of this stage
        before = {n: p.detach().clone() for n, p in tr.policy.unet.named_parameters()}
        data = sample_stage(stage)
        ids = data.payload.ids
        here = dist.held(ids)
        seen.append(
            {
                "n": len(ids),
                "pos": here.nonzero().reshape(-1),
                "final": tr.algo.arena.latents(ids[here], T),
                "adv": tr.algo.arena.advantages(ids[here]),
                "params_before": before,
            }
        )
        return data

    tr.algo.sample_stage = recording
    tr.run()
    params = {n: p.detach().clone() for n, p in tr.policy.unet.named_parameters()}
    return seen, params, tr.metrics.records


def _numbers(records):
    from b2diffurl.report import is_timing_key

    skip = ("arena_mb",)  # this process's share of the trajectories
    return [{k: v for k, v in r.items() if not is_timing_key(k) and k not in skip} for r in records]


def _assert_same_numbers(a, b, tol):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if isinstance(ra[k], float) or isinstance(ra[k], list):
                torch.testing.assert_close(torch.tensor(ra[k]), torch.tensor(rb[k]), rtol=0, atol=tol, msg=k)
            else:
                assert ra[k] == rb[k], k


STAGES = 2


@pytest.fixture(scope="module")
def b2_one(tmp_path_factory):
    out = tmp_path_factory.mktemp("b2-one")
    return out, _train(out, "b2", STAGES)


@pytest.fixture(scope="module")
def b2_two(tmp_path_factory):
    out = tmp_path_factory.mktemp("b2-two")
    return out, run_ranks(_train, out, str(out / "run"), "b2", STAGES)


def _check_equivalence(one, ranks, two_out):
    """Stage 0 (samples, selection, advantages, the parameter update) within 1e-6; the next stage, which
    samples with those parameters, and every logged number within 1e-4 (float rounding of different batch
    compositions in training forwards, amplified by DDIM's x0 prediction, is all that differs)."""
    one_seen, one_params, one_metrics = one
    for s in range(STAGES):
        tol = 1e-6 if s == 0 else 1e-4
        n = one_seen[s]["n"]
        final = torch.full_like(one_seen[s]["final"], float("nan"))
        adv = torch.full_like(one_seen[s]["adv"], float("nan"))
        count = torch.zeros(n, dtype=torch.long)
        for seen, _, _ in ranks:
            st = seen[s]
            assert st["n"] == n  # every rank iterates the same global selection
            final[st["pos"]], adv[st["pos"]] = st["final"], st["adv"]
            count[st["pos"]] += 1
        assert count.tolist() == [1] * n  # each selected sample held by exactly one rank
        torch.testing.assert_close(final, one_seen[s]["final"], rtol=0, atol=tol)
        torch.testing.assert_close(adv, one_seen[s]["adv"], rtol=0, atol=tol)
    for seen, params, metrics in ranks:
        for name, p in one_seen[1]["params_before"].items():  # after stage 0's update
            torch.testing.assert_close(seen[1]["params_before"][name], p, rtol=0, atol=1e-6, msg=name)
        moved = max((p - one_seen[0]["params_before"][name]).abs().max() for name, p in params.items())
        assert moved > 1e-4  # the update is not trivially equal
        for name, p in one_params.items():
            torch.testing.assert_close(params[name], p, rtol=0, atol=1e-4, msg=name)
        _assert_same_numbers(_numbers(metrics), _numbers(one_metrics), 1e-4)
    # rank 0 alone wrote the run directory, with both ranks' random streams in the checkpoint
    logged = [json.loads(ln) for ln in (two_out / "metrics.jsonl").read_text().splitlines()]
    assert _numbers(logged) == _numbers(ranks[0][2])
    state = torch.load(two_out / "checkpoints" / f"stage_{STAGES:05d}" / "state.pt", weights_only=False)
    assert state["world_size"] == WORLD and len(state["rng_per_rank"]) == WORLD


def test_b2_two_ranks_half_batch_equal_one_rank_full_batch(b2_one, b2_two):
    _check_equivalence(b2_one[1], b2_two[1], b2_two[0] / "run")


def test_ddpo_two_ranks_half_batch_equal_one_rank_full_batch(tmp_path):
    one = _train(tmp_path / "one", "ddpo", STAGES)
    _check_equivalence(
        one, run_ranks(_train, tmp_path, str(tmp_path / "two"), "ddpo", STAGES), tmp_path / "two"
    )


def test_kill_and_resume_under_two_ranks_is_exact(b2_two, tmp_path):
    full = b2_two[1]
    run = str(tmp_path / "run")
    with pytest.raises(mp.ProcessExitedException):  # both ranks die at the start of stage 1
        run_ranks(_train, tmp_path, run, "b2", STAGES, None, 1)
    assert (tmp_path / "run" / "checkpoints" / "stage_00001" / "state.pt").is_file()
    resumed = run_ranks(_train, tmp_path, run, "b2", STAGES, run)
    for r in range(WORLD):
        _assert_same_numbers(_numbers(resumed[r][2]), _numbers(full[r][2]), 0.0)
        for name, p in full[r][1].items():
            assert torch.equal(resumed[r][1][name], p), name


def _resume_other_world(out):
    from tiny_policy import brightness_reward, tiny_policy

    from b2diffurl.trainer import Trainer

    try:
        Trainer(
            _config(out, "b2", STAGES),
            policy=tiny_policy(),
            reward_fn=brightness_reward,
            train_prompts=PROMPTS,
            resume=out,
        )
    except dist.DistributedError as exc:
        return str(exc)
    return None


def test_resume_with_another_world_size_is_refused(b2_one, tmp_path):
    for msg in run_ranks(_resume_other_world, tmp_path, str(b2_one[0])):
        assert msg is not None and "written by 1 process" in msg and "this run has 2" in msg


def _train_dfusion(out, objective):
    """One D-Fusion stage (2 prompts, one sampling batch each) on a random-init toy policy with LoRA. One pair
    (sample) per training micro-batch and one row per reference call, so that 1 and 2 processes run the same
    UNet batches: with log-probs summed over pixels, batch-dependent float rounding would otherwise show at
    1e-5 in the loss (how rows split within a micro-batch is covered by the B²/DDPO tests)."""
    from dfusion_reference import toy_policy, toy_reward

    from b2diffurl import config as C
    from b2diffurl.trainer import Trainer

    cfg = C.load_config(
        overrides={
            "algo": "dfusion",
            "stages": 1,
            "sample.num_steps": 5,
            "sample.prompts_per_stage": 2,
            "sample.batch_size": 1,
            "sample.branches": 4,  # 1 prompt × 4 samples per sampling batch
            "dfusion.samples_per_prompt": 4,
            "dfusion.mask_threshold": 0.0625,
            "dfusion.objective": objective,
            "dpo.logprob_reduction": "sum",
            "dpo.ref_batch_size": 1,
            "eval.prompts": "none",
            "train.inner_epochs": 1,
            "train.micro_batch_size": 1,
            "train.lr": 1e-3,
            "train.adam_eps": 1e-4,
            "out": str(out),
            "progress": False,
            "grid_every": 0,
        }
    )
    prompts = ["a blue square to the left of a green triangle", "two red circles"]
    tr = Trainer(cfg, policy=toy_policy(), reward_fn=toy_reward, train_prompts=prompts, heldout_prompts=[])
    before = [p.detach().clone() for p in tr.params]
    tr.run()
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(tr.params, before))
    return [p.detach().clone() for p in tr.params], tr.metrics.records, moved


@pytest.mark.parametrize("objective", ["dpo", "ppo"])
def test_dfusion_two_ranks_equal_one_rank(tmp_path, objective):
    """Prompts sharded (one per rank), pairs per prompt, metrics gathered, DPO/PPO gradient shares summed."""
    one_params, one_metrics, moved = _train_dfusion(tmp_path / "one", objective)
    assert moved > 1e-5 and one_metrics[-1]["pairs"] > 0
    for params, metrics, _ in run_ranks(_train_dfusion, tmp_path, str(tmp_path / "two"), objective):
        _assert_same_numbers(_numbers(metrics), _numbers(one_metrics), 1e-6)
        for p, q in zip(params, one_params):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
