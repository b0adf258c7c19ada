"""Load a text-to-image policy: the embedded toy model or a local Stable Diffusion 1.x/2.x diffusers folder.

``load_policy(source, dtype=..., device=...)`` returns a :class:`Policy` holding the UNet, text encoder,
tokenizer, a DDIM scheduler built from the folder's scheduler config, and the VAE (``None`` for the toy,
which lives in pixel space behind a lossless pixel-unshuffle, see :mod:`b2diffurl.toy.model`).
Everything is loaded with ``local_files_only=True``: nothing is ever downloaded.

LoRA (peft, through diffusers' adapter API) goes on the UNet attention projections; only the LoRA
weights are saved/loaded, and :meth:`Policy.lora_disabled` gives the frozen reference policy (D3PO).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_LORA_WEIGHTS, _LORA_CONFIG = "lora.safetensors", "lora_config.json"


class ModelError(ValueError):
    """A model folder that cannot be loaded as asked (missing, malformed, wrong kind); one line naming the fix."""


class ModelFileError(ModelError, FileNotFoundError):
    """The model path or a file it needs does not exist (nothing is downloaded)."""


class VAECodec:
    """Latent space of Stable Diffusion: ``AutoencoderKL`` with its scaling factor (frozen)."""

    def __init__(self, vae):
        self.vae = vae.requires_grad_(False).eval()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """VAE posterior mean of images in [0, 1], scaled."""
        x = images.to(self.vae.device, self.vae.dtype) * 2 - 1
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor


class PixelShuffleCodec:
    """Pixel space behind a lossless pixel-(un)shuffle: latents = unshuffle(2·image − 1, patch), so a UNet runs at
    1/patch of the image side on 3·patch² channels (the embedded toy model: patch 2, 32×32 images)."""

    def __init__(self, patch: int):
        self.patch = int(patch)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((F.pixel_shuffle(latents.float(), self.patch) + 1) / 2).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images * 2 - 1, self.patch)


class FirstChannelsCodec:
    """Latents [N, 4, h, w] <-> "images" [N, 3, h, w]: the first 3 channels mapped from [-1, 1] to [0, 1]. A stand-in
    for the VAE of a random-init model (:func:`random_policy`: throughput does not depend on what the pixels show)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents[:, :3].float() * 0.5 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)


