"""Pretrain the toy text-to-image model: ``python -m b2diffurl.toy.pretrain [--steps N] [--out DIR]``.

Data are rendered on the fly (:mod:`b2diffurl.toy.render`) from the train split with a category mix weighted
towards what RL is asked to improve (:data:`CATEGORY_WEIGHTS`), 10 % empty prompts for classifier-free
guidance. DDPM v-prediction loss (or ε with --prediction epsilon) on a cosine schedule, AdamW with warm-up then
constant LR; an EMA of the UNet weights is what gets saved. The text encoder is frozen (see
:mod:`b2diffurl.toy.model`), so the prompt embeddings are computed once per prompt and cached.
``--init-from`` warm-starts the UNet from an earlier checkpoint folder (same architecture).
The checkpoint (diffusers folder layout, safetensors) is rewritten every ``--save-every`` steps, so a
usable model exists even if the run is stopped early; at the end a loss curve, a sample grid and a
quality report (mean toy reward per prompt category) are written next to it.
This file also holds an independent sampling loop on ``DDIMScheduler.step`` (a cross-check for
:mod:`b2diffurl.sampling`).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from b2diffurl.toy import CHECKPOINT_DIR
from b2diffurl.toy import model as M
from b2diffurl.toy.prompts import CATEGORIES, heldout_prompts, prompt_category, train_prompts
from b2diffurl.toy.render import RELATION_LAYOUTS, render
from b2diffurl.toy.score import toy_score, toy_success

# counts and relations are what the first toy could not do; singles are learnt quickly at any weight
CATEGORY_WEIGHTS = {"single": 0.2, "count": 0.4, "relation": 0.4}
EVAL_STEPS = 10
P_UNCOND = 0.1


def encode(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompts -> text embeddings [N, MAX_TOKENS, TEXT_DIM]."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=M.MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def sample_prompts(rng: random.Random, n: int, weights: dict[str, float] | None = None) -> list[str]:
    """``n`` training prompts: a category drawn by ``weights`` (default :data:`CATEGORY_WEIGHTS`), then a prompt."""
    weights = weights or CATEGORY_WEIGHTS
    by_cat = {c: train_prompts(c) for c in CATEGORIES}
    cats = rng.choices(list(weights), weights=list(weights.values()), k=n)
    return [rng.choice(by_cat[c]) for c in cats]


def training_batch(
    rng: random.Random,
    n: int,
    seed: int,
    weights: dict[str, float] | None = None,
    relation_layout: str = "any",
) -> tuple[torch.Tensor, list[str]]:
    """One batch of the rendered data stream -> (latents [n, 12, 16, 16], prompts): ``n`` prompts drawn by
    ``weights`` (:func:`sample_prompts`), their scenes rendered from ``seed``, then :data:`P_UNCOND` of the
    prompts emptied for classifier-free guidance (``rng`` is drawn in that order)."""
    prompts = sample_prompts(rng, n, weights)
    x0 = M.images_to_latents(render(prompts, seed=seed, relation_layout=relation_layout))
    return x0, ["" if rng.random() < P_UNCOND else p for p in prompts]


class PromptEmbeddings:
    """Cached embeddings of the frozen text encoder: each distinct prompt is encoded once."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder, self.cache = tokenizer, text_encoder, {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with torch.no_grad():
                self.cache.update(zip(missing, encode(self.tokenizer, self.text_encoder, missing)))
        return torch.stack([self.cache[p] for p in prompts])


def denoising_loss(
    unet,
    x0: torch.Tensor,
    cond: torch.Tensor,
    alphas_cumprod,
    prediction: str,
    high_noise: float = 0.0,
    high_from: int | None = None,
) -> torch.Tensor:
    """DDPM training loss at uniform timesteps: MSE to v (``v_prediction``) or to the noise (``epsilon``).
    Draws the timesteps, then the noise (the order the committed checkpoints were trained with).
    ``high_noise`` > 0 moves that fraction of the batch (its first rows) to timesteps drawn evenly from
    ``high_from`` (default: half the schedule, the noisier half, where the layout is decided) to the last;
    0 draws exactly as before."""
    n_t = len(alphas_cumprod)
    high_from = n_t // 2 if high_from is None else high_from
    if not 0 <= high_from < n_t:
        raise ValueError(f"high_from must be in [0, {n_t}), got {high_from}")
    t = torch.randint(0, n_t, (x0.shape[0],), device=x0.device)
    k = round(high_noise * x0.shape[0])
    if k:
        t[:k] = high_from + t[:k] * (n_t - high_from) // n_t
    noise = torch.randn_like(x0)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    return F.mse_loss(unet(xt, t, cond).sample, target)


