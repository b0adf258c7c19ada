"""Toy world: prompt grammar, renderer, the dense reward and binary success (oracles: the renderer's own scene
parameters, scipy.ndimage.label for connected components, hand-built images with hand-computed rewards), and
the frozen text encoder's sensitivity to every reward-relevant word."""

import random

import pytest
import torch
import torch.nn.functional as F

from b2diffurl.toy import prompts as P
from b2diffurl.toy.render import PALETTE, render, render_layout, sample_layout
from b2diffurl.toy.score import (
    component_stats,
    connected_components,
    pixel_classes,
    toy_score,
    toy_success,
)


def _all():
    return P.train_prompts() + P.heldout_prompts()


def test_splits_are_disjoint_and_cover_every_category():
    train, held = set(P.train_prompts()), set(P.heldout_prompts())
    assert not train & held
    for cat in P.CATEGORIES:
        assert P.train_prompts(cat) and P.heldout_prompts(cat)
    assert len(held) / (len(train) + len(held)) == pytest.approx(0.2, abs=0.02)
    assert P.get_prompts("heldout:single") == P.heldout_prompts("single")


def test_parse_and_categories():
    s = P.parse("a green triangle to the left of a yellow circle")
    assert s.objects == (("green", "triangle"), ("yellow", "circle")) and s.relation == "to the left of"
    assert P.parse("three red squares").objects == (("red", "square"),) * 3
    assert [
        P.prompt_category(p) for p in ("a red circle", "two blue squares", "a red circle above a blue square")
    ] == ["single", "count", "relation"]
    assert set(P.OBJECT_WORDS) == {"circle", "square", "triangle", "circles", "squares", "triangles"}


@pytest.mark.parametrize(
    "bad", ["a purple circle", "two red circle", "a red circle near a blue square", "", "red"]
)
def test_parse_rejects_with_expectation(bad):
    with pytest.raises(ValueError, match="expected"):
        P.parse(bad)


def test_render_is_deterministic_and_in_range():
    ps = random.Random(0).sample(_all(), 32)
    a, b = render(ps, seed=5), render(ps, seed=5)
    assert a.shape == (32, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, render(ps, seed=6))


def test_layout_satisfies_the_prompt():
    ps = P.get_prompts("all:relation")
    lay = sample_layout(ps, seed=1)
    for p, row in zip(ps, lay):
        rel = P.parse(p).relation
        (xa, ya), (xb, yb) = row[0, :2].tolist(), row[1, :2].tolist()
        ok = {"to the left of": xa < xb, "to the right of": xa > xb, "above": ya < yb, "below": ya > yb}[rel]
        assert ok, p


@pytest.mark.parametrize("seed", [1, 2])
def test_halves_layout_puts_each_object_in_its_own_half(seed):
    ps = P.get_prompts("all:relation")
    lay = sample_layout(ps, seed=seed, relation_layout="halves")
    for p, row in zip(ps, lay):
        rel = P.parse(p).relation
        (xa, ya, sa), (xb, yb, sb) = row[0, :3].tolist(), row[1, :3].tolist()
        # (far edge of the object that should be nearer the origin, near edge of the other), on the relation's axis
        near, far = {
            "to the left of": (xa + sa / 2, xb - sb / 2),
            "to the right of": (xb + sb / 2, xa - sa / 2),
            "above": (ya + sa / 2, yb - sb / 2),
            "below": (yb + sb / 2, ya - sa / 2),
        }[rel]
        assert near <= 16.0 <= far, p
    imgs = render(ps, seed=seed, relation_layout="halves")
    assert toy_success(imgs, ps).all()
    # single and count prompts ignore the option; relation prompts place differently
    other = P.get_prompts("all:count")[:20]
    assert torch.equal(
        sample_layout(other, seed=seed, relation_layout="halves"), sample_layout(other, seed=seed)
    )
    assert not torch.equal(lay, sample_layout(ps, seed=seed))
    with pytest.raises(ValueError, match="relation_layout"):
        sample_layout(ps[:1], relation_layout="sideways")


def test_connected_components_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    ps = random.Random(1).sample(_all(), 64)
    cls = pixel_classes(render(ps, seed=2))
    lab = connected_components(cls, len(P.COLOURS))
    for c, l in zip(cls, lab):
        n_ref = sum(
            ndimage.label((c == k).numpy(), structure=[[1, 1, 1]] * 3)[1] for k in range(len(P.COLOURS))
        )
        assert len(torch.unique(l[l > 0])) == n_ref


