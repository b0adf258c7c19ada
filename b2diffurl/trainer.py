"""The training loop shared by every algorithm: stages of sample → reward → select → train.

The trainer owns what is common (device/dtype, policy + LoRA, optimizer and LR schedule, random generators,
held-out evaluation, JSONL metrics, sample grids, reward curve, checkpoints, exact resume, SIGTERM); an
algorithm (``b2diffurl.algos.api.Algorithm``, registered in ``b2diffurl.config.ALGORITHMS``) owns the stage.

Output directory::

    config.yaml               resolved config of the run
    metrics.jsonl             one line per stage ({"kind": "stage", ...}) and per evaluation ({"kind": "eval"})
    grids/stage_NNNNN.png     sample grids (+ .txt captions) every ``grid_every`` stages
    checkpoints/stage_NNNNN/  state.pt (+ lora/ for LoRA runs); ``checkpoints/LATEST`` names the newest
    reward_curve.png          at the end

Checkpoints are written to a temporary directory, fsynced and renamed into place, then ``LATEST`` is replaced
atomically, so a crash at any point leaves the last good checkpoint intact. Resume restores parameters,
optimizer, LR schedule, stage index, the algorithm's state (stat-tracker history), every RNG (torch CPU/CUDA,
numpy, python, the sampler's and shuffler's generators) and truncates metrics.jsonl to the checkpoint, so a
killed-and-resumed run logs the same numbers as an uninterrupted one (CPU, fp32; on GPU add
``deterministic=true``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from b2diffurl import config as C

log = logging.getLogger("b2diffurl.trainer")
CHECKPOINT_VERSION = 1
_TIMING_SUFFIXES = (
    "_time_s",
    "_per_s",
    "_time",
)  # metric names holding wall-clock numbers (not reproducible)


# ----------------------------------------------------------------------------------------------- helpers
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise C.ConfigError(f"model.device={spec!r} but CUDA is not available; use model.device=cpu or auto")
    return dev


def load_prompts(spec: str, split: str) -> list[str]:
    if spec == "none":
        return []
    if spec == "toy" or spec.startswith("toy:"):
        from b2diffurl.toy import prompts as toy_prompts

        category = spec.partition(":")[2] or None  # toy:relation -> that category of the split
        try:
            return list(toy_prompts.get_prompts(split + (f":{category}" if category else "")))
        except ValueError as exc:
            raise C.ConfigError(f"prompts {spec!r}: {exc}") from None
    text = Path(spec).read_text()
    if spec.endswith(".json"):
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise C.ConfigError(f"{spec}: expected a JSON list of prompt strings")
        return data
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def rng_state(noise_gen: torch.Generator, cpu_gen: torch.Generator) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "noise_gen": noise_gen.get_state(),
        "cpu_gen": cpu_gen.get_state(),
    }


def set_rng_state(state: dict, noise_gen: torch.Generator, cpu_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    noise_gen.set_state(state["noise_gen"])
    cpu_gen.set_state(state["cpu_gen"])


def _progress(enabled: bool):
    if not enabled:
        return lambda it, **kw: it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return lambda it, **kw: it
    return lambda it, **kw: tqdm(it, dynamic_ncols=True, **kw)


def save_grid(images: torch.Tensor, captions: list[str], path: Path, ncol: int = 8) -> None:
    from PIL import Image

    imgs = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    n, _, h, w = imgs.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    scale = max(1, 96 // max(h, w))
    canvas = torch.full((3, nrow * (h + 2), ncol * (w + 2)), 255, dtype=torch.uint8)
    for k in range(n):
        r, c = divmod(k, ncol)
        canvas[:, r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = imgs[k]
    img = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    path.with_suffix(".txt").write_text("\n".join(captions) + "\n")


def plot_reward_curve(metrics: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    st = [m for m in metrics if m.get("kind") == "stage"]
    ev = [m for m in metrics if m.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if st:
        x = np.array([m["stage"] for m in st])
        y = np.array([m["reward_mean"] for m in st])
        s = np.array([m["reward_std"] for m in st])
        ax.plot(x, y, label="train reward (stage mean)")
        ax.fill_between(x, y - s, y + s, alpha=0.2)
    if ev:
        ax.plot([m["stage"] for m in ev], [m["reward_mean"] for m in ev], "o-", label="held-out reward")
    ax.set_xlabel("stage")
    ax.set_ylabel("reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def is_timing_key(k: str) -> bool:
    return k.endswith(_TIMING_SUFFIXES) or k == "wall_time_s"


# ----------------------------------------------------------------------------------------------- trainer
def paired_gain(before, after) -> dict:
    """Paired comparison of two evaluations of the same (prompt, seed) images: mean per-image gain, its
    standard error, and how many images got better / worse."""
    d = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    return {
        "gain": float(d.mean()),
        "gain_se": se,
        "n_better": int((d > 1e-6).sum()),
        "n_worse": int((d < -1e-6).sum()),
    }


class Trainer:
    """``Trainer(cfg).run()``; ``policy`` / ``reward_fn`` may be injected (tests, notebooks)."""

    def __init__(
        self,
        cfg: C.RunConfig,
        *,
        policy=None,
        reward_fn=None,
        resume: str | None = None,
        train_prompts: list[str] | None = None,
        heldout_prompts: list[str] | None = None,
    ):
        C.validate(cfg)
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.model.device)
        self.dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            cfg.model.dtype
        ]
        self._stop_requested = False
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        # everything that can fail on a bad config fails here, before any sampling
        self.train_prompts = (
            train_prompts if train_prompts is not None else load_prompts(cfg.prompts, "train")
        )
        self.heldout_prompts = (
            heldout_prompts if heldout_prompts is not None else load_prompts(cfg.eval.prompts, "heldout")
        )
        if not self.train_prompts:
            raise C.ConfigError(f"prompts={cfg.prompts!r} gave no training prompts")
        if reward_fn is None:
            from b2diffurl.rewards import get_reward

            try:
                reward_fn = get_reward(cfg.reward, **cfg.reward_options)
            except (KeyError, ValueError, ImportError, AttributeError) as exc:
                raise C.ConfigError(f"reward {cfg.reward!r}: {exc}") from exc
        self.reward_fn = reward_fn
        algo_cls = self._algo_class(cfg.algo)

        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        torch.manual_seed(cfg.seed)
        if policy is None:
            from b2diffurl.models import load_policy

            policy = load_policy(cfg.model.path, dtype=self.dtype, device=self.device)
        self.policy = policy
        self.params = self._setup_trainable()
        tc = cfg.train
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=tc.lr,
            betas=(tc.adam_beta1, tc.adam_beta2),
            weight_decay=tc.weight_decay,
            eps=tc.adam_eps,
        )
        warm = tc.lr_warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: min(1.0, (n + 1) / warm) if warm > 0 else 1.0
        )

        from b2diffurl.algos.api import RunContext
        from b2diffurl.sampling import TreeSampler

        s = cfg.sample
        self.sampler = TreeSampler(
            policy,
            num_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
            eta=s.eta,
            backend=s.backend,
            cuda_graphs=s.cuda_graphs,
        )
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.cpu_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.ctx = RunContext(
            cfg=cfg,
            policy=policy,
            reward_fn=self.reward_fn,
            sampler=self.sampler,
            params=self.params,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            train_prompts=self.train_prompts,
            device=self.device,
            noise_gen=self.noise_gen,
            cpu_gen=self.cpu_gen,
            progress=_progress(cfg.progress),
        )
        self.algo = algo_cls(self.ctx)
        self.start_stage = 0
        self.metrics: list[dict] = []
        if resume:
            self._load_checkpoint(self._find_checkpoint(resume))

    # ---- setup ---------------------------------------------------------------------------------------------
    @staticmethod
    def _algo_class(name: str):
        mod, _, cls = C.ALGORITHMS[name].partition(":")
        return getattr(importlib.import_module(mod), cls)

    def use_lora(self) -> bool:
        m = self.cfg.model
        # D-Fusion's DPO needs π_ref = the same UNet with LoRA disabled, so 'auto' means LoRA for it on the toy too
        return m.lora == "on" or (m.lora == "auto" and (m.path != "toy" or self.cfg.algo == "dfusion"))

    def _setup_trainable(self) -> list[torch.nn.Parameter]:
        p, m = self.policy, self.cfg.model
        if getattr(p, "text_encoder", None) is not None:
            p.text_encoder.requires_grad_(False)
        if getattr(p, "vae", None) is not None:
            p.vae.requires_grad_(False)
        if self.use_lora():
            p.unet.requires_grad_(False)
            p.add_lora(rank=m.lora_rank, alpha=m.lora_alpha, targets=tuple(m.lora_targets))
            params = [q for q in p.unet.parameters() if q.requires_grad]
            for q in params:  # LoRA weights train in float32 whatever the base dtype
                q.data = q.data.float()
        else:
            p.unet.requires_grad_(True)
            params = list(p.unet.parameters())
        if not params:
            raise RuntimeError("no trainable UNet parameters (LoRA targets matched nothing?)")
        return params

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {
            n: q.detach().cpu().clone() for n, q in self.policy.unet.named_parameters() if q.requires_grad
        }

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self, next_stage: int) -> Path:
        root = self._ckpt_root()
        root.mkdir(parents=True, exist_ok=True)
        name = f"stage_{next_stage:05d}"
        final = root / name
        tmp = root / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        state = {
            "version": CHECKPOINT_VERSION,
            "next_stage": next_stage,
            "config": C.to_dict(self.cfg),
            "model": self.trainable_state(),
            "lora": self.use_lora(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "algo": self.algo.state_dict(),
            "rng": rng_state(self.noise_gen, self.cpu_gen),
            "metrics_lines": len(self.metrics),
        }
        torch.save(state, tmp / "state.pt")
        if self.use_lora() and hasattr(self.policy, "save_lora"):
            with contextlib.suppress(Exception):  # a convenience export; state.pt is authoritative
                self.policy.save_lora(str(tmp / "lora"))
        _fsync_tree(tmp)
        if final.exists():  # re-checkpoint of the same stage (resume then SIGTERM): replace atomically-ish
            old = root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / "LATEST", name + "\n")
        self._prune_checkpoints(keep=name)
        return final

    def _prune_checkpoints(self, keep: str) -> None:
        """Delete all but the newest ``keep_checkpoints`` stage checkpoints (never ``keep``, the one LATEST names)."""
        n = self.cfg.keep_checkpoints
        if n <= 0:
            return
        root = self._ckpt_root()
        done = sorted(p.name for p in root.glob("stage_*") if (p / "state.pt").is_file())
        for old in done[:-n]:
            if old != keep:
                shutil.rmtree(root / old, ignore_errors=True)

    def _find_checkpoint(self, path: str) -> Path:
        p = Path(path)
        if (p / "state.pt").is_file():
            return p
        for root in (p / "checkpoints", p):
            if (root / "LATEST").is_file():
                cand = root / (root / "LATEST").read_text().strip()
                if (cand / "state.pt").is_file():
                    return cand
        raise C.ConfigError(
            f"--resume {path!r}: no checkpoint found (expected a run directory with "
            "checkpoints/LATEST or a checkpoint directory with state.pt)"
        )

    def _load_checkpoint(self, ckpt: Path) -> None:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
        if state.get("version") != CHECKPOINT_VERSION:
            raise C.ConfigError(f"{ckpt}: checkpoint version {state.get('version')} != {CHECKPOINT_VERSION}")
        named = dict(self.policy.unet.named_parameters())
        missing = [n for n in state["model"] if n not in named]
        if missing or set(state["model"]) != {n for n, q in named.items() if q.requires_grad}:
            raise C.ConfigError(
                f"{ckpt}: the checkpoint's trainable parameters do not match this model "
                f"(lora={state['lora']} in the checkpoint vs {self.use_lora()} now; "
                f"{len(missing)} unknown names)"
            )
        with torch.no_grad():
            for n, v in state["model"].items():
                named[n].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.algo.load_state_dict(state["algo"])
        set_rng_state(state["rng"], self.noise_gen, self.cpu_gen)
        self.start_stage = int(state["next_stage"])
        # metrics logged after the checkpoint (a run killed between checkpoints) are dropped: they are redone
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        keep = lines[: int(state["metrics_lines"])]
        self.metrics = [json.loads(ln) for ln in keep]
        atomic_write_text(path, "".join(ln + "\n" for ln in keep))
        log.info("resumed from %s at stage %d", ckpt, self.start_stage)

    # ---- logging -------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.metrics.append(record)
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def evaluate(self, stage: int) -> dict | None:
        """Mean reward on held-out prompts with a fixed seed (same noise every time)."""
        e = self.cfg.eval
        if not self.heldout_prompts or e.num_prompts <= 0:
            return None
        from b2diffurl.sampling import sample

        n = min(e.num_prompts, len(self.heldout_prompts))  # evenly spaced: the set may be sorted by category
        chosen = [self.heldout_prompts[(i * len(self.heldout_prompts)) // n] for i in range(n)]
        prompts = [p for p in chosen for _ in range(e.images_per_prompt)]
        t0 = time.perf_counter()
        res = sample(
            self.policy,
            prompts,
            seed=e.seed,
            batch_size=self.cfg.sample.batch_size * self.cfg.sample.branches,
            sampler=self.sampler,
        )
        with torch.no_grad():
            r = self.reward_fn(res.images, prompts).float().cpu()
        rec = {
            "kind": "eval",
            "stage": stage,
            "reward_mean": float(r.mean()),
            "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
            "n": len(prompts),
            "eval_time_s": time.perf_counter() - t0,
            "rewards": [round(v, 6) for v in r.tolist()],
        }
        first = next((m for m in self.metrics if m.get("kind") == "eval" and "rewards" in m), None)
        if first is not None and first["stage"] != stage and len(first["rewards"]) == r.numel():
            # same prompts and noise seeds as the first evaluation: a paired comparison, image by image
            rec.update(paired_gain(first["rewards"], rec["rewards"]))
        if self.cfg.prompts.startswith("toy") or self.cfg.eval.prompts.startswith("toy"):
            with contextlib.suppress(Exception):
                from b2diffurl.toy.prompts import prompt_category

                cats: dict[str, list[float]] = {}
                for p, v in zip(prompts, r.tolist()):
                    cats.setdefault(prompt_category(p), []).append(v)
                rec.update({f"reward_{c}": float(np.mean(v)) for c, v in cats.items()})
        return rec

    # ---- the loop ------------------------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):  # noqa: ARG002
        self._stop_requested = True
        log.warning("SIGTERM: checkpointing at the end of the current stage, then exiting")

    def request_stop(self) -> None:
        self._stop_requested = True

    def run(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(self.out / "config.yaml", yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
        old_handler = None
        with contextlib.suppress(ValueError):  # not the main thread: no handler, no SIGTERM checkpoint
            old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        t_start = time.perf_counter()
        status = "finished"
        try:
            if self.start_stage == 0 and not any(m.get("kind") == "eval" for m in self.metrics):
                rec = self.evaluate(0)
                if rec:
                    self._log(rec)
                    log.info("held-out reward before training: %.4f", rec["reward_mean"])
            bar = self.ctx.progress(
                range(self.start_stage, cfg.stages),
                desc=f"{cfg.algo} stages",
                initial=self.start_stage,
                total=cfg.stages,
            )
            for stage in bar:
                t0 = time.perf_counter()
                data = self.algo.sample_stage(stage)
                train_metrics = self.algo.train_stage(stage, data)
                rec = {
                    "kind": "stage",
                    "stage": stage,
                    **data.metrics,
                    **train_metrics,
                    "stage_time_s": time.perf_counter() - t0,
                }
                self._log(rec)
                tol = 1e-5 if self.dtype == torch.float32 else 1e-3
                if rec.get("ratio_dev_max", 0.0) > tol:
                    log.warning(
                        "stage %d: max |ratio - 1| before the first update is %.2e > %.0e: sampling and "
                        "training forwards disagree",
                        stage,
                        rec["ratio_dev_max"],
                        tol,
                    )
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(
                        reward=f"{rec['reward_mean']:.3f}",
                        sel=rec.get("n_selected"),
                        dev=f"{rec.get('ratio_dev_max', 0):.1e}",
                    )
                if cfg.grid_every and (stage + 1) % cfg.grid_every == 0 and data.images is not None:
                    save_grid(data.images, data.captions, self.out / "grids" / f"stage_{stage:05d}.png")
                last = stage + 1 == cfg.stages
                if cfg.eval.every and (stage + 1) % cfg.eval.every == 0 and not last:
                    ev = self.evaluate(stage + 1)
                    if ev:
                        self._log(ev)
                if last:
                    ev = self.evaluate(stage + 1)
                    if ev:
                        self._log(ev)
                if (
                    last
                    or self._stop_requested
                    or (cfg.checkpoint_every and (stage + 1) % cfg.checkpoint_every == 0)
                ):
                    self.save_checkpoint(stage + 1)
                if self._stop_requested and not last:
                    status = "interrupted"
                    break
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)
        plot_reward_curve(self.metrics, self.out / "reward_curve.png")
        evals = [m for m in self.metrics if m.get("kind") == "eval"]
        summary = {
            "status": status,
            "stages_done": sum(m.get("kind") == "stage" for m in self.metrics),
            "wall_time_s": time.perf_counter() - t_start,
            "out": str(self.out),
        }
        if len(evals) >= 2:
            summary.update(heldout_before=evals[0]["reward_mean"], heldout_after=evals[-1]["reward_mean"])
            if "gain" in evals[-1]:
                summary.update(heldout_gain=evals[-1]["gain"], heldout_gain_se=evals[-1]["gain_se"])
                log.info(
                    "held-out reward %.4f -> %.4f: paired gain %+.4f ± %.4f (1 s.e.; %d images better, %d worse)",
                    evals[0]["reward_mean"],
                    evals[-1]["reward_mean"],
                    evals[-1]["gain"],
                    evals[-1]["gain_se"],
                    evals[-1]["n_better"],
                    evals[-1]["n_worse"],
                )
        return summary


# ----------------------------------------------------------------------------------------------- CLI
TRAIN_DESCRIPTION = """\
Fine-tune a text-to-image diffusion policy with RL: B²-DiffuRL (default) or the DDPO baseline.

