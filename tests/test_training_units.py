"""Training in the official units, DDPO's own statistics and presets, and the opt-in deviations.

Oracles: the official scripts' formulas (B²-DiffuRL run_train.py with accelerate's accumulation over
``gradient_accumulation_steps × split_step`` micro-steps; ddpo-pytorch's ``PerPromptStatTracker`` and its
"(8 × 4) / (4 × 2) = 4 gradient updates per epoch"), written out here independently of the library.
"""

from __future__ import annotations

import math
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from b2diffurl import config as C
from b2diffurl.algos.api import RunContext
from b2diffurl.algos.b2 import select_branches
from b2diffurl.algos.ppo import BufferStatTracker, lopsided_warning, ppo_update


class _Batch(SimpleNamespace):
    pass


class _CountingArena:
    """Just enough of TrajectoryArena for ppo_update: rows carry (id, step); old log-prob 0, advantage 1."""

    def gather(self, ids, steps, device=None):
        n = ids.numel()
        return _Batch(
            ids=ids,
            step=steps,
            logprob=torch.zeros(n),
            advantage=torch.ones(n),
        )


class _LinearSampler:
    """log π(row) = w · f(id, step): a model whose per-micro-step gradient is known in closed form."""

    def __init__(self, w):
        self.w = w

    def feature(self, ids, steps):
        return torch.stack([torch.sin(ids.float() + 0.3 * steps.float()), torch.cos(0.7 * steps.float())], 1)

    def batch_logprob(self, batch, cond_table):  # noqa: ARG002
        return self.feature(batch.ids, batch.step) @ self.w

    def forward_disagreement(self, ratio_dev_max):  # noqa: ARG002 - no sampling forward to compare with
        return None


def _ctx(train_overrides: dict, w: torch.nn.Parameter, steps_log: list):
    cfg = C.load_config(
        overrides={"preset": "official", **{f"train.{k}": v for k, v in train_overrides.items()}}
    )
    opt = torch.optim.SGD([w], lr=0.0)  # lr 0: count steps without moving w

    class Ctx(RunContext):
        def optimizer_step(self):
            steps_log.append(w.grad.detach().clone())
            return super().optimizer_step()

    return Ctx(
        cfg=cfg,
        policy=None,
        reward_fn=None,
        sampler=_LinearSampler(w),
        params=[w],
        optimizer=opt,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        train_prompts=["p"],
        device=torch.device("cpu"),
        noise_gen=torch.Generator().manual_seed(0),
        cpu_gen=torch.Generator().manual_seed(0),
    )


def official_b2_optimizer_steps(M: int, K: int, epochs: int, mb: int, accum: int) -> int:
    """B²-DiffuRL run_train.py: a fresh Accelerator per stage with gradient_accumulation_steps = accum × K;
    ``accumulate`` is entered once per (micro-batch, timestep), the optimizer steps when the running count
    reaches a multiple of accum × K, and the count carries over the inner epochs (no flush at the end)."""
    count, steps = 0, 0
    for _ in range(epochs):
        for _ in range(math.ceil(M / mb)):
            for _ in range(K):
                count += 1
                if count % (accum * K) == 0:
                    steps += 1
    return steps


@pytest.mark.parametrize(
    ("preset_algo", "M", "K"),
    [(("official", "b2"), 300, 3), (("official", "b2"), 64, 2), (("official", "ddpo"), 256, 2)],
)
def test_optimizer_steps_per_stage_match_the_official_count(preset_algo, M, K):
    preset, algo = preset_algo
    cfg = C.load_config(overrides={"preset": preset, "algo": algo})
    t = cfg.train
    if algo == "ddpo":
        # ddpo-pytorch dgx.py: 256 samples per epoch, (8·4)/(4·2) = 4 updates per GPU epoch on 8 GPUs → 4 total
        assert (t.micro_batch_size * t.grad_accum_steps, t.inner_epochs, t.clip_range, t.lr) == (
            64,
            1,
            1e-4,
            3e-4,
        )
        assert cfg.sample.prompts_per_stage * cfg.sample.branches == 256
    else:  # run_process.sh: AccStep 64, TrainEpoch 2, train.batch_size 2
        assert (t.micro_batch_size, t.grad_accum_steps, t.inner_epochs) == (2, 64, 2)
    w = torch.nn.Parameter(torch.tensor([0.5, -0.25]))
    log: list = []
    ctx = _ctx(
        {
            "micro_batch_size": t.micro_batch_size,
            "grad_accum_steps": t.grad_accum_steps,
            "inner_epochs": t.inner_epochs,
        },
        w,
        log,
    )
    out = ppo_update(ctx, _CountingArena(), torch.arange(M), torch.arange(K), torch.zeros(1, 1, 1))
    want = official_b2_optimizer_steps(M, K, t.inner_epochs, t.micro_batch_size, t.grad_accum_steps)
    assert out["optimizer_steps"] == want == len(log)
    assert out["micro_steps"] == t.inner_epochs * math.ceil(M / t.micro_batch_size) * K
    assert out["dropped_micro_steps"] == out["micro_steps"] - want * t.grad_accum_steps * K


