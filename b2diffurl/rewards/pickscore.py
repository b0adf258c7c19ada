"""PickScore: a CLIP ViT-H/14 (transformers ``CLIPModel``) fine-tuned on Pick-a-Pic preferences.

Score = ``logit_scale.exp() · cos(image, prompt)``, the PickScore authors' inference formula (about 18-24
for SD images; flow_grpo divides it by 26 to train). Two local folders:

* ``model`` - the ``CLIPModel`` folder (``config.json`` + weights, e.g. PickScore_v1);
* ``processor`` - the ``CLIPProcessor`` folder (``preprocessor_config.json`` + tokenizer files; PickScore
  uses CLIP-ViT-H-14-laion2B-s32B-b79K's). Defaults to ``model`` when both live in one folder.

Images are preprocessed on the device with the processor's own size, crop, mean and std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2diffurl.rewards import RewardError, RewardFileError, require_dir
from b2diffurl.rewards.scorer import DeviceFollowingScorer, scorer_preprocess

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values
# the image processor config: its own file, or inside the processor config (as transformers 5 saves it)
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class PickScoreReward(DeviceFollowingScorer):
    """``reward(images [N,3,H,W] in [0,1], prompts) -> PickScore [N]``."""

    def __init__(
        self,
        model: str | None = None,
        processor: str | None = None,
        *,
        device=None,
        dtype=None,
        batch_size: int = 32,
    ):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        mdir = require_dir(
            model,
            "pickscore reward: model folder",
            "pass model=DIR, a local CLIPModel folder (e.g. PickScore_v1)",
            needs=("config.json",),
        )
        pdir = require_dir(
            processor or model,
            "pickscore reward: processor folder",
            "pass processor=DIR, a local CLIPProcessor folder (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K)",
        )
        if not any((pdir / n).is_file() for n in _PROCESSOR_FILES):
            raise RewardFileError(
                f"pickscore reward: processor folder {str(pdir)!r} has no {' or '.join(_PROCESSOR_FILES)}; "
                "pass processor=DIR, a local CLIPProcessor folder (e.g. CLIP-ViT-H-14-laion2B-s32B-b79K)"
            )
        try:
            net = CLIPModel.from_pretrained(str(mdir), local_files_only=True, dtype=torch.float32)
            image_processor = CLIPImageProcessor.from_pretrained(str(pdir), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(pdir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise RewardError(
                f"pickscore reward: cannot load {mdir} / {pdir}: {str(e).splitlines()[0]}"
            ) from None
        self.modules["clip"] = net
        self.model = net
        ip = image_processor
        if not getattr(ip, "do_center_crop", True) or not getattr(ip, "do_resize", True):
            raise RewardError(
                f"pickscore reward: {pdir} processor must resize and centre-crop (CLIP's default)"
            )
        crop = ip.crop_size
        short = ip.size["shortest_edge"] if "shortest_edge" in ip.size else None
        if short is None or short != crop["height"] or crop["height"] != crop["width"]:
            raise RewardError(
                f"pickscore reward: {pdir} processor size {dict(ip.size)} / crop {dict(crop)}; "
                "expected a square crop equal to the resized shortest edge (CLIP's default)"
            )
        resample = int(getattr(ip.resample, "value", ip.resample))
        if resample not in _RESAMPLE:
            raise RewardError(f"pickscore reward: unsupported processor resample {ip.resample!r}")
        self.preprocess = {
            "size": (int(crop["height"]), int(crop["width"])),
            "mean": tuple(ip.image_mean),
            "std": tuple(ip.image_std),
            "interpolation": _RESAMPLE[resample],
        }
        self.max_length = min(
            int(self.tokenizer.model_max_length), int(net.config.text_config.max_position_embeddings)
        )
        self._text_cache: dict[str, torch.Tensor] = {}

    def _on_moved(self) -> None:
        self._text_cache.clear()

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            tok = self.tokenizer(
                new, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            out = self.model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
            feats = F.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)
            self._text_cache.update(zip(new, feats))
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        p = self.preprocess
        x = scorer_preprocess(
            images,
            p["size"],
            p["mean"],
            p["std"],
            interpolation=p["interpolation"],
            crop="floor",
            dtype=self.dtype,
        )
        out = self.model.vision_model(pixel_values=x)
        return F.normalize(self.model.visual_projection(out.pooler_output).float(), dim=-1)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = self.image_features(images)
        return self.model.logit_scale.float().exp() * (img * self._text_features(prompts)).sum(-1)
