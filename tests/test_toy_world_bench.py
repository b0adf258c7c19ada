"""bench.toy_world's UNet word table against a closed form: with a stand-in UNet whose prediction is the mean
of the prompt embedding's tokens (broadcast over the latent), each change is the L2 distance between mean
embeddings, whatever the noised input and the timestep."""

import math
import random

import pytest
import torch
from bench_modules import from_checkout


class _MeanEmbedding(torch.nn.Module):
    device, dtype = torch.device("cpu"), torch.float32

    def forward(self, x_t, t, emb):
        flat = x_t.flatten(1)
        out = emb.mean(1).repeat(1, flat.shape[1] // emb.shape[2] + 1)[:, : flat.shape[1]]
        return type("Out", (), {"sample": out.view_as(x_t)})()


def test_unet_word_table_matches_the_closed_form():
    from b2diffurl.models import load_policy
    from b2diffurl.toy import prompts as P

    toy_world = from_checkout("bench.toy_world")
    policy = load_policy("toy")
    policy.unet = _MeanEmbedding()
    rows = toy_world.unet_word_rows(policy, steps=4, prompts=6, seed=3)
    assert {r["swap"] for r in rows} >= {"count", "shape", "relation_left_right"}
    assert {r["timesteps"] for r in rows} == {"751..501"}  # the noisier half of the 4-step schedule
    reps = policy.latent_shape[0] * policy.latent_shape[1] * policy.latent_shape[2]

    def change(
        ps, qs
    ):  # the stand-in's prediction repeats the mean embedding; its norm scales with the repeats
        a, b = policy.encode_prompts(ps).float().mean(1), policy.encode_prompts(qs).float().mean(1)
        full = lambda e: e.repeat(1, reps // e.shape[1] + 1)[:, :reps]
        return (full(a) - full(b)).norm(dim=1).mean().item()

    rng = random.Random(3)
    for cat in ("count", "relation"):
        ps = sorted(rng.sample(P.get_prompts(f"all:{cat}"), 6))
        swaps = [toy_world._swaps(p) for p in ps]
        for row in (r for r in rows if r["prompts"].startswith(cat)):
            idx = [i for i, sw in enumerate(swaps) if row["swap"] in sw]
            sel = [ps[i] for i in idx]
            want = change(sel, [swaps[i][row["swap"]] for i in idx])
            colour = change(sel, [swaps[i]["colour"] for i in idx])
            assert row["prompts"] == f"{cat} ({len(idx)})"
            assert abs(row["change"] - want) <= 1e-4 * want
            assert abs(row["vs_colour"] - want / colour) <= 1e-4
            assert abs(row["cond_vs_uncond"] - change(sel, [""] * len(sel))) <= 1e-4 * row["cond_vs_uncond"]
    first = toy_world.unet_word_rows(policy, steps=10, prompts=2, seed=3, noisy=1)
    assert {r["timesteps"] for r in first} == {"901..901"}  # only the noisiest step of the 10-step schedule


def test_relation_order_against_rendered_scenes():
    """Scenes drawn for a prompt stand in its order; scenes drawn for the swapped relation stand in the other."""
    from b2diffurl.toy import prompts as P
    from b2diffurl.toy.render import render

    toy_world = from_checkout("bench.toy_world")
    ps = sorted(random.Random(0).sample(P.get_prompts("all:relation"), 40))
    swapped = [
        toy_world._swaps(p)[next(k for k in toy_world._swaps(p) if k.startswith("relation"))] for p in ps
    ]
    assert toy_world.relation_order(render(ps, seed=2), ps) == (1.0, 1.0)
    assert toy_world.relation_order(render(swapped, seed=2), ps) == (1.0, 0.0)
    blank = torch.zeros(len(ps), 3, 32, 32)  # nothing drawn: no pair found, so no order to report
    found, right = toy_world.relation_order(blank, ps)
    assert found == 0.0 and math.isnan(right)


class _Constant(torch.nn.Module):
    """A stand-in UNet that predicts the same latents whatever it is given."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, latents):
        super().__init__()
        self.latents = latents

    def forward(self, x_t, t, emb):
        return type("Out", (), {"sample": self.latents.expand_as(x_t)})()


class _Identity(torch.nn.Module):
    device, dtype = torch.device("cpu"), torch.float32

    def forward(self, x_t, t, emb):
        return type("Out", (), {"sample": x_t})()


def test_symmetry_table_against_closed_forms():
    """The identity is equivariant under both mirrors (error 0). A constant prediction of a left-to-right ramp
    image: its left-right mirror is the ramp's negation in latent space (1 − r ↦ −(2r − 1)), so the error is
    |R − (−R)| / |R| = 2; top-bottom it is unchanged, error 0."""
    import torch.nn.functional as F

    from b2diffurl.models import load_policy

    toy_world = from_checkout("bench.toy_world")
    policy = load_policy("toy")
    policy.unet = _Identity()
    rows = {r["mirror"]: r for r in toy_world.symmetry_rows(policy, steps=4, prompts=4)}
    assert (
        rows["left-right"]["equivariance_error"] <= 1e-6 and rows["top-bottom"]["equivariance_error"] <= 1e-6
    )
    ramp = (torch.arange(32.0) / 31).expand(1, 3, 32, 32)  # r(x) = x / 31, constant down each column
    policy.unet = _Constant(F.pixel_unshuffle(2 * ramp - 1, 2))
    rows = {r["mirror"]: r for r in toy_world.symmetry_rows(policy, steps=4, prompts=4)}
    assert abs(rows["left-right"]["equivariance_error"] - 2.0) <= 1e-5
    assert rows["top-bottom"]["equivariance_error"] <= 1e-6
    # the noisier half of a 4-step schedule (leading spacing, offset 1: 751, 501, 251, 1)
    assert rows["left-right"]["prompts"] == 4 and rows["left-right"]["timesteps"] == "751..501"


def test_dfusion_table_threshold_zero_fuses_every_position():
    """Mask threshold 0 turns every position of the object attention into the mask (coverage exactly 1), the
    default leaves part of the image out, and the options reach the table."""
    from b2diffurl.models import load_policy

    toy_world = from_checkout("bench.toy_world")
    policy = load_policy("toy")
    full, default = (
        toy_world.dfusion_rows(policy, steps=3, cfg=5.0, prompts=2, n=4, mask_threshold=thr, layers=layers)[0]
        for thr, layers in ((0.0, "0-4"), (0.05, "auto"))
    )
    assert full["mask_coverage"] == 1.0 and default["mask_coverage"] < 1.0
    assert (full["fused_blocks"], full["mask_threshold"]) == ("0-4", 0.0)
    assert 0.0 <= full["ssim_target_ref"] <= 1.0 and full["pairs"] == default["pairs"] == 4


def test_noisy_steps_out_of_range_is_refused():
    """``noisy`` counts the schedule's noisiest steps: 0 or more than the schedule is an error, not the
    default."""
    from b2diffurl.models import load_policy

    toy_world = from_checkout("bench.toy_world")
    policy = load_policy("toy")
    for bad in (0, 5):
        with pytest.raises(ValueError, match="noisy must be in"):
            toy_world._noisier_half(policy, 4, bad)
    _, ts = toy_world._noisier_half(policy, 4, 4)
    assert len(ts) == 4
