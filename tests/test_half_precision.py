"""Half precision end to end on CPU (bf16, and fp16 where CPU kernels exist): sampling (noise, latents, arena in
the policy dtype, log-probs fp32), B²/DDPO and D-Fusion stages, load_policy's dtype, model-folder errors, and
the warning when the sampling and training forwards disagree."""

from __future__ import annotations

import pytest
import torch
from test_models import _tiny_sd_folder
from tiny_policy import brightness_reward, one_stage_overrides, tiny_policy

from b2diffurl import config as C
from b2diffurl.cli import main
from b2diffurl.models import ModelError, load_policy
from b2diffurl.sampling import RATIO_TOLERANCE, TreeSampler

HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPTS = ["a red circle", "a blue circle", "a green circle"]


def _half_or_skip(fn):
    """Run ``fn``; skip when this CPU build has no kernel for the dtype (fp16 convolutions on some builds)."""
    try:
        return fn()
    except (RuntimeError, NotImplementedError) as e:
        if "not implemented for" in str(e) and ("Half" in str(e) or "BFloat16" in str(e)):
            pytest.skip(f"no CPU kernel in this torch build: {str(e).splitlines()[0]}")
        raise


def _trainer(tmp_path, algo, dtype, lora="on", **over):
    from b2diffurl.trainer import Trainer

    cfg = C.load_config(
        overrides=one_stage_overrides(
            tmp_path / "run",
            algo,
            **{
                "model.lora": lora,
                "model.dtype": dtype,
                "dfusion.object_words": ["circle"],
                "dfusion.samples_per_prompt": 4,
                "dfusion.mask_grid": 8,
                **over,
            },
        )
    )
    policy = tiny_policy(dtype=HALF.get(dtype, torch.float32))
    return Trainer(cfg, policy=policy, reward_fn=brightness_reward, train_prompts=PROMPTS)


@pytest.mark.parametrize("dtype", sorted(HALF))
def test_tree_sampling_keeps_the_policy_dtype_and_fp32_logprobs(dtype):
    from b2kernels.buffer import TrajectoryArena

    policy = tiny_policy(dtype=HALF[dtype])
    sampler = TreeSampler(policy, num_steps=3, guidance_scale=3.0)
    arena = TrajectoryArena(policy.latent_shape, num_steps=3, max_trees=2, branches=2, dtype=sampler.dtype)
    ids = arena.add_trees(torch.tensor([0, 1]), 1)
    cond = policy.encode_prompts(PROMPTS[:2])
    out = _half_or_skip(
        lambda: sampler.sample_trees(
            cond, split_step=1, branches=2, generator=torch.Generator().manual_seed(0), arena=arena, ids=ids
        )
    )
    assert out.latents.dtype == HALF[dtype] and out.logprobs.dtype == torch.float32
    assert torch.isfinite(out.logprobs).all()
    # the same weights in fp32 with the same (fp32-drawn) noise give the same trajectory up to half precision
    ref = TreeSampler(tiny_policy(dtype=torch.float32), num_steps=3, guidance_scale=3.0)
    ref_out = ref.sample_trees(
        cond.float(), split_step=1, branches=2, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out.latents.float(), ref_out.latents, atol=0.1, rtol=0.05)
    # the training forward on the stored transitions reproduces the sampling log-probs (ratio 1)
    batch = arena.gather(ids, torch.full_like(ids, 2))
    lp = sampler.batch_logprob(batch, cond)
    assert lp.dtype == torch.float32
    assert (torch.exp(lp - batch.logprob) - 1).abs().max() <= RATIO_TOLERANCE[HALF[dtype]]


@pytest.mark.parametrize("algo", ["b2", "ddpo", "dfusion"])
@pytest.mark.parametrize("dtype", sorted(HALF))
def test_a_half_precision_stage_trains_lora_in_fp32(tmp_path, algo, dtype, caplog):
    tr = _trainer(tmp_path, algo, dtype)
    assert tr.algo.arena.dtype == HALF[dtype] and tr.sampler.dtype == HALF[dtype]
    lora = [p for p in tr.policy.unet.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    before = [p.detach().clone() for p in lora]
    with caplog.at_level("WARNING", logger="b2diffurl.algos.ppo"):
        data = _half_or_skip(lambda: tr.algo.sample_stage(0))
        out = tr.algo.train_stage(0, data)
    assert out["optimizer_steps"] > 0 and torch.isfinite(torch.tensor(out["loss"]))
    if "ratio_dev_max" in out:  # PPO: the pre-update pass reproduces sampling within the half tolerance
        assert out["ratio_dev_max"] <= RATIO_TOLERANCE[HALF[dtype]]
        assert "forwards disagree" not in caplog.text
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, lora))
    assert all(torch.isfinite(p).all() for p in lora)