def test_one_optimizer_step_averages_every_trained_step_of_its_micro_batches():
    """The accumulated gradient equals the mean of the per-(micro-batch, step) PPO gradients (ratio 1 at w,
    so d loss/dw = −mean_rows(A · f)) over the group: computed here in closed form from the features."""
    w = torch.nn.Parameter(torch.tensor([0.5, -0.25]))
    log: list = []
    M, K, mb, accum = 6, 3, 2, 3  # one full group of 3 micro-batches × 3 steps per epoch
    ctx = _ctx({"micro_batch_size": mb, "grad_accum_steps": accum, "inner_epochs": 1}, w, log)
    # zero old log-prob: ratio = exp(w·f) != 1, so use the exact PPO gradient at the clip-free point instead
    ctx.cfg.train.clip_range = 1e9
    out = ppo_update(ctx, _CountingArena(), torch.arange(M), torch.arange(K), torch.zeros(1, 1, 1))
    assert out["optimizer_steps"] == 1
    ids = torch.arange(M).repeat_interleave(K)
    steps = torch.arange(K).repeat(M)
    f = ctx.sampler.feature(ids, steps)
    ratio = torch.exp(f @ w.detach())
    # loss per micro-step = mean over its mb rows of −A·ratio; group loss = mean over the 9 micro-steps
    want = -(ratio[:, None] * f).sum(0) / (mb * accum * K)
    torch.testing.assert_close(log[0], want, rtol=1e-5, atol=1e-7)


def test_flush_partial_accum_applies_the_leftover_group():
    w = torch.nn.Parameter(torch.tensor([0.5, -0.25]))
    log: list = []
    ctx = _ctx(
        {"micro_batch_size": 2, "grad_accum_steps": 4, "inner_epochs": 1, "flush_partial_accum": True}, w, log
    )
    out = ppo_update(ctx, _CountingArena(), torch.arange(10), torch.arange(2), torch.zeros(1, 1, 1))
    # 5 micro-batches: one full group of 4 and a flushed group of 1
    assert out["optimizer_steps"] == 2 and out["dropped_micro_steps"] == 0


