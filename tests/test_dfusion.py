"""D-Fusion pair construction: pairing, object tokens, masks, replayable noise, one-call fusion vs the official
three-call procedure (tests/dfusion_reference.py), config errors. CPU, tiny random-init toy-world models."""

from __future__ import annotations

import math

import pytest
import torch
from dfusion_reference import official_targets, row_noise, toy_policy, toy_reward

from b2diffurl.algos import dfusion as D
from b2diffurl.config import DFusionConfig

T = 5
PROMPTS = ["a blue square to the left of a green triangle"]


def _arena(policy, trees=32):
    from b2kernels.buffer import TrajectoryArena

    return TrajectoryArena(policy.latent_shape, num_steps=T, max_trees=trees, branches=1, backend="python")


def _sampler(policy):
    from b2diffurl.sampling import TreeSampler

    return TreeSampler(policy, num_steps=T, guidance_scale=5.0, eta=1.0)


def _traj(arena, ids):
    return torch.stack([arena.latents(ids, i) for i in range(T + 1)], 1)


@pytest.fixture(scope="module")
def policy():
    return toy_policy()


# ----------------------------------------------------------------------------------------------- pairing
def test_pair_indices_hand_made():
    scores = torch.tensor(
        [[0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4], [1.0, 1.0, 0.0, 2.0, -1.0, 0.5, 0.5, 3.0]]
    )
    refs, bases = D.pair_indices(scores, 0.25, 0.5, 2)
    # row 0 best-first: 1, 6, 4, 2, 7, 3, 5, 0
    assert refs[0].tolist() == [1, 1, 6, 6] and bases[0].tolist() == [7, 3, 5, 0]
    # row 1 best-first (ties keep the lower index first): 7, 3, 0, 1, 5, 6, 2, 4
    assert refs[1].tolist() == [7, 7, 3, 3] and bases[1].tolist() == [5, 6, 2, 4]
    # n = 16 as in the official run: 4 references × 2 = 8 bases
    r16, b16 = D.pair_indices(torch.arange(16.0)[None], 0.25, 0.5, 2)
    assert r16[0].tolist() == [15, 15, 14, 14, 13, 13, 12, 12] and b16[0].tolist() == list(range(7, -1, -1))


@pytest.mark.parametrize(
    "n,ref,base,reuse,msg",
    [
        (6, 0.25, 0.5, 2, "does not split"),
        (8, 0.25, 0.5, 3, "references × ref_reuse = bases"),
        (8, 0.5, 0.75, 1, "references × ref_reuse = bases"),
    ],
)
def test_pairing_errors(n, ref, base, reuse, msg):
    with pytest.raises(ValueError, match=msg):
        D.pairing_sizes(n, ref, base, reuse)
    with pytest.raises(ValueError, match=msg):
        DFusionConfig(samples_per_prompt=n, ref_fraction=ref, base_fraction=base, ref_reuse=reuse).validate()