class Codec(Protocol):
    """Images [N, 3, H, W] float in [0, 1] <-> latents [N, *latent_shape] (the UNet's space)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...


class Policy:
    """UNet + text encoder + tokenizer + DDIMScheduler + image codec on one device.

    ``latent_shape`` is (C, H, W) of one latent; ``encode_prompts`` -> [N, L, D]; ``decode`` latents ->
    images [N, 3, H_img, W_img] in [0, 1]. The text encoder is frozen; the UNet is frozen too once LoRA is
    attached (only adapter weights train). ``object_words``: the nouns whose cross-attention marks the objects
    of a prompt (D-Fusion's mask) when the model's world knows them (the toy model does; SD: empty, set them
    in the config). Build one with :meth:`from_components` or :func:`load_policy`."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler, codec: Codec, *, source, object_words):
        self.unet, self.text_encoder, self.tokenizer, self.scheduler, self.codec = (
            unet,
            text_encoder,
            tokenizer,
            scheduler,
            codec,
        )
        self.source, self.object_words = source, tuple(object_words)
        self.text_encoder.requires_grad_(False).eval()
        size = unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        self.latent_shape = (int(unet.config.in_channels), int(size), int(size))
        self.lora_config: dict | None = None

    @classmethod
    def from_components(
        cls,
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        codec: Codec,
        *,
        object_words: tuple[str, ...] = (),
        source: str = "components",
    ) -> Policy:
        """A policy from modules in memory (e.g. tiny random ones in tests and benches): ``scheduler`` is any
        DDIM-compatible diffusers scheduler (its config is turned into a ``DDIMScheduler``), ``codec`` maps
        latents to images (:class:`VAECodec`, :class:`PixelShuffleCodec` or any object with ``decode`` and
        ``encode``). The text encoder moves to the UNet's device."""
        from diffusers import DDIMScheduler

        text_encoder = text_encoder.to(unet.device)
        cfg = {**scheduler.config, "_class_name": type(scheduler).__name__}
        ddim = DDIMScheduler.from_config(_ddim_compatible(cfg, source))
        return cls(unet, text_encoder, tokenizer, ddim, codec, source=source, object_words=object_words)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # -- text and pixels ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts (len N) -> text embeddings [N, L, D] on the policy's device (uncond: ``[""]``)."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0].to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [N, *latent_shape] -> images [N, 3, H, W] float32 in [0, 1]."""
        return self.codec.decode(latents).float()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] -> latents [N, *latent_shape] in the policy's dtype and device."""
        return self.codec.encode(images.to(self.device)).to(self.device, self.dtype)

    # -- LoRA -----------------------------------------------------------------------------------
    def add_lora(
        self, rank: int = 4, alpha: float = 4, targets=DEFAULT_LORA_TARGETS, dropout: float = 0.0
    ) -> None:
        """Attach a LoRA adapter (A random, B zero: starts as the identity) to the UNet attention
        projections named ``targets``; freezes the rest of the UNet. Adapter weights are fp32."""
        from peft import LoraConfig

        if self.lora_config is not None:
            raise RuntimeError(
                f"a LoRA adapter is already attached ({self.lora_config}); load_lora replaces its weights"
            )
        cfg = {
            "r": int(rank),
            "lora_alpha": float(alpha),
            "target_modules": list(targets),
            "lora_dropout": float(dropout),
        }
        self.unet.requires_grad_(False)
        try:
            self.unet.add_adapter(LoraConfig(init_lora_weights=True, **cfg))
        except ValueError as e:
            names = sorted(
                {n.rsplit(".", 1)[-1] for n, _ in self.unet.named_modules()}
                & {"to_q", "to_k", "to_v", "proj_in"}
            )
            raise ValueError(
                f"could not attach LoRA to UNet modules {list(targets)}: {e} (e.g. {names})"
            ) from None
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.lora_config = cfg

    def make_trainable(self, lora=None) -> list:
        """Freeze the text encoder; with ``lora`` (a ``ModelConfig``: rank, alpha, targets) attach an adapter
        and train only it, else train the whole UNet. Returns the trainable parameters."""
        from b2diffurl.config import ConfigError

        self.text_encoder.requires_grad_(False)
        if lora is not None:  # add_lora freezes the UNet and keeps the adapter weights in float32
            want = (int(lora.lora_rank), float(lora.lora_alpha), list(lora.lora_targets))
            have = self.lora_config
            # the same adapter already attached (a second run on one policy object, e.g. a bench's warm-up)
            if have is None or (have["r"], have["lora_alpha"], have["target_modules"]) != want:
                self.add_lora(*want[:2], tuple(want[2]))
            else:  # train only the adapter again, whatever was unfrozen since
                for name, q in self.unet.named_parameters():
                    q.requires_grad_("lora_" in name)
        else:
            self.unet.requires_grad_(True)
        params = [q for q in self.unet.parameters() if q.requires_grad]
        if not params:
            raise ConfigError("no trainable UNet parameters: model.lora_targets matched no module")
        return params

    def save_lora(self, directory) -> Path:
        """Write only the adapter: ``lora.safetensors`` + ``lora_config.json`` into ``directory``."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if self.lora_config is None:
            raise RuntimeError("no LoRA adapter attached: call add_lora(...) first")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()
        }
        save_file(state, str(d / _LORA_WEIGHTS))
        (d / _LORA_CONFIG).write_text(json.dumps({**self.lora_config, "source": self.source}, indent=2))
        return d

    def load_lora(self, directory) -> None:
        """Load adapter weights saved by :meth:`save_lora` (attaching an adapter with the saved config if
        none is attached)."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / _LORA_WEIGHTS).is_file() or not (d / _LORA_CONFIG).is_file():
            raise FileNotFoundError(
                f"expected a LoRA folder with {_LORA_WEIGHTS} and {_LORA_CONFIG}, got {d}"
            )
        cfg = json.loads((d / _LORA_CONFIG).read_text())
        cfg.pop("source", None)
        if self.lora_config is None:
            self.add_lora(
                rank=cfg["r"],
                alpha=cfg["lora_alpha"],
                targets=cfg["target_modules"],
                dropout=cfg.get("lora_dropout", 0.0),
            )
        elif {k: self.lora_config[k] for k in ("r", "target_modules")} != {
            k: cfg[k] for k in ("r", "target_modules")
        }:
            raise ValueError(f"LoRA in {d} has config {cfg}, the attached adapter has {self.lora_config}")
        result = set_peft_model_state_dict(
            self.unet, load_file(str(d / _LORA_WEIGHTS), device=str(self.device))
        )
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"LoRA weights in {d} do not fit this UNet: unexpected keys {unexpected[:5]}")

    @contextlib.contextmanager
    def lora_disabled(self):
        """Within the block the UNet runs without its adapter (π_ref of D3PO); no-op without LoRA."""
        if self.lora_config is None:
            yield
            return
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()


