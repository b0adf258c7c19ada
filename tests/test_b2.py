"""B² and DDPO pieces: schedule, branch point, stat tracker, selection, loss, ratio == 1, one stage trains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_policy import brightness_reward, three_stage_overrides, tiny_policy

from b2diffurl import config as C
from b2diffurl.algos.b2 import select_branches, split_k
from b2diffurl.algos.ppo import PromptStatTracker, clamp_advantages, ppo_clip_loss

T = 4
PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def tiny_cfg(tmp_path, **over):
    return C.load_config(overrides=three_stage_overrides(tmp_path, T, **over))


def make_trainer(tmp_path, lora=False, **over):
    from b2diffurl.trainer import Trainer

    cfg = tiny_cfg(tmp_path, **{"model.lora": "on" if lora else "off", **over})
    return Trainer(cfg, policy=tiny_policy(), reward_fn=brightness_reward, train_prompts=PROMPTS)


# ---------------------------------------------------------------------------------------------- schedule
def test_official_schedule_values():
    ks = [split_k(s, 100, 14, 20) for s in range(100)]
    assert ks == [math.floor(14 + 7 * s / 100) for s in range(100)]
    assert ks[0] == 14 and ks[14] == 14 and ks[15] == 15 and ks[57] == 17 and ks[85] == 19 and ks[86] == 20
    assert ks[99] == 20 and ks.count(20) == 14
    # clipped to k_right when (k_right - k_left + 1)·s/S reaches the extra level
    assert [split_k(s, 4, 1, 2) for s in range(4)] == [1, 1, 2, 2]
    assert split_k(9, 10, 3, 3) == 3


def test_branch_point_and_trained_steps(tmp_path):
    tr = make_trainer(tmp_path, stages=3)
    algo = tr.algo
    assert [algo.k_for_stage(s) for s in range(3)] == [2, 3, 4]
    data = algo.sample_stage(1)  # k = 3: branch at step T - 3 = 1
    sel_ids, steps, _ = data.payload
    assert data.metrics["split_step"] == 1 and data.metrics["k"] == 3
    assert steps.tolist() == [1, 2, 3]
    ids = torch.arange(9)
    assert algo.arena.split_steps(ids).tolist() == [1] * 9
    lat1 = algo.arena.latents(ids, 1).view(3, 3, -1)  # latent 1 shared by the 3 branches of each tree
    assert torch.equal(lat1, lat1[:, :1].expand_as(lat1))
    lat2 = algo.arena.latents(ids, 2).view(3, 3, -1)
    assert (lat2[:, 0] - lat2[:, 1]).abs().amax() > 1e-4


# ---------------------------------------------------------------------------------------------- statistics
def test_stat_tracker_against_numpy_with_history():
    rng = np.random.default_rng(0)
    tr = PromptStatTracker(history=2)
    stages = []
    for _ in range(4):
        prompts = list(rng.choice(["a", "b", "c"], size=7))
        scores = rng.normal(size=7)
        stages.append((prompts, scores))
        z = tr.update(prompts, scores)
        k = len(stages) - 1
        for i, (p, s) in enumerate(zip(prompts, scores)):
            pool = [v for pr, sc in stages[max(0, k - 2) : k + 1] for q, v in zip(pr, sc) if q == p]
            if len(pool) < 2:
                assert z[i] == 0.0
                continue
            expect = (s - np.mean(pool)) / (np.std(pool, ddof=1) + 1e-8)
            assert z[i] == pytest.approx(expect, rel=1e-9, abs=1e-12)
    state = tr.state_dict()
    assert len(state["past"]) == 2  # only H stages kept
    clone = PromptStatTracker(0)
    clone.load_state_dict(state)
    p, s = ["a", "b", "a"], np.array([0.1, 0.2, 0.3])
    np.testing.assert_array_equal(clone.update(p, s), tr.update(p, s))


def test_stat_tracker_hand_example():
    tr = PromptStatTracker(history=8)
    z = tr.update(["x", "x", "y", "y"], [1.0, 3.0, 5.0, 5.0])
    # x: mean 2, unbiased std sqrt(2) -> z = ∓1/sqrt(2); y: std 0 -> z = 0 / 1e-8 = 0
    assert z[0] == pytest.approx(-1 / math.sqrt(2)) and z[1] == pytest.approx(1 / math.sqrt(2))
    assert z[2] == 0 and z[3] == 0
    z = tr.update(["x"], [2.0])  # pooled with [1, 3]: mean 2 -> z = 0
    assert z[0] == pytest.approx(0.0)


def test_stat_tracker_min_std_floors_only_small_spreads():
    """b2.min_std: near-tied scores (std 0.001) are divided by the floor; a real spread keeps the official
    z."""
    tr = PromptStatTracker(history=0, min_std=0.05)
    z = tr.update(["x", "x", "y", "y"], [0.999, 1.0, 0.2, 0.8])
    # x: mean 0.9995, unbiased std 0.000707 < 0.05 -> z = ±0.0005 / 0.05 = ±0.01
    assert z[0] == pytest.approx(-0.01, rel=1e-6) and z[1] == pytest.approx(0.01, rel=1e-6)
    # y: unbiased std 0.3 * sqrt(2) = 0.424 > 0.05 -> the official ±1/sqrt(2)
    assert z[2] == pytest.approx(-1 / math.sqrt(2)) and z[3] == pytest.approx(1 / math.sqrt(2))
    official = PromptStatTracker(history=0).update(["x", "x"], [0.999, 1.0])
    assert official[0] == pytest.approx(-1 / math.sqrt(2), rel=1e-4)  # full-sized advantages from noise


# ---------------------------------------------------------------------------------------------- selection
def test_selection_hand_made_scores():
    z = np.array(
        [
            [0.2, 0.9, -0.8, 0.9],  # best idx 1 (tie with 3 -> lowest), worst idx 2
            [0.5, 0.1, -0.5, 0.0],  # best 0.5 >= 0.5 counts; worst -0.5 is not < -0.5
            [0.4, 0.3, 0.2, 0.1],  # nothing passes
            [-0.6, -0.6, -0.7, -0.7],  # no positive; worst idx 2 (tie with 3 -> lowest)
        ]
    )
    rows, pos = select_branches(z, 0.5, -0.5)
    assert rows.tolist() == [1, 2, 4, 14]
    assert pos.tolist() == [True, False, True, False]


def test_advantage_clamp_and_betas():
    adv = clamp_advantages([7.0, 2.0, -1.0, -9.0, 0.0], 5.0, beta_pos=2.0, beta_neg=0.5)
    np.testing.assert_allclose(adv, [10.0, 4.0, -0.5, -2.5, 0.0])


def test_ppo_loss_hand_computation():
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0])
    ratio = torch.tensor([1.3, 0.8, 1.3, 0.8])
    # max(-A r, -A clip(r, 0.9, 1.1)):
    # A=1, r=1.3: max(-1.3, -1.1) = -1.1 ; A=1, r=0.8: max(-0.8, -0.9) = -0.8
    # A=-2, r=1.3: max(2.6, 2.2) = 2.6   ; A=-2, r=0.8: max(1.6, 1.8) = 1.8
    expect = (-1.1 - 0.8 + 2.6 + 1.8) / 4
    assert ppo_clip_loss(adv, ratio, 0.1).item() == pytest.approx(expect, rel=1e-6)


# ---------------------------------------------------------------------------------------------- training
def test_first_pass_reproduces_sampling_logprobs(tmp_path):
    tr = make_trainer(tmp_path, stages=1)
    data = tr.algo.sample_stage(0)
    _, steps, cond_table = data.payload
    ids = torch.arange(9)
    all_steps = torch.arange(T)
    # every stored step of every trajectory (prefix steps included), recomputed through the training forward
    rows_ids = ids.repeat_interleave(T)
    rows_steps = all_steps.repeat(9)
    batch = tr.algo.arena.gather(rows_ids, rows_steps)
    with torch.no_grad():
        logp = tr.ctx.sampler.batch_logprob(batch, cond_table)
    ratio = torch.exp(logp - batch.logprob)
    assert (ratio - 1).abs().max().item() <= 1e-5
    assert torch.isfinite(batch.logprob).all()
    metrics = tr.algo.train_stage(0, data)
    assert metrics["ratio_dev_max"] <= 1e-5


def test_one_stage_changes_lora_weights_only(tmp_path):
    tr = make_trainer(tmp_path, lora=True, stages=1, **{"train.grad_accum_steps": 1})
    named = dict(tr.policy.unet.named_parameters())
    lora = {n: p.detach().clone() for n, p in named.items() if "lora" in n}
    base = {n: p.detach().clone() for n, p in named.items() if "lora" not in n}
    assert lora and all(not named[n].requires_grad for n in base)
    data = tr.algo.sample_stage(0)
    assert data.metrics["n_selected"] > 0
    m = tr.algo.train_stage(0, data)
    assert m["optimizer_steps"] > 0
    changed = [n for n, v in lora.items() if not torch.equal(v, named[n])]
    assert len(changed) > len(lora) // 2
    assert all(torch.equal(v, named[n]) for n, v in base.items())


def test_ddpo_layout_no_branching_all_steps(tmp_path):
    tr = make_trainer(tmp_path, algo="ddpo", stages=1)
    data = tr.algo.sample_stage(0)
    sel_ids, steps, _ = data.payload
    assert data.metrics["images"] == 9 and data.metrics["split_step"] == T
    assert steps.tolist() == list(range(T)) and sel_ids.numel() == 9
    assert tr.algo.arena.split_steps(sel_ids).tolist() == [T] * 9
    m = tr.algo.train_stage(0, data)
    epochs = tr.cfg.train.inner_epochs  # DDPO's preset: ddpo-pytorch's single inner epoch
    assert m["micro_steps"] == epochs * math.ceil(9 / 2) * T and m["ratio_dev_max"] <= 1e-5


def test_selected_advantages_belong_to_the_best_and_worst_branches(tmp_path):
    """The advantage stored for a trajectory matches its own reward: positives are their group's best branch,
    negatives its worst (catches any misalignment between reward rows, z-scores and arena ids)."""
    tr = make_trainer(tmp_path, stages=1)
    data = tr.algo.sample_stage(0)
    sel_ids, _, _ = data.payload
    arena = tr.algo.arena
    rewards = arena.rewards(torch.arange(9)).view(3, 3)
    adv = arena.advantages(sel_ids)
    assert sel_ids.numel() > 0
    for i, a in zip(sel_ids.tolist(), adv.tolist()):
        group = rewards[i // 3]
        assert a != 0
        assert arena.rewards(torch.tensor([i]))[0] == (group.max() if a > 0 else group.min())


def test_one_update_moves_logprobs_along_the_advantages(tmp_path):
    """Direction check of the whole pipeline (selection → arena → PPO loss → optimizer): one small optimizer
    step must raise the advantage-weighted log-likelihood Σᵢ Aᵢ·Σⱼ log π(x_prev | x_t) of the trained rows
    (first order: the PPO surrogate at ratio 1 has gradient −Σ A ∇log π). A flipped sign anywhere fails it."""
    tr = make_trainer(
        tmp_path,
        stages=1,
        **{
            "train.inner_epochs": 1,
            "train.grad_accum_steps": 10_000,
            "train.lr": 1e-5,
            "train.lr_warmup_steps": 0,
        },
    )
    data = tr.algo.sample_stage(0)
    sel_ids, steps, cond_table = data.payload
    assert sel_ids.numel() > 0
    arena = tr.algo.arena
    rows_ids = sel_ids.repeat_interleave(steps.numel())
    rows_steps = steps.repeat(sel_ids.numel())
    batch = arena.gather(rows_ids, rows_steps)

    def weighted_loglik():
        with torch.no_grad():
            return (
                (batch.advantage.double() * tr.ctx.sampler.batch_logprob(batch, cond_table).double())
                .sum()
                .item()
            )

    before = weighted_loglik()
    m = tr.algo.train_stage(0, data)
    assert m["optimizer_steps"] == 1
    after = weighted_loglik()
    assert after > before, (before, after)
