"""One oracle, every caller: the policy step (UNet with CFG, then the DDIM step density) gives the official
DDIM log-prob (tests/ddim_oracle.py: diffusers' ``DDIMScheduler.step`` + the Gaussian density by hand) where
tree sampling, PPO (B²/DDPO), DPO and D-Fusion's Phase A compute it."""

from __future__ import annotations

import math

import pytest
import torch
from ddim_oracle import ddim_scheduler, transition_logprobs
from dfusion_reference import toy_policy, toy_reward

from b2diffurl.sampling import TreeSampler

T = 4
W = 5.0
PROMPTS = ["a blue square to the left of a green triangle", "two red circles"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy():
    p = toy_policy()
    p.add_lora()  # identity adapter (B = 0): π_θ = π_ref, so DPO's reference pass is the same policy
    return p


def _arena(policy, trees, branches=1):
    from b2kernels.buffer import TrajectoryArena

    return TrajectoryArena(
        policy.latent_shape, num_steps=T, max_trees=trees, branches=branches, backend="python"
    )


def _transitions(arena, ids):
    """Every stored transition of ``ids``: (ids, steps) flattened id-major."""
    all_ids = torch.as_tensor(ids).repeat_interleave(T)
    return all_ids, torch.arange(T).repeat(len(ids))


def _oracle(policy, arena, ids, steps, cond_table, guidance=W):
    b = arena.gather(ids, steps)
    cond = cond_table[b.prompt_id.long()]
    return transition_logprobs(policy, ddim_scheduler(policy, T), b.x_t, b.x_prev, b.step, cond, guidance)


def _sampled(policy, *, guidance=W):
    """Trees sampled (split 1, 2 branches) into an arena: (sampler, arena, ids, cond_table)."""
    sampler = TreeSampler(policy, num_steps=T, guidance_scale=guidance, eta=1.0)
    cond = policy.encode_prompts(PROMPTS)
    arena = _arena(policy, len(PROMPTS), branches=2)
    ids = arena.add_trees([0, 1], 1)
    sampler.sample_trees(
        cond, split_step=1, branches=2, generator=torch.Generator().manual_seed(1), arena=arena, ids=ids
    )
    return sampler, arena, ids, cond


@pytest.mark.parametrize("guidance", [W, 1.0], ids=["cfg", "no-cfg"])
def test_sampling_logprobs_are_the_official_density(policy, guidance):
    sampler, arena, ids, cond = _sampled(policy, guidance=guidance)
    all_ids, steps = _transitions(arena, ids)
    want = _oracle(policy, arena, all_ids, steps, cond, guidance if guidance != 1.0 else None)
    got = arena.logprobs(ids).reshape(-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ppo_update_sees_the_official_density(policy):
    """ppo_update's training forward, fed the oracle's log-probs as π_old: its pre-update ratio is 1."""
    from b2diffurl import config as C
    from b2diffurl.algos.api import RunContext
    from b2diffurl.algos.ppo import ppo_update

    sampler, arena, ids, cond = _sampled(policy)
    all_ids, steps = _transitions(arena, ids)
    oracle = _oracle(policy, arena, all_ids, steps, cond).reshape(len(ids), T)
    for i in range(T):
        arena.write_logprobs(ids, i, oracle[:, i])
    arena.set_advantages(ids, torch.linspace(-1, 1, len(ids)))
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    cfg = C.load_config(
        overrides=["train.inner_epochs=1", "train.micro_batch_size=4", "train.grad_accum_steps=64"]
    )
    ctx = RunContext(
        cfg=cfg,
        policy=policy,
        reward_fn=toy_reward,
        sampler=sampler,
        params=params,
        optimizer=opt,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0),
        train_prompts=PROMPTS,
        device=torch.device("cpu"),
        noise_gen=torch.Generator(),
        cpu_gen=torch.Generator().manual_seed(0),
    )
    m = ppo_update(ctx, arena, ids, torch.arange(T), cond)
    assert m["micro_steps"] == T and m["ratio_dev_max"] < 5e-4, m


def test_dpo_logprobs_are_the_official_density(policy):
    """DPO's reference log-probs and the ℓθ of its update (loss log 2 when ℓθ = ℓref = oracle)."""
    from b2diffurl.algos import dpo
    from b2diffurl.config import DPOConfig

    sampler, arena, ids, cond = _sampled(policy)
    steps = list(range(T))
    ref = dpo.reference_logprobs(sampler, arena, ids, steps, cond, batch_size=3)
    all_ids, flat_steps = _transitions(arena, ids)
    oracle = _oracle(policy, arena, all_ids, flat_steps, cond).reshape(len(ids), T)
    torch.testing.assert_close(ref, oracle, rtol=1e-4, atol=1e-4)
    numel = math.prod(policy.latent_shape)
    m = dpo.train_dpo(
        sampler,
        arena,
        ids[:2],
        ids[2:],
        steps,
        cond,
        DPOConfig(logprob_reduction="sum", beta=1.0),
        inner_epochs=1,
        pairs_per_batch=2,
        optimizer=torch.optim.SGD([p for p in policy.unet.parameters() if p.requires_grad], lr=0.0),
        generator=torch.Generator().manual_seed(0),
        ref_logp=(oracle[:2] * numel, oracle[2:] * numel),
    )
    # −log σ(β·(Δw − Δl)) = log 2 − β(Δw − Δl)/2 + …: a sampler/oracle gap of 1e-4 per element would show as 1e-2
    assert m["loss"] == pytest.approx(math.log(2), abs=2e-3) and m["dpo_clipfrac"] == 0.0


def test_dfusion_phase_a_logprobs_are_the_official_density(policy):
    from b2diffurl.algos import dfusion as D
    from b2diffurl.config import DFusionConfig

    sampler = TreeSampler(policy, num_steps=T, guidance_scale=W, eta=1.0)
    arena = _arena(policy, 8)
    stage = D.generate_pairs(
        sampler,
        PROMPTS[:1],
        DFusionConfig(samples_per_prompt=4, mask_threshold=0.0625, fusion_steps=(2, -1)),
        reward_fn=toy_reward,
        arena=arena,
    )
    ids = stage.sample_ids[:2]
    all_ids, steps = _transitions(arena, ids)
    want = _oracle(policy, arena, all_ids, steps, stage.cond)
    torch.testing.assert_close(arena.logprobs(ids).reshape(-1), want, rtol=1e-4, atol=1e-4)