# -- loading ------------------------------------------------------------------------------------
def _check_folder(path: Path) -> None:
    if not path.exists():
        raise ModelFileError(
            f"model path {str(path)!r} does not exist; expected 'toy' or a local diffusers folder "
            f"(with {', '.join(REQUIRED)}, vae/ subfolders) of Stable Diffusion 1.x/2.x"
        )
    if not path.is_dir():
        raise ModelError(
            f"model path {str(path)!r} is a file; expected a diffusers folder (e.g. saved with "
            f"StableDiffusionPipeline.save_pretrained) with subfolders {', '.join(REQUIRED)}, vae"
        )
    missing = [s for s in REQUIRED if not (path / s).is_dir()]
    if missing:
        raise ModelError(
            f"{str(path)!r} is not a diffusers text-to-image folder: missing subfolder(s) "
            f"{', '.join(missing)}; expected {', '.join(REQUIRED)} (+ vae for latent-space models)"
        )


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {p}: {e}") from None


def _ddim_compatible(cfg: dict, where) -> dict:
    """The scheduler config ``cfg`` if DDIM can stand in for its scheduler, else a ValueError naming the fix."""
    import diffusers

    name = cfg.get("_class_name", "?")
    cls = getattr(diffusers, name, None)
    compatible = name == "DDIMScheduler" or "DDIMScheduler" in [
        getattr(c, "__name__", c) for c in getattr(cls, "_compatibles", [])
    ]
    pred = cfg.get("prediction_type", "epsilon")
    if not compatible or pred not in ("epsilon", "v_prediction", "sample"):
        raise ModelError(
            f"{where} has scheduler {name} (prediction_type={pred!r}); expected a DDPM-family "
            "scheduler that DDIMScheduler can replace (DDIM, DDPM, PNDM, Euler, DPM-Solver, ...) with "
            "prediction_type epsilon, v_prediction or sample — e.g. Stable Diffusion 1.x/2.x"
        )
    return cfg


