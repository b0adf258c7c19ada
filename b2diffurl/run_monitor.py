"""The trainer's side of the reward-hacking monitors: the reward algorithms see, the gold reward, the starting
policy, the per-stage alarm and the optional TensorBoard mirror of metrics.jsonl.

Monitoring sits between the algorithm and its reward (:class:`RewardTap`), so every algorithm that scores its
samples through ``RunContext.reward_fn`` is watched without knowing it: each scored batch also feeds the
stage's :class:`~b2diffurl.monitors.StageMonitor` (reward terms, gold reward, diversity, image statistics).
The KL to the starting policy needs the stored log-probs of trained steps, so the tree-PPO algorithms
measure it themselves (:mod:`b2diffurl.algos.kl`) through :func:`starting_policy`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from pathlib import Path

from b2diffurl.config import ConfigError
from b2diffurl.monitors import HackingAlarm, StageMonitor, hacking_alarm
from b2diffurl.rewards import Reward, RewardResult, get_reward

log = logging.getLogger("b2diffurl.monitor")


class RewardTap(Reward):
    """The run's reward as algorithms see it: the same scores, terms, weights and aggregation, plus

    * ``before()`` called ahead of every scored batch (the trainer's stop check: every sampling batch is a
      stopping point);
    * the current stage's monitor (``monitor``, set by :class:`RunWatch`) fed with every scored batch."""

    def __init__(self, reward: Reward, before: Callable[[], None] | None = None):
        super().__init__(
            reward.name, reward._fn, weights=reward.weights, aggregate=reward.aggregate, terms=reward.terms
        )
        self.reward, self.before = reward, before
        self.monitor: StageMonitor | None = None

    def score(self, images, prompts) -> RewardResult:
        if self.before is not None:
            self.before()
        result = self.reward.score(images, prompts)
        if self.monitor is not None:
            self.monitor.add(images, prompts, result)
        return result

    def image_embeddings(self, images):
        return self.reward.image_embeddings(images)

    def limit(self, **limits) -> RewardTap:
        """Limits (timeout, non-finite fraction) belong to the wrapped reward, which does the scoring."""
        self.reward.limit(**limits)
        return self


def build_rewards(run_config, reward_fn=None, gold_fn=None, train_prompts=()) -> tuple[Reward, Reward | None]:
    """(training reward, held-out gold reward or None) of a run; injected callables win over the config's
    specs. The training reward carries the run's timeout and non-finite limits."""
    from b2diffurl.rewards import as_reward

    if reward_fn is None:
        reward_fn = get_reward(
            run_config.reward, aggregate=run_config.reward_aggregate, **run_config.reward_options
        )
    reward = as_reward(reward_fn).limit(
        timeout_s=run_config.reward_timeout_s, max_nonfinite_fraction=run_config.reward_max_nonfinite_fraction
    )
    gold = as_reward(gold_fn) if gold_fn is not None else gold_reward(run_config, reward, list(train_prompts))
    return reward, gold


def gold_reward(run_config, reward: Reward, train_prompts: list[str]) -> Reward | None:
    """The held-out gold reward of ``monitor.gold_reward``: 'auto' is the toy reward on the toy model with
    toy-world prompts unless the training reward already has a toy term (then it would not be held out), else
    none."""
    mon = run_config.monitor
    spec = mon.gold_reward
    if spec == "auto":
        from b2diffurl.toy import is_toy_checkpoint

        toy = (
            is_toy_checkpoint(run_config.model.path)
            and "toy" not in reward.weights
            and _toy_world(train_prompts)
        )
        spec = "toy" if toy else "none"
    if spec == "none":
        return None
    return get_reward(spec, **mon.gold_reward_options)


def heldout_gold(run_config, gold: Reward | None, heldout_prompts: list[str]) -> Reward | None:
    """The gold reward for held-out evaluations: ``gold``, unless 'auto' chose the toy reward from the training
    prompts and the held-out prompts are not all toy-world prompts (the toy reward cannot score them)."""
    if gold is None or run_config.monitor.gold_reward != "auto" or _toy_world(heldout_prompts):
        return gold
    return None