def update(loss, opt, sched, params, ema_params, step: int, ema: float, extra=()) -> None:
    """Backward, clip to norm 1 (``params`` and any ``extra`` trained parameters together), AdamW and
    LR-schedule steps, then the EMA of ``params`` (decay warmed up as (1+s)/(10+s))."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([*params, *extra], 1.0)
    opt.step()
    sched.step()
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1 - min(ema, (1 + step) / (10 + step)))


@torch.no_grad()
def ddim_sample(
    unet, text_encoder, tokenizer, scheduler, prompts, *, num_steps=20, guidance_scale=5.0, eta=1.0, seed=0
) -> torch.Tensor:
    """Reference DDIM sampler on ``DDIMScheduler.step`` -> images [N, 3, 32, 32] in [0, 1]."""
    dev = unet.device
    g = torch.Generator().manual_seed(seed)
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_steps)
    n = len(prompts)
    cond = encode(tokenizer, text_encoder, prompts)
    emb = torch.cat([encode(tokenizer, text_encoder, [""]).expand(n, -1, -1), cond])
    x = torch.randn((n, *M.LATENT_SHAPE), generator=g).to(dev)
    for t in sched.timesteps:
        eu, ec = unet(torch.cat([x, x]), t, emb).sample.chunk(2)
        eps = eu + guidance_scale * (ec - eu)
        noise = torch.randn(x.shape, generator=g).to(dev)
        x = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    return M.latents_to_images(x)


def save_checkpoint(out: Path, unet, text_encoder, tokenizer, ddim, meta: dict) -> None:
    """Write the diffusers-layout folder atomically (tmp dir + rename)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "tokenizer")
    ddim.save_pretrained(tmp / "scheduler")
    for sub in ("unet", "text_encoder"):  # the folder it was loaded from is a path on the training machine
        cfg_path = tmp / sub / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("_name_or_path", None)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    import diffusers

    index = {
        "_class_name": "B2DiffuRLToyPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "vae": [None, None],
        "b2diffurl_toy": {
            "latent_shape": list(M.LATENT_SHAPE),
            "image_size": M.IMAGE_SIZE,
            "patch": M.PATCH,
            "decode": "pixel_shuffle(latents, patch) * 0.5 + 0.5",
            **meta,
        },
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    keep = {p.name: p for p in out.glob("*.png")} | {
        p.name: p for p in out.glob("*.json") if p.name != "model_index.json"
    }
    for name, p in keep.items():  # artefacts from earlier evaluations survive a checkpoint rewrite
        shutil.copy2(p, tmp / name)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def evaluate(
    unet, text_encoder, tokenizer, ddim, out: Path | None, *, n_per_prompt=4, seed=0, num_steps=EVAL_STEPS
) -> dict:
    """Mean dense toy reward and success rate per (split, category) with ``num_steps`` DDIM steps, η = 1, CFG 5; writes
    samples.png and quality.json."""
    report = {}
    grid_rows = []
    for split, prompts in (("train", train_prompts()), ("heldout", heldout_prompts())):
        rng = random.Random(seed)
        for cat in CATEGORIES:
            ps = [p for p in prompts if prompt_category(p) == cat]
            ps = rng.sample(ps, min(len(ps), 24)) if cat == "relation" else ps
            ps = [p for p in ps for _ in range(n_per_prompt)]
            imgs = torch.cat(
                [
                    ddim_sample(
                        unet,
                        text_encoder,
                        tokenizer,
                        ddim,
                        ps[i : i + 64],
                        num_steps=num_steps,
                        seed=seed + i,
                    )
                    for i in range(0, len(ps), 64)
                ]
            )
            r, ok = toy_score(imgs, ps), toy_success(imgs, ps).float()
            report[f"{split}/{cat}"] = {
                "mean": r.mean().item(),
                "std": r.std().item(),
                "success": ok.mean().item(),
                "n": len(ps),
            }
            if split == "train":
                grid_rows.append(imgs[::n_per_prompt][:8])  # first sample of 8 prompts
    if out is not None:
        from torchvision.utils import save_image

        grid = F.interpolate(
            torch.cat(grid_rows).cpu(), scale_factor=3, mode="nearest"
        )  # rows: single, count, relation
        save_image(grid, out / "samples.png", nrow=8, padding=2, pad_value=1.0)
        (out / "quality.json").write_text(json.dumps({"num_steps": num_steps, **report}, indent=2))
    return report


def plot_losses(
    losses: list[float], path: Path, prior: list[float] | None = None, label: str = "v-MSE"
) -> None:
    """Loss curve PNG; ``prior`` = the losses of the run this one was initialised from (drawn first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v, k=50):
        return [sum(v[max(0, i - k) : i + 1]) / len(v[max(0, i - k) : i + 1]) for i in range(len(v))]

    prior = prior or []
    fig, ax = plt.subplots(figsize=(5.5, 3))
    if prior:
        ax.plot(prior, alpha=0.25, lw=0.5, color="gray")
        ax.plot(smooth(prior), lw=1.5, color="gray", label="warm-start run")
        ax.axvline(len(prior), color="k", lw=0.5, ls="--")
    xs = range(len(prior), len(prior) + len(losses))
    ax.plot(xs, losses, alpha=0.3, lw=0.5, color="C0")
    ax.plot(
        xs, smooth(losses), lw=1.5, color="C1", label=f"{'phase 2: ' if prior else ''}{label} (mean of 50)"
    )
    ax.set(yscale="log", xlabel="step (batch 64)", ylabel="loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _category_weights(text: str) -> dict[str, float]:
    """``'single=0.15,count=0.25,relation=0.6'`` -> a weight per category (every category, each ≥ 0, sum > 0)."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in CATEGORIES:
            raise argparse.ArgumentTypeError(
                f"expected CATEGORY=WEIGHT for each of {list(CATEGORIES)}, got {part!r}"
            )
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"weight of {name!r} is not a number: {value!r}") from None
    if set(out) != set(CATEGORIES) or min(out.values()) < 0 or sum(out.values()) <= 0:
        raise argparse.ArgumentTypeError(
            f"need a weight ≥ 0 for each of {list(CATEGORIES)}, not all zero; got {text!r}"
        )
    return out


