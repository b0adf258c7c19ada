"""Model rewards (clip, hpsv2, aesthetic, pickscore): tiny random scorers saved to a temp folder and loaded back
through the real loaders; preprocessing checked against the libraries' own PIL pipelines; one-line errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from b2diffurl.rewards import RewardError, RewardFileError, get_reward
from b2diffurl.rewards.scorer import scorer_preprocess

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle"]


def uint8_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images on the uint8 grid (so PIL and the tensor path see exactly the same pixels)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 7, generator=g)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.rand(n, 3, h, w, generator=g)
    return (x.clamp(0, 1) * 255).round() / 255


def to_pil(img: torch.Tensor):
    from PIL import Image

    return Image.fromarray((img * 255).round().byte().permute(1, 2, 0).numpy())


def save_tiny_open_clip(path, name: str, seed: int = 1):
    import open_clip

    from b2diffurl.rewards.clip import load_open_clip

    load_open_clip(name, None, model_config=TINY_CLIP, random_init=True)  # registers the tiny config
    torch.manual_seed(seed)
    net = open_clip.create_model(name, pretrained=None).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return net


# -- preprocessing against the libraries' own transforms -------------------------------------------------------
# PIL rounds the resized image to uint8 before normalising; that rounding (≤ 0.5/255, a little more through its
# fixed-point filter) divided by the smallest std bounds the difference. A wrong mean/std, crop offset, resize
# mode or interpolation is off by 0.05-1.
TOL = 2.5 / 255 / 0.26


@pytest.mark.parametrize("hw", [(32, 32), (48, 40), (40, 64), (96, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_open_clip_preprocessing_matches_open_clip_transform(hw):
    import open_clip

    images = uint8_images(2, *hw)
    for size, interp in [(24, "bicubic"), (32, "bilinear")]:
        tf = open_clip.image_transform(
            size,
            is_train=False,
            mean=open_clip.OPENAI_DATASET_MEAN,
            std=open_clip.OPENAI_DATASET_STD,
            interpolation=interp,
            resize_mode="shortest",
        )
        want = torch.stack([tf(to_pil(im)) for im in images])
        got = scorer_preprocess(
            images,
            (size, size),
            open_clip.OPENAI_DATASET_MEAN,
            open_clip.OPENAI_DATASET_STD,
            interpolation=interp,
        )
        assert got.shape == want.shape
        assert (got - want).abs().max() < TOL, (hw, size, interp, float((got - want).abs().max()))


@pytest.mark.parametrize("hw", [(30, 30), (40, 60), (40, 62), (64, 48)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_clip_image_processor_preprocessing_matches(hw):
    from transformers import CLIPImageProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20})
    images = uint8_images(2, *hw, seed=3)
    want = ip(images=[to_pil(im) for im in images], return_tensors="pt").pixel_values
    got = scorer_preprocess(
        images, (20, 20), ip.image_mean, ip.image_std, interpolation="bicubic", crop="floor"
    )
    assert got.shape == want.shape and (got - want).abs().max() < TOL, float((got - want).abs().max())


def test_preprocess_rejects_unsupported_modes():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(RewardError, match="resize_mode 'longest' unsupported"):
        scorer_preprocess(x, (4, 4), (0, 0, 0), (1, 1, 1), resize_mode="longest")
    with pytest.raises(RewardError, match="interpolation 'nearest' unsupported"):
        scorer_preprocess(x, (4, 4), (0, 0, 0), (1, 1, 1), interpolation="nearest")


# -- clip / hpsv2: open_clip cosine --------------------------------------------------------------------------------
def open_clip_cosine(net, name, images):
    """Oracle: open_clip's own model call with its own PIL preprocessing."""
    import open_clip

    tf = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        x = torch.stack([tf(to_pil(im)) for im in images])
        out = net(x, open_clip.get_tokenizer(name)(PROMPTS))
    return (out[0] * out[1]).sum(-1)  # CLIP.forward returns normalised image and text features


