"""Score rewards in a background thread, so the next batch can be sampled meanwhile (ddpo-pytorch's trick).

What overlaps: everything a reward does off the sampling stream - host work (JPEG encoding, PIL,
tokenising, a ``python:`` reward calling a service) and, on CUDA, the Python side of launching the
scorer's kernels. The scorer's GPU kernels still share the device with the sampler. One worker keeps
results in submission order and keeps the scorer's caches single-threaded.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from b2diffurl.rewards import Reward, RewardResult


class BackgroundScorer:
    """``submit(images, prompts) -> Future[RewardResult]``; ``close()`` (or ``with``) waits for pending work.

    The caller must not modify ``images`` in place until the future is done (hand over a fresh tensor,
    e.g. the decoder's output)."""

    def __init__(self, reward: Reward):
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