def _toy_world(prompts: list[str]) -> bool:
    """Whether the toy reward can score these prompts (it knows only the toy world's grammar)."""
    from b2diffurl.toy.prompts import parse

    try:
        for p in dict.fromkeys(prompts):
            parse(p)
    except ValueError:
        return False
    return True


def starting_policy(policy, *, lora: bool, keep_copy: bool) -> Callable | None:
    """A context-manager factory inside which ``policy`` runs as the starting policy, or None.

    With LoRA the starting policy is the UNet with its adapters disabled (they start as the identity): no
    memory. A full fine-tune has no such switch, so with ``keep_copy`` a frozen copy of the UNet as it is now
    (call this before any training or checkpoint restore) is swapped in for the block: one more UNet in
    memory (the toy's 6 MB; an SD 1.x UNet 1.7 GB in fp16), which is why it is only kept when the KL monitor
    (monitor.kl_samples > 0) or the KL regulariser (train.kl_coef > 0) asks for it."""
    if lora:
        return policy.lora_disabled
    if not keep_copy:
        return None
    frozen = copy.deepcopy(policy.unet).requires_grad_(False).eval()

    @contextlib.contextmanager
    def swapped():
        live = policy.unet
        policy.unet = frozen
        try:
            yield
        finally:
            policy.unet = live

    return swapped


class RunWatch:
    """One stage monitor per stage on the reward tap, and the alarm over the stage records."""

    def __init__(self, run_config, tap: RewardTap, gold: Reward | None):
        self.cfg = run_config.monitor
        self.tap, self.gold = tap, gold

    def start_stage(self) -> None:
        embed = self.tap.image_embeddings if self.cfg.diversity_embeddings else None
        self.tap.monitor = StageMonitor(self.gold, embed)

    def end_stage(self) -> dict:
        """The stage's monitor metrics (the monitor is detached: later scoring, e.g. evaluation, is not
        counted)."""
        mon, self.tap.monitor = self.tap.monitor, None
        return mon.metrics() if mon is not None else {}

    def alarm(self, stage_records: list[dict]) -> HackingAlarm:
        """:func:`~b2diffurl.monitors.hacking_alarm` over the stage records of metrics.jsonl (the current one
        last): training reward ``reward_mean``, gold ``gold_mean``, diversity ``diversity``."""
        history = [
            {
                "stage": r["stage"],
                "reward": r.get("reward_mean"),
                "gold": r.get("gold_mean"),
                "diversity": r.get("diversity"),
            }
            for r in stage_records
        ]
        c = self.cfg
        return hacking_alarm(
            history,
            window=c.window,
            reward_rise=c.reward_rise,
            gold_drop=c.gold_drop,
            diversity_drop=c.diversity_drop,
            min_trend_t=c.min_trend_t,
        )


def alarm_metrics(alarm: HackingAlarm) -> dict:
    """What a stage record carries of the alarm: the flag and each series' relative change over the window."""
    out: dict = {"hacking_alarm": alarm.fired}
    out.update({f"alarm_{k}_change": v for k, v in alarm.changes.items()})
    return out


class TensorBoardLog:
    """Every numeric metric of metrics.jsonl mirrored to TensorBoard event files in ``<out>/tensorboard``
    (stage records as ``stage/<name>``, evaluations as ``eval/<name>``, at their stage)."""

    def __init__(self, directory: Path):
        self.writer = open_summary_writer(directory)

    def log(self, record: dict) -> None:
        kind, step = record.get("kind", "stage"), int(record.get("stage", 0))
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "stage":  # bools too: the alarm plots as 0/1
                self.writer.add_scalar(f"{kind}/{k}", float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_tensorboard() -> None:
    """ConfigError (one line, exit 2 from the CLI) when the tensorboard package is missing; checked before the
    model loads."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "log_with=tensorboard needs the tensorboard package: pip install tensorboard (or drop --log-with)"
        )


def open_summary_writer(directory: Path):
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(directory))
