"""bench.coord_toy's coordinate input: the two extra channels are the pixel grid (x grows to the right, y
downwards, both spanning [-1, 1]), the UNet's first convolution takes them, and the output keeps the latent
shape; bad input is a one-line error."""

import pytest
import torch
from bench_modules import from_checkout


def test_coordinate_channels_are_the_pixel_grid():
    coord_toy = from_checkout("bench.coord_toy")
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x, t, emb):
            seen["x"] = x
            return x[:, :-2]

    model = coord_toy.CoordInput(Probe(), 4)
    latents = torch.randn(3, 12, 4, 4)
    out = model(latents, 0, None)
    assert torch.equal(out, latents)
    grid = seen["x"][:, 12:]
    assert grid.shape == (3, 2, 4, 4)
    assert torch.allclose(grid[0, 0, 2], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))  # x along a row
    assert torch.allclose(grid[0, 1, :, 1], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))  # y down a column
    assert torch.equal(grid[0], grid[2])


def test_coord_arm_runs_the_toy_unet_on_latents():
    from b2diffurl.toy import model as M

    coord_toy = from_checkout("bench.coord_toy")
    model = coord_toy.build("coord")
    assert model.unet.conv_in.in_channels == M.LATENT_SHAPE[0] + 2
    x = torch.randn(2, *M.LATENT_SHAPE)
    emb = torch.randn(2, M.MAX_TOKENS, M.TEXT_DIM)
    with torch.no_grad():
        assert model(x, torch.tensor(500), emb).sample.shape == x.shape
    assert coord_toy.build("plain").conv_in.in_channels == M.LATENT_SHAPE[0]


def test_bad_minutes_is_a_one_line_error(capsys):
    coord_toy = from_checkout("bench.coord_toy")
    with pytest.raises(SystemExit):
        coord_toy.main(["--arm", "coord", "--minutes", "0"])
    assert "--minutes must be positive" in capsys.readouterr().err


def test_bidirectional_encoder_drops_only_the_causal_mask():
    """Oracle: in a one-layer encoder the last position already attends to every token under the causal mask,
    so dropping the mask must leave it exactly as it was; the first word's output must not move with a later
    word under the causal mask and must move without it."""
    from transformers import CLIPTextModel

    from b2diffurl.toy import model as M

    coord_toy = from_checkout("bench.coord_toy")
    tok = M.build_tokenizer()
    config = M.build_text_encoder().config
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    causal = CLIPTextModel(config).eval()
    bidir = coord_toy.BidirectionalText(causal)
    ids = tok(
        ["a red circle left of a blue square", "a red circle right of a blue square"],
        padding="max_length",
        max_length=M.MAX_TOKENS,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        c, b = causal(ids)[0], bidir(ids)[0]
    assert b.shape == c.shape == (2, M.MAX_TOKENS, M.TEXT_DIM)
    torch.testing.assert_close(b[:, -1], c[:, -1])
    red = 2  # <bos> a red
    torch.testing.assert_close(c[0, red], c[1, red])
    assert (b[0, red] - b[1, red]).norm() > 0.05 * b[0, red].norm()
    shipped = coord_toy.build_encoder("bidirectional")
    assert not any(p.requires_grad for p in shipped.parameters())
