"""The monitors in real (tiny) training runs: the hacking alarm fires on a hackable reward and stays silent on
a clean run, the KL to the starting policy, the KL regulariser against the closed form, advantage aggregation
of a multi-reward, and the config/CLI around them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_policy import tiny_policy

from b2diffurl import config as C
from b2diffurl.trainer import Trainer

PROMPTS = ["a red circle", "two blue squares"]


def mean_brightness(images, prompts):
    """Trivially hackable: saturating every pixel to white maximises it and erases every difference between
    the images of a prompt."""
    return images.mean((1, 2, 3))


def run_cfg(out, **over):
    base = {
        "algo": "ddpo",
        "stages": 4,
        "sample.num_steps": 4,
        "sample.prompts_per_stage": 4,
        "sample.branches": 3,
        "sample.batch_size": 4,
        "eval.prompts": "none",
        "model.lora": "off",
        "train.micro_batch_size": 4,
        "train.grad_accum_steps": 1,
        "train.lr_warmup_steps": 0,
        "out": str(out),
        "progress": False,
        "grid_every": 0,
        "checkpoint_every": 0,
        "preset": "toy",
        "monitor.window": 3,
        "monitor.kl_samples": 16,
    }
    base.update(over)
    return C.load_config(overrides=base)


def stages_of(trainer):
    return trainer.metrics.of_kind("stage")


def test_alarm_fires_when_a_real_run_hacks_brightness(tmp_path, caplog):
    """DDPO with a large step on mean brightness: the images wash out, the training reward rises while the
    per-prompt diversity falls, the alarm fires with the numbers, and --stop-on-hacking ends the run there
    with its checkpoint saved."""
    cfg = run_cfg(
        tmp_path,
        stages=5,
        **{"train.lr": 3e-2, "monitor.gold_reward": "none", "monitor.stop_on_hacking": True},
    )
    tr = Trainer(cfg, policy=tiny_policy(), reward_fn=mean_brightness, train_prompts=PROMPTS)
    with caplog.at_level("WARNING", logger="b2diffurl.trainer"):
        summary = tr.run()
    recs = stages_of(tr)
    assert summary["status"] == "hacking" and summary["stages_done"] < 5, [r["hacking_alarm"] for r in recs]
    last = recs[-1]
    assert last["hacking_alarm"] and not any(r["hacking_alarm"] for r in recs[:-1])
    assert last["alarm_reward_change"] > 0.02 and last["alarm_diversity_change"] < -0.10
    assert recs[-1]["reward_mean"] > recs[0]["reward_mean"] and recs[-1]["diversity"] < recs[0]["diversity"]
    assert any("reward hacking suspected" in m and "diversity" in m for m in caplog.messages)
    # the checkpoint after the alarmed stage is on disk, so the run can be inspected or resumed
    assert (tmp_path / "checkpoints" / f"stage_{len(recs):05d}" / "state.pt").is_file()
    assert (tmp_path / "reward_curve.png").is_file()
    # KL to the starting policy: 0 while the sampling policy is the start, then positive
    assert abs(recs[0]["kl_k1"]) < 1e-6 and recs[-1]["kl_k3"] > 1e-3
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [ln["hacking_alarm"] for ln in lines if ln["kind"] == "stage"] == [
        r["hacking_alarm"] for r in recs
    ]
    assert all(r["monitor_time_s"] < r["stage_time_s"] for r in recs)


@pytest.mark.slow
def test_alarm_fires_on_the_toy_world_when_brightness_is_hacked(tmp_path, caplog):
    """The embedded toy model on toy-world prompts, trained by DDPO on mean brightness: the images brighten
    while the exact toy reward (the default gold reward here) falls, and the alarm names both (~12 s a stage
    on 2 busy cores; with toy v4 it fires at stage 2, the gold reward down 31%)."""
    from b2diffurl.toy.prompts import train_prompts

    cfg = run_cfg(
        tmp_path,
        stages=5,
        **{
            "sample.num_steps": 10,
            "train.micro_batch_size": 6,
            "train.lr": 2e-3,
            "monitor.kl_samples": 8,
            "monitor.stop_on_hacking": True,
        },
    )
    tr = Trainer(cfg, reward_fn=mean_brightness, train_prompts=train_prompts()[:4])  # the toy model itself
    with caplog.at_level("WARNING", logger="b2diffurl.trainer"):
        assert tr.run()["status"] == "hacking"
    recs = stages_of(tr)
    assert recs[-1]["hacking_alarm"] and recs[-1]["alarm_gold_change"] < -0.05
    assert recs[-1]["reward_mean"] > recs[0]["reward_mean"] and recs[-1]["gold_mean"] < recs[0]["gold_mean"]
    assert any("while gold reward" in m for m in caplog.messages)


def test_alarm_silent_on_a_clean_run(tmp_path):
    """The same reward trained with a moderate step, judged by a gold reward that agrees with it: the reward
    rises (the alarm has something to judge), the gold rises with it and diversity holds - no alarm."""
    cfg = run_cfg(tmp_path, **{"train.lr": 1e-2})
    tr = Trainer(
        cfg, policy=tiny_policy(), reward_fn=mean_brightness, gold_fn=mean_brightness, train_prompts=PROMPTS
    )
    assert tr.run()["status"] == "finished"
    recs = stages_of(tr)
    assert recs[-1]["reward_mean"] > recs[0]["reward_mean"] * 1.02
    assert max(r["alarm_reward_change"] or 0 for r in recs) > 0.02
    assert not any(r["hacking_alarm"] for r in recs), [
        (r["alarm_reward_change"], r["alarm_gold_change"], r["alarm_diversity_change"]) for r in recs
    ]
    assert all(r["gold_mean"] == pytest.approx(r["reward_mean"], abs=1e-6) for r in recs)


# -- the KL regulariser ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 3.0], ids=["no_cfg", "cfg"])
def test_step_kl_matches_the_gaussian_closed_form(guidance):
    """train.kl_coef's per-step KL against ‖μ_θ − μ_ref‖²/(2σ²) (mean over elements), with both means from
    diffusers' DDIMScheduler.step (zero noise) and σ from its variance: θ = a LoRA moved off zero, ref = the
    same UNet with the adapter disabled."""
    from diffusers import DDIMScheduler

    from b2diffurl.algos.kl import step_kl
    from b2diffurl.sampling import TreeSampler

    policy = tiny_policy()
    policy.add_lora(rank=2, alpha=2.0)
    with torch.no_grad():
        for n, p in policy.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    sampler = TreeSampler(policy, num_steps=4, guidance_scale=guidance, eta=1.0, backend="reference")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=g)
    steps = torch.tensor([0, 1, 2])
    cond = policy.encode_prompts(["a red circle", "two blue squares", "a green triangle"])
    kl = step_kl(sampler, policy.lora_disabled, x, steps, cond)

    sched = DDIMScheduler.from_config(policy.scheduler.config)
    sched.set_timesteps(4)
    uncond = policy.encode_prompts([""]).expand(3, -1, -1)

    def eps(t):
        with torch.no_grad():
            c = policy.unet(x, t, encoder_hidden_states=cond).sample
            if guidance == 1.0:
                return c
            u = policy.unet(x, t, encoder_hidden_states=uncond).sample
            return u + guidance * (c - u)

    expected = []
    for k, i in enumerate(steps.tolist()):
        t = sched.timesteps[i]
        ts = t.expand(3)
        e_theta = eps(ts)
        with policy.lora_disabled():
            e_ref = eps(ts)
        zero = torch.zeros_like(x[k : k + 1])
        mu = [
            sched.step(e[k : k + 1], t, x[k : k + 1], eta=1.0, variance_noise=zero).prev_sample
            for e in (e_theta, e_ref)
        ]
        prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
        var = sched._get_variance(t, prev_t)
        expected.append(((mu[0] - mu[1]) ** 2).mean() / (2 * var))
    expected = torch.stack(expected).float()
    assert (expected > 1e-4).all()  # the two policies really differ
    torch.testing.assert_close(kl.detach(), expected, rtol=2e-3, atol=1e-7)
    kl.sum().backward()  # differentiable w.r.t. the policy
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.unet.parameters())

    # with stored transitions, the same call also gives their log-prob: a Gaussian with mean μ_θ (diffusers'
    # zero-noise step) and variance σ², mean over elements
    x_prev = torch.randn(3, 4, 8, 8, generator=g)
    kl2, logp = step_kl(sampler, policy.lora_disabled, x, steps, cond, x_prev=x_prev)
    want_logp = []
    for k, i in enumerate(steps.tolist()):
        t = sched.timesteps[i]
        mu = sched.step(
            eps(t.expand(3))[k : k + 1], t, x[k : k + 1], eta=1.0, variance_noise=torch.zeros_like(x[:1])
        ).prev_sample
        var = sched._get_variance(t, t - sched.config.num_train_timesteps // sched.num_inference_steps)
        lp = -((x_prev[k : k + 1] - mu) ** 2) / (2 * var) - 0.5 * torch.log(2 * torch.pi * var)
        want_logp.append(lp.mean())
    torch.testing.assert_close(kl2.detach(), expected, rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(logp.detach(), torch.stack(want_logp).float(), rtol=1e-4, atol=1e-4)


def test_kl_penalty_shares_the_policy_forward_with_the_log_prob():
    """train.kl_coef's PPO path costs one reference forward: the policy's UNet call that scores the stored
    transitions also gives the KL term (two UNet calls per micro-step, not three)."""
    from types import SimpleNamespace

    from b2diffurl.algos.kl import batch_logprob_and_kl
    from b2diffurl.sampling import TreeSampler

    policy = tiny_policy()
    policy.add_lora(rank=2, alpha=2.0)
    sampler = TreeSampler(policy, num_steps=4, guidance_scale=3.0, eta=1.0, backend="reference")
    calls = []
    policy.unet.register_forward_hook(lambda *_: calls.append(1))
    g = torch.Generator().manual_seed(5)
    cond_table = policy.encode_prompts(["a red circle", "two blue squares"])
    batch = SimpleNamespace(
        x_t=torch.randn(2, 4, 8, 8, generator=g),
        x_prev=torch.randn(2, 4, 8, 8, generator=g),
        step=torch.tensor([1, 2]),
        prompt_id=torch.tensor([1, 0]),
    )
    ctx = SimpleNamespace(sampler=sampler, reference=policy.lora_disabled)
    logp, kl = batch_logprob_and_kl(ctx, batch, cond_table)
    assert len(calls) == 2
    torch.testing.assert_close(logp, sampler.batch_logprob(batch, cond_table))
    assert kl.ndim == 0 and kl.requires_grad


def test_kl_coef_trains_with_a_penalty_and_zero_adds_none(tmp_path):
    """kl_coef > 0 logs the penalty (0 before the first update moves the policy); 0 logs none."""
    cfg = run_cfg(tmp_path / "a", stages=1, **{"train.lr": 1e-2, "train.kl_coef": 0.5})
    rec = stages_of(_run(cfg))[0]
    assert rec["kl_penalty"] > 0 and np.isfinite(rec["loss"])
    rec0 = stages_of(_run(run_cfg(tmp_path / "b", stages=1, **{"train.lr": 1e-2})))[0]
    assert "kl_penalty" not in rec0


def _run(cfg, reward=mean_brightness):
    tr = Trainer(cfg, policy=tiny_policy(), reward_fn=reward, gold_fn=reward, train_prompts=PROMPTS)
    tr.run()
    return tr


# -- advantage aggregation ---------------------------------------------------------------------------------------
def test_advantage_aggregation_uses_one_tracker_per_term():
    """reward_aggregate=advantage: z = Σ w_k · z_k with each term z-scored by its own copy of the tracker
    (per-prompt, unbiased std, pooled with the previous stage's raw scores: history 1), against numpy."""
    from b2diffurl.algos.ppo import PromptStatTracker
    from b2diffurl.algos.terms import RewardNormaliser
    from b2diffurl.rewards import Reward, RewardResult

    reward = Reward("a:0.7,b:0.3", None, weights={"a": 0.7, "b": 0.3}, aggregate="advantage")
    norm = RewardNormaliser(PromptStatTracker(history=1), reward)
    prompts = ["p", "p", "p", "q", "q"]
    rng = np.random.default_rng(0)
    stages = [{n: rng.normal(size=5) * s for n, s in (("a", 1.0), ("b", 50.0))} for _ in range(2)]
    for k, comps in enumerate(stages):
        norm.start()
        for lo, hi in ((0, 2), (2, 5)):  # two scored batches
            part = {n: torch.tensor(v[lo:hi]) for n, v in comps.items()}
            norm.add(RewardResult(total=0.7 * part["a"] + 0.3 * part["b"], components=part))
        totals = torch.tensor(0.7 * comps["a"] + 0.3 * comps["b"])
        z = norm.zscores(prompts, totals)
        expected = np.zeros(5)
        for n, w in (("a", 0.7), ("b", 0.3)):
            for p in ("p", "q"):
                rows = [i for i, q in enumerate(prompts) if q == p]
                pool = np.concatenate([s[n][rows] for s in stages[max(0, k - 1) : k + 1]])
                expected[rows] += w * (comps[n][rows] - pool.mean()) / (pool.std(ddof=1) + 1e-8)
        np.testing.assert_allclose(z, expected, rtol=1e-6)  # the terms are collected as float32
    # the per-term histories are run state
    state = norm.state_dict()
    fresh = RewardNormaliser(PromptStatTracker(history=1), reward)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state and set(state["term_trackers"]) == {"a", "b"}
    # reward aggregation (or a single term) keeps the one tracker of the total
    single = RewardNormaliser(PromptStatTracker(history=1), Reward("a", None))
    assert single.term_trackers == {} and single.state_dict() == {"term_trackers": {}}


def test_multi_reward_run_logs_each_term(tmp_path):
    """A weighted multi-reward through the trainer under advantage aggregation: each term logged, the
    per-term trackers in the checkpoint."""
    from b2diffurl.rewards import get_reward

    reward = get_reward("toy:0.5,jpeg_compressibility:0.5", aggregate="advantage")
    cfg = run_cfg(
        tmp_path, stages=1, checkpoint_every=1, **{"train.lr": 1e-3, "reward_aggregate": "advantage"}
    )
    tr = Trainer(cfg, policy=tiny_policy(), reward_fn=reward, train_prompts=PROMPTS)
    tr.run()
    rec = stages_of(tr)[0]
    for term in ("toy", "jpeg_compressibility"):
        assert np.isfinite(rec[f"reward_{term}_mean"]) and rec[f"reward_{term}_std"] >= 0
    assert "gold_mean" not in rec  # the training reward has the toy term: 'auto' holds no gold out
    state = torch.load(tmp_path / "checkpoints" / "stage_00001" / "state.pt", weights_only=False)
    assert set(state["algo"]["term_trackers"]) == {"toy", "jpeg_compressibility"}


# -- config and CLI ----------------------------------------------------------------------------------------------
def test_dotted_reward_options_and_monitor_config():
    cfg = C.load_config(
        overrides={"reward": "toy:0.5,clip:0.5", "reward_options.clip.checkpoint": "/w/clip.bin"}
    )
    assert cfg.reward_options == {"clip.checkpoint": "/w/clip.bin"}
    assert C.flatten(C.to_dict(cfg))["reward_options"] == {"clip.checkpoint": "/w/clip.bin"}
    for over, msg in (
        ({"reward_aggregate": "sum"}, "reward_aggregate must be one of reward, advantage"),
        ({"monitor.window": 1}, "monitor.window must be in [2, inf)"),
        ({"monitor.gold_reward": "nope"}, "monitor.gold_reward: expected auto, none or a reward spec"),
        ({"train.kl_coef": -1}, "train.kl_coef must be in [0, inf)"),
        ({"algo": "dfusion", "train.kl_coef": 0.1}, "train.kl_coef applies to the PPO objectives"),
    ):
        with pytest.raises(C.ConfigError, match=msg.replace("[", r"\[").replace(")", r"\)")):
            C.load_config(overrides=over)


def test_bad_log_with_is_one_line_exit_2(tmp_path, capsys):
    from b2diffurl.cli import main

    rc = main(["train", "--log-with", "wandb", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert (
        rc == 2 and "log_with must be one of none, tensorboard" in err and len(err.strip().splitlines()) == 1
    )
    assert not (tmp_path / "run").exists()


def test_log_with_tensorboard(tmp_path, capsys):
    """With the tensorboard package the metrics are mirrored to event files; without it, one line, exit 2."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        from b2diffurl.cli import main

        rc = main(["train", "--log-with", "tensorboard", "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert rc == 2 and "pip install tensorboard" in err and len(err.strip().splitlines()) == 1
        return
    tr = _run(run_cfg(tmp_path, stages=1, log_with="tensorboard", **{"train.lr": 1e-3}))
    assert stages_of(tr) and list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# -- scoring overlapped with sampling ------------------------------------------------------------------------------
def test_stage_scorer_hides_scoring_behind_sampling():
    """A reward that takes 0.15 s per batch, 'sampling' that takes 0.15 s per batch: in the background the
    caller waits for about one batch's scoring instead of all of them; same results, same order; errors
    surface at the next submit."""
    import time

    from b2diffurl.rewards import Reward
    from b2diffurl.rewards.background import StageScorer

    def slow(images, prompts):
        time.sleep(0.15)
        return images.mean((1, 2, 3))

    batches = [torch.full((2, 3, 4, 4), v) for v in (0.1, 0.5, 0.9)]
    waits = {}
    for overlap in (False, True):
        with StageScorer(Reward("slow", slow), overlap=overlap) as scorer:
            for b in batches:
                scorer.submit(b, ["p", "q"])
                time.sleep(0.15)  # the next batch's sampling
            got = [r.total.tolist() for r in scorer.results()]
        np.testing.assert_allclose(got, [[0.1, 0.1], [0.5, 0.5], [0.9, 0.9]], rtol=1e-6)
        m = scorer.metrics()
        assert m["reward_time_s"] >= 0.44
        waits[overlap] = m["reward_wait_time_s"] / m["reward_time_s"]
    assert waits[False] == 1.0 and waits[True] < 0.5, waits

    def broken(images, prompts):
        raise RuntimeError("scorer down")

    with StageScorer(Reward("broken", broken), overlap=True) as scorer:
        scorer.submit(batches[0], ["p", "q"])
        time.sleep(0.2)
        with pytest.raises(RuntimeError, match="scorer down"):
            scorer.submit(batches[1], ["p", "q"])


def test_overlapped_scoring_gives_the_same_run(tmp_path):
    from b2diffurl.report import is_timing_key

    runs = {}
    for mode in ("off", "on"):
        cfg = run_cfg(tmp_path / mode, stages=2, **{"train.lr": 1e-2, "sample.overlap_reward": mode})
        runs[mode] = [{k: v for k, v in r.items() if not is_timing_key(k)} for r in stages_of(_run(cfg))]
    assert runs["on"] == runs["off"]


def test_tensorboard_mirror_gets_every_numeric_metric(tmp_path, monkeypatch):
    """log_with=tensorboard: each stage record's numbers reach the writer as stage/<name> at the stage's step
    (a stand-in writer: the mirroring is ours, the event files are torch's)."""
    from b2diffurl import run_monitor

    scalars = []

    class Writer:
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(run_monitor, "check_tensorboard", lambda: None)
    monkeypatch.setattr(run_monitor, "open_summary_writer", lambda directory: Writer())
    tr = _run(run_cfg(tmp_path, stages=2, log_with="tensorboard", **{"train.lr": 1e-3}))
    recs = stages_of(tr)
    for rec in recs:
        got = {tag: v for tag, v, step in scalars if step == rec["stage"]}
        assert got["stage/reward_mean"] == pytest.approx(rec["reward_mean"])
        assert got["stage/hacking_alarm"] == 0.0 and "stage/kind" not in got
        assert {f"stage/{k}" for k, v in rec.items() if isinstance(v, (int, float)) and k != "stage"} == set(
            got
        )
