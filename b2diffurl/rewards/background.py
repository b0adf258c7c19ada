"""Score rewards in a background thread, so the next batch can be sampled meanwhile (ddpo-pytorch's trick).

What overlaps: everything a reward does off the sampling stream - host work (JPEG encoding, PIL,
tokenising, a ``python:`` reward calling a service) and, on CUDA, the Python side of launching the
scorer's kernels. The scorer's GPU kernels still share the device with the sampler. One worker keeps
results in submission order and keeps the scorer's caches single-threaded.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

from b2diffurl.rewards import Reward, RewardResult


class BackgroundScorer:
    """``submit(images, prompts) -> Future[RewardResult]``; ``close()`` (or ``with``) waits for pending work.

    The caller must not modify ``images`` in place until the future is done (hand over a fresh tensor,
    e.g. the decoder's output)."""

    def __init__(self, reward: Reward | _Timed):
        self.reward = reward
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def submit(self, images, prompts) -> Future[RewardResult]:
        return self._pool.submit(self.reward.score, images, list(prompts))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> BackgroundScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StageScorer:
    """A stage's reward calls, one ``submit(images, prompts)`` per sampled batch, then ``results()`` (in
    submission order). With ``overlap`` each batch is scored by a :class:`BackgroundScorer` while the caller
    samples the next one; without, at once. Either way the same scores, the same order.

    ``metrics()``: ``reward_time_s`` (time spent scoring) and ``reward_wait_time_s`` (time the caller was
    blocked on scores: all of it without overlap, only what sampling did not hide with it), so a run's own
    metrics measure the overlap. A reward error (or a stop request raised by the reward) surfaces at the next
    ``submit`` after it happened, at the latest in ``results()``."""

    def __init__(self, reward: Reward, overlap: bool):
        self.reward = reward
        self.pool = BackgroundScorer(_Timed(reward, self)) if overlap else None
        self.pending: list = []
        self.busy_s = self.wait_s = 0.0

    def submit(self, images, prompts) -> None:
        if self.pool is None:
            t0 = time.perf_counter()
            self.pending.append(self.reward.score(images, list(prompts)))
            dt = time.perf_counter() - t0
            self.busy_s, self.wait_s = self.busy_s + dt, self.wait_s + dt
            return
        for fut in self.pending:  # a finished batch that failed stops the stage now, not after sampling
            if fut.done() and fut.exception() is not None:
                self.close()
                fut.result()
        self.pending.append(self.pool.submit(images, prompts))

    def results(self) -> list[RewardResult]:
        if self.pool is None:
            return self.pending
        t0 = time.perf_counter()
        try:
            return [fut.result() for fut in self.pending]
        finally:
            self.wait_s += time.perf_counter() - t0
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def metrics(self) -> dict[str, float]:
        return {"reward_time_s": self.busy_s, "reward_wait_time_s": self.wait_s}

    def __enter__(self) -> StageScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Timed:
    """The reward's ``score`` with its time added to the owner's ``busy_s`` (called in the worker thread)."""

    def __init__(self, reward: Reward, owner: StageScorer):
        self.reward, self.owner = reward, owner

    def score(self, images, prompts) -> RewardResult:
        import torch

        t0 = time.perf_counter()
        try:
            with torch.no_grad():  # grad mode is per thread: the worker's would be on
                return self.reward.score(images, prompts)
        finally:
            self.owner.busy_s += time.perf_counter() - t0