def _load(folder: Path, dev):
    from b2diffurl.models import load_policy

    return load_policy(str(folder), device=dev)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--channels", type=str, default="32,64,64", help="UNet block_out_channels")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    ap.add_argument("--eval-only", action="store_true", help="evaluate the checkpoint in --out and exit")
    ap.add_argument("--no-eval", action="store_true", help="skip the quality report at the end")
    ap.add_argument("--prediction", default="v_prediction", choices=["v_prediction", "epsilon"])
    ap.add_argument(
        "--category-weights",
        type=_category_weights,
        default=dict(CATEGORY_WEIGHTS),
        help="prompt mix, e.g. 'single=0.15,count=0.25,relation=0.6' (default: %(default)s)",
    )
    ap.add_argument(
        "--relation-layout",
        default="any",
        choices=RELATION_LAYOUTS,
        help="how relation prompts' training images place their two objects: anywhere the relation holds, "
        "or each object in its own half of the image (default: %(default)s)",
    )
    ap.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="train the text encoder with the UNet (a diagnostic: the shipped toy keeps it frozen, see toy.model); "
        "it starts from the seed encoder, also with --init-from",
    )
    ap.add_argument(
        "--high-noise",
        type=float,
        default=0.0,
        help="fraction of each batch trained at timesteps from --high-noise-from to the last (default: 0)",
    )
    ap.add_argument(
        "--high-noise-from",
        type=int,
        default=None,
        help="the first timestep of --high-noise's range, of the scheduler's 1000 "
        "(default: 500, the noisier half)",
    )
    ap.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="warm-start the UNet from this checkpoint folder (fresh optimizer; --channels ignored)",
    )
    args = ap.parse_args(argv)
    if not 0.0 <= args.high_noise <= 1.0:
        ap.error(f"--high-noise must be in [0, 1], got {args.high_noise}")
    ddpm, ddim = M.build_schedulers(args.prediction)
    n_t = ddpm.config.num_train_timesteps
    if args.high_noise_from is not None and not 0 <= args.high_noise_from < n_t:
        ap.error(f"--high-noise-from must be in [0, {n_t}), got {args.high_noise_from}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    dev = torch.device(args.device)
    tokenizer = M.build_tokenizer()
    if args.eval_only:
        pol = _load(args.out, dev)
        print(json.dumps(evaluate(pol.unet, pol.text_encoder, tokenizer, pol.scheduler, args.out), indent=2))
        return
    init_info, prior_losses = None, None
    te = M.build_text_encoder().to(dev)
    if args.init_from is not None:
        index = json.loads((args.init_from / "model_index.json").read_text()).get("b2diffurl_toy", {})
        layout = ("latent_shape", "image_size", "patch", "decode")
        init_info = {k: v for k, v in index.items() if k not in layout}  # the previous run's whole recipe
        init_info.setdefault("text_encoder", None)
        init_info["text_encoder"] = init_info["text_encoder"] or "trained jointly with the UNet"
        if (args.init_from / "losses.json").is_file():
            prior_losses = json.loads((args.init_from / "losses.json").read_text())
        unet = _load(args.init_from, dev).unet
        unet.requires_grad_(True).train()
        args.channels = ",".join(str(c) for c in unet.config.block_out_channels)
    else:
        unet = M.build_unet(tuple(int(c) for c in args.channels.split(","))).to(dev)
    params = list(unet.parameters())
    te_params = list(te.parameters()) if args.train_text_encoder else []
    te.requires_grad_(args.train_text_encoder).train(args.train_text_encoder)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_params = list(ema_unet.parameters())
    embed = (
        (lambda ps: encode(tokenizer, te, ps)) if args.train_text_encoder else PromptEmbeddings(tokenizer, te)
    )

    opt = torch.optim.AdamW(params + te_params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    acp = ddpm.alphas_cumprod.to(dev)
    print(
        f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, text encoder "
        f"{sum(p.numel() for p in te.parameters()) / 1e6:.2f}M "
        f"({'trained' if args.train_text_encoder else 'frozen'}); threads {torch.get_num_threads()}",
        flush=True,
    )
    losses, t0 = [], time.time()
    from tqdm import tqdm

    bar = tqdm(range(args.steps), mininterval=20, dynamic_ncols=False, ncols=100)
    step = 0
    for step in bar:
        x0, prompts = training_batch(
            rng, args.batch, args.seed * 100_000 + step, args.category_weights, args.relation_layout
        )
        x0 = x0.to(dev)
        loss = denoising_loss(
            unet, x0, embed(prompts), acp, args.prediction, args.high_noise, args.high_noise_from
        )
        update(loss, opt, sched, params, ema_params, step, args.ema, te_params)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(
                loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}",
                s_per_step=f"{(time.time() - t0) / (step + 1):.2f}",
            )
        last = step + 1 == args.steps or (args.max_minutes and time.time() - t0 > 60 * args.max_minutes)
        if (step + 1) % args.save_every == 0 or last:
            meta = {
                "train_steps": step + 1,
                "command": "python -m b2diffurl.toy.pretrain "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "prediction_type": args.prediction,
                "init_from": init_info,
                "batch": args.batch,
                "lr": args.lr,
                "ema": args.ema,
                "seed": args.seed,
                "channels": args.channels,
                "category_weights": args.category_weights,
                "relation_layout": args.relation_layout,
                "high_noise": args.high_noise,
                "high_noise_from": args.high_noise_from,
                "p_uncond": P_UNCOND,
                "text_encoder": f"{'trained' if args.train_text_encoder else 'frozen'} CLIPTextModel, "
                f"random init from seed {M.TEXT_ENCODER_SEED}",
                "threads": torch.get_num_threads(),
                "s_per_step": round((time.time() - t0) / (step + 1), 3),
                "wall_minutes": round((time.time() - t0) / 60, 1),
                "final_loss_mean100": sum(losses[-100:]) / len(losses[-100:]),
            }
            save_checkpoint(args.out, ema_unet, te, tokenizer, ddim, meta)
            (args.out / "losses.json").write_text(json.dumps([round(v, 5) for v in losses]))
            plot_losses(
                losses,
                args.out / "loss_curve.png",
                prior_losses,
                "v-MSE" if args.prediction == "v_prediction" else "ε-MSE",
            )
            print(f"\nsaved step {step + 1} to {args.out} ({(time.time() - t0) / 60:.1f} min)", flush=True)
        if last:
            break
    if args.no_eval:
        return
    ema_unet.eval()
    te.requires_grad_(False).eval()
    report = evaluate(ema_unet, te, tokenizer, ddim, args.out)
    print(json.dumps(report, indent=2), flush=True)
    print(f"done: {step + 1} steps in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
