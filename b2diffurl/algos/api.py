"""The algorithm plug-in API: what ``b2diffurl.trainer`` calls and what it hands an algorithm.

Register a new algorithm in ``b2diffurl.config.ALGORITHMS`` (``"name": "package.module:Class"``)::

    class MyAlgorithm:                      # satisfies the Algorithm protocol below
        name = "mine"
        needs_reference_policy = False      # True: π_ref is the UNet with LoRA disabled (the trainer adds LoRA)
        def __init__(self, ctx: RunContext): ...
        def sample_stage(self, stage: int) -> StageData[MyPayload]: ...  # sample, score, select (no optimizer use)
        def train_stage(self, stage: int, data: StageData[MyPayload]) -> dict: ...  # update via ctx.optimizer_step
        def state_dict(self) -> dict: ...    # run state beyond model/optimizer/RNG (e.g. stat-tracker history)
        def load_state_dict(self, state: dict) -> None: ...

The trainer owns the loop (stages, evaluation, checkpoints, exact resume, SIGTERM, logging, grids, plots);
:class:`RunContext` hands the algorithm everything it may use: config, policy, reward, sampler, optimizer step,
random generators (checkpointed by the trainer), prompt draws, device. The metrics an algorithm returns are
logged as they are: the trainer names no algorithm's metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import torch

from b2diffurl import distributed

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from b2diffurl.config import RunConfig
    from b2diffurl.models import Policy
    from b2diffurl.sampling import TreeSampler

PayloadT = TypeVar("PayloadT")


@dataclass
class StageData(Generic[PayloadT]):
    """What ``sample_stage`` hands to ``train_stage``: metrics to log, a few images for the sample grid
    ([n, 3, H, W] in [0, 1]) with their captions, and the algorithm's own ``payload`` (its type is the
    algorithm's: e.g. :class:`b2diffurl.algos.ppo.PPOPayload`)."""

    metrics: dict
    images: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)
    payload: PayloadT | None = None


class Algorithm(Protocol):
    name: str
    # True when the algorithm's reference policy is the same UNet with its LoRA adapters disabled (D3PO's π_ref):
    # with model.lora=auto the trainer then attaches LoRA even where it would fine-tune the whole UNet
    needs_reference_policy: bool
    # Optional (default False): True when the algorithm runs data-parallel under torchrun through
    # b2diffurl.distributed (sharded sampling, gathered scores, gradient shares); the trainer refuses the others
    data_parallel: bool

    def sample_stage(self, stage: int) -> StageData: ...

    def train_stage(self, stage: int, data: StageData) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class StopRequested(Exception):
    """Raised by :meth:`RunContext.check_stop` after SIGTERM/SIGINT: the trainer saves the state of the
    stage's start and exits, so a resumed run redoes the interrupted stage exactly."""


# (images [N,3,H,W] in [0,1], prompts) -> [N]; the trainer hands a b2diffurl.rewards.Reward, whose .score also
# gives each term of a multi-reward (rewards.as_reward turns a plain function into one)
RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]


def algorithm_class(name: str, *, distributed: bool = False) -> type:
    """The class registered for ``name`` in ``b2diffurl.config.ALGORITHMS``; under several processes only an
    algorithm that declares ``data_parallel = True`` is accepted."""
    import importlib

    from b2diffurl.config import ALGORITHMS, ConfigError

    module, _, cls = ALGORITHMS[name].partition(":")
    algo_cls = getattr(importlib.import_module(module), cls)
    if distributed and not getattr(algo_cls, "data_parallel", False):
        raise ConfigError(
            f"algo={name!r} does not run data-parallel yet: start it as one process (without torchrun), or use "
            "algo=b2 or ddpo"
        )
    return algo_cls


def make_optimizer(params, train_config) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on ``params`` with ``train.*`` settings and a linear warm-up over ``train.lr_warmup_steps``."""
    optimizer = torch.optim.AdamW(
        params,
        lr=train_config.lr,
        betas=(train_config.adam_beta1, train_config.adam_beta2),
        weight_decay=train_config.weight_decay,
        eps=train_config.adam_eps,
    )
    warm = train_config.lr_warmup_steps
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda n: min(1.0, (n + 1) / warm) if warm > 0 else 1.0
    )


@dataclass
class RunContext:
    """Everything an algorithm may use. Built by the trainer; the generators are part of the checkpoint."""

    cfg: RunConfig
    policy: Policy
    reward_fn: RewardFn
    sampler: TreeSampler
    params: list[torch.nn.Parameter]  # trainable parameters
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    train_prompts: list[str]
    device: torch.device
    noise_gen: torch.Generator  # on ``device``: x_T and per-step noise
    cpu_gen: torch.Generator  # prompt draws, shuffles, timestep permutations
    progress: Callable = lambda iterable, **tqdm_kwargs: iterable  # wraps an iterable in a progress bar
    should_stop: Callable[[], bool] = lambda: False  # True once the run was asked to stop (SIGTERM/SIGINT)
    # `with ctx.reference():` runs the policy as it was before training (LoRA disabled, or a frozen copy of a
    # fully fine-tuned UNet swapped in): the KL monitor and train.kl_coef. None when the run keeps no reference
    reference: Callable | None = None
    # dynamic loss scaling for float16 weights (torch.amp.GradScaler; None otherwise): see :meth:`backward`
    scaler: torch.amp.GradScaler | None = None
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite gradient, over the run

    def check_stop(self) -> None:
        """Call between sampling batches and between optimizer steps: raises :class:`StopRequested` once a
        stop was asked for, so a preempted run stops within one batch or step."""
        # every process stops at the same poll, whichever received the signal (polls are collective)
        if distributed.any_rank(self.should_stop()):
            raise StopRequested

    def draw_prompts(self, n: int) -> list[str]:
        """n training prompts drawn uniformly with replacement (official ``prompt_random_choose``)."""
        idx = torch.randint(len(self.train_prompts), (n,), generator=self.cpu_gen)
        return [self.train_prompts[i] for i in idx.tolist()]

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the loss scaler when the run has one (float16 weights): every algorithm's
        backward goes through here so that :meth:`optimizer_step` can unscale what it accumulated."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self) -> torch.Tensor:
        """Unscale (float16 runs), clip, step, schedule, zero grads, then :meth:`check_stop`. Returns the
        pre-clip grad norm (device tensor).

        A step whose gradient is not finite is skipped — weights, Adam moments and the LR schedule stay as they
        were — and counted in :attr:`skipped_steps`; an optimizer step would otherwise write NaN into every
        weight. That check is the one host sync per optimizer step. With a loss scaler such skips are how the
        scale finds its level (they are logged at debug level); without one each is a warning."""
        distributed.sum_gradients(self.params)  # data-parallel: each process's share -> the global gradient
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        finite = bool(torch.isfinite(norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when unscale_ found inf/NaN
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        if finite:
            self.lr_scheduler.step()
        else:
            self.skipped_steps += 1
            (log.debug if self.scaler is not None else log.warning)(
                "optimizer step skipped: non-finite gradient (norm %s); %d skipped so far",
                float(norm),
                self.skipped_steps,
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.check_stop()  # between optimizer steps: a preempted run stops here at the latest
        return norm.detach()

    def encode(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.policy.encode_prompts(prompts)
