"""The batched tree sampler against a per-row, per-branch oracle built on diffusers' DDIMScheduler.step."""

from __future__ import annotations

import logging

import pytest
import torch
from ddim_oracle import ddim_scheduler, gaussian_logprob, official_step
from tiny_policy import tiny_policy

from b2diffurl.sampling import TreeSampler, sample

T = 4


def _oracle_tree(policy, cond, uncond, *, split, branches, gen, guidance, eta=1.0):
    """Per-branch sequential reference: one oracle step (two UNet calls, DDIMScheduler.step, the Gaussian
    density by hand) per branch per step. Draws the noise in the sampler's documented order (x_T for the P
    prompts, then each step's [rows] noise), so the two must agree number for number."""
    sched = ddim_scheduler(policy, T)
    P, B = cond.shape[0], branches
    shape = policy.latent_shape
    x = torch.randn((P, *shape), generator=gen)
    noises = []
    for i in range(T):
        rows = P if i < split else P * B
        noises.append(torch.randn((rows, *shape), generator=gen))
    out_lat = torch.zeros(P * B, T + 1, *shape)
    out_lp = torch.zeros(P * B, T)
    for p in range(P):
        for b in range(B):
            r = p * B + b
            xi = x[p : p + 1]
            out_lat[r, 0] = xi[0]
            for i in range(T):
                nrow = noises[i][p : p + 1] if i < split else noises[i][r : r + 1]
                mean, sigma = official_step(policy.unet, sched, xi, i, cond[p : p + 1], uncond, guidance, eta)
                xn = mean + sigma * nrow
                out_lp[r, i] = gaussian_logprob(xn, mean, sigma)
                xi = xn
                out_lat[r, i + 1] = xi[0]
    return out_lat, out_lp


@pytest.mark.parametrize(
    "split,branches", [(2, 3), (0, 2), (T, 1)], ids=["split2-B3", "split0-B2", "noBranch"]
)
def test_tree_sampler_matches_per_branch_oracle(split, branches):
    from b2kernels.buffer import TrajectoryArena

    pol = tiny_policy()
    prompts = ["a red circle", "two blue squares"]
    with torch.no_grad():
        cond = pol.encode_prompts(prompts)
        uncond = pol.encode_prompts([""])
    s = TreeSampler(pol, num_steps=T, guidance_scale=5.0, eta=1.0)
    arena = TrajectoryArena(pol.latent_shape, num_steps=T, max_trees=2, branches=branches, backend="python")
    ids = arena.add_trees([0, 1], split)
    out = s.sample_trees(
        cond,
        split_step=split,
        branches=branches,
        generator=torch.Generator().manual_seed(3),
        arena=arena,
        ids=ids,
    )
    with torch.no_grad():
        lat, lp = _oracle_tree(
            pol,
            cond,
            uncond,
            split=split,
            branches=branches,
            gen=torch.Generator().manual_seed(3),
            guidance=5.0,
        )
    # fp32: the oracle's per-row UNet calls round differently from the batched call, and CFG (w = 5) amplifies
    # that rounding through the steps: a few 1e-5 on latents of scale 1
    torch.testing.assert_close(out.latents, lat[:, T], rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(out.logprobs, lp, rtol=1e-4, atol=1e-4)
    for i in range(T + 1):
        torch.testing.assert_close(arena.latents(ids, i), lat[:, i], rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(arena.logprobs(ids), lp, rtol=1e-4, atol=1e-4)
    # branches share the prefix exactly and diverge after the split
    if branches > 1:
        stored = torch.stack([arena.latents(ids, i) for i in range(T + 1)], 1).view(2, branches, T + 1, -1)
        assert torch.equal(
            stored[:, :1, : split + 1].expand_as(stored[:, :, : split + 1]), stored[:, :, : split + 1]
        )
        assert (stored[:, 0, split + 1 :] - stored[:, 1, split + 1 :]).abs().amax() > 1e-3


def test_sample_plain_api():
    pol = tiny_policy()
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    a = sample(pol, prompts, num_steps=T, seed=5, batch_size=2)
    assert a.images.shape == (3, 3, 8, 8) and a.latents.shape == (3, 4, 8, 8) and a.logprobs.shape == (3, T)
    assert a.images.min() >= 0 and a.images.max() <= 1
    b = sample(pol, prompts, num_steps=T, seed=5, batch_size=2)
    c = sample(pol, prompts, num_steps=T, seed=6, batch_size=2)
    assert torch.equal(a.latents, b.latents)
    assert (a.latents - c.latents).abs().amax() > 1e-3


def test_eta_zero_refused():
    with pytest.raises(ValueError, match="eta"):
        TreeSampler(tiny_policy(), num_steps=T, eta=0.0)


def test_cuda_graphs_fall_back_on_cpu_with_reason(caplog):
    pol = tiny_policy()
    with caplog.at_level(logging.WARNING, logger="b2diffurl.sampling"):
        s = TreeSampler(pol, num_steps=T, cuda_graphs=True)
    assert s.graphs is None and "cpu" in s.graph_reason
    assert any("cuda_graphs" in r.message for r in caplog.records)
    ref = sample(pol, ["a red circle"], num_steps=T, seed=1)
    got = sample(pol, ["a red circle"], num_steps=T, seed=1, sampler=s)
    assert torch.equal(ref.latents, got.latents)


@pytest.mark.gpu
def test_cuda_graphs_match_eager_on_gpu():
    pol = tiny_policy(device="cuda")
    prompts = ["a red circle", "two blue squares"]
    eager = TreeSampler(pol, num_steps=T)
    graphed = TreeSampler(pol, num_steps=T, cuda_graphs=True)
    with torch.no_grad():
        cond = pol.encode_prompts(prompts)
    a = eager.sample_trees(cond, split_step=2, branches=3, generator=torch.Generator("cuda").manual_seed(0))
    b = graphed.sample_trees(cond, split_step=2, branches=3, generator=torch.Generator("cuda").manual_seed(0))
    assert graphed.graphs, f"graph capture fell back: {graphed.graph_reason}"
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-4)