def test_components_find_rendered_objects():
    ps = random.Random(2).sample(_all(), 100)
    lay = sample_layout(ps, seed=3)
    obj = component_stats(render(ps, seed=3))
    assert torch.equal(obj["valid"].sum(1), lay[..., 5].sum(1).long())
    for i in range(len(ps)):
        m = int(lay[i, :, 5].sum())
        found = sorted(
            zip(obj["colour"][i][obj["valid"][i]].tolist(), obj["shape"][i][obj["valid"][i]].tolist())
        )
        assert found == sorted(zip(lay[i, :m, 3].long().tolist(), lay[i, :m, 4].long().tolist())), ps[i]


def test_reward_of_rendered_images_is_high_for_own_prompt_low_for_mismatched():
    rng = random.Random(0)
    ps = [rng.choice(_all()) for _ in range(400)]
    imgs = render(ps, seed=7)
    own = toy_score(imgs, ps)
    assert own.shape == (400,) and own.dtype == torch.float32
    assert own.min() >= 0.99
    assert toy_success(imgs, ps).all()

    # mismatched: a prompt sharing no colour and no shape with the rendered one
    def disjoint(p):
        cs, ss = {c for c, _ in P.parse(p).objects}, {s for _, s in P.parse(p).objects}
        pool = [
            q
            for q in _all()
            if not ({c for c, _ in P.parse(q).objects} & cs or {s for _, s in P.parse(q).objects} & ss)
        ]
        return rng.choice(pool)

    other = [disjoint(p) for p in ps]
    assert toy_score(imgs, other).max() <= 0.3
    assert not toy_success(imgs, other).any()


def test_partial_credit_orders_as_expected():
    img = render(["a red circle to the left of a blue square"], seed=0)
    s = lambda p: toy_score(img, [p]).item()
    exact = s("a red circle to the left of a blue square")
    wrong_rel = s("a red circle to the right of a blue square")
    wrong_shape = s("a red triangle to the left of a blue square")
    wrong_colour = s("a green circle to the left of a blue square")
    assert exact == pytest.approx(1.0)
    assert 0.5 < wrong_rel < exact and 0.3 < wrong_shape < exact and 0.3 < wrong_colour < exact
    img_ps = ["a red circle to the left of a blue square"] + [
        "a red circle to the right of a blue square",
        "a red triangle to the left of a blue square",
        "a green circle to the left of a blue square",
    ]
    assert toy_success(img.expand(4, -1, -1, -1), img_ps).tolist() == [True, False, False, False]
    two = render(["two red circles"], seed=0)
    assert 0.5 < toy_score(two, ["three red circles"]).item() < toy_score(two, ["two red circles"]).item()
    assert toy_score(torch.zeros(1, 3, 32, 32), ["a red circle"]).item() == 0.0


