"""``b2diffurl`` command line: ``train | sample | eval | info``.

b2diffurl train --set stages=4 --out runs/try
b2diffurl sample --model toy --prompt "a red circle" --n 16 --out grid.png
b2diffurl eval --model toy --reward toy --prompts toy:heldout
b2diffurl info

User errors (bad option, file, reward spec or configuration) end with one line on stderr naming the fix
and exit code 2; an interrupted training run exits with :data:`EXIT_INTERRUPTED`. Every option is checked
before a model is loaded or a file is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from b2diffurl import cli_outputs
from b2diffurl import config as C
from b2diffurl.preemption import EXIT_INTERRUPTED

EXIT_USAGE = 2
EXIT_KILLED = 128 + 2  # the shell's code for a process ended by SIGINT (a second Ctrl-C)


class UsageError(ValueError):
    """A bad command-line option; the message names the fix."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user asked for something impossible" (reported in one line)."""
    from b2diffurl.checkpoint import CheckpointError
    from b2diffurl.distributed import DistributedError
    from b2diffurl.models import ModelError
    from b2diffurl.prompts import PromptSetError
    from b2diffurl.rewards import RewardError

    user = (UsageError, C.ConfigError, PromptSetError, RewardError, CheckpointError, DistributedError)
    return (*user, ModelError)


# ----------------------------------------------------------------------------------------------- train
TRAIN_DESCRIPTION = """\
Fine-tune a text-to-image diffusion policy with RL: B²-DiffuRL (default), the DDPO baseline or D-Fusion.

With no arguments: B² on the embedded toy world, CPU-friendly sizes (preset 'toy'), about 4 minutes on 2
idle cores. It trains a sparse, end-only reward (1 when the image's mean pixel value exceeds 0.09, else 0) and
reports it on held-out images before and after, next to the toy's prompt-following reward (the gold reward
it is watched with; train on that one with --set reward=toy). Real models: --model /path/to/sd-diffusers-folder (LoRA,
official B²-DiffuRL hyper-parameters: preset 'official'). Every field below can be set with
--set key=value (repeatable) or in a YAML file (--config run.yaml, nested sections or dotted keys);
precedence: defaults < preset < YAML < flags < --set.

Outputs in --out: config.yaml, metrics.jsonl (per stage: the algorithm's metrics; per evaluation: held-out
reward and gold reward), grids/ (training samples; held-out images per evaluation), checkpoints/ (every checkpoint_every stages, at the end and on SIGTERM), reward_curve.png.
--resume DIR continues a run exactly.
"""


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="RL fine-tuning (B²-DiffuRL, DDPO or D-Fusion)",
        description=TRAIN_DESCRIPTION,
        epilog="config fields (default = official value; [toy: ...] = toy preset):\n" + C.help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--algo", choices=sorted(C.ALGORITHMS), help="algorithm (config key: algo; default b2)")
    p.add_argument("--model", help="'toy' or a local diffusers folder (config key: model.path; default toy)")
    p.add_argument(
        "--reward", help="reward spec, e.g. toy | clip | python:pkg.module:function (config: reward)"
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
    cli_outputs.add_train_output_args(p)
    p.set_defaults(func=cmd_train)


def config_from_args(args) -> tuple[C.RunConfig, str | None]:
    """The run configuration the flags describe. ``--resume`` starts from the run's saved config.yaml, a layer
    under ``--config`` and the flags (see :func:`b2diffurl.config.load_config`); it always writes into the
    run's own directory."""
    explicit: dict = C.flatten(C.read_yaml(args.config, "--config")) if args.config else {}
    saved, resume_dir = None, None
    if args.resume:
        rp = Path(args.resume)
        run_dir = rp.parent.parent if (rp / "state.pt").is_file() else rp
        if not (run_dir / "config.yaml").is_file():
            raise UsageError(f"--resume {args.resume!r}: no config.yaml in {run_dir} (not a run directory)")
        saved = C.read_yaml(run_dir / "config.yaml", "--resume config")
        explicit["out"] = str(run_dir)
        resume_dir = args.resume
    for flag, key in (
        ("algo", "algo"),
        ("model", "model.path"),
        ("reward", "reward"),
        ("preset", "preset"),
        ("out", "out"),
        ("save_pairs", "dfusion.save_pairs"),
        *cli_outputs.TRAIN_FLAGS,
    ):
        if getattr(args, flag, None) is not None:
            explicit[key] = getattr(args, flag)
    explicit.update(C.parse_set(args.overrides))
    return C.load_config(overrides=explicit, saved=saved), resume_dir


