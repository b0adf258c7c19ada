"""``b2diffurl`` command line: ``train | sample | eval | info``.

b2diffurl sample --model toy --prompt "a red circle" --n 16 --out grid.png
b2diffurl eval --model toy --reward toy --prompts heldout
b2diffurl info
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="toy", help="'toy' or a local diffusers folder of SD 1.x/2.x (default toy)"
    )
    p.add_argument(
        "--lora",
        metavar="DIR",
        help="LoRA weights saved by a training run (lora.safetensors + lora_config.json)",
    )
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler call")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model dtype (auto: fp16 on CUDA for SD folders, else fp32)",
    )


def _load(args):
    import torch

    from b2diffurl.models import load_policy

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtype == "auto":
        dtype = torch.float16 if device.startswith("cuda") and args.model != "toy" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    policy = load_policy(args.model, dtype=dtype, device=device)
    if args.lora:
        policy.load_lora(args.lora)
    return policy


def _sample(policy, prompts: list[str], args):
    from b2diffurl.sampling import sample

    return sample(
        policy,
        prompts,
        num_steps=args.steps,
        guidance_scale=args.cfg,
        eta=args.eta,
        seed=args.seed,
        batch_size=args.batch_size,
    ).images


def save_grid(images, path, ncol: int | None = None) -> Path:
    """Images [N, 3, H, W] in [0, 1] -> one PNG (small images upscaled with nearest neighbour to ≥ 96 px)."""
    import math

    import torch.nn.functional as F
    from torchvision.utils import save_image

    ncol = ncol or math.ceil(math.sqrt(len(images)))
    scale = max(1, 96 // max(images.shape[-2:]))
    imgs = (
        F.interpolate(images.float().cpu(), scale_factor=scale, mode="nearest")
        if scale > 1
        else images.float().cpu()
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(imgs, path, nrow=ncol, padding=2, pad_value=1.0)
    return path


def cmd_sample(args) -> int:
    policy = _load(args)
    images = _sample(policy, [args.prompt] * args.n, args)
    print(f"wrote {save_grid(images, args.out)} ({args.n} samples of {args.prompt!r})")
    return 0


def _prompt_set(spec: str) -> list[str]:
    p = Path(spec)
    if p.suffix in (".txt", ".json") or p.is_file():
        if not p.is_file():
            raise SystemExit(f"b2diffurl eval: prompt file {spec!r} not found")
        text = p.read_text()
        return (
            json.loads(text)
            if p.suffix == ".json"
            else [ln.strip() for ln in text.splitlines() if ln.strip()]
        )
    from b2diffurl.toy.prompts import get_prompts

    try:
        return get_prompts(spec)
    except ValueError as e:
        raise SystemExit(f"b2diffurl eval: {e}; or give a .txt/.json file of prompts") from None


def _category(prompt: str) -> str:
    from b2diffurl.toy.prompts import prompt_category

    try:
        return prompt_category(prompt)
    except ValueError:
        return "other"


def _parse_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"b2diffurl eval: --reward-option expects KEY=VALUE, got {item!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_eval(args) -> int:
    import torch

    from b2diffurl.rewards import get_reward

    prompts = _prompt_set(args.prompts)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    reward_fn = get_reward(args.reward, **_parse_options(args.reward_option))
    policy = _load(args)
    rows = [p for p in prompts for _ in range(args.n_per_prompt)]
    images = _sample(policy, rows, args)
    scores = reward_fn(images, rows).float().cpu()
    cats = [_category(p) for p in rows]
    report = {
        "model": args.model,
        "reward": args.reward,
        "prompts": args.prompts,
        "n_images": len(rows),
        "by_category": {},
    }
    print(f"{'category':<10} {'mean':>7}   {'std':>6}  {'n':>5}")
    for cat in [*dict.fromkeys(cats), "all"]:
        s = scores if cat == "all" else scores[torch.tensor([c == cat for c in cats])]
        std = s.std().item() if len(s) > 1 else 0.0
        report["by_category"][cat] = {"mean": s.mean().item(), "std": std, "n": len(s)}
        print(f"{cat:<10} {s.mean().item():7.4f} ± {std:6.4f}  {len(s):5d}")
    first = images[:: args.n_per_prompt][:64]
    print(f"grid: {save_grid(first, args.out)} (first sample of up to 64 prompts)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_info(args) -> int:
    from b2kernels.info import report

    print(report())
    return 0


def _add_train_parser(sub) -> None:
    """`b2diffurl train` lives in b2diffurl.trainer (registered lazily so sample/eval work without it)."""
    try:
        from b2diffurl.trainer import add_train_subparser
    except ImportError as exc:
        reason = f"b2diffurl train is unavailable: b2diffurl.trainer failed to import ({exc})"
        p = sub.add_parser("train", help="RL fine-tuning (unavailable: b2diffurl.trainer failed to import)")
        p.set_defaults(func=lambda a: sys.exit(reason))
        return
    add_train_subparser(sub)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="b2diffurl",
        description="RL fine-tuning of text-to-image diffusion models (B²-DiffuRL, D-Fusion) on b2kernels",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)

    p = sub.add_parser("sample", help="sample a grid of images for one prompt")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="mean ± std reward per prompt category, plus a grid PNG")
    _add_model_args(p)
    p.add_argument("--reward", default="toy", help="toy | clip | python:pkg.module:function (default toy)")
    p.add_argument(
        "--reward-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="reward option, e.g. checkpoint=/path/open_clip_pytorch_model.bin (repeatable)",
    )
    p.add_argument(
        "--prompts",
        default="heldout",
        help="train | heldout | all [:single|count|relation], "
        "or a .txt (one per line) / .json (list) file (default heldout)",
    )
    p.add_argument("--n-per-prompt", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--out", default="eval_grid.png", help="grid PNG (default eval_grid.png)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="versions, devices and which kernel backend each op uses")
    p.set_defaults(func=cmd_info)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