@pytest.mark.parametrize("spec,opt", [("clip", "checkpoint"), ("hpsv2", "checkpoint")])
def test_open_clip_rewards_load_a_saved_checkpoint(tmp_path, spec, opt):
    import open_clip

    name = f"tiny-{spec}"
    net = save_tiny_open_clip(tmp_path / "w.pt", name)
    reward = get_reward(spec, model=name, **{opt: str(tmp_path / "w.pt")}, batch_size=2)
    images = uint8_images(3, 48, 48)
    got = reward(images, PROMPTS)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, open_clip_cosine(net, name, images), atol=0.02, rtol=0)
    # random weights give cosines near 0: make sure the loaded weights (not a fresh init) produced them
    fresh = get_reward("clip", model=name, random_init=True)(images, PROMPTS)
    assert (fresh - got).abs().max() > 0.05
    torch.testing.assert_close(reward(images[:1], PROMPTS[:1]), got[:1], atol=1e-6, rtol=0)  # batching/cache
    # the diversity monitor's embeddings: open_clip's own normalised image features; a multi-reward finds them
    tf = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        want = F.normalize(net.encode_image(torch.stack([tf(to_pil(im)) for im in images])), dim=-1)
    torch.testing.assert_close(reward.image_embeddings(images), want, atol=0.02, rtol=0)
    multi = get_reward(f"toy:0.5,{spec}:0.5", **{spec: {"model": name, opt: str(tmp_path / "w.pt")}})
    torch.testing.assert_close(multi.image_embeddings(images), reward.image_embeddings(images))


def test_open_clip_errors(tmp_path):
    with pytest.raises(
        RewardError, match=r"^clip reward: open_clip checkpoint: no path given; pass checkpoint=PATH"
    ):
        get_reward("clip")
    with pytest.raises(
        RewardFileError, match=r"hpsv2 reward: checkpoint '.*missing.pt' not found; pass checkpoint"
    ):
        get_reward("hpsv2", checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(RewardError, match="unknown open_clip architecture 'NoSuchNet-1'"):
        get_reward("clip", model="NoSuchNet-1", random_init=True)
    with pytest.raises(
        RewardError, match="unknown open_clip architecture 'hf-hub:org/x'.*hub names are not fetched"
    ):
        get_reward("clip", model="hf-hub:org/x", random_init=True)
    with pytest.raises(RewardError, match="needs a Hugging Face text tower/tokenizer .*would be downloaded"):
        get_reward("clip", model="xlm-roberta-base-ViT-B-32", random_init=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RewardError, match="could not be read as a weights file"):
        get_reward("clip", model="tiny-err", model_config=TINY_CLIP, checkpoint=str(tmp_path / "junk.pt"))
    wrong = dict(TINY_CLIP, embed_dim=8)
    save_tiny_open_clip(tmp_path / "w.pt", "tiny-err16")
    with pytest.raises(RewardError, match="does not fit open_clip tiny-err8") as e:
        get_reward("clip", model="tiny-err8", model_config=wrong, checkpoint=str(tmp_path / "w.pt"))
    assert "\n" not in str(e.value)
    with pytest.raises(RewardError, match="unknown option.*foo.*its options are"):
        get_reward("clip", foo=1)


def test_reward_follows_the_images_device_and_fixed_device():
    r = get_reward("clip", model="tiny-dev", model_config=TINY_CLIP, random_init=True)
    out = r(uint8_images(2, 32, 32), PROMPTS[:2])
    assert r._fn.device == torch.device("cpu") and r._fn.dtype == torch.float32 and out.device.type == "cpu"
    r2 = get_reward("clip", model="tiny-dev", random_init=True, device="cpu", dtype=torch.float64)
    assert r2(uint8_images(2, 32, 32), PROMPTS[:2]).dtype == torch.float32
    assert next(r2._fn.model.parameters()).dtype == torch.float64


# -- aesthetic ---------------------------------------------------------------------------------------------------------
def laion_head(dim: int) -> torch.nn.Sequential:
    """The LAION improved-aesthetic-predictor MLP layout (Linear/Dropout alternating, layers.{0,2,4,6,7})."""
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 64),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(64, 32),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 16),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(16, 8),
        torch.nn.Linear(8, 1),
    ).eval()


def test_aesthetic_reward_loads_clip_and_head(tmp_path):
    import open_clip

    net = save_tiny_open_clip(tmp_path / "clip.pt", "tiny-aes")
    torch.manual_seed(2)
    head = laion_head(16)
    with torch.no_grad():  # a steeper head than init, so that the three images score visibly differently
        for m in head:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(4)
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp_path / "head.pth")
    reward = get_reward(
        "aesthetic", model="tiny-aes", checkpoint=str(tmp_path / "clip.pt"), head=str(tmp_path / "head.pth")
    )
    images = uint8_images(3, 40, 40)
    tf = open_clip.image_transform(32, is_train=False)
    with (
        torch.no_grad()
    ):  # oracle: LAION's recipe by hand - CLIP image embedding, L2 normalised, through the MLP
        emb = net.encode_image(torch.stack([tf(to_pil(im)) for im in images]))
        want = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    got = reward(images, PROMPTS)
    assert want.std() > 0.05  # the images do score differently, so the comparison can fail
    assert (got - want).abs().max() < 0.1 * want.std(), (got, want)