# ----------------------------------------------------------------------------------------------- tokens
class _SubwordTokenizer:
    """Word pieces of ≤ 4 characters, BOS=1, EOS=2 (HF-like call)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _pieces(self, text):
        return [w[i : i + 4] for w in text.lower().split() for i in range(0, len(w), 4)]

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(p, len(self.vocab) + 3) for p in self._pieces(text)]
        return {"input_ids": [1] + ids + [2] if add_special_tokens else ids}


def test_object_tokens_by_tokenizer_multi_token():
    tok = _SubwordTokenizer()
    # "triangle" -> "tria", "ngle"; "cat" one piece. Positions include BOS at 0.
    cols = D.object_token_columns(tok, "a big triangle near a cat", ["triangle", "cat"], required=True)
    assert cols == [("triangle", [3, 4]), ("cat", [7])]
    with pytest.raises(ValueError, match="not in prompt"):
        D.object_token_columns(tok, "a red circle", ["dog"], required=True)


def test_object_tokens_toy_tokenizer(policy):
    cols = D.object_token_columns(policy.tokenizer, PROMPTS[0], ["square", "triangle"], required=True)
    assert cols == [("square", [3]), ("triangle", [10])]  # word index + 1 (BOS)
    cfg = DFusionConfig(object_words=("circle",))
    with pytest.raises(ValueError, match="'circle' is not in prompt"):
        D.item_selection(policy.tokenizer, PROMPTS, cfg, 16)


def test_items_are_occurrences(policy):
    """A repeated object word gives one item per occurrence, each with its own threshold and column."""
    prompt = "a blue circle above a green circle"
    cfg = DFusionConfig(item_thresholds={"circle": 0.2})
    sel, thr = D.item_selection(policy.tokenizer, [prompt, "a red square"], cfg, 16, policy.object_words)
    assert sel.shape == (2, 16, 2)
    torch.testing.assert_close(thr, torch.tensor([[0.2, 0.2], [cfg.mask_threshold, math.inf]]))
    assert sel[0].nonzero().tolist() == [[3, 0], [7, 1]]  # "circle" at words 2 and 6 (+1 for BOS)
    assert sel[1].nonzero().tolist() == [[3, 0]]
    with pytest.raises(ValueError, match="object words"):
        D.item_selection(policy.tokenizer, [prompt], DFusionConfig(), 16, ())


def test_row_noise_replays():
    seeds = [D.sample_seed(7, 3, j) for j in range(3)]
    a = D.RowNoise(seeds, T, (2, 4, 4), "cpu")
    b = D.RowNoise(seeds[::-1], T, (2, 4, 4), "cpu")  # another batch order
    assert torch.equal(a.noise, b.noise.flip(0))
    assert torch.equal(a.noise[1], row_noise(seeds[1], T, (2, 4, 4)))
    assert len(set(D.sample_seed(7, e, j) for e in range(4) for j in range(100))) == 400


# ----------------------------------------------------------------------------------------------- fusion
def _run(policy, cfg, seed=3, arena=None, **kw):
    arena = arena or _arena(policy)
    stage = D.generate_pairs(
        _sampler(policy), PROMPTS, cfg, reward_fn=toy_reward, arena=arena, run_seed=seed, epoch=1, **kw
    )
    return stage, arena


def test_zero_mask_target_equals_base(policy):
    # threshold +inf: the mask is all zero, so the fused attention blends nothing in. Targets replay the bases'
    # noise; the only difference is numerical (batch of 2+4 rows through the K/V-injection op vs 4 rows through
    # SDPA in Phase A), so fp32 agreement is ~1e-6 rather than bitwise.
    stage, arena = _run(policy, DFusionConfig(samples_per_prompt=4, mask_threshold=math.inf))
    assert stage.masks.sum() == 0
    tgt, base = _traj(arena, stage.target_ids), _traj(arena, stage.base_ids)
    torch.testing.assert_close(tgt, base, rtol=0, atol=2e-5)
    torch.testing.assert_close(
        arena.logprobs(stage.target_ids), arena.logprobs(stage.base_ids), rtol=0, atol=1e-4
    )


def test_fusion_changes_target_from_first_fused_step(policy):
    cfg = DFusionConfig(samples_per_prompt=4, mask_threshold=0.0, fusion_steps=(2, -1))  # m ≡ 1
    stage, arena = _run(policy, cfg)
    assert stage.masks[:, 2:].all() and not stage.masks[:, :2].any()
    tgt, base = _traj(arena, stage.target_ids), _traj(arena, stage.base_ids)
    diff = (tgt - base).flatten(2).abs().amax(2).amax(0)  # per latent index
    assert diff[:3].max() == 0  # latents 0, 1, 2 precede fused step 2
    assert (diff[3:] > 1e-3).all()


def test_one_call_fusion_equals_official_three_call_procedure(policy):
    thr = 0.0625  # ~ half the tokens on for this random toy model
    cfg = DFusionConfig(samples_per_prompt=4, mask_threshold=thr)
    calls = []
    hook = policy.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        stage, arena = _run(policy, cfg, seed=11)
    finally:
        hook.remove()
    # Phase A: T calls; fusion: one call per step from the first fused step on (no base pass, refs once)
    assert len(calls) == T + (T - 2)
    cov = float(stage.masks[:, 2:].float().mean())
    assert 0.05 < cov < 0.95, cov
    items = [[3, 10]]
    ref = official_targets(
        policy.unet,
        policy.scheduler,
        policy.encode_prompts,
        PROMPTS,
        items,
        [[thr, thr]],
        n=4,
        seeds=[D.sample_seed(11, 1, j) for j in range(4)],
        rewards_fn=lambda lat, ps: toy_reward(policy.decode(lat), ps),
        fused_blocks=(2, 3, 4),
        window=range(2, T),
        guidance_scale=5.0,
        latent_shape=policy.latent_shape,
    )
    assert stage.ref_ids.tolist() == ref["refs"] and stage.base_ids.tolist() == ref["bases"]
    tgt, base = _traj(arena, stage.target_ids), _traj(arena, stage.base_ids)
    torch.testing.assert_close(
        base[:, -1], ref["base_final"], rtol=0, atol=1e-4
    )  # the base pass only replays
    err = (tgt - ref["targets"]).abs().max()
    effect = (ref["targets"][:, -1] - ref["base_final"]).abs().max()
    assert err < 1e-4 and effect > 100 * err, (err, effect)
    torch.testing.assert_close(
        arena.logprobs(stage.target_ids)[:, 2:], ref["target_logp"][:, 2:], rtol=0, atol=1e-4
    )
    torch.testing.assert_close(stage.target_rewards, toy_reward(policy.decode(tgt[:, -1]), PROMPTS * 2))


def test_preference_by_reward_ties_excluded(policy):
    stage, arena = _run(policy, DFusionConfig(samples_per_prompt=4, mask_threshold=0.0625))
    rt, rb = stage.target_rewards, stage.base_rewards
    want_pref = [
        int(t if a > b else s) for t, s, a, b in zip(stage.target_ids, stage.base_ids, rt, rb) if a != b
    ]
    assert stage.preferred.tolist() == want_pref
    # all-zero mask: target == base up to rounding, rewards tie or differ by rounding only
    rewards = arena.rewards(stage.target_ids)
    torch.testing.assert_close(rewards, stage.target_rewards)


def test_save_pairs_png(policy, tmp_path):
    cfg = DFusionConfig(samples_per_prompt=4, mask_threshold=0.0625)
    stage, _ = _run(policy, cfg, save_dir=str(tmp_path))
    from PIL import Image

    img = Image.open(stage.metrics["pairs_png"])
    # one row per pair (reference | base | target | mask), 32-px tiles + 2-px gutters, enlarged 3× (nearest)
    assert img.size == (4 * 34 * 3, 2 * 34 * 3)


def test_config_errors(policy):
    with pytest.raises(ValueError, match="out of range: this UNet has 5 blocks"):
        D.fusion_block_indices(policy.unet, "3-6")
    assert D.fusion_block_indices(policy.unet, "auto") == (2, 3, 4)
    with pytest.raises(ValueError, match="fusion_steps"):
        D.fused_step_range(DFusionConfig(fusion_steps=(2, 30)), 20)
    assert D.fused_step_range(DFusionConfig(), 20) == list(range(2, 20))
    with pytest.raises(ValueError, match="mask_grid=32"):
        _run(policy, DFusionConfig(samples_per_prompt=4, mask_grid=32))
    with pytest.raises(ValueError, match="does not split"):
        _run(policy, DFusionConfig(samples_per_prompt=6))


def test_prompt_chunks_equal_one_batch(policy):
    # two prompts in one call vs one prompt per call: same seeds (global sample index), same pairs and targets
    prompts = PROMPTS + ["two red circles"]
    cfg = DFusionConfig(samples_per_prompt=4, mask_threshold=0.0625)
    out = []
    for per_call in (None, 1):
        arena = _arena(policy)
        st = D.generate_pairs(
            _sampler(policy),
            prompts,
            cfg,
            reward_fn=toy_reward,
            arena=arena,
            run_seed=2,
            prompts_per_call=per_call,
        )
        out.append((st, _traj(arena, st.target_ids), arena.prompt_ids(st.target_ids)))
    (a, ta, pa), (b, tb, pb) = out
    rows = lambda st: [st.sample_ids.tolist().index(i) for i in st.base_ids.tolist()]  # arena ids differ
    assert rows(a) == rows(b) and pa.tolist() == pb.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(a.sample_rewards, b.sample_rewards, rtol=0, atol=1e-5)
    torch.testing.assert_close(ta, tb, rtol=0, atol=2e-5)
    assert torch.equal(a.masks, b.masks)


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cpu", marks=pytest.mark.slow, id="cpu-triton-interpreter"),
        pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
    ],
)
def test_triton_backend_pipeline_matches_reference(device):
    # the whole pair pipeline with backend='triton' (fused DDIM step + K/V-injection kernel) vs the torch reference
    # (CPU: TRITON_INTERPRET=1 from conftest, ~20 s with T=3)
    from b2diffurl.sampling import TreeSampler

    steps = 3
    pol = toy_policy()
    pol.unet.to(device)
    pol.text_encoder.to(device)
    out = []
    # exact fp32 on both sides: cuDNN's default TF32 convolutions round each UNet input to 10 mantissa bits, so a
    # 1e-6 difference in an attention output can flip a rounding and grow over the steps under CFG
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for backend in ("reference", "triton"):
        from b2kernels.buffer import TrajectoryArena

        arena = TrajectoryArena(pol.latent_shape, num_steps=steps, max_trees=16, branches=1, backend="python")
        st = D.generate_pairs(
            TreeSampler(pol, num_steps=steps, guidance_scale=5.0, backend=backend),
            PROMPTS,
            DFusionConfig(samples_per_prompt=4, mask_threshold=0.0625),
            reward_fn=toy_reward,
            arena=arena,
            run_seed=1,
        )
        out.append(torch.stack([arena.latents(st.target_ids, i) for i in range(steps + 1)], 1))
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-4)


def test_auto_fusion_layers_on_sd_layout():
    # SD 1.x/2.x block layout (tiny widths): 'auto' = official 3..6 = mid + three cross-attention up blocks,
    # i.e. 10 self-attention modules with layers_per_block=2
    from diffusers import UNet2DConditionModel

    from b2kernels.integrations.diffusers import cross_attention_blocks

    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    assert D.fusion_block_indices(unet, "auto") == D.fusion_block_indices(unet, "3-6") == (3, 4, 5, 6)
    blocks = cross_attention_blocks(unet)
    fused = [
        n
        for n in unet.attn_processors
        if ".attn1." in n and n.startswith(tuple(blocks[i] for i in (3, 4, 5, 6)))
    ]
    assert len(fused) == 10