def test_a_half_precision_full_fine_tune_is_refused_before_work(tmp_path):
    with pytest.raises(C.ConfigError, match=r"model.dtype=bfloat16 with a full fine-tune.*model.lora=on"):
        _trainer(tmp_path, "b2", "bfloat16", lora="off")


def test_load_policy_takes_a_dtype_name_for_every_module():
    policy = load_policy("toy", dtype="bfloat16")
    dtypes = {p.dtype for m in (policy.unet, policy.text_encoder) for p in m.parameters()}
    assert dtypes == {torch.bfloat16} and policy.encode_prompts(["a red circle"]).dtype == torch.bfloat16
    with pytest.raises(ModelError, match="dtype 'half' is unknown"):
        load_policy("toy", dtype="half")


def test_sample_and_eval_cli_run_in_bf16(tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["--model", "toy", "--device", "cpu", "--dtype", "bfloat16", "--steps", "2"]
    assert main(["sample", *argv, "--prompt", "a red circle", "--n", "2", "--out", str(out)]) == 0
    assert out.is_file()
    report = tmp_path / "eval.json"
    evaluate = ["eval", *argv, "--reward", "toy", "--prompts", "toy:heldout", "--max-prompts", "2"]
    assert (
        main([*evaluate, "--n-per-prompt", "1", "--out", str(tmp_path / "e.png"), "--json", str(report)]) == 0
    )
    assert report.is_file()


# ----------------------------------------------------------------------------------------------- model errors
def test_a_malformed_model_folder_is_one_line_exit_2(tmp_path, capsys):
    root = _tiny_sd_folder(tmp_path / "sd")
    weights = next((root / "unet").glob("diffusion_pytorch_model.*"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    with pytest.raises(ModelError, match=r"cannot load unet/ of model folder"):
        load_policy(str(root))
    capsys.readouterr()
    rc = main(["sample", "--model", str(root), "--prompt", "a", "--n", "1", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot load unet/" in err and "Traceback" not in err
    assert main(["sample", "--model", str(tmp_path / "nope"), "--prompt", "a"]) == 2
    assert "neither 'toy' nor an existing diffusers folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- ratio check
def test_disagreeing_forwards_are_warned_about(tmp_path, caplog):
    tr = _trainer(tmp_path, "b2", "float32")
    data = tr.algo.sample_stage(0)
    with torch.no_grad():  # the training forward no longer is the sampling one
        tr.policy.unet.conv_in.bias.add_(0.05)
    with caplog.at_level("WARNING", logger="b2diffurl.algos.ppo"):
        out = tr.algo.train_stage(0, data)
    assert out["ratio_dev_max"] > RATIO_TOLERANCE[torch.float32]
    assert "the sampling and training forwards disagree" in caplog.text
    assert "(tolerance 1e-05 in float32)" in caplog.text


def test_a_float16_lora_run_scales_its_loss_and_resumes_with_the_scale(tmp_path):
    """model.dtype=float16 + LoRA: the trainer hands algorithms a GradScaler, logs its scale each stage and
    keeps it in the checkpoint, and a resumed run starts from the saved scale; float32 runs have none."""
    from b2diffurl.trainer import Trainer

    over = one_stage_overrides(
        tmp_path / "run", **{"model.lora": "on", "model.dtype": "float16", "stages": 2}
    )
    tr = Trainer(
        C.load_config(overrides={**over, "checkpoint_every": 1}),
        policy=tiny_policy(dtype=torch.float16),
        reward_fn=brightness_reward,
        train_prompts=["a red circle", "a blue square"],
    )
    assert isinstance(tr.ctx.scaler, torch.amp.GradScaler)
    assert _half_or_skip(tr.run)["status"] == "finished"
    recs = tr.metrics.of_kind("stage")
    assert all(r["loss_scale"] > 0 and r["skipped_steps"] >= 0 for r in recs)
    # a scale no run starts from: the resumed run must read it from the checkpoint
    tr.ctx.scaler.update(1024.0)
    saved = tr.save_checkpoint(3)
    assert torch.load(saved / "state.pt", weights_only=False)["scaler"]["scale"] == 1024.0
    resumed = Trainer(
        C.load_config(overrides={**over, "stages": 4}),
        policy=tiny_policy(dtype=torch.float16),
        reward_fn=brightness_reward,
        train_prompts=["a red circle", "a blue square"],
        resume=str(tmp_path / "run"),
    )
    assert resumed.start_stage == 3 and resumed.ctx.scaler.get_scale() == 1024.0
    plain = Trainer(
        C.load_config(overrides=one_stage_overrides(tmp_path / "plain")),
        policy=tiny_policy(),
        reward_fn=brightness_reward,
        train_prompts=["a red circle"],
    )
    assert plain.ctx.scaler is None