def test_aesthetic_errors(tmp_path):
    net = save_tiny_open_clip(tmp_path / "clip.pt", "tiny-aes-err")
    ck = str(tmp_path / "clip.pt")
    with pytest.raises(RewardError, match=r"aesthetic reward: MLP head: no path given; pass head=PATH"):
        get_reward("aesthetic", checkpoint=ck)
    with pytest.raises(RewardFileError, match=r"MLP head '.*nohead.pth' not found"):
        get_reward("aesthetic", checkpoint=ck, head=str(tmp_path / "nohead.pth"))
    torch.save({f"layers.{k}": v for k, v in laion_head(768).state_dict().items()}, tmp_path / "h768.pth")
    with pytest.raises(RewardError, match=r"head layer 0 .* has weight \(64, 768\); expected \[out, 16\]"):
        get_reward("aesthetic", model="tiny-aes-err", checkpoint=ck, head=str(tmp_path / "h768.pth"))
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "odd.pth")
    with pytest.raises(RewardError, match="has key 'fc.weight'; expected an MLP of layers"):
        get_reward("aesthetic", model="tiny-aes-err", checkpoint=ck, head=str(tmp_path / "odd.pth"))
    with pytest.raises(RewardFileError, match="aesthetic reward: CLIP checkpoint '.*nope.bin' not found"):
        torch.save({f"layers.{k}": v for k, v in laion_head(16).state_dict().items()}, tmp_path / "h.pth")
        get_reward("aesthetic", checkpoint=str(tmp_path / "nope.bin"), head=str(tmp_path / "h.pth"))
    del net


# -- pickscore ---------------------------------------------------------------------------------------------------------
def save_tiny_pickscore(root):
    """A random-init tiny transformers CLIPModel folder + a CLIPProcessor folder with a letter-level BPE vocab."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=16)
    ip = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 20, "width": 20})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(root / "processor")
    torch.manual_seed(3)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=20,
            patch_size=5,
        ),
        projection_dim=8,
        logit_scale_init_value=3.0,
    )
    model = CLIPModel(cfg).eval()
    model.save_pretrained(root / "model")
    return model, CLIPProcessor.from_pretrained(root / "processor", local_files_only=True)


def test_pickscore_reward_matches_clipmodel_forward(tmp_path):
    model, processor = save_tiny_pickscore(tmp_path)
    reward = get_reward("pickscore", model=str(tmp_path / "model"), processor=str(tmp_path / "processor"))
    images = uint8_images(3, 30, 40)
    with (
        torch.no_grad()
    ):  # oracle: the processor's PIL path + CLIPModel.forward's logits (logit_scale.exp()·cos)
        inputs = processor(
            text=PROMPTS,
            images=[to_pil(im) for im in images],
            return_tensors="pt",
            padding="max_length",
            max_length=16,
            truncation=True,
        )
        want = model(**inputs).logits_per_image.diagonal()
    got = reward(images, PROMPTS)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=inputs.pixel_values).pooler_output
    torch.testing.assert_close(reward.image_embeddings(images), F.normalize(emb, dim=-1), atol=0.02, rtol=0)
    assert (got - want).abs().max() < 0.2 * want.std()  # far closer than the spread between images


def test_pickscore_errors(tmp_path):
    with pytest.raises(RewardError, match="pickscore reward: model folder: no folder given; pass model=DIR"):
        get_reward("pickscore")
    with pytest.raises(RewardFileError, match="model folder '.*nope' is not a folder"):
        get_reward("pickscore", model=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardFileError, match="model folder '.*empty' has no config.json"):
        get_reward("pickscore", model=str(tmp_path / "empty"))
    save_tiny_pickscore(tmp_path)
    with pytest.raises(
        RewardFileError, match="processor folder .* has no preprocessor_config.json or processor"
    ):
        get_reward("pickscore", model=str(tmp_path / "model"))  # processor defaults to the model folder
