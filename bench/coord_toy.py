"""``python -m bench.coord_toy``: can a toy UNet trained from scratch follow relation words given more help?

``--arm plain|coord [--encoder causal|bidirectional]``: does position in the UNet's input, or a text encoder
whose every token sees the relation word, let the toy follow relation words?

The shipped toy UNet learns to be almost mirror-equivariant (``bench.toy_world``'s ``symmetry`` table), and an
equivariant denoiser draws "A left of B" as often as "A right of B". This is an A/B from scratch at equal
training time: ``plain`` is the toy UNet; ``coord`` is the same UNet given two extra input channels holding the
pixel coordinates (x from −1 at the left to +1 at the right, y from −1 at the top), so position, and with it
left from right, is in its input. ``--encoder bidirectional`` runs the toy's frozen text encoder without its
causal mask, so the first object's tokens see the relation word too. Every arm trains on the same data stream
(relation-heavy, each relation object in its own half of the image, part of each batch at the noisier half of
the schedule), then samples relation prompts and reports how often the two objects stand in the named order
(``bench.toy_world.relation_order``; 0.5 by chance). One process per arm, one thread each; results go to
``--out`` as JSON. Nothing here is used by the library: the shipped toy is unchanged.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import random
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, environment

ENCODERS = ("causal", "bidirectional")


class CoordInput(torch.nn.Module):
    """``unet`` (built for ``channels`` + 2 inputs) called on the latents with two coordinate channels appended."""

    def __init__(self, unet, size: int):
        super().__init__()
        self.unet = unet
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys])[None], persistent=False)

    @property
    def device(self) -> torch.device:
        return self.grid.device

    def forward(self, x, t, emb):
        return self.unet(torch.cat([x, self.grid.expand(x.shape[0], -1, -1, -1).to(x)], 1), t, emb)


class BidirectionalText(torch.nn.Module):
    """The toy's frozen ``CLIPTextModel`` run without its causal mask, so every token (the first object's
    colour and shape too) sees the relation word; same weights, same output layout (a 1-tuple)."""

    def __init__(self, clip_text):
        super().__init__()
        self.clip = clip_text

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def forward(self, ids):
        h = self.clip.embeddings(input_ids=ids)
        h = self.clip.encoder(inputs_embeds=h, attention_mask=None).last_hidden_state
        return (self.clip.final_layer_norm(h),)


def build_encoder(encoder: str):
    from b2diffurl.toy import model as M

    te = M.build_text_encoder()
    return te if encoder == "causal" else BidirectionalText(te).requires_grad_(False).eval()


def build(arm: str):
    from b2diffurl.toy import model as M

    unet = M.build_unet()
    if arm == "plain":
        return unet
    conv = unet.conv_in
    unet.conv_in = torch.nn.Conv2d(
        conv.in_channels + 2, conv.out_channels, conv.kernel_size, padding=conv.padding
    )
    return CoordInput(unet, M.LATENT_SHAPE[1])


def evaluate(model, te, tok, ddim, *, prompts: int, images: int, steps: int, seed: int) -> dict:
    from b2diffurl.toy.pretrain import ddim_sample
    from b2diffurl.toy.prompts import get_prompts
    from b2diffurl.toy.score import toy_success
    from bench.toy_world import relation_order

    out = {}
    rng = random.Random(seed)
    for cat in ("single", "count", "relation"):
        pool = get_prompts(f"all:{cat}")
        ps = [p for p in sorted(rng.sample(pool, min(prompts, len(pool)))) for _ in range(images)]
        imgs = torch.cat(
            [
                ddim_sample(model, te, tok, ddim, ps[i : i + 64], num_steps=steps, seed=seed + i)
                for i in range(0, len(ps), 64)
            ]
        )
        row = {"images": len(ps), "success": toy_success(imgs, ps).float().mean().item()}
        if cat == "relation":
            row["pairs_found"], row["order_right"] = relation_order(imgs, ps)
        out[cat] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.coord_toy", description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=("plain", "coord"), required=True)
    ap.add_argument(
        "--encoder",
        choices=ENCODERS,
        default="causal",
        help="the frozen text encoder: the toy's causal CLIP, or the same weights without the causal mask",
    )
    ap.add_argument("--minutes", type=float, default=35.0, help="training wall time")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-prompts", type=int, default=48, help="prompts per category in the evaluation")
    ap.add_argument("--eval-images", type=int, default=4, help="images per prompt in the evaluation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    if args.minutes <= 0:
        ap.error("--minutes must be positive")

    from b2diffurl.toy import model as M
    from b2diffurl.toy.pretrain import PromptEmbeddings, denoising_loss, training_batch, update

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = build(args.arm).train()
    tok, te = M.build_tokenizer(), build_encoder(args.encoder)
    ddpm, ddim = M.build_schedulers()
    params = list(model.parameters())
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    embed = PromptEmbeddings(tok, te)
    weights = {"single": 0.2, "count": 0.2, "relation": 0.6}
    losses, t0, step = [], time.time(), 0
    while time.time() - t0 < 60 * args.minutes:
        x0, prompts = training_batch(rng, args.batch, args.seed * 100_000 + step, weights, "halves")
        loss = denoising_loss(model, x0, embed(prompts), ddpm.alphas_cumprod, "v_prediction", 0.3)
        update(loss, opt, sched, params, ema_params, step, 0.998)
        losses.append(loss.item())
        step += 1
        if step % 250 == 0:
            print(
                f"step {step} loss {sum(losses[-250:]) / 250:.4f} {(time.time() - t0) / 60:.1f} min",
                flush=True,
            )
    train_min = (time.time() - t0) / 60
    ema.eval()
    with torch.no_grad():
        result = evaluate(
            ema, te, tok, ddim, prompts=args.eval_prompts, images=args.eval_images, steps=10, seed=1
        )
    record = {
        "suite": "coord_toy",
        "env": environment(),
        "arm": args.arm,
        "encoder": args.encoder,
        "steps": step,
        "train_minutes": round(train_min, 1),
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "category_weights": weights,
        "relation_layout": "halves",
        "high_noise": 0.3,
        "loss_last250": sum(losses[-250:]) / max(1, len(losses[-250:])),
        "eval": result,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.arm if args.encoder == "causal" else f"{args.arm}-{args.encoder}"
    path = args.out / f"coord_toy-{name}-seed{args.seed}-{_dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