def load_policy(source: str = "toy", *, dtype: torch.dtype | str = torch.float32, device="cpu") -> Policy:
    """``source``: ``"toy"`` (the embedded checkpoint), a toy checkpoint folder (its ``model_index.json`` has a
    ``b2diffurl_toy`` entry: pixel-space codec, or a ``vae/`` when the entry says ``"codec": "vae"``; the toy
    world's object words) or the path of a local diffusers
    folder of SD 1.x/2.x (unet/, text_encoder/, tokenizer/, scheduler/, vae/). Offline only. ``dtype``: a torch
    dtype or its name (``"float16"``); every module is loaded in it. A missing or malformed folder raises
    :class:`ModelError` with a one-line message."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    if isinstance(dtype, str):  # diffusers ignores a dtype name (fp32) where transformers honours it: resolve
        if dtype not in DTYPES:
            raise ModelError(f"dtype {dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if str(source) == "toy":
        from b2diffurl.toy import CHECKPOINT_DIR as path

        if not (path / "unet").is_dir():
            raise ModelFileError(
                f"the embedded toy checkpoint is missing at {path}; "
                "create it with `python -m b2diffurl.toy.pretrain`"
            )
    else:
        path = Path(source).expanduser()
    _check_folder(path)
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    toy = index.get("b2diffurl_toy")
    unet_cls = (
        _read_json(path / "unet" / "config.json").get("_class_name")
        if (path / "unet" / "config.json").is_file()
        else None
    )
    if unet_cls != "UNet2DConditionModel":
        raise ModelError(
            f"{path}/unet holds {unet_cls or 'no config.json'}; expected a UNet2DConditionModel (SD 1.x/2.x)"
        )
    sched_cfg = _read_json(path / "scheduler" / "scheduler_config.json")
    scheduler = DDIMScheduler.from_config(_ddim_compatible(sched_cfg, path))
    kw = dict(local_files_only=True, torch_dtype=dtype)
    with _loading(path, "unet"):
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kw).to(device)
    with _loading(path, "text_encoder"):
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **kw).to(device)
    with _loading(path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    object_words: tuple = ()
    if toy is not None:
        from b2diffurl.toy.prompts import OBJECT_WORDS  # the toy world tells what its objects are

        object_words = OBJECT_WORDS
    if toy is not None and toy.get("codec") != "vae":
        codec = PixelShuffleCodec(toy["patch"])
    else:  # SD folders, and toys in a learned latent space (bench/latent_toy.py)
        from diffusers import AutoencoderKL

        if not (path / "vae").is_dir():
            expected = (
                "its b2diffurl_toy entry names codec 'vae'"
                if toy is not None
                else "expected an SD 1.x/2.x diffusers folder with a VAE"
            )
            raise ModelError(f"{str(path)!r} has no vae/ subfolder; {expected}")
        with _loading(path, "vae"):
            codec = VAECodec(AutoencoderKL.from_pretrained(path / "vae", **kw).to(device))
    return Policy.from_components(
        unet, text_encoder, tokenizer, scheduler, codec, object_words=object_words, source=str(source)
    )


def random_policy(
    unet_config: dict,
    device="cpu",
    dtype=torch.float32,
    *,
    seq: int | None = None,
    text_heads: int = 4,
    seed: int = 0,
    source: str = "random",
) -> Policy:
    """A :class:`Policy` from random-init modules (benchmarks and CPU tests; nothing is loaded):
    ``UNet2DConditionModel(**unet_config)``, a 1-layer CLIP text encoder (hidden = cross_attention_dim,
    ``text_heads`` heads) over the toy world's word tokenizer padded to ``seq`` tokens (default: its own
    length), Stable Diffusion's DDIM scheduler settings and :class:`FirstChannelsCodec`. ``seed`` seeds torch's
    global generator before the UNet and text encoder are initialised."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from b2diffurl.toy.model import build_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config).to(device, dtype)
    tokenizer = build_tokenizer()
    if seq is not None:
        tokenizer.model_max_length = seq
    d = unet_config["cross_attention_dim"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=1,
            num_attention_heads=text_heads,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=d,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).to(device, dtype)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return Policy.from_components(
        unet, text_encoder, tokenizer, scheduler, FirstChannelsCodec(), source=source
    )


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def _loading(path: Path, sub: str):
    """Turn the loaders' errors on a malformed subfolder (missing or truncated weights, a bad config) into one
    ModelError line; anything else is a bug and keeps its traceback."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"cannot load {sub}/ of model folder {str(path)!r}: {first}") from None


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device without CUDA is
    a user error (one line, raised before any model loads)."""
    from b2diffurl.config import ConfigError, check_device

    if problem := check_device(spec):
        raise ConfigError(problem)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for, but CUDA is not available; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device
