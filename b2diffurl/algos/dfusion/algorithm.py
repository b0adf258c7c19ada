"""``b2diffurl train --algo dfusion``: the trainer plug-in of D-Fusion (pairs each stage, then D3PO or PPO)."""

from __future__ import annotations

import itertools
import os
import time

import torch

from b2diffurl import distributed
from b2diffurl.algos.api import StageData
from b2diffurl.algos.dfusion.fusion import fused_step_range, fusion_block_indices
from b2diffurl.algos.dfusion.generation import DFusionStage, generate_pairs
from b2diffurl.algos.dfusion.pairs import pairing_sizes, preference_pairs


class DFusionAlgorithm:
    """``b2diffurl train --algo dfusion``: each stage draws ``sample.prompts_per_stage`` prompts, builds D-Fusion
    pairs (:func:`generate_pairs`) and trains on them with D3PO (``dfusion.objective='dpo'``, π_ref = LoRA
    off, ℓ^ref once per stage, steps from the first fused one on) or with DDPO-style PPO-clip (``'ppo'``:
    targets and bases, per-prompt z-scored rewards). Sampling noise derives from (run seed, stage, sample index), so a resumed run replays it
    without generator state."""

    name = "dfusion"
    needs_reference_policy = True  # DPO's π_ref is this UNet with LoRA off: model.lora=auto turns LoRA on
    data_parallel = True  # prompts sharded (pairs are per prompt), metrics gathered, DPO/PPO gradient shares

    def __init__(self, ctx):
        from b2kernels.buffer import TrajectoryArena

        c = ctx.cfg
        self.ctx, self.dcfg, self.pcfg = ctx, c.dfusion, c.dpo
        self.dcfg.validate()
        self.pcfg.validate()
        self.T = c.sample.num_steps
        n = self.dcfg.samples_per_prompt
        _, nb = pairing_sizes(n, self.dcfg.ref_fraction, self.dcfg.base_fraction, self.dcfg.ref_reuse)
        P = c.sample.prompts_per_stage
        self.prompts_per_call = max(1, c.sample.batch_size * c.sample.branches // n)
        fused_step_range(self.dcfg, self.T)
        fusion_block_indices(ctx.policy.unet, self.dcfg.fusion_layers)
        if distributed.size() > P:  # each process builds the pairs of at least one prompt
            raise ValueError(
                f"dfusion on {distributed.size()} processes needs sample.prompts_per_stage >= "
                f"{distributed.size()} (got {P})"
            )
        if self.dcfg.objective == "dpo" and ctx.policy.lora_config is None:
            raise ValueError(
                "dfusion with objective='dpo' needs π_ref = the UNet with LoRA disabled: set "
                "model.lora=on (or auto)"
            )
        self.arena = TrajectoryArena(
            tuple(ctx.policy.latent_shape),
            num_steps=self.T,
            max_trees=P * (n + nb),
            branches=1,
            dtype=ctx.sampler.dtype,
        )

    def sample_stage(self, stage: int):
        ctx = self.ctx
        t0 = time.perf_counter()
        drawn = ctx.draw_prompts(ctx.cfg.sample.prompts_per_stage)
        # this process builds the pairs of its share of the prompts (whole sampling batches; all in one process)
        part = distributed.shard(len(drawn), block=self.prompts_per_call)
        prompts = drawn[part.start : part.stop]
        self.arena.reset()
        save_dir = (
            os.path.join(ctx.cfg.out, "pairs") if self.dcfg.save_pairs and distributed.is_main() else None
        )
        T = self.T
        calls = -(-len(prompts) // self.prompts_per_call) * (2 * T - fused_step_range(self.dcfg, T)[0])
        # one tick per batched UNet call: advancing the progress iterable draws the bar (a no-op without one)
        ticks = iter(ctx.progress(range(calls), desc=f"stage {stage}: D-Fusion UNet steps", leave=False))
        st = generate_pairs(
            ctx.sampler,
            prompts,
            self.dcfg,
            reward_fn=ctx.reward_fn,
            arena=self.arena,
            run_seed=ctx.cfg.seed,
            epoch=stage,
            first_prompt=part.start,
            prompts_per_call=self.prompts_per_call,
            save_dir=save_dir,
            progress=lambda n: next(itertools.islice(ticks, n - 1, n), None),
        )
        for _ in ticks:  # finish (and close) the bar
            pass
        dt = time.perf_counter() - t0
        m = dict(
            st.metrics,
            sample_time_s=dt,
            sample_images_per_s=st.metrics["images"] / max(dt, 1e-9),
            n_selected=st.metrics["pairs"],
        )
        k = st.images.shape[0] // 3
        captions = [
            f"{role} {float(r):.2f}"
            for i in range(k)
            for role, r in (
                ("ref", st.sample_rewards[st.sample_ids == st.ref_ids[i]][0]),
                ("base", st.base_rewards[i]),
                ("target", st.target_rewards[i]),
            )
        ]
        return StageData(metrics=m, images=st.images, captions=captions, payload=st)

    def train_stage(self, stage: int, data) -> dict:
        st: DFusionStage = data.payload
        ctx = self.ctx
        s = ctx.sampler
        if self.dcfg.objective == "ppo":
            return self._train_ppo(st)
        from b2diffurl.algos.dpo import train_dpo

        if self.dcfg.pairs == "plain":
            # D3PO's own pairs: the Phase-A reference against the base, two independent trajectories (every
            # step differs); same pairs and count as the fused arm, fusion not used for training
            by_id = torch.full((int(st.sample_ids.max()) + 1,), float("nan"))
            by_id[st.sample_ids] = st.sample_rewards.float()
            preferred, dispreferred, _ = preference_pairs(
                st.ref_ids, st.base_ids, by_id[st.ref_ids], st.base_rewards.float()
            )
            preferred, dispreferred = preferred[: st.num_pairs], dispreferred[: st.num_pairs]  # equal count
            steps = list(range(self.T))
        else:
            preferred, dispreferred = st.preferred, st.dispreferred
            # target == base before the first fused step (zero gradient: skipped); every later step can differ,
            # including any after a window that ends early
            steps = list(range(st.fused_steps[0], self.T))
        return train_dpo(
            s,
            self.arena,
            distributed.spread(preferred),  # the global pair list; other processes' pairs are -1 here
            distributed.spread(dispreferred),
            steps,
            st.cond,
            self.pcfg,
            inner_epochs=ctx.cfg.train.inner_epochs,
            pairs_per_batch=ctx.cfg.train.micro_batch_size,
            optimizer_step=ctx.optimizer_step,
            backward=ctx.backward,
            generator=ctx.cpu_gen,
        )

    def _train_ppo(self, st: DFusionStage) -> dict:
        """D-Fusion pairs into DDPO: targets and bases, advantage = per-prompt z-score of their rewards; the
        targets' old log-probs are re-evaluated under the plain policy (they were sampled by the fused one)."""
        from b2diffurl.algos.ppo import ppo_update

        ctx = self.ctx
        # samples without a finite reward (NaN from the reward boundary) are left out
        ok_t, ok_b = torch.isfinite(st.target_rewards), torch.isfinite(st.base_rewards)
        ids = torch.cat([st.target_ids[ok_t], st.base_ids[ok_b]])
        # global order: every process's targets, then every process's bases (-1 where another holds them)
        global_ids = torch.cat(
            [distributed.spread(st.target_ids[ok_t]), distributed.spread(st.base_ids[ok_b])]
        )
        r = torch.cat([st.target_rewards[ok_t], st.base_rewards[ok_b]]).double()
        g = torch.cat([st.pair_prompt[ok_t], st.pair_prompt[ok_b]])
        adv = torch.zeros_like(r)
        for p in g.unique():
            sel = g == p
            v = r[sel]
            adv[sel] = (v - v.mean()) / (v.std() + 1e-8) if v.numel() > 1 else 0.0
        adv = adv.clamp(-ctx.cfg.train.adv_clip, ctx.cfg.train.adv_clip).float()
        self.arena.set_advantages(ids, adv)
        tid = st.target_ids
        with torch.no_grad():
            for i in range(self.T):
                b = self.arena.gather(tid, torch.full_like(tid, i), device=ctx.device)
                self.arena.write_logprobs(tid, i, ctx.sampler.batch_logprob(b, st.cond).float().cpu())
        return ppo_update(ctx, self.arena, global_ids, torch.arange(self.T), st.cond)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