def ddpo_pytorch_advantages(history, prompts, rewards, buffer_size, min_count):
    """kvablack/ddpo-pytorch PerPromptStatTracker.update, re-derived: deque(maxlen) per prompt, np.std (N),
    + 1e-6, whole-batch statistics while a prompt has fewer than min_count rewards."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    adv = np.empty_like(rewards)
    for p in np.unique(prompts):
        mine = rewards[prompts == p]
        history.setdefault(p, deque(maxlen=buffer_size)).extend(mine)
        pool = np.asarray(history[p]) if len(history[p]) >= min_count else rewards
        adv[prompts == p] = (mine - pool.mean()) / (pool.std() + 1e-6)
    return adv


def test_buffer_tracker_matches_ddpo_pytorch_over_several_stages():
    rng = np.random.default_rng(0)
    ours, theirs = BufferStatTracker(16, 6), {}
    for stage in range(6):
        prompts = [f"p{i}" for i in rng.integers(0, 4, size=10)]
        rewards = rng.normal(stage * 0.3, 1.0, size=10)
        np.testing.assert_allclose(
            ours.update(prompts, rewards),
            ddpo_pytorch_advantages(theirs, prompts, rewards, 16, 6),
            rtol=1e-12,
        )
    restored = BufferStatTracker(1, 1)
    restored.load_state_dict(ours.state_dict())
    prompts, rewards = ["p0", "p1", "p0"], [0.1, 0.9, -0.3]
    np.testing.assert_allclose(restored.update(prompts, rewards), ours.update(prompts, rewards))


def test_group_centering_drops_tied_groups_and_keeps_the_official_rule_by_default():
    # group 0 ties (all 1.2: the prefix fixed the outcome), group 1 has a spread
    z = np.array([[1.2, 1.2, 1.2, 1.2], [0.9, -0.9, 0.1, -0.1]])
    rows, _ = select_branches(z, 0.5, -0.5)
    assert 0 in rows  # official: the tied group still yields a "positive" at branch 0
    rows_c, pos_c = select_branches(z - z.mean(axis=1, keepdims=True), 0.5, -0.5)
    assert rows_c.tolist() == [4, 5] and pos_c.tolist() == [True, False]


def test_lopsided_warning():
    assert lopsided_warning(np.array([-1.0] * 19 + [1.0]), 3) is not None
    assert lopsided_warning(np.array([-1.0] * 10 + [1.0] * 10), 3) is None
    assert lopsided_warning(np.array([-1.0] * 3), 3) is None  # too few to judge


def test_min_step_sigma_matches_the_ddim_formula():
    from diffusers import DDIMScheduler

    from b2kernels.ops.ddim_logprob import DDIMTable

    s = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=False,
        steps_offset=1,
        clip_sample=False,
    )
    s.set_timesteps(20)
    table = DDIMTable.from_scheduler(s)
    want = torch.tensor([s._get_variance(int(t), int(t) - 1000 // 20) ** 0.5 for t in s.timesteps])
    torch.testing.assert_close(table.sigmas(1.0), want.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(table.sigmas(0.5), 0.5 * want.float(), rtol=1e-5, atol=1e-7)


def test_a_toy_checkpoint_folder_gets_the_toy_preset_and_a_full_fine_tune(tmp_path):
    """A retrained toy (``b2diffurl.toy.pretrain --out DIR``) is the toy world: preset 'auto' picks 'toy' and
    lora 'auto' a full fine-tune, as for the embedded checkpoint. A folder without the toy entry stays a real
    model (preset 'official', LoRA)."""
    import json
    import shutil

    from b2diffurl.config.loading import resolve_preset
    from b2diffurl.toy import CHECKPOINT_DIR, is_toy_checkpoint
    from b2diffurl.trainer import Trainer

    toy = tmp_path / "toy"
    shutil.copytree(CHECKPOINT_DIR, toy)
    real = tmp_path / "real"
    real.mkdir()
    (real / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert is_toy_checkpoint("toy") and is_toy_checkpoint(toy)
    assert not is_toy_checkpoint(real) and not is_toy_checkpoint(tmp_path / "missing")
    assert resolve_preset(C.load_config(overrides={"model.path": str(toy)})) == "toy"
    assert resolve_preset(C.load_config(overrides={"model.path": str(real)})) == "official"
    cfg = C.load_config(overrides={"model.path": str(toy), "out": str(tmp_path / "run"), "stages": 1})
    assert Trainer(cfg).lora is False


# ---- non-finite gradients and float16 loss scaling (RunContext.backward / optimizer_step) ----------------------
def _step_ctx(w: torch.nn.Parameter, opt, scaler=None) -> RunContext:
    return RunContext(
        cfg=C.load_config(overrides={"preset": "official"}),
        policy=None,
        reward_fn=None,
        sampler=None,
        params=[w],
        optimizer=opt,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0 / (n + 1)),
        train_prompts=["p"],
        device=torch.device("cpu"),
        noise_gen=torch.Generator().manual_seed(0),
        cpu_gen=torch.Generator().manual_seed(0),
        scaler=scaler,
    )


def test_a_non_finite_gradient_skips_the_step_and_leaves_weights_moments_and_schedule_alone(caplog):
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0)
    ctx = _step_ctx(w, opt)
    w.grad = torch.tensor([1.0, float("nan"), -1.0])
    with caplog.at_level("WARNING", logger="b2diffurl.algos.api"):
        ctx.optimizer_step()
    assert torch.equal(w.detach(), torch.ones(3))  # no NaN written into the weights
    assert not opt.state and ctx.lr_scheduler.last_epoch == 0 and ctx.skipped_steps == 1
    assert w.grad is None and any("non-finite gradient" in m for m in caplog.messages)
    # the next finite step is AdamW's first step, by its closed form: w - lr * g / (|g| + eps)
    w.grad = torch.tensor([0.5, -0.25, 0.0])
    ctx.optimizer_step()
    expect = torch.ones(3) - 0.1 * torch.tensor([0.5, -0.25, 0.0]) / (torch.tensor([0.5, 0.25, 0.0]) + 1e-8)
    assert torch.allclose(w.detach(), expect, atol=1e-6) and ctx.skipped_steps == 1
    assert ctx.lr_scheduler.last_epoch == 1


@pytest.mark.parametrize("scaled", [True, False])
def test_float16_loss_scaling_keeps_gradients_that_float16_would_flush_to_zero(scaled):
    """Float32 weights used through a float16 forward (LoRA on a float16 UNet): a gradient of 1e-8·x reaches
    them through float16 activations, below float16's smallest subnormal (6e-8). With the scaler it arrives
    intact (closed form: d/dw of 1e-8·Σ w·x is 1e-8·x); without it, it is flushed to zero."""
    x = torch.tensor([1.0, -2.0, 3.0, 0.5])
    w = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([w], lr=1e6)
    ctx = _step_ctx(w, opt, scaler=torch.amp.GradScaler("cpu") if scaled else None)
    loss = (w.half() * x.half()).float().sum() * 1e-8
    ctx.backward(loss)
    ctx.optimizer_step()
    if scaled:
        assert torch.allclose(w.detach(), -1e6 * 1e-8 * x, rtol=2e-3)
        assert ctx.skipped_steps == 0
    else:
        assert torch.equal(w.detach(), torch.zeros(4))


def test_an_overflowing_float16_step_is_skipped_and_the_scale_backs_off():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    ctx = _step_ctx(w, opt, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    ctx.backward((w.half() * 1e4).float().sum())  # 1e4 · 2^16 overflows float16 on the way back
    ctx.optimizer_step()
    assert torch.equal(w.detach(), torch.ones(2)) and ctx.skipped_steps == 1
    assert ctx.scaler.get_scale() == 2.0**15  # GradScaler's backoff factor 0.5
    ctx.backward((w.half() * 1.0).float().sum())
    ctx.optimizer_step()
    # gradient (1, 1) clipped to norm 1 (train.max_grad_norm), then one SGD step of 0.1
    assert torch.allclose(w.detach(), torch.full((2,), 1 - 0.1 / 2**0.5)) and ctx.skipped_steps == 1
