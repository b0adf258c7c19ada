"""Batched branch-tree DDIM sampler shared by every algorithm (B², DDPO, D-Fusion phase A) and the CLI.

One UNet call per DDIM step for *all* prompts and branches of a batch: P prompts share a prefix up to step
``split_step`` (= T − k), then P·B rows continue with independent noise. CFG is one 2× batch (uncond rows
first). The fused ``b2kernels.ddim_step_sample`` produces x_prev and the step log-prob. Latents go to the
arena as they are produced (prefix latents once per tree); log-probs stay on the device until the loop ends
(one transfer), so the step loop has no ``.item()`` and no host sync.

Row layout is tree-major: row ``p·B + b`` is branch ``b`` of prompt ``p`` (the arena's id order).

Shapes are static per (rows, dtype), so the step (UNet + DDIM) can be captured in a CUDA graph
(``cuda_graphs=True``): one graph for the P-row prefix step and one for the P·B-row branch step, replayed
with the step index as a device tensor. Where capture can't run (CPU, capture error) the sampler logs why and
runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# the largest max |ratio − 1| of a first PPO pass that still counts as "the same forward", per policy dtype
RATIO_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


@dataclass
class TreeSample:
    """Output of :meth:`TreeSampler.sample_trees` for P prompts × B branches (tree-major rows)."""

    latents: torch.Tensor  # [P·B, C, H, W] final latents (x at latent index T)
    logprobs: torch.Tensor  # [P·B, T] float32 per-step log-probs (prefix steps repeated per branch)
    split_step: int
    branches: int


@dataclass
class SampleResult:
    """Output of :func:`sample`."""

    images: torch.Tensor | None  # [N, 3, H, W] in [0, 1] (None with decode=False)
    latents: torch.Tensor  # [N, C, H, W] final latents
    logprobs: torch.Tensor  # [N, T] float32
    prompts: list[str]


class _GraphedStep:
    """A CUDA-graph capture of ``step_fn`` for one static shape. Inputs are copied into static buffers."""

    def __init__(self, step_fn, x, step_idx, embeds, noise, pool=None):
        self.static = [t.clone() for t in (x, step_idx, embeds, noise)]
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm up (autotuning, lazy inits) outside the capture
            for _ in range(2):
                step_fn(*self.static)
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):  # one memory pool shared by the prefix/branch graphs
            self.out = step_fn(*self.static)

    def __call__(self, x, step_idx, embeds, noise):
        for dst, src in zip(self.static, (x, step_idx, embeds, noise)):
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        self.graph.replay()
        # clone: the next replay overwrites the outputs while async arena copies may still read them
        return self.out[0].clone(), self.out[1].clone()


class TreeSampler:
    """Branch-tree DDIM sampler for a policy (see module docs). Holds the DDIM table and the uncond embedding, and
    owns the policy step (:meth:`policy_step`): every log-prob of the project, sampled or trained, comes from it.
    ``train_cfg=False`` runs training forwards without CFG even when sampling uses it (``train.use_guidance``)."""

    def __init__(
        self,
        policy,
        *,
        num_steps: int = 20,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        backend: str = "auto",
        cuda_graphs: bool = False,
        train_cfg: bool = True,
    ):
        from b2kernels import DDIMTable

        if eta <= 0:
            raise ValueError(
                f"eta must be > 0 for a sampler with log-probs (got {eta}); eta = 0 has no density"
            )
        self.policy = policy
        self.num_steps, self.guidance_scale, self.eta, self.backend = (
            int(num_steps),
            guidance_scale,
            eta,
            backend,
        )
        self.device = next(policy.unet.parameters()).device
        self.dtype = next(policy.unet.parameters()).dtype
        policy.scheduler.set_timesteps(self.num_steps)
        self.table = DDIMTable.from_scheduler(policy.scheduler, device=self.device)
        self.timesteps = self.table.timesteps.to(self.device)
        self.use_cfg = guidance_scale is not None and guidance_scale != 1.0
        self.train_cfg = bool(train_cfg)
        with torch.no_grad():
            self.uncond = policy.encode_prompts([""]).to(self.dtype) if self.use_cfg else None
        self.graphs: dict | None = None
        self._graph_pool = None
        self.graph_reason: str | None = None
        if cuda_graphs:
            if self.device.type != "cuda":
                self.graph_reason = (
                    f"cuda_graphs=True but the policy is on '{self.device.type}': running eagerly"
                )
            else:
                self.graphs = {}
            if self.graph_reason:
                log.warning(self.graph_reason)

    def forward_disagreement(self, ratio_dev_max: float) -> str | None:
        """A message when the first PPO pass (before any update) did not reproduce the sampling log-probs within
        the tolerance of the policy dtype (max |ratio − 1| = ``ratio_dev_max``): the sampling and training
        forwards differ (dropout or batch-dependent layers in train mode, another attention backend, TF32
        convolutions in fp32), so the PPO ratio and its clipping measure that difference as well as the update.
        Training without guidance while sampling with it (``train_cfg=False``) changes the forward on purpose."""
        if self.guidance(training=True) != self.guidance():
            return None
        tol = RATIO_TOLERANCE.get(self.dtype, 1e-3)
        if not ratio_dev_max > tol:
            return None
        return (
            f"the sampling and training forwards disagree: max |ratio - 1| before the first update is "
            f"{ratio_dev_max:.3g} (tolerance {tol:g} in {str(self.dtype)[6:]}); the PPO ratio measures that "
            "difference too (look for dropout or train-mode layers, another attention backend, or TF32)"
        )

    # ---- the policy step: the one place that runs the UNet (with CFG) and the DDIM op ------------------------
    def guidance(self, *, training: bool = False) -> float | None:
        """The CFG rule of every caller: the guidance scale, or None for a plain (N-row) UNet call.

        CFG is off when ``guidance_scale`` is 1.0 (or None), and in training forwards also when the sampler was
        built with ``train_cfg=False`` (then the first PPO ratio is not 1: sampling used CFG)."""
        if not self.use_cfg or (training and not self.train_cfg):
            return None
        return self.guidance_scale

    def embeds_for(self, cond: torch.Tensor, *, training: bool = False) -> torch.Tensor:
        """UNet conditioning for N rows: [uncond × N; cond] with CFG, else cond."""
        cond = cond.to(self.dtype)
        if self.guidance(training=training) is None:
            return cond
        return torch.cat([self.uncond.expand(cond.shape[0], -1, -1), cond])

    def model_output(self, x: torch.Tensor, step_idx, embeds: torch.Tensor, *, guided: bool):
        """(cond output, uncond output or None) of one UNet call on N rows (2N with CFG, ``guided``).

        ``step_idx``: an int (eager sampling: no host sync anywhere) or a LongTensor [N] (training rows, graphs).
        """
        if isinstance(step_idx, int):
            t = self.timesteps[step_idx].expand(x.shape[0])
        else:
            t = self.timesteps[step_idx.to(self.device)]
        if guided:
            out = self.policy.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=embeds).sample
            uncond, cond = out.chunk(2)
            return cond, uncond
        return self.policy.unet(x, t, encoder_hidden_states=embeds).sample, None

    def policy_step(
        self,
        x_t: torch.Tensor,
        steps,
        embeds: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        x_prev: torch.Tensor | None = None,
        training: bool = False,
        context_rows: int = 0,
    ):
        """One DDIM policy step π(x_prev | x_t, c) of N rows: UNet (one call, 2N rows with CFG), then the fused
        DDIM op. Every caller goes through here: tree sampling, PPO and DPO log-probs, D-Fusion.

        ``steps``: int or LongTensor [N]; ``embeds`` from :meth:`embeds_for` with the same ``training``. Give
        ``noise`` [N, ...] to sample (returns ``(x_prev, logp [N])``) or ``x_prev`` to score a stored transition
        (returns ``logp [N]``, differentiable w.r.t. the UNet); a tuple of ``x_prev`` tensors scores each against
        the same UNet call (returns a tuple of ``logp``). ``context_rows`` = r: the first r rows of
        ``x_t`` (and of each CFG half of ``embeds``) only join the UNet call (e.g. D-Fusion's reference rows,
        whose K/V the attention processors hand to the other rows); the DDIM step is taken for the rest."""
        from b2kernels import ddim_step_logprob, ddim_step_sample

        if (noise is None) == (x_prev is None):
            raise ValueError("policy_step: give exactly one of noise (sample) or x_prev (log-prob)")
        gs = self.guidance(training=training)
        cond, uncond = self.model_output(x_t, steps, embeds, guided=gs is not None)
        if context_rows:
            x_t, cond = x_t[context_rows:], cond[context_rows:]
            uncond = uncond[context_rows:] if uncond is not None else None
        if not isinstance(steps, int):
            steps = steps.to(self.device)
        common = dict(eta=self.eta, model_output_uncond=uncond, guidance_scale=gs, backend=self.backend)
        if noise is not None:
            return ddim_step_sample(self.table, steps, x_t, cond, noise, **common)
        if isinstance(x_prev, tuple):
            return tuple(
                ddim_step_logprob(self.table, steps, x_t, cond, xp.to(self.dtype), **common) for xp in x_prev
            )
        return ddim_step_logprob(self.table, steps, x_t, cond, x_prev.to(self.dtype), **common)

    def step_logprob(
        self, x_t: torch.Tensor, x_prev: torch.Tensor, steps: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """Training log-prob log π_θ(x_prev | x_t, c) [N] of stored transitions (rows may sit at different
        steps; ``cond`` [N, L, D] per row). Same UNet layout and DDIM function as sampling, so the first
        pre-update pass reproduces the sampling log-probs."""
        return self.policy_step(
            x_t.to(self.dtype), steps, self.embeds_for(cond, training=True), x_prev=x_prev, training=True
        )

    def batch_logprob(self, batch, cond_table: torch.Tensor) -> torch.Tensor:
        """:meth:`step_logprob` of rows gathered from a trajectory arena (``batch.x_t``, ``x_prev``, ``step``,
        ``prompt_id``); ``cond_table`` [P, L, D] is indexed by the rows' prompt ids."""
        cond = cond_table[batch.prompt_id.to(cond_table.device)]
        return self.step_logprob(batch.x_t, batch.x_prev, batch.step, cond)

    def _step(self, x, step_idx, embeds, noise):
        return self.policy_step(x, step_idx, embeds, noise=noise)

    def step(self, x: torch.Tensor, i: int, embeds: torch.Tensor, noise: torch.Tensor):
        """One batched DDIM step i for all rows: (x_prev, logp [N])."""
        if self.graphs is None:
            return self._step(x, int(i), embeds, noise)
        key = (x.shape[0], x.dtype)
        g = self.graphs.get(key)
        step_idx = torch.full((x.shape[0],), int(i), dtype=torch.long, device=x.device)
        if g is None:
            try:
                if self._graph_pool is None:
                    self._graph_pool = torch.cuda.graph_pool_handle()
                g = self.graphs[key] = _GraphedStep(self._step, x, step_idx, embeds, noise, self._graph_pool)
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back, with the reason logged
                self.graph_reason = (
                    f"CUDA graph capture failed ({type(exc).__name__}: {exc}); running eagerly"
                )
                log.warning(self.graph_reason)
                self.graphs = None
                return self._step(x, int(i), embeds, noise)
        return g(x, step_idx, embeds, noise)

    # ---- trees --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_trees(
        self,
        cond: torch.Tensor,
        *,
        split_step: int,
        branches: int,
        generator: torch.Generator | Sequence[torch.Generator],
        arena=None,
        ids: torch.Tensor | None = None,
    ) -> TreeSample:
        """Sample P trees: cond [P, L, D] prompt embeddings; latents 0..split_step shared, then B branches.

        ``arena``/``ids`` (ids [P·B] from ``arena.add_trees``): latents are written as they are produced and
        log-probs at the end. ``generator`` (on the policy's device) draws x_T and every step's noise in float32:
        one generator for all rows, or one per tree (P of them), which makes a tree's noise independent of the
        other trees in its batch (data-parallel runs shard trees over processes: b2diffurl.distributed).
        """
        T, B, s = self.num_steps, int(branches), int(split_step)
        if not 0 <= s <= T:
            raise ValueError(f"split_step must be in [0, T={T}], got {s}")
        P = cond.shape[0]
        shape = tuple(self.policy.latent_shape)
        dev = self.device
        tree_ids = ids[::B] if ids is not None else None
        per_tree = None if isinstance(generator, torch.Generator) else list(generator)
        if per_tree is not None and len(per_tree) != P:
            raise ValueError(f"sample_trees: {len(per_tree)} generators for {P} trees")

        def draw(rows: int) -> torch.Tensor:  # [rows, ...] standard normal; per-tree streams stay tree-major
            if per_tree is None:
                return torch.randn((rows, *shape), generator=generator, device=dev, dtype=torch.float32)
            return torch.cat(
                [
                    torch.randn((rows // P, *shape), generator=g, device=dev, dtype=torch.float32)
                    for g in per_tree
                ]
            )

        x = draw(P).to(self.dtype)
        embeds = self.embeds_for(cond)
        if arena is not None:
            arena.write_latents(tree_ids, 0, x.to(arena.dtype))  # latent 0 is always shared (s >= 0)
        logps = []
        for i in range(T):
            if i == s and B > 1:  # branch: latent s is the last shared one
                x = x.repeat_interleave(B, dim=0)
                embeds = self.embeds_for(cond.repeat_interleave(B, dim=0))
            rows = x.shape[0]
            noise = draw(rows).to(self.dtype)  # drawn in fp32: the same noise stream for every dtype
            x, logp = self.step(x, i, embeds, noise)
            logps.append(logp)
            if arena is not None:
                if i + 1 <= s:
                    arena.write_latents(tree_ids, i + 1, x.to(arena.dtype))
                else:
                    arena.write_latents(ids, i + 1, x.to(arena.dtype))
        if s == T and B > 1:  # s == T: every latent shared; the B rows are copies
            x = x.repeat_interleave(B, dim=0)
        rows_final = P * B
        full = torch.stack(
            [lp if lp.shape[0] == rows_final else lp.repeat_interleave(B) for lp in logps], dim=1
        )
        if arena is not None:
            host = [lp.float().cpu() for lp in logps]  # one sync, after the loop
            for i, lp in enumerate(host):
                arena.write_logprobs(tree_ids if i < s else ids, i, lp)
        return TreeSample(latents=x, logprobs=full.float(), split_step=s, branches=B)


def sample(
    policy,
    prompts: list[str],
    *,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    eta: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    decode: bool = True,
    backend: str = "auto",
    cuda_graphs: bool = False,
    sampler: TreeSampler | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> SampleResult:
    """Plain sampling (no branching) with the tree sampler's batched step; used by ``b2diffurl sample/eval``.

    Returns images [N, 3, H, W] in [0, 1] (``policy.decode``), final latents and per-step log-probs. The same
    ``seed`` and ``batch_size`` give the same noise, hence the same images, for any policy weights.
    ``generators`` (one per prompt, in place of ``seed``) make each image's noise independent of the batching.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("sample: no prompts given")
    sampler = sampler or TreeSampler(
        policy,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        backend=backend,
        cuda_graphs=cuda_graphs,
    )
    gen = torch.Generator(device=sampler.device).manual_seed(int(seed))
    bs = int(batch_size or len(prompts))
    lat, lps, imgs = [], [], []
    for i in range(0, len(prompts), bs):
        chunk = prompts[i : i + bs]
        with torch.no_grad():
            cond = policy.encode_prompts(chunk)
        g = gen if generators is None else generators[i : i + bs]
        out = sampler.sample_trees(cond, split_step=sampler.num_steps, branches=1, generator=g)
        lat.append(out.latents)
        lps.append(out.logprobs)
        if decode:
            with torch.no_grad():
                imgs.append(policy.decode(out.latents).float().clamp(0, 1))
    return SampleResult(
        images=torch.cat(imgs) if decode else None,
        latents=torch.cat(lat),
        logprobs=torch.cat(lps),
        prompts=prompts,
    )