def cmd_train(args) -> int:
    from b2diffurl import distributed, trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch  # main() has set its thread count by now

    logging.getLogger("b2diffurl.cli").info(
        "torch CPU threads: %d (choose with b2diffurl --threads N train, or OMP_NUM_THREADS)",
        torch.get_num_threads(),
    )
    run_config, resume = config_from_args(args)
    # under torchrun: a rank that fails prints its error and ends the job (user errors stay one line)
    with distributed.record_failure(_user_errors()):
        summary = trainer.Trainer(run_config, resume=resume).run()
    if distributed.is_main():
        print(json.dumps(summary, indent=2))
    return cli_outputs.exit_code(summary["status"], EXIT_INTERRUPTED)


# ----------------------------------------------------------------------------------------------- sample / eval
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="toy", help="'toy' or a local diffusers folder of SD 1.x/2.x (default toy)"
    )
    cli_outputs.add_lora_arg(p)
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


def _writable(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be written (checked before sampling, so no work is lost at the end), or None."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    if target.is_dir():
        return f"{flag} {path!r} is a directory; give a file name"
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        return f"{flag} {path!r}: {str(existing)!r} is not a writable directory"
    if target.exists() and not os.access(target, os.W_OK):
        return f"{flag} {path!r} is not writable"
    return None


def _check_common(args, outputs: dict[str, str | None], counts: dict[str, int | None]) -> None:
    """Every sample/eval option checked before a model loads; all problems reported in one line."""
    import math

    errs = [C.check_range(flag, value, "[1, inf)") for flag, value in counts.items() if value is not None]
    for flag, value, interval in (("--cfg", args.cfg, "[1, inf)"), ("--eta", args.eta, "(0, 1]")):
        errs.append(
            f"{flag} must be a finite number, got {value!r}"
            if not math.isfinite(value)
            else C.check_range(flag, value, interval)
        )
    errs.append(C.check_device(args.device))
    if args.model != "toy" and not os.path.isdir(args.model):
        errs.append(f"--model {args.model!r} is neither 'toy' nor an existing diffusers folder")
    if args.lora:  # a run or checkpoint directory names its adapter folder from here on
        args.lora, problem = cli_outputs.resolve_lora(args.lora)
        errs.append(problem)
    errs += [_writable(path, flag) for flag, path in outputs.items() if path]
    errs = [e for e in errs if e]
    if errs:
        raise UsageError("; ".join(errs))


def _load(args):
    import torch

    from b2diffurl.models import DTYPES, load_policy, resolve_device

    device = resolve_device(args.device)
    if args.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" and args.model != "toy" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
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


def cmd_sample(args) -> int:
    from b2diffurl.report import save_grid

    _check_common(
        args, {"--out": args.out}, {"--n": args.n, "--steps": args.steps, "--batch-size": args.batch_size}
    )
    policy = _load(args)
    images = _sample(policy, [args.prompt] * args.n, args)
    print(f"wrote {save_grid(images, args.out)} ({args.n} samples of {args.prompt!r})")
    return 0


def _parse_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise UsageError(f"--reward-option expects KEY=VALUE, got {item!r}")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_eval(args) -> int:
    import torch

    from b2diffurl import prompts as prompt_sets
    from b2diffurl.report import save_grid
    from b2diffurl.rewards import check_reward_spec, get_reward

    counts = {
        "--steps": args.steps,
        "--batch-size": args.batch_size,
        "--n-per-prompt": args.n_per_prompt,
        "--max-prompts": args.max_prompts,
    }
    _check_common(args, {"--out": args.out, "--json": args.json}, counts)
    if problem := check_reward_spec(args.reward):
        raise UsageError(f"--reward: {problem}")
    prompt_set = prompt_sets.load(args.prompts, "heldout")
    prompts = prompt_set.prompts[: args.max_prompts] if args.max_prompts else prompt_set.prompts
    if not prompts:
        raise UsageError(f"--prompts {args.prompts!r} names no prompts")
    reward_fn = get_reward(args.reward, **_parse_options(args.reward_option))
    policy = _load(args)
    rows = [p for p in prompts for _ in range(args.n_per_prompt)]
    images = _sample(policy, rows, args)
    scores = reward_fn(images, rows).float().cpu()
    group_of = prompt_set.group_of or (lambda _p: "all")
    groups = [group_of(p) for p in rows]
    result = {
        "model": args.model,
        "reward": args.reward,
        "prompts": args.prompts,
        "n_images": len(rows),
        "by_category": {},
    }
    print(f"{'category':<10} {'mean':>7}   {'std':>6}  {'n':>5}")
    for group in dict.fromkeys([*groups, "all"]):
        s = scores if group == "all" else scores[torch.tensor([g == group for g in groups])]
        std = s.std().item() if len(s) > 1 else 0.0
        result["by_category"][group] = {"mean": s.mean().item(), "std": std, "n": len(s)}
        print(f"{group:<10} {s.mean().item():7.4f} ± {std:6.4f}  {len(s):5d}")
    first = images[:: args.n_per_prompt][:64]
    print(f"grid: {save_grid(first, args.out)} (first sample of up to 64 prompts)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_info(args) -> int:  # noqa: ARG001
    from b2kernels.info import report

    print(report())
    return 0


# ----------------------------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="b2diffurl",
        description="RL fine-tuning of text-to-image diffusion models (B²-DiffuRL, D-Fusion) on b2kernels",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads (default: OMP_NUM_THREADS if set, else the cores other processes leave idle)",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    add_train_parser(sub)

    p = sub.add_parser("sample", help="sample a grid of images for one prompt")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    p.add_argument("--out", default="grid.png", help="output PNG (default grid.png)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="mean ± std reward per prompt group, plus a grid PNG")
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
        default="toy:heldout",
        help="prompt set: 'toy[:train|heldout|all][:single|count|relation]' or a .txt (one per line) / "
        ".json (list) file (default toy:heldout)",
    )
    p.add_argument("--n-per-prompt", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--out", default="eval_grid.png", help="grid PNG (default eval_grid.png)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="versions, devices and which kernel backend each op uses")
    p.set_defaults(func=cmd_info)
    return ap


def choose_threads(requested: int | None) -> int | None:
    """torch intra-op threads for this process, or None to keep torch's choice (it honours OMP_NUM_THREADS).

    Small convolutions do not scale across busy cores: on a 2-core box with other processes running, toy
    sampling of 32 images took 43 s with 1 thread and 171 s with 2; on an idle box 2 threads were 1.24x faster
    than 1. So by default take the cores that the 1-minute load average leaves idle, at least one."""
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--threads must be >= 1, got {requested}")
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return None
    return max(1, min(cores, int(cores - busy + 0.5)))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        threads = choose_threads(args.threads)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        message = " ".join(str(exc).split())  # one line, whatever the raiser wrote
        print(f"b2diffurl {args.command}: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"b2diffurl {args.command}: stopped at once; resume from the last checkpoint", file=sys.stderr)
        return EXIT_KILLED


if __name__ == "__main__":
    sys.exit(main())