def test_reward_is_robust_to_blur_and_noise():
    rng = random.Random(3)
    ps = [rng.choice(_all()) for _ in range(200)]
    imgs = render(ps, seed=1)
    k = torch.tensor([0.25, 0.5, 0.25])
    blur = F.conv2d(
        F.pad(imgs, (1, 1, 1, 1), mode="replicate"),
        (k[:, None] * k).expand(3, 1, 3, 3).contiguous(),
        groups=3,
    )
    noisy = (blur + 0.04 * torch.randn(imgs.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert toy_score(noisy, ps).mean() >= 0.9


def test_colour_classification_survives_dimming():
    img = PALETTE[:, :, None, None].expand(-1, -1, 4, 4) * 0.6  # each palette colour at 60 % brightness
    cls = pixel_classes(img)
    assert torch.equal(cls[:, 0, 0], torch.arange(len(P.COLOURS)))


def test_reward_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"expected images \[N,3,H,W\]"):
        toy_score(torch.zeros(2, 3, 32, 32), ["a red circle"])


# ----------------------------------------------------------------------------- hand-built images, hand-computed
def _scene(*objs):
    """Objects (cx, cy, side, colour index, shape index) -> one image [1, 3, 32, 32]. A square of even side
    at an integer centre covers exactly side² pixels, whose mean pixel index is cx − 0.5."""
    lay = torch.zeros(1, 3, 6)
    for i, o in enumerate(objs):
        lay[0, i] = torch.tensor([*o, 1.0])
    return render_layout(lay)


RED, GREEN, BLUE = 0, 1, 2
SQUARE = 1


@pytest.mark.parametrize(
    "dx, relation_part",
    [(4.0, (4 + 6) / 12), (12.0, 1.0), (0.0, 0.5), (-4.0, (-4 + 6) / 12), (-8.0, 0.0)],
)
def test_relation_margin_is_a_pixel_ramp(dx, relation_part):
    # red square at x = 16, blue square at x = 16 + dx, far apart vertically so they never touch
    img = _scene((16, 8, 8, RED, SQUARE), (16 + dx, 24, 8, BLUE, SQUARE))
    p = ["a red square to the left of a blue square"]
    score, parts = toy_score(img, p, return_parts=True)
    assert parts["margin"].item() == pytest.approx(dx)
    assert parts["colour"].item() == 1.0 and parts["objects"].item() == pytest.approx(1.0, abs=1e-4)
    assert score.item() == pytest.approx(0.2 + 0.5 + 0.3 * relation_part, abs=1e-4)
    assert toy_success(img, p).item() == (dx > 0)


def test_extra_speck_costs_colour_purity_and_objects():
    # 8×8 red square (64 px) + a 2×4 green patch (8 px: presence (8-4)/8 = 1/2, valid for success)
    img = _scene((10, 10, 8, RED, SQUARE))
    img[0, :, 24:26, 20:24] = PALETTE[GREEN][:, None, None]
    score, parts = toy_score(img, ["a red square"], return_parts=True)
    assert parts["colour"].item() == pytest.approx(64 / 72)
    assert parts["objects"].item() == pytest.approx(1 / 1.5, abs=1e-4)
    assert score.item() == pytest.approx(0.3 * 64 / 72 + 0.7 / 1.5, abs=1e-4)
    assert not toy_success(img, ["a red square"]).item()
    # a 2×2 speck (4 px) has presence 0 and is below the success area: no cost except colour purity
    img = _scene((10, 10, 8, RED, SQUARE))
    img[0, :, 24:26, 20:22] = PALETTE[GREEN][:, None, None]
    score, parts = toy_score(img, ["a red square"], return_parts=True)
    assert parts["objects"].item() == pytest.approx(1.0, abs=1e-4)
    assert score.item() == pytest.approx(0.3 * 64 / 68 + 0.7, abs=1e-4)
    assert toy_success(img, ["a red square"]).item()


def test_count_is_scored_by_soft_counts():
    three = _scene((6, 6, 8, RED, SQUARE), (20, 6, 8, RED, SQUARE), (6, 22, 8, RED, SQUARE))
    for prompt, objects in (("two red squares", 2 / 3), ("three red squares", 1.0), ("a red square", 1 / 3)):
        score, parts = toy_score(three, [prompt], return_parts=True)
        assert parts["objects"].item() == pytest.approx(objects, abs=1e-4), prompt
        assert score.item() == pytest.approx(0.3 + 0.7 * objects, abs=1e-4), prompt
        assert toy_success(three, [prompt]).item() == (prompt == "three red squares")
    # a wrong-colour object: found 2 red + 1 blue, two red wanted -> objects 2/3, colour 128/192
    mixed = _scene((6, 6, 8, RED, SQUARE), (20, 6, 8, RED, SQUARE), (6, 22, 8, BLUE, SQUARE))
    score, parts = toy_score(mixed, ["two red squares"], return_parts=True)
    assert parts["colour"].item() == pytest.approx(128 / 192)
    assert score.item() == pytest.approx(0.3 * 128 / 192 + 0.7 * 2 / 3, abs=1e-4)


def test_dense_reward_is_continuous_in_object_area():
    # a growing blue patch next to "a red square": presence rises 0 -> 1 over 4..12 px, score falls smoothly
    scores = []
    for w in range(1, 7):  # 2×w patch: 2..12 px
        img = _scene((10, 10, 8, RED, SQUARE))
        img[0, :, 24:26, 16 : 16 + w] = PALETTE[BLUE][:, None, None]
        scores.append(toy_score(img, ["a red square"]).item())
        presence = min(max((2 * w - 4) / 8, 0), 1)
        expect = 0.3 * 64 / (64 + 2 * w) + 0.7 / (1 + presence)
        assert scores[-1] == pytest.approx(expect, abs=1e-4), w
    assert all(a > b for a, b in zip(scores[1:], scores[2:]))


def test_frozen_text_encoder_sees_relation_words():
    """A relation-word swap moves the prompt embedding at least half as much as a colour swap (the jointly
    trained encoder of the first toy moved 2.7 % vs 36 %), and the encoder is frozen and seeded."""
    from b2diffurl.toy import model as M

    te, tok = M.build_text_encoder(), M.build_tokenizer()
    assert not any(p.requires_grad for p in te.parameters())
    assert all(torch.equal(a, b) for a, b in zip(te.parameters(), M.build_text_encoder().parameters()))

    def emb(ps):
        ids = tok(ps, padding="max_length", max_length=M.MAX_TOKENS, return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids)[0]

    def change(a, b):
        ea, eb = emb([a]), emb([b])
        return ((ea - eb).norm() / ea.norm()).item()

    base = "a red circle to the left of a blue square"
    rel = change(base, base.replace("left", "right"))
    rel2 = change("a red circle above a blue square", "a red circle below a blue square")
    col = change(base, base.replace("red", "green"))
    assert min(rel, rel2) >= 0.5 * col > 0
