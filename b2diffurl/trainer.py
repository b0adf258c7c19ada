"""The training loop shared by every algorithm: stages of sample → reward → select → train.

The trainer owns what every algorithm needs (device and dtype, policy and LoRA, optimizer and LR schedule,
random generators, held-out evaluation, metrics, grids, checkpoints, exact resume, stopping on signals); an
algorithm (registered in ``b2diffurl.config.ALGORITHMS``) owns the stage. docs/ARCHITECTURE.md describes the
data path of a stage, the run directory and why a resumed run logs the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from b2diffurl import checkpoint, distributed, prompts, report, run_monitor
from b2diffurl import config as C
from b2diffurl.preemption import StopSignal
from b2diffurl.toy import is_toy_checkpoint

log = logging.getLogger("b2diffurl.trainer")


class Trainer:
    """``Trainer(run_config).run()``; ``policy`` / ``reward_fn`` / ``gold_fn`` (the monitors' held-out reward) /
    prompt lists may be injected (tests, notebooks)."""

    def __init__(
        self,
        run_config: C.RunConfig,
        *,
        policy=None,
        reward_fn=None,
        gold_fn=None,
        resume: str | None = None,
        train_prompts: list[str] | None = None,
        heldout_prompts: list[str] | None = None,
    ):
        C.validate(run_config)
        from b2diffurl.models import DTYPES, resolve_device

        # under torchrun: join the process group first (this rank's device; rank 0 names the run directory)
        self.world = distributed.init(resolve_device(run_config.model.device))
        distributed.quiet_other_ranks()
        self.fresh_dir = run_config.out == "auto"
        if self.fresh_dir:  # the saved config names the resolved directory, so --resume finds it
            run_config.out = distributed.broadcast_object(str(checkpoint.new_run_dir()))
        self.cfg = run_config
        self.out = Path(run_config.out)
        resume_from, resume_state = checkpoint.open_run(
            self.out, resume, run_config
        )  # before the model loads
        if resume_state:
            distributed.check_world_size(resume_state.get("world_size", 1), f"checkpoint {resume_from}")
        distributed.barrier()  # every rank checked the run directory before rank 0 writes into it
        self.device = self.world.device
        self.dtype = DTYPES[run_config.model.dtype]
        self.stop = StopSignal(run_config.stop_timeout_s)
        if run_config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)

        # everything that can fail on a bad config fails here, before the model loads
        train_set = prompts.load(run_config.prompts, "train")
        heldout_set = prompts.load(run_config.eval.prompts, "heldout")
        self.train_prompts = train_prompts if train_prompts is not None else train_set.prompts
        self.heldout_prompts = heldout_prompts if heldout_prompts is not None else heldout_set.prompts
        self.group_of = heldout_set.group_of
        if not self.train_prompts:
            raise C.ConfigError(f"prompts={run_config.prompts!r} gave no training prompts")
        self.reward_fn, gold = run_monitor.build_rewards(run_config, reward_fn, gold_fn, self.train_prompts)
        # an injected gold reward is the caller's choice; 'auto' scores held-out images only where it can
        self.gold_fn = (
            gold if gold_fn is not None else run_monitor.heldout_gold(run_config, gold, self.heldout_prompts)
        )
        if run_config.log_with == "tensorboard":
            run_monitor.check_tensorboard()
        from b2diffurl.algos.api import RunContext, algorithm_class, make_optimizer

        algo_cls = algorithm_class(run_config.algo, distributed=self.world.distributed)
        model_config = run_config.model
        # 'auto': LoRA for real models, and on a toy checkpoint for an algorithm whose reference policy is the
        # same UNet with the adapters disabled (Algorithm.needs_reference_policy, see algos/api.py)
        self.lora = model_config.lora == "on" or (
            model_config.lora == "auto"
            and (not is_toy_checkpoint(model_config.path) or algo_cls.needs_reference_policy)
        )
        dtype = policy.dtype if policy is not None else self.dtype
        if not self.lora and dtype != torch.float32:  # LoRA adapters train in fp32 (Policy.add_lora)
            raise C.ConfigError(
                f"model.dtype={str(dtype)[6:]} with a full fine-tune (model.lora={model_config.lora}) would "
                "step half-precision weights, where AdamW's small updates round away; set model.lora=on or "
                "model.dtype=float32"
            )

        random.seed(run_config.seed)
        np.random.seed(run_config.seed % 2**32)
        torch.manual_seed(run_config.seed)
        if policy is None:
            from b2diffurl.models import load_policy

            policy = load_policy(run_config.model.path, dtype=self.dtype, device=self.device)
        self.policy = policy
        self.params = policy.make_trainable(model_config if self.lora else None)
        # the KL monitor and regulariser compare with the policy as it is now, before any update or restore
        wants_reference = run_config.monitor.kl_samples > 0 or run_config.train.kl_coef > 0
        reference = run_monitor.starting_policy(policy, lora=self.lora, keep_copy=wants_reference)
        self.optimizer, self.lr_scheduler = make_optimizer(self.params, run_config.train)
        from b2diffurl.sampling import TreeSampler

        sample_config = run_config.sample
        self.sampler = TreeSampler(
            policy,
            num_steps=sample_config.num_steps,
            guidance_scale=sample_config.guidance_scale,
            eta=sample_config.eta,
            backend=sample_config.backend,
            cuda_graphs=C.switch(sample_config.cuda_graphs, auto=self.device.type == "cuda"),
            train_cfg=run_config.train.use_guidance,
        )
        self.noise_gen = torch.Generator(device=self.device).manual_seed(run_config.seed)
        self.cpu_gen = torch.Generator().manual_seed(run_config.seed + 1)
        # the reward as algorithms see it: each scored batch is a stopping point and feeds the stage's monitors
        self.reward_tap = run_monitor.RewardTap(self.reward_fn, before=self._batch_stop_point)
        self.watch = run_monitor.RunWatch(run_config, self.reward_tap, gold)
        show_progress = run_config.progress and distributed.is_main()  # one process draws progress bars
        self.ctx = RunContext(
            cfg=run_config,
            policy=policy,
            reward_fn=self.reward_tap,
            sampler=self.sampler,
            params=self.params,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            train_prompts=self.train_prompts,
            device=self.device,
            noise_gen=self.noise_gen,
            cpu_gen=self.cpu_gen,
            progress=report.progress_bar if show_progress else (lambda it, **kw: it),
            should_stop=lambda: self.stop.requested,
            reference=reference,
            # float16 activations underflow small gradients (the fp32 adapters' grads arrive through them):
            # dynamic loss scaling as accelerate's fp16 mode does; bfloat16 has float32's range and needs none
            scaler=torch.amp.GradScaler(self.device.type) if dtype == torch.float16 else None,
        )
        self.algo = algo_cls(self.ctx)
        self.start_stage = 0
        self.metrics = report.MetricsLog(self.out / "metrics.jsonl", write=distributed.is_main())
        if resume_state:
            self._restore(resume_from, resume_state)

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _state(self, next_stage: int) -> dict:
        """Everything a run continues from at the start of stage ``next_stage`` (CPU copies)."""
        return checkpoint.cpu_copy(
            {
                "next_stage": next_stage,
                "config": C.to_dict(self.cfg),
                "model": {n: q for n, q in self.policy.unet.named_parameters() if q.requires_grad},
                "lora": self.lora,
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "scaler": self.ctx.scaler.state_dict() if self.ctx.scaler is not None else None,
                "algo": self.algo.state_dict(),
                "rng": checkpoint.rng_state(self.noise_gen, self.cpu_gen),
                "metrics_lines": len(self.metrics.records),
            }
        )

    def save_checkpoint(self, next_stage: int, state: dict | None = None) -> Path:
        """Save ``state`` (default: the current one) as the checkpoint of stage ``next_stage``'s start."""
        # a LoRA run also exports its adapters in the format `b2diffurl sample --lora` reads (only for the
        # current state: the live adapters are not those of a stage-start snapshot)
        export = (lambda d: self.policy.save_lora(str(d / "lora"))) if self.lora and state is None else None
        state = state or self._state(next_stage)
        # rank 0 writes the checkpoint of all ranks: theirs differ only in their random streams
        state = dict(
            state, world_size=self.world.size, rng_per_rank=distributed.gather_rng_states(state["rng"])
        )
        root = self.out / "checkpoints"
        final = root / checkpoint.stage_name(next_stage)
        if distributed.is_main():
            final = checkpoint.save(root, next_stage, state, export)
            checkpoint.prune(root, self.cfg.keep_checkpoints, keep=final)
        distributed.barrier()  # no rank runs ahead of a checkpoint that is not on disk yet
        return final

    def _restore(self, ckpt: Path, state: dict) -> None:
        # open_run refused any change of model, LoRA or targets: the parameter names are the saved ones
        named = dict(self.policy.unet.named_parameters())
        with torch.no_grad():
            for n, v in state["model"].items():
                named[n].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ctx.scaler is not None and state.get("scaler"):
            self.ctx.scaler.load_state_dict(state["scaler"])
        self.algo.load_state_dict(state["algo"])
        rng = state.get("rng_per_rank", [state["rng"]])[self.world.rank]
        checkpoint.set_rng_state(rng, self.noise_gen, self.cpu_gen)
        self.start_stage = int(state["next_stage"])
        self.metrics.truncate(int(state["metrics_lines"]))  # later lines are redone by this run
        log.info("resumed from %s at stage %d", ckpt, self.start_stage)

    def _batch_stop_point(self) -> None:
        """Called before each scored batch: algorithms score each sampling batch as it is done, so checking
        for a stop request first makes every sampling batch a stopping point."""
        # with several processes the polls are collective, and ranks may sample different numbers of batches:
        # they agree on a stop at the optimizer steps and stage ends instead, which every rank passes together
        if not self.world.distributed:
            self.ctx.check_stop()

    def _evaluate(self, stage: int) -> None:
        report.evaluate(
            stage,
            self.heldout_prompts,
            self.cfg.eval,
            batch_size=self.cfg.sample.batch_size * self.cfg.sample.branches,
            sampler=self.sampler,
            reward_fn=self.reward_fn,
            group_of=self.group_of,
            metrics=self.metrics,
            gold_fn=self.gold_fn,
            grid_path=self.out / "grids" / f"heldout_{stage:05d}.png" if self.cfg.grid_every else None,
        )

    # ---- the loop ------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train until ``stages`` are done or a stop is requested; ``status`` is "finished", "interrupted"
        (the state saved then continues exactly on ``--resume``) or "hacking" (the hacking alarm fired with
        monitor.stop_on_hacking; the checkpoint after that stage is saved)."""
        import yaml

        from b2diffurl.algos.api import StopRequested

        run_config = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if self.fresh_dir and distributed.is_main():
            checkpoint.point_latest(self.out)
        if distributed.is_main():
            checkpoint.atomic_write(
                self.out / "config.yaml", yaml.safe_dump(C.to_dict(run_config), sort_keys=False)
            )
        t_start = time.perf_counter()
        status = "finished"
        if run_config.log_with == "tensorboard" and distributed.is_main():
            self.metrics.mirrors.append(run_monitor.TensorBoardLog(self.out / "tensorboard").log)
        with self.stop:
            if self.start_stage == 0 and not self.metrics.of_kind("eval"):
                self._evaluate(0)
            bar = self.ctx.progress(
                range(self.start_stage, run_config.stages),
                desc=f"{run_config.algo} stages",
                initial=self.start_stage,
                total=run_config.stages,
            )
            for stage in bar:
                stage_start = self._state(stage)  # what a stop in the middle of this stage saves
                try:
                    rec = self._run_stage(stage, bar)
                except StopRequested:
                    self.save_checkpoint(stage, stage_start)
                    status = "interrupted"
                    break
                last = stage + 1 == run_config.stages
                # every rank ends on the alarm together (the monitors gather every rank's images: the same verdict)
                hacked = run_config.monitor.stop_on_hacking and distributed.any_rank(rec["hacking_alarm"])
                every = run_config.eval.every
                if last or hacked or (every and (stage + 1) % every == 0):
                    self._evaluate(stage + 1)
                ckpt_every = run_config.checkpoint_every
                stop = distributed.any_rank(self.stop.requested)  # all ranks stop after the same stage
                if last or stop or hacked or (ckpt_every and (stage + 1) % ckpt_every == 0):
                    self.save_checkpoint(stage + 1)
                if hacked and not last:
                    status = "hacking"
                    log.warning("monitor.stop_on_hacking: run ended after stage %d (checkpoint saved)", stage)
                    break
                if stop and not last:
                    status = "interrupted"
                    break
        if self.lora and status != "interrupted" and distributed.is_main():
            from b2diffurl.export import export_run_lora

            export_run_lora(self.policy.unet, self.out)
        if distributed.is_main():
            report.plot_reward_curve(self.metrics.records, self.out / "reward_curve.png")
        return {
            "status": status,
            "stages_done": len(self.metrics.of_kind("stage")),
            "wall_time_s": time.perf_counter() - t_start,
            "out": str(self.out),
            **report.summarize(self.metrics.records),
        }

    def _run_stage(self, stage: int, bar) -> dict:
        t0 = time.perf_counter()
        self.watch.start_stage()
        data = self.algo.sample_stage(stage)
        skipped = self.ctx.skipped_steps
        train_metrics = self.algo.train_stage(stage, data)
        rec = {"kind": "stage", "stage": stage, **data.metrics, **train_metrics, **self.watch.end_stage()}
        # optimizer steps skipped for a non-finite gradient this stage (RunContext.optimizer_step)
        rec["skipped_steps"] = self.ctx.skipped_steps - skipped
        if self.ctx.scaler is not None:
            rec["loss_scale"] = self.ctx.scaler.get_scale()
        alarm = self.watch.alarm([*self.metrics.of_kind("stage"), rec])
        if alarm.fired:
            log.warning("stage %d: %s", stage, alarm.message)
        rec.update(run_monitor.alarm_metrics(alarm), stage_time_s=time.perf_counter() - t0)
        self.metrics.append(rec)
        if self.cfg.progress and distributed.is_main():  # then ``bar`` is a tqdm bar (report.progress_bar)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}")
        grid_every = self.cfg.grid_every
        if grid_every and (stage + 1) % grid_every == 0 and data.images is not None and distributed.is_main():
            report.save_grid(data.images, self.out / "grids" / f"stage_{stage:05d}.png", data.captions)
        return rec
