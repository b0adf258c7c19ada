"""Trainer: exact resume (SIGTERM and kill-between-checkpoints), atomic checkpoints, bad configs, CLI."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from tiny_policy import brightness_reward, three_stage_overrides, tiny_policy

from b2diffurl import config as C
from b2diffurl.report import is_timing_key
from b2diffurl.trainer import Trainer

T = 4
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "three yellow circles"]


def cfg_for(out, **over):
    """The tiny 3-stage run with a grid and a checkpoint after every stage."""
    over = {"model.lora": "off", "grid_every": 1, "checkpoint_every": 1, **over}
    return C.load_config(overrides=three_stage_overrides(out, T, **over))


def trainer(cfg, resume=None, reward=brightness_reward):
    return Trainer(cfg, policy=tiny_policy(), reward_fn=reward, train_prompts=PROMPTS, resume=resume)


def stage_metrics(out):
    rows = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not is_timing_key(k)} for r in rows]


def params(tr):
    return {n: p.detach().clone() for n, p in tr.policy.unet.named_parameters()}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    tr = trainer(cfg_for(out))
    summary = tr.run()
    return out, summary, params(tr)


def test_uninterrupted_run_outputs(reference_run):
    out, summary, _ = reference_run
    assert summary["status"] == "finished" and summary["stages_done"] == 3
    m = stage_metrics(out)
    assert [r["stage"] for r in m] == [0, 1, 2]
    for r in m:
        assert r["ratio_dev_max"] <= 1e-5
        assert {"reward_mean", "reward_std", "n_pos", "n_neg", "loss", "approx_kl"} <= set(r)
    assert (out / "reward_curve.png").is_file() and (out / "grids" / "stage_00000.png").is_file()
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "stage_00003"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_then_resume_is_exact(reference_run, tmp_path, signum):
    ref_out, _, ref_params = reference_run
    calls = {"n": 0}

    def reward_with_sigterm(images, prompts):
        calls["n"] += 1
        if calls["n"] == 3:  # stage 1's second sampling batch: the signal arrives mid-stage
            os.kill(os.getpid(), signum)
        return brightness_reward(images, prompts)

    cfg = cfg_for(tmp_path, checkpoint_every=0)
    first = trainer(cfg, reward=reward_with_sigterm).run()
    # the stop lands at stage 1's next sampling batch: stage 1 is redone from its saved start
    assert first["status"] == "interrupted" and first["stages_done"] == 1
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "stage_00001"
    tr = trainer(cfg, resume=str(tmp_path))
    assert tr.start_stage == 1
    second = tr.run()
    assert second["status"] == "finished"
    assert stage_metrics(tmp_path) == stage_metrics(ref_out)
    got = params(tr)
    assert all(torch.equal(got[n], v) for n, v in ref_params.items())


def test_kill_between_checkpoints_then_resume_is_exact(reference_run, tmp_path):
    """A run killed after stage 2 was logged but before its checkpoint: resume from stage_00001 redoes 1..2."""
    ref_out, _, ref_params = reference_run
    import shutil

    shutil.copytree(ref_out, tmp_path, dirs_exist_ok=True)
    (tmp_path / "checkpoints" / "LATEST").write_text("stage_00001\n")
    shutil.rmtree(tmp_path / "checkpoints" / "stage_00002")
    shutil.rmtree(tmp_path / "checkpoints" / "stage_00003")
    tr = trainer(cfg_for(tmp_path), resume=str(tmp_path))
    assert tr.start_stage == 1 and len(stage_metrics(tmp_path)) == 1  # later lines truncated
    tr.run()
    assert stage_metrics(tmp_path) == stage_metrics(ref_out)
    got = params(tr)
    assert all(torch.equal(got[n], v) for n, v in ref_params.items())


def test_crash_during_checkpoint_keeps_last_good(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, stages=2)
    tr = trainer(cfg)
    tr.save_checkpoint(1)
    good = torch.load(tmp_path / "checkpoints" / "stage_00001" / "state.pt", weights_only=False)
    import b2diffurl.trainer as trainer_mod

    def broken_save(obj, path, *a, **k):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trainer_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        tr.save_checkpoint(2)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "stage_00001"
    assert not (tmp_path / "checkpoints" / "stage_00002").exists()
    again = trainer(cfg, resume=str(tmp_path))
    assert again.start_stage == 1
    assert all(
        torch.equal(dict(again.policy.unet.named_parameters())[n], v) for n, v in good["model"].items()
    )


# ---------------------------------------------------------------------------------------------- bad configs
@pytest.mark.parametrize(
    "over,msg",
    [
        ({"b2.k_lft": 3}, "unknown config key 'b2.k_lft'.*b2.k_left"),
        ({"b2.k_right": 25}, "k_right=25 exceeds sample.num_steps=10"),
        ({"sample.branches": 1}, "branches >= 2"),
        ({"sample.eta": 0.0}, r"sample.eta must be in \(0, 1\], got 0.0"),
        ({"model.path": "/nonexistent/sd15"}, "neither 'toy' nor an existing diffusers folder"),
        ({"reward": "imagereward"}, "unknown reward 'imagereward'"),
        ({"stages": "ten"}, "stages: expected int"),
    ],
    ids=["unknown-key", "k_right>T", "B<2", "eta0", "model-path", "reward", "type"],
)
def test_bad_configs_fail_with_clear_message(over, msg):
    with pytest.raises(C.ConfigError, match=msg):
        C.load_config(overrides=over)


def test_preset_and_precedence(tmp_path):
    toy = C.load_config()
    b2_toy = C.ALGO_PRESETS[("toy", "b2")]  # the default algorithm's values under the toy preset win
    assert toy.preset == "toy" and toy.algo == "b2"
    assert (toy.stages, toy.train.lr) == (b2_toy["stages"], b2_toy["train.lr"])
    dfusion = C.load_config(overrides={"algo": "dfusion"})
    assert (dfusion.stages, dfusion.train.lr) == (C.PRESETS["toy"]["stages"], C.PRESETS["toy"]["train.lr"])
    y = tmp_path / "run.yaml"
    y.write_text("stages: 7\nsample:\n  branches: 3\n")
    cfg = C.load_config(str(y), ["sample.branches=6"])
    assert (
        cfg.stages == 7
        and cfg.sample.branches == 6
        and cfg.sample.prompts_per_stage == C.PRESETS["toy"]["sample.prompts_per_stage"]
    )
    off = C.load_config(overrides={"preset": "official"})
    assert (off.stages, off.sample.prompts_per_stage, off.sample.branches, off.train.grad_accum_steps) == (
        100,
        256,
        5,
        64,
    )
    assert C.from_dict(C.to_dict(cfg)) == cfg


def _cli(argv):
    from b2diffurl.cli import main

    return main(argv)


def test_cli_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        _cli(["train", "--help"])
    text = capsys.readouterr().out
    for key, *_ in C.iter_fields():
        assert f"  {key} (default" in text, key


def test_cli_bad_config_fails_before_sampling(tmp_path, capsys):
    rc = _cli(["train", "--set", "sample.eta=0", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "sample.eta must be in (0, 1]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_smoke_one_stage(tmp_path, monkeypatch, capsys):
    """`b2diffurl train --set stages=1 ...` end to end (policy and reward patched to the tiny test ones)."""
    import b2diffurl.trainer as trainer_mod

    real = trainer_mod.Trainer

    def patched(cfg, **kw):
        return real(cfg, policy=tiny_policy(), reward_fn=brightness_reward, train_prompts=PROMPTS, **kw)

    monkeypatch.setattr(trainer_mod, "Trainer", patched)
    rc = _cli(
        [
            "train",
            "--algo",
            "ddpo",
            "--out",
            str(tmp_path),
            "--set",
            "stages=1",
            "--set",
            "sample.num_steps=4",
            "--set",
            "sample.prompts_per_stage=2",
            "--set",
            "sample.branches=2",
            "--set",
            "eval.prompts=none",
            "--set",
            "progress=false",
            "--set",
            "model.lora=off",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{") :])
    assert summary["status"] == "finished" and summary["stages_done"] == 1
    assert stage_metrics(tmp_path)[0]["stage"] == 0
    assert (tmp_path / "checkpoints" / "LATEST").is_file() and (tmp_path / "config.yaml").is_file()
    # `train --resume DIR --set stages=2` continues the same run (its saved config) for one more stage
    assert _cli(["train", "--resume", str(tmp_path), "--set", "stages=2"]) == 0
    assert [r["stage"] for r in stage_metrics(tmp_path)] == [0, 1]
    assert stage_metrics(tmp_path)[1]["split_step"] == T  # still DDPO: the algo came from the saved config


def test_paired_gain_hand_values():
    from b2diffurl.report import paired_gain

    g = paired_gain([0.5, 0.5, 1.0, 0.0], [0.75, 0.5, 0.5, 0.5])  # differences 0.25, 0, -0.5, 0.5
    assert g["gain"] == pytest.approx(0.0625)
    # unbiased std of the differences = sqrt(0.546875 / 3); s.e. = that / 2
    assert g["gain_se"] == pytest.approx((0.546875 / 3) ** 0.5 / 2)
    assert (g["n_better"], g["n_worse"]) == (2, 1)


def test_final_eval_is_paired_with_the_first(tmp_path):
    cfg = cfg_for(
        tmp_path, **{"stages": 1, "eval.prompts": "toy", "eval.num_prompts": 3, "eval.images_per_prompt": 2}
    )
    tr = Trainer(
        cfg,
        policy=tiny_policy(),
        reward_fn=brightness_reward,
        train_prompts=PROMPTS,
        heldout_prompts=PROMPTS[1:],
    )
    summary = tr.run()
    ev = [r for r in stage_metrics(tmp_path) if r["kind"] == "eval"]
    assert len(ev) == 2 and len(ev[0]["rewards"]) == 6 and "gain" not in ev[0]
    # the mean of the per-image differences is the difference of the means (same images, same order)
    assert summary["heldout_gain"] == pytest.approx(
        summary["heldout_after"] - summary["heldout_before"], abs=1e-5
    )
    assert ev[1]["n_better"] + ev[1]["n_worse"] <= 6 and summary["heldout_gain_se"] >= 0


def test_heldout_eval_scores_the_gold_reward_on_the_same_images(tmp_path):
    """A gold reward that is a known function of the training reward (2r + 0.5) must come out as exactly that
    function of the logged per-image rewards, in the same order, and its paired change as twice the reward's."""
    over = {
        "stages": 1,
        "eval.prompts": "toy",
        "eval.num_prompts": 3,
        "eval.images_per_prompt": 2,
        "grid_every": 1,
    }
    cfg = cfg_for(tmp_path, **over)
    tr = Trainer(
        cfg,
        policy=tiny_policy(),
        reward_fn=brightness_reward,
        gold_fn=lambda images, prompts: 2.0 * brightness_reward(images, prompts) + 0.5,
        train_prompts=PROMPTS,
        heldout_prompts=PROMPTS[1:],
    )
    summary = tr.run()
    ev = [r for r in stage_metrics(tmp_path) if r["kind"] == "eval"]
    assert len(ev) == 2 and "gold_gain" not in ev[0]
    for rec in ev:
        assert rec["gold_rewards"] == pytest.approx([2 * v + 0.5 for v in rec["rewards"]], abs=1e-5)
        assert rec["gold_mean"] == pytest.approx(2 * rec["reward_mean"] + 0.5, abs=1e-5)
    assert ev[1]["gold_gain"] == pytest.approx(2 * ev[1]["gain"], abs=1e-5)
    assert ev[1]["gold_gain_se"] == pytest.approx(2 * ev[1]["gain_se"], abs=1e-5)
    assert summary["heldout_gold_gain"] == pytest.approx(ev[1]["gold_gain"])
    # each evaluation leaves a grid of its held-out images, captioned with their prompts (2 per prompt)
    for stage in (0, 1):
        grid = tmp_path / "grids" / f"heldout_{stage:05d}.png"
        assert grid.is_file()
        captions = grid.with_suffix(".txt").read_text().splitlines()
        assert len(captions) == 6 and captions[0::2] == captions[1::2] and len(set(captions)) == 3


