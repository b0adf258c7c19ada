"""D3PO training on D-Fusion pairs: loss vs hand computation, clamp, ties, zero gradient on unfused steps,
LoRA-disabled reference = base model, weights change, ``train --algo dfusion`` through the shared trainer."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from dfusion_reference import randomize_lora, toy_policy, toy_reward

from b2diffurl.algos import dfusion as D
from b2diffurl.algos import dpo
from b2diffurl.config import DFusionConfig

T = 5
PROMPTS = ["a blue square to the left of a green triangle"]


def _sampler(policy):
    from b2diffurl.sampling import TreeSampler

    return TreeSampler(policy, num_steps=T, guidance_scale=5.0, eta=1.0)


@pytest.fixture(scope="module")
def staged():
    """A LoRA policy (random B so LoRA on ≠ off), its base copy, and one stage of D-Fusion pairs."""
    from b2kernels.buffer import TrajectoryArena

    policy = toy_policy()
    base_unet = copy.deepcopy(policy.unet)
    policy.add_lora()
    randomize_lora(policy)
    sampler = _sampler(policy)
    arena = TrajectoryArena(policy.latent_shape, num_steps=T, max_trees=16, branches=1, backend="python")
    stage = D.generate_pairs(
        sampler,
        PROMPTS,
        DFusionConfig(samples_per_prompt=4, mask_threshold=0.0625),
        reward_fn=toy_reward,
        arena=arena,
        run_seed=5,
    )
    return policy, base_unet, sampler, arena, stage


# ----------------------------------------------------------------------------------------------- the loss
def test_d3po_loss_hand_computation():
    beta, eps = 0.1, 0.1
    lw = torch.tensor([-1.00, -1.00, 0.30, -2.0], requires_grad=True)
    ll = torch.tensor([-1.02, -0.90, 0.00, -2.0], requires_grad=True)
    rw = torch.tensor([-1.01, -1.00, 0.00, -2.0])
    rl = torch.tensor([-1.01, -1.00, 0.20, -2.0])
    got = dpo.d3po_loss(lw, ll, rw, rl, beta=beta, eps=eps)

    def hand(a, b, c, d):
        r_w = min(max(math.exp(a - c), 1 - eps), 1 + eps)
        r_l = min(max(math.exp(b - d), 1 - eps), 1 + eps)
        return -math.log(1 / (1 + math.exp(-beta * (math.log(r_w) - math.log(r_l)))))

    want = torch.tensor([hand(*v) for v in zip(lw.tolist(), ll.tolist(), rw.tolist(), rl.tolist())])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert got[3].item() == pytest.approx(math.log(2), abs=1e-7)  # tie: no preference
    got.sum().backward()
    # row 2: ℓθ−ℓref = +0.3 (w) and −0.2 (l) are both outside [log 0.9, log 1.1]: the clamp cuts the gradient
    assert lw.grad[2] == 0 and ll.grad[2] == 0
    assert lw.grad[0] < 0 < ll.grad[0]  # pushes w up, l down


def test_sum_reduction_is_mean_times_numel(staged):
    policy, _, sampler, arena, stage = staged
    ids, steps = stage.target_ids[:2], [2, 3]
    m, s = (
        dpo.reference_logprobs(sampler, arena, ids, steps, stage.cond, reduction=reduction)
        for reduction in ("mean", "sum")
    )
    torch.testing.assert_close(s, m * math.prod(policy.latent_shape))


# ----------------------------------------------------------------------------------------------- reference policy
def test_lora_disabled_reference_equals_base_model(staged):
    policy, base_unet, sampler, arena, stage = staged
    ids = torch.cat([stage.target_ids[:2], stage.base_ids[:1]])
    steps = [0, 2, 4]
    ref = dpo.reference_logprobs(sampler, arena, ids, steps, stage.cond, batch_size=4)
    b = arena.gather(ids.repeat_interleave(3), torch.tensor(steps).repeat(3))
    base_policy = copy.copy(policy)
    base_policy.unet = base_unet
    with torch.no_grad():
        want = _sampler(base_policy).batch_logprob(b, stage.cond).reshape(3, 3)
        lora_on = sampler.batch_logprob(b, stage.cond).reshape(3, 3)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-5)
    assert (lora_on - want).abs().max() > 1e-3  # the adapter is really on outside the context


# ----------------------------------------------------------------------------------------------- gradients
def _pair_grad(policy, sampler, arena, stage, step):
    policy.unet.zero_grad(set_to_none=True)
    ids = torch.stack([stage.target_ids[0], stage.base_ids[0]])
    b = arena.gather(ids, torch.tensor([step, step]))
    logp = sampler.batch_logprob(b, stage.cond)
    ref = logp.detach() - 0.01  # inside the clamp: gradients flow
    dpo.d3po_loss(logp[:1], logp[1:], ref[:1], ref[1:]).sum().backward()
    return max(p.grad.abs().max().item() for p in policy.unet.parameters() if p.grad is not None)


def test_zero_gradient_on_unfused_steps(staged):
    policy, _, sampler, arena, stage = staged
    assert stage.fused_steps[0] == 2
    unfused = [_pair_grad(policy, sampler, arena, stage, s) for s in (0, 1)]
    fused = _pair_grad(policy, sampler, arena, stage, 3)
    policy.unet.zero_grad(set_to_none=True)
    assert max(unfused) < 1e-9 and fused > 1e-6, (unfused, fused)


def test_train_dpo_changes_weights(staged):
    policy, _, sampler, arena, stage = staged
    assert stage.num_pairs > 0
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    m = dpo.train_dpo(
        sampler,
        arena,
        stage.preferred,
        stage.dispreferred,
        stage.fused_steps,
        stage.cond,
        dpo.DPOConfig(logprob_reduction="sum"),
        inner_epochs=1,
        pairs_per_batch=2,
        optimizer=opt,
        generator=torch.Generator().manual_seed(0),
    )
    assert m["optimizer_steps"] == math.ceil(stage.num_pairs / 2) and math.isfinite(m["loss"])
    assert max((p.detach() - q).abs().max().item() for p, q in zip(params, before)) > 0


# ----------------------------------------------------------------------------------------------- trainer
def _trainer(tmp_path, stages, resume=None, extra=()):
    from b2diffurl import config as C
    from b2diffurl.trainer import Trainer

    cfg = C.load_config(
        overrides=[
            "algo=dfusion",
            f"stages={stages}",
            f"sample.num_steps={T}",
            "sample.prompts_per_stage=1",
            "sample.batch_size=1",
            "dfusion.samples_per_prompt=4",
            "dfusion.mask_threshold=0.0625",
            "dfusion.save_pairs=true",
            "eval.prompts=none",
            f"out={tmp_path}",
            "progress=false",
            "checkpoint_every=1",
            "train.inner_epochs=1",
            "train.micro_batch_size=2",
            "grid_every=0",
            "dpo.logprob_reduction=sum",
            "train.lr=1e-3",
            *extra,
        ]
    )
    policy = toy_policy()
    return Trainer(
        cfg,
        policy=policy,
        reward_fn=toy_reward,
        train_prompts=PROMPTS + ["two red circles"],
        heldout_prompts=[],
        resume=resume,
    )


def test_train_algo_dfusion_changes_weights_and_resumes_exactly(tmp_path):
    tr = _trainer(tmp_path / "a", 2)
    before = [p.detach().clone() for p in tr.params]
    tr.run()
    assert max((p.detach() - q).abs().max().item() for p, q in zip(tr.params, before)) > 0
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    stages = [r for r in recs if r.get("kind") == "stage"]
    assert len(stages) == 2 and all("reward_target_mean" in r and "loss" in r for r in stages)
    assert list((tmp_path / "a" / "pairs").glob("*.png"))
    # resume: 1 stage, then continue to 2 from its checkpoint -> same weights as the straight run
    _trainer(tmp_path / "b", 1).run()
    tr2 = _trainer(tmp_path / "b", 2, resume=str(tmp_path / "b"))
    tr2.run()
    for p, q in zip(tr.params, tr2.params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def test_dfusion_pairs_feed_ppo(tmp_path):
    # objective=ppo: the same pairs (targets + bases, per-prompt z-scored rewards) train with DDPO's PPO-clip;
    # the targets' old log-probs are re-evaluated under the plain policy, so the first pass has ratio 1
    tr = _trainer(tmp_path, 1, extra=("dfusion.objective=ppo", "dfusion.save_pairs=false"))
    before = [p.detach().clone() for p in tr.params]
    tr.run()
    assert max((p.detach() - q).abs().max().item() for p, q in zip(tr.params, before)) > 0
    rec = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"stage"' in x][-1]
    assert rec["train_samples"] == 4 and rec["ratio_dev_max"] < 1e-5
