"""Architecture of the toy text-to-image model (diffusers/transformers classes, random init).

The text encoder is a tiny ``CLIPTextModel`` drawn once from a fixed seed and kept frozen (as SD keeps CLIP
frozen). Trained jointly with the UNet, the first toy's encoder learnt to ignore the words the UNet found
hard (swapping "left"/"right" moved the prompt embedding 2.7 % against 36 % for a colour), so relations
could never be learnt afterwards. A frozen random encoder moves every word's embedding alike (measured by
``bench/toy_world.py``), so whatever the reward depends on stays visible to the UNet and to RL.

Pixel space with an "identity VAE": a 32×32×3 image in [-1, 1] is pixel-unshuffled (lossless) into a
12×16×16 latent, so the UNet runs at 16×16 — about 4× cheaper than at 32×32, which is what makes CPU
pretraining fit in well under an hour — and still has cross-attention at two resolutions (16×16, 8×8;
plus the 4×4 mid block) for D-Fusion's masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2diffurl.toy.prompts import VOCAB

IMAGE_SIZE = 32
PATCH = 2
LATENT_SHAPE = (3 * PATCH * PATCH, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH)  # (12, 16, 16)
MAX_TOKENS = 16
SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>")
TEXT_DIM = 64


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` over the toy vocabulary (lowercased, whitespace split,
    ``<bos> … <eos>`` added, padded to MAX_TOKENS)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=MAX_TOKENS,
    )


TEXT_ENCODER_SEED = 0


def build_text_encoder(seed: int = TEXT_ENCODER_SEED):
    """Tiny frozen ``CLIPTextModel``: 2 layers, width 64, 16 positions, weights drawn from ``seed`` (the
    global RNG is left untouched), ``requires_grad`` off."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(SPECIAL) + len(VOCAB),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        projection_dim=TEXT_DIM,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te = CLIPTextModel(cfg)
    return te.requires_grad_(False).eval()


def build_unet(block_out_channels=(32, 64, 64), latent_shape=LATENT_SHAPE):
    """Tiny ``UNet2DConditionModel`` on (C, H, H) latents, 12×16×16 by default: cross-attention at 16×16, 8×8
    and the 4×4 mid block (at H and H/2 for other sizes)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_shape[1],
        in_channels=latent_shape[0],
        out_channels=latent_shape[0],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def build_schedulers(prediction_type: str = "v_prediction"):
    """(DDPMScheduler for training, DDIMScheduler for sampling) with the same cosine ᾱ schedule; SD-style
    DDIM settings (leading spacing, steps_offset 1, set_alpha_to_one False, no clipping).

    v-prediction (as SD 2.x): with ε-prediction the first DDIM step (t = 951, ᾱ ≈ 0.006) divides the ε
    error by √ᾱ, and the measured x̂₀ error (RMS 1.5) derailed sampling from pure noise; v keeps x̂₀ bounded."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=False,
    )
    ddim = DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return DDPMScheduler(**common), ddim


def images_to_latents(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, 32, 32] in [0, 1] -> latents [N, 12, 16, 16] in [-1, 1] (pixel unshuffle, lossless)."""
    return F.pixel_unshuffle(images * 2 - 1, PATCH)


def latents_to_images(latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, 12, 16, 16] -> images [N, 3, 32, 32] clamped to [0, 1]."""
    return ((F.pixel_shuffle(latents, PATCH) + 1) / 2).clamp(0, 1)