def test_auto_gold_skips_held_out_prompts_the_toy_reward_cannot_score(tmp_path):
    """'auto' picks the toy reward as gold from toy training prompts; held-out prompts outside the toy's grammar
    are still evaluated with the training reward, without the gold (which would raise on them)."""
    from b2diffurl.rewards import get_reward

    with pytest.raises(ValueError):
        get_reward("toy")(torch.zeros(1, 3, 32, 32), ["a photo of a cat"])  # the failure being avoided
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("a photo of a cat\n")
    over = {"stages": 1, "eval.prompts": str(heldout), "eval.num_prompts": 1, "eval.images_per_prompt": 2}
    tr = Trainer(
        cfg_for(tmp_path / "run", **over),
        policy=tiny_policy(),
        reward_fn=brightness_reward,
        train_prompts=PROMPTS,
    )
    assert tr.run()["status"] == "finished"
    ev = [r for r in stage_metrics(tmp_path / "run") if r["kind"] == "eval"]
    assert len(ev) == 2 and all("gold_rewards" not in r and len(r["rewards"]) == 2 for r in ev)
    assert any(
        r.get("gold_mean") is not None for r in stage_metrics(tmp_path / "run") if r["kind"] == "stage"
    )


def test_keep_checkpoints_prunes_old_ones_and_resume_still_works(tmp_path):
    out = tmp_path / "run"
    trainer(cfg_for(out, keep_checkpoints=2)).run()  # checkpoints after stages 1, 2, 3
    kept = sorted(p.name for p in (out / "checkpoints").glob("stage_*"))
    assert kept == ["stage_00002", "stage_00003"]
    tr = trainer(cfg_for(out, stages=4, keep_checkpoints=2), resume=str(out))
    assert tr.start_stage == 3
    tr.run()
    assert sorted(p.name for p in (out / "checkpoints").glob("stage_*")) == ["stage_00003", "stage_00004"]


def test_negative_keep_checkpoints_is_refused(tmp_path):
    with pytest.raises(C.ConfigError, match=r"keep_checkpoints must be in \[0, inf\)"):
        C.validate(cfg_for(tmp_path, keep_checkpoints=-1))
