"""Rewards checked at the boundary: shape, dtype, non-finite scores (dropped from statistics, selection, pairs
and training, counted, warned about, the run stopped above a fraction) and a timeout on a reward that blocks."""

from __future__ import annotations

import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from tiny_policy import one_stage_overrides, tiny_policy

from b2diffurl import config as C
from b2diffurl.algos.b2 import select_branches
from b2diffurl.algos.dfusion.pairs import pair_indices, preference_pairs
from b2diffurl.algos.ppo import BufferStatTracker, PromptStatTracker, reward_stats
from b2diffurl.rewards import (
    NonFiniteRewardError,
    RewardError,
    RewardTimeoutError,
    as_reward,
    get_reward,
)

NAN = float("nan")


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    """``python:guard_rewards:<fn>`` rewards: NaN on every third row, inf on the first, ints, a sleeper."""
    (tmp_path / "guard_rewards.py").write_text(
        textwrap.dedent("""
        import time
        import torch

        def some_nan(images, prompts):
            r = images[:, 0].mean((1, 2)).double()
            r[::3] = float("nan")
            return r

        def first_inf(images, prompts):
            r = images.mean((1, 2, 3))
            r[0] = float("-inf")
            return r

        def all_nan(images, prompts):
            return torch.full((len(prompts),), float("nan"))

        def integers(images, prompts):
            return torch.ones(len(prompts), dtype=torch.long)

        def grad_mode(images, prompts):
            return torch.full((len(prompts),), float(torch.is_grad_enabled()))

        def sleeper(images, prompts, seconds=30.0):
            time.sleep(seconds)
            return images.mean((1, 2, 3))
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_non_finite_scores_become_nan_and_are_counted_and_warned(rewards_module, caplog):
    imgs = torch.rand(6, 3, 4, 4)
    reward = get_reward("python:guard_rewards:some_nan")
    with caplog.at_level("WARNING", logger="b2diffurl.rewards"):
        s = reward(imgs, ["x"] * 6)
    assert s.dtype == torch.float32 and s.shape == (6,)
    assert torch.isnan(s).tolist() == [True, False, False, True, False, False]
    torch.testing.assert_close(s[1:3], imgs[1:3, 0].mean((1, 2)))
    assert reward.nonfinite == 2
    assert "'python:guard_rewards:some_nan' returned 2 non-finite score(s) out of 6" in caplog.text
    inf = get_reward("python:guard_rewards:first_inf")
    assert torch.isnan(inf(imgs, ["x"] * 6)).tolist() == [True] + [False] * 5  # -inf is no score either
    assert inf.nonfinite == 1


def test_a_multi_reward_with_a_nan_term_has_a_nan_total(rewards_module):
    imgs = torch.rand(6, 3, 4, 4)
    reward = get_reward("python:guard_rewards:some_nan:0.5,jpeg_compressibility:0.5")
    res = reward.score(imgs, ["x"] * 6)
    assert torch.isnan(res.total).tolist() == [True, False, False, True, False, False]
    assert reward.nonfinite == 2


def test_above_the_fraction_the_reward_call_fails_naming_the_reward(rewards_module):
    imgs = torch.rand(6, 3, 4, 4)
    # 2 of 6 = 0.33: allowed at 0.5, refused at 0.25
    get_reward("python:guard_rewards:some_nan").limit(max_nonfinite_fraction=0.5)(imgs, ["x"] * 6)
    reward = get_reward("python:guard_rewards:some_nan").limit(max_nonfinite_fraction=0.25)
    with pytest.raises(NonFiniteRewardError, match="'python:guard_rewards:some_nan' returned 2 non-finite"):
        reward(imgs, ["x"] * 6)
    assert issubclass(NonFiniteRewardError, RewardError)  # a user error: one line, exit 2


def test_shape_and_dtype_are_checked_naming_the_reward(rewards_module):
    imgs = torch.rand(3, 3, 4, 4)
    with pytest.raises(RewardError, match=r"'python:guard_rewards:integers' returned torch.int64 scores"):
        get_reward("python:guard_rewards:integers")(imgs, ["x"] * 3)
    with pytest.raises(RewardError, match=r"'lambda_reward' returned shape \(3, 1\); expected \[3\]"):
        as_reward(lambda i, p: torch.zeros(3, 1), name="lambda_reward")(imgs, ["x"] * 3)


# ----------------------------------------------------------------------------------------------- timeout
def test_a_reward_that_blocks_is_abandoned_after_the_timeout(rewards_module):
    imgs = torch.rand(2, 3, 4, 4)
    reward = get_reward("python:guard_rewards:sleeper", seconds=30.0).limit(timeout_s=0.3)
    t0 = time.perf_counter()
    with pytest.raises(RewardTimeoutError, match=r"did not return within reward_timeout_s=0.3 s"):
        reward(imgs, ["x"] * 2)
    assert time.perf_counter() - t0 < 5
    # the abandoned call runs on in a daemon thread: it never holds the process open
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("reward python:guard"))
    quick = get_reward("python:guard_rewards:sleeper", seconds=0.0).limit(timeout_s=5)
    torch.testing.assert_close(quick(imgs, ["x"] * 2), imgs.mean((1, 2, 3)))


def test_the_worker_thread_keeps_the_callers_grad_mode_and_errors(rewards_module):
    imgs = torch.rand(2, 3, 4, 4)
    reward = get_reward("python:guard_rewards:grad_mode").limit(timeout_s=10)
    with torch.no_grad():
        assert reward(imgs, ["x"] * 2).tolist() == [0.0, 0.0]
    assert reward(imgs, ["x"] * 2).tolist() == [1.0, 1.0]
    boom = as_reward(lambda i, p: 1 / 0, name="boom").limit(timeout_s=10)
    with pytest.raises(ZeroDivisionError):
        boom(imgs, ["x"] * 2)


# ----------------------------------------------------------------------------------------------- statistics
def test_prompt_tracker_stores_no_nan_and_gives_nan_rows_no_score():
    tr = PromptStatTracker(history=4)
    z = tr.update(["x", "x", "x", "y", "y"], [1.0, NAN, 3.0, NAN, 5.0])
    # x pools [1, 3] only (mean 2, unbiased std √2); y has one finite score: z = 0; NaN rows: NaN
    np.testing.assert_allclose(z, [-1 / np.sqrt(2), NAN, 1 / np.sqrt(2), NAN, 0.0])
    assert all(np.isfinite(v).all() for d in tr.past for v in d.values())
    assert {p: v.tolist() for p, v in tr.past[0].items()} == {"x": [1.0, 3.0], "y": [5.0]}
    z = tr.update(["x", "z"], [2.0, NAN])  # pooled with [1, 3]; a prompt with no finite score is not stored
    np.testing.assert_allclose(z, [0.0, NAN])
    assert set(tr.past[-1]) == {"x"}


def test_buffer_tracker_stores_no_nan():
    tr = BufferStatTracker(buffer_size=8, min_count=2)
    z = tr.update(["x", "x", "x", "y"], [1.0, NAN, 3.0, NAN])
    # x's buffer [1, 3]: mean 2, biased std 1
    np.testing.assert_allclose(z, [-1.0, NAN, 1.0, NAN], atol=1e-5)
    assert tr.buffers == {"x": [1.0, 3.0]}
    z = BufferStatTracker(buffer_size=8, min_count=5).update(["x", "y", "y"], [NAN, 0.0, 2.0])
    np.testing.assert_allclose(z, [NAN, -1.0, 1.0], atol=1e-5)  # stage statistics of the finite rewards


def test_selection_never_picks_a_nan_branch():
    z = np.array(
        [
            [NAN, 0.9, -0.8, 0.1],  # the NaN branch is neither best nor worst
            [NAN, NAN, NAN, NAN],  # nothing to select
            [0.7, NAN, NAN, NAN],  # one finite branch: it is the best (and the worst, but not < -0.5)
        ]
    )
    rows, pos = select_branches(z, 0.5, -0.5)
    assert rows.tolist() == [1, 2, 8] and pos.tolist() == [True, False, True]


def test_pairing_ranks_nan_last_and_leaves_its_pairs_out():
    scores = torch.tensor([[NAN, 0.9, 0.1, 0.5]])
    refs, bases = pair_indices(scores, ref_fraction=0.25, base_fraction=0.5, reuse=2)
    assert refs.tolist() == [[1, 1]] and bases.tolist() == [[2, 0]]  # order 1, 3, 2, then the NaN one
    pref, disp, decisive = preference_pairs(
        torch.tensor([10, 11, 12]),
        torch.tensor([20, 21, 22]),
        torch.tensor([1.0, NAN, 0.0]),
        torch.tensor([0.0, 0.5, NAN]),
    )
    assert decisive.tolist() == [True, False, False] and pref.tolist() == [10] and disp.tolist() == [20]


def test_stage_reward_metrics_cover_finite_rewards_and_count_the_rest():
    m = reward_stats(torch.tensor([1.0, NAN, 3.0, NAN]))
    assert m == {
        "reward_mean": 2.0,
        "reward_std": pytest.approx(np.sqrt(2)),
        "reward_max": 3.0,
        "reward_min": 1.0,
        "rewards_nonfinite": 2,
    }


# ----------------------------------------------------------------------------------------------- runs
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def _trainer(tmp_path, algo, reward, **over):
    from b2diffurl.trainer import Trainer

    cfg = C.load_config(
        overrides=one_stage_overrides(tmp_path / "run", algo, **{"model.lora": "off", **over})
    )
    return Trainer(cfg, policy=tiny_policy(), reward_fn=reward, train_prompts=PROMPTS)


def _some_nan(images, prompts):
    r = images[:, 0].mean((1, 2))
    r[1::9] = NAN  # one row in nine (batches of 9 rows)
    return r


@pytest.mark.parametrize("algo", ["b2", "ddpo"])
def test_a_stage_with_some_nan_rewards_trains_on_the_others(tmp_path, algo, caplog):
    tr = _trainer(tmp_path, algo, _some_nan, reward_max_nonfinite_fraction=0.2)
    with caplog.at_level("WARNING", logger="b2diffurl.rewards"):
        data = tr.algo.sample_stage(0)
    assert data.metrics["rewards_nonfinite"] == 1 and np.isfinite(data.metrics["reward_mean"])
    assert "non-finite score(s)" in caplog.text
    sel_ids = data.payload.ids
    assert len(sel_ids) > 0
    assert torch.isfinite(tr.algo.arena.gather(sel_ids, torch.zeros_like(sel_ids)).advantage).all()
    nan_id = 1  # the NaN row's trajectory id (one process: arena ids in row order)
    assert nan_id not in sel_ids.tolist()
    history = tr.algo.tracker.state_dict()
    assert np.isfinite(np.concatenate([np.ravel(v) for v in _values(history)])).all()
    out = tr.algo.train_stage(0, data)
    assert out["optimizer_steps"] > 0 and np.isfinite(out["loss"])


def _values(state):
    for key in ("past", "buffers"):
        items = state.get(key, [])
        for d in items if isinstance(items, list) else [items]:
            yield from d.values()


def test_a_run_stops_above_the_non_finite_fraction(tmp_path):
    def mostly_nan(images, prompts):
        r = images.mean((1, 2, 3))
        r[: len(r) // 2] = NAN
        return r

    tr = _trainer(tmp_path, "b2", mostly_nan)
    with pytest.raises(NonFiniteRewardError, match="reward_max_nonfinite_fraction=0.1"):
        tr.run()
    assert (
        _trainer(tmp_path / "b", "b2", mostly_nan, reward_max_nonfinite_fraction=0.6).run()["status"]
        == "finished"
    )


def test_reward_limits_are_validated():
    for key, bad in (("reward_max_nonfinite_fraction", 1.5), ("reward_timeout_s", -1.0)):
        with pytest.raises(C.ConfigError, match=key):
            C.validate(C.load_config(overrides={key: bad}))


def test_paired_gain_leaves_out_images_without_a_finite_reward():
    from b2diffurl.report import paired_gain

    g = paired_gain([1.0, NAN, 2.0, 0.0], [2.0, 3.0, None, 0.5])  # None: a null read back from metrics.jsonl
    assert g["gain"] == pytest.approx(0.75) and g["n_better"] == 2 and g["n_worse"] == 0


def test_readme_documents_the_reward_limits():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for key in ("reward_max_nonfinite_fraction", "reward_timeout_s", "rewards_nonfinite"):
        assert key in readme, key


@pytest.mark.parametrize("objective", ["dpo", "ppo"])
def test_dfusion_with_nan_rewards_pairs_and_trains_on_finite_ones(tmp_path, objective):
    def every_fifth_nan(images, prompts):
        r = images[:, 0].mean((1, 2))
        r[::5] = NAN
        return r

    tr = _trainer(
        tmp_path,
        "dfusion",
        every_fifth_nan,
        **{
            "model.lora": "on",
            "reward_max_nonfinite_fraction": 0.5,  # D-Fusion scores targets in small batches
            "dfusion.objective": objective,
            "dfusion.object_words": ["circle"],
            "dfusion.samples_per_prompt": 4,
            "dfusion.mask_grid": 8,
        },
    )
    tr.train_prompts[:] = ["a red circle", "a blue circle", "a green circle"]
    data = tr.algo.sample_stage(0)
    st = data.payload
    assert data.metrics["rewards_nonfinite"] > 0 and np.isfinite(data.metrics["reward_mean"])
    nan_ids = set(st.target_ids[st.target_rewards.isnan()].tolist()) | set(
        st.base_ids[st.base_rewards.isnan()].tolist()
    )
    assert nan_ids and not nan_ids & set(st.preferred.tolist() + st.dispreferred.tolist())
    out = tr.algo.train_stage(0, data)
    assert np.isfinite(out["loss"])