With no arguments: B² on the embedded toy world, CPU-friendly sizes (preset 'toy'), a few minutes on 2 cores;
held-out toy reward is reported before and after. Real models: --model /path/to/sd-diffusers-folder (LoRA,
official B²-DiffuRL hyper-parameters: preset 'official'). Every field below can be set with
--set key=value (repeatable) or in a YAML file (--config run.yaml, nested sections or dotted keys);
precedence: defaults < preset < YAML < flags < --set.

Outputs in --out: config.yaml, metrics.jsonl (per stage: reward mean/std, selected counts, ratio deviation,
loss, approx KL, throughput; per evaluation: held-out reward), grids/, checkpoints/ (every checkpoint_every
stages, at the end and on SIGTERM), reward_curve.png. --resume DIR continues a run exactly.
"""


def add_train_subparser(subparsers) -> None:
    """Register ``b2diffurl train`` on an argparse subparsers object."""
    import argparse

    p = subparsers.add_parser(
        "train",
        help="RL fine-tuning (B²-DiffuRL or DDPO)",
        description=TRAIN_DESCRIPTION,
        epilog="config fields (default = official value; [toy: ...] = toy preset):\n" + C.help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--algo", choices=sorted(C.ALGORITHMS), help="algorithm (config key: algo; default b2)")
    p.add_argument("--model", help="'toy' or a local diffusers folder (config key: model.path; default toy)")
    p.add_argument(
        "--reward", help="toy | clip | python:pkg.module:function (config key: reward; default toy)"
    )
    p.add_argument("--config", metavar="RUN.yaml", help="YAML file with config fields")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override one config field, e.g. --set stages=10 --set b2.k_left=10 (repeatable)",
    )
    p.add_argument(
        "--preset", choices=["auto", *C.PRESETS], help="value preset (config key: preset; default auto)"
    )
    p.add_argument("--out", help="output directory (config key: out)")
    p.add_argument(
        "--resume", metavar="DIR", help="continue the run in DIR (run dir or checkpoint dir) exactly"
    )
    p.add_argument(
        "--save-pairs",
        action="store_true",
        default=None,
        dest="save_pairs",
        help="D-Fusion: write reference | base | target | mask grids to <out>/pairs/ (dfusion.save_pairs)",
    )
    p.set_defaults(func=train_main)


def config_from_args(args) -> tuple[C.RunConfig, str | None]:
    explicit: dict = {}
    resume_dir = None
    if args.resume:
        rp = Path(args.resume)
        run_dir = rp.parent.parent if (rp / "state.pt").is_file() else rp
        if not (run_dir / "config.yaml").is_file():
            raise C.ConfigError(
                f"--resume {args.resume!r}: no config.yaml in {run_dir} (not a run directory)"
            )
        import yaml

        explicit.update(C._flatten(yaml.safe_load((run_dir / "config.yaml").read_text())))
        explicit["out"] = str(run_dir)
        resume_dir = args.resume
    if args.config:
        import yaml

        if not os.path.isfile(args.config):
            raise C.ConfigError(f"--config {args.config!r} does not exist")
        explicit.update(C._flatten(yaml.safe_load(Path(args.config).read_text()) or {}))
    for flag, key in (
        ("algo", "algo"),
        ("model", "model.path"),
        ("reward", "reward"),
        ("preset", "preset"),
        ("out", "out"),
        ("save_pairs", "dfusion.save_pairs"),
    ):
        if getattr(args, flag, None) is not None:
            explicit[key] = getattr(args, flag)
    explicit.update(C.parse_set(args.overrides))
    return C.load_config(overrides=explicit), resume_dir


def train_main(args) -> int:
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, resume = config_from_args(args)
        trainer = Trainer(cfg, resume=resume)
    except C.ConfigError as exc:
        print(f"b2diffurl train: {exc}", file=sys.stderr)
        return 2
    summary = trainer.run()
    print(json.dumps(summary, indent=2))
    return 0
