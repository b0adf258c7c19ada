"""The configuration schema: one dataclass tree (every field with a default and a help string), the
presets and the algorithm registry. Torch-free, so ``b2diffurl train --help`` is fast and complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad configuration, reported before anything is loaded or sampled."""


def switch(value: str, auto: bool) -> bool:
    """An ``auto | on | off`` option as a bool: ``auto`` takes the caller's default (e.g. "the model is on CUDA")."""
    return {"on": True, "off": False}.get(value, auto)


def _f(default, help: str, **kw):  # noqa: A002 - "help" reads best at the call sites
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, tuple):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    path: str = _f(
        "toy", "policy to fine-tune: 'toy' (embedded toy world) or a local diffusers folder (SD 1.x/2.x)"
    )
    dtype: str = _f(
        "float32", "weights/compute dtype: float32 | float16 | bfloat16 (LoRA weights stay float32)"
    )
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    lora: str = _f(
        "auto",
        "auto (LoRA for real models, full fine-tune for a toy checkpoint: 'toy' or a folder written by "
        "b2diffurl.toy.pretrain) | on | off",
    )
    lora_rank: int = _f(4, "LoRA rank on the UNet attention projections")
    lora_alpha: float = _f(4.0, "LoRA alpha (scale = alpha / rank)")
    lora_targets: list = _f(["to_q", "to_k", "to_v", "to_out.0"], "module names that get LoRA adapters")


@dataclass
class SampleConfig:
    num_steps: int = _f(20, "T: DDIM steps per trajectory")
    eta: float = _f(1.0, "DDIM eta (must be > 0: eta = 0 has no step density)")
    guidance_scale: float = _f(5.0, "classifier-free guidance scale for sampling and training (1.0 = no CFG)")
    prompts_per_stage: int = _f(256, "P: prompts (prefixes / branch groups) sampled per stage")
    branches: int = _f(
        5, "B: branches per prefix for B² (DDPO draws B independent images per prompt instead)"
    )
    batch_size: int = _f(8, "prompts per batched UNet call while sampling (rows = batch_size·B, ×2 for CFG)")
    cuda_graphs: str = _f(
        "auto",
        "capture the sampling step (UNet + CFG + DDIM) in CUDA graphs: auto (on when the model is on CUDA) | on "
        "(elsewhere it runs eagerly, with the reason logged) | off",
    )
    backend: str = _f("auto", "b2kernels backend for the DDIM step: auto | triton | reference")
    overlap_reward: str = _f(
        "auto",
        "score each sampled batch in a background thread while the next one samples (ddpo-pytorch's overlap): "
        "auto (on CUDA) | on | off; metrics reward_time_s vs reward_wait_time_s show what it hid",
    )


@dataclass
class TrainConfig:
    inner_epochs: int = _f(2, "passes over the stage's selected samples")
    lr: float = _f(1e-4, "AdamW learning rate")
    lr_warmup_steps: int = _f(0, "linear LR warmup over this many optimizer steps (0 = constant LR)")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient-norm clip per optimizer step")
    micro_batch_size: int = _f(2, "samples per training micro-step (UNet rows = 2× with CFG)")
    grad_accum_steps: int = _f(
        64,
        "micro-batches per optimizer step, each with ALL its trained timesteps (the official unit: one "
        "optimizer step covers grad_accum_steps × micro_batch_size samples × every trained step); the count "
        "runs on across inner epochs",
    )
    flush_partial_accum: bool = _f(
        False,
        "apply a partial accumulation group left at the end of a stage (official: False, its gradient is "
        "dropped)",
    )
    min_step_sigma: float = _f(
        0.0,
        "train only DDIM steps whose noise scale sigma_t >= this (0 = every branched step, official); the "
        "last low-sigma steps carry most of the gradient noise and little of the image",
    )
    clip_range: float = _f(0.1, "PPO clip epsilon")
    adv_clip: float = _f(5.0, "advantages are clamped to [-adv_clip, adv_clip]")
    use_guidance: bool = _f(
        True,
        "use classifier-free guidance in the training forward too (one 2N-row UNet call), as sampling does",
    )
    kl_coef: float = _f(
        0.0,
        "weight of a per-step KL to the starting policy added to the PPO loss (flow_grpo's beta; 0 = off, the "
        "official B² recipe, and no extra forward); the usual remedy when the hacking alarm fires",
    )


@dataclass
class B2Config:
    k_left: int = _f(14, "branched (trained) steps at stage 0")
    k_right: int = _f(20, "branched (trained) steps at the last stage; must be <= sample.num_steps")
    history: int = _f(8, "H: earlier stages whose raw scores join the per-prompt statistics")
    min_std: float = _f(
        0.0,
        "floor on the per-prompt std the z-scores divide by (official: 0); differences far below it (noise "
        "in a dense reward near its ceiling) then give small z-scores and no selected sample",
    )
    pos_threshold: float = _f(0.5, "best branch is a positive sample if its z-score >= this")
    neg_threshold: float = _f(-0.5, "worst branch is a negative sample if its z-score < this")
    beta1: float = _f(1.0, "weight of positive advantages")
    beta2: float = _f(1.0, "weight of negative advantages")
    group_centering: bool = _f(
        False,
        "subtract each branch group's mean z-score before selection (official: False); groups whose "
        "branches tie (outcome fixed by the shared prefix) then give no sample",
    )


@dataclass
class DDPOConfig:
    buffer_size: int = _f(
        16,
        "per-prompt statistics over the last N rewards of that prompt (ddpo-pytorch: 16); 0 = the current "
        "stage's rewards only",
    )
    min_count: int = _f(
        16,
        "until a prompt has this many rewards in its buffer, normalise with the whole stage's mean/std "
        "(ddpo-pytorch: 16)",
    )


def dfusion_pairing_sizes(n: int, ref_fraction: float, base_fraction: float, reuse: int) -> tuple[int, int]:
    """(references, bases) per prompt for D-Fusion pairing; ValueError when ``n`` does not split as needed."""

    def whole(x):
        return abs(x - round(x)) < 1e-9

    n_ref, n_base = n * ref_fraction, n * base_fraction
    if not (whole(n_ref) and whole(n_base)) or round(n_ref) < 1:
        m = next((k for k in range(1, 1000) if whole(k * ref_fraction) and whole(k * base_fraction)), 1000)
        raise ValueError(
            f"dfusion.samples_per_prompt={n} does not split into ref_fraction={ref_fraction} and "
            f"base_fraction={base_fraction} whole samples (n·ref_fraction = {n_ref:g}, n·base_fraction"
            f" = {n_base:g}); use a multiple of {m} (official: 16)"
        )
    n_ref, n_base = round(n_ref), round(n_base)
    if n_ref * reuse != n_base:
        raise ValueError(
            f"D-Fusion pairing needs references × ref_reuse = bases, got {n_ref} × {reuse} != {n_base} "
            f"(samples_per_prompt={n}, ref_fraction={ref_fraction}, base_fraction={base_fraction})"
        )
    if n_ref + n_base > n:
        raise ValueError(
            f"D-Fusion references ({n_ref}) and bases ({n_base}) overlap within samples_per_prompt={n}"
        )
    return n_ref, n_base


class _SelfChecking:
    """Sections usable on their own (outside a RunConfig) check themselves: ``errors()`` lists the problems."""

    def errors(self) -> list[str]:
        return []

    def validate(self) -> None:
        errs = self.errors()
        if errs:
            raise ValueError("; ".join(errs))


@dataclass
class DFusionConfig(_SelfChecking):
    samples_per_prompt: int = _f(16, "n: Phase-A images per prompt (official 16)")
    ref_fraction: float = _f(0.25, "fraction of each prompt's images (best first) used as references")
    base_fraction: float = _f(
        0.5,
        "fraction of each prompt's images (worst) used as bases; needs "
        "n·ref_fraction·ref_reuse = n·base_fraction",
    )
    ref_reuse: int = _f(2, "targets per reference (official 2)")
    fusion_steps: list = _f(
        [2, -1],
        "first and last fused DDIM step index, inclusive; negatives count from the end "
        "(official: 2..19 of 20 = every step but the two noisiest)",
    )
    fusion_layers: str = _f(
        "auto",
        "fused blocks: 'a-b' inclusive, counting UNet blocks with cross-attention in "
        "execution order; 'auto' = mid block + every cross-attention up block (= the "
        "official '3-6' on SD 1.x/2.x)",
    )
    object_words: list = _f(
        [],
        "object words whose cross-attention builds the mask (located with the tokenizer; "
        "multi-token words use all their tokens); empty = the toy world's shape nouns found "
        "in each prompt. Every listed word must occur in every prompt",
    )
    mask_grid: int = _f(
        16, "token-grid side of the cross-attention layers averaged into the mask (official 16)"
    )
    mask_threshold: float = _f(
        0.05, "binarisation threshold of the head/layer-averaged object attention (official fallback 0.05)"
    )
    item_thresholds: dict = _f(
        {},
        "per object word thresholds overriding mask_threshold (official: hand-set per "
        "prompt and item, 0.005-0.03)",
    )
    mask_rule: str = _f(
        "threshold",
        "'threshold' (official) or 'mean': keep tokens >= the item's spatial mean "
        "(scale-free: transfers between models and prompt lengths)",
    )
    pairs: str = _f(
        "fused",
        "training pairs: 'fused' (D-Fusion: target vs its base) or 'plain' (D3PO's own: the Phase-A "
        "reference vs the base, no fusion in training; for the D-Fusion-vs-plain comparison at equal pair count)",
    )
    objective: str = _f(
        "dpo",
        "training on the (target, base) pairs: 'dpo' (D3PO, as the paper) or 'ppo' "
        "(DDPO-style PPO-clip on targets and bases with per-prompt z-scored rewards)",
    )
    save_pairs: bool = _f(False, "write reference | base | target | mask grids to <out>/pairs/ every stage")

    def errors(self) -> list[str]:
        errs = []
        try:
            dfusion_pairing_sizes(
                self.samples_per_prompt, self.ref_fraction, self.base_fraction, self.ref_reuse
            )
        except ValueError as e:
            errs.append(str(e))
        if self.ref_reuse < 1:
            errs.append(f"dfusion.ref_reuse must be >= 1, got {self.ref_reuse}")
        if len(self.fusion_steps) != 2:
            errs.append(f"dfusion.fusion_steps must be [first, last], got {self.fusion_steps!r}")
        if self.mask_rule not in ("threshold", "mean"):
            errs.append(f"dfusion.mask_rule must be 'threshold' or 'mean', got {self.mask_rule!r}")
        if self.pairs not in ("fused", "plain"):
            errs.append(f"dfusion.pairs must be 'fused' or 'plain', got {self.pairs!r}")
        if self.objective not in ("dpo", "ppo"):
            errs.append(f"dfusion.objective must be 'dpo' or 'ppo', got {self.objective!r}")
        if self.mask_grid < 1:
            errs.append(f"dfusion.mask_grid must be >= 1, got {self.mask_grid}")
        return errs


@dataclass
class DPOConfig(_SelfChecking):
    beta: float = _f(
        0.1, "DPO temperature β (D3PO 0.1; D-Fusion's config key is 0, which makes the loss constant)"
    )
    clip_eps: float = _f(0.1, "ratio clamp ε: r = clamp(π_θ/π_ref, 1−ε, 1+ε)")
    logprob_reduction: str = _f(
        "mean",
        "'mean' over C·H·W (the papers' convention: βΔ is tiny) or 'sum' (= mean × C·H·W, a stronger signal)",
    )
    ref_batch_size: int = _f(32, "transitions per no-grad UNet call when computing ℓ^ref once per stage")

    def errors(self) -> list[str]:
        errs = []
        if self.logprob_reduction not in ("mean", "sum"):
            errs.append(f"dpo.logprob_reduction must be 'mean' or 'sum', got {self.logprob_reduction!r}")
        if not 0 < self.clip_eps < 1:
            errs.append(f"dpo.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.ref_batch_size < 1:
            errs.append(f"dpo.ref_batch_size must be >= 1, got {self.ref_batch_size}")
        return errs


@dataclass
class EvalConfig:
    prompts: str = _f(
        "toy",
        "held-out prompts: 'toy' (toy held-out set), 'toy:<category>', a .txt (one per line) "
        "or .json list, or 'none'",
    )
    num_prompts: int = _f(32, "held-out prompts evaluated (N evenly spaced over the held-out list)")
    images_per_prompt: int = _f(2, "images per held-out prompt")
    every: int = _f(0, "evaluate every N stages (0 = only before and after training)")
    seed: int = _f(1234, "fixed sampling seed for evaluation (same noise before and after)")


@dataclass
class MonitorConfig:
    gold_reward: str = _f(
        "auto",
        "held-out gold reward scored on every training image next to the training reward: 'auto' (the toy "
        "reward on the toy model unless the training reward already contains it, else none), 'none', or a "
        "reward spec",
    )
    gold_reward_options: dict = _f({}, "keyword options of the gold reward (as reward_options)")
    diversity_embeddings: bool = _f(
        False,
        "measure per-prompt diversity on the training reward's image embeddings (one extra image-encoder "
        "pass per batch) instead of downsampled pixels",
    )
    kl_samples: int = _f(
        32,
        "trained (trajectory, step) pairs per stage on which the KL to the starting policy is estimated (one "
        "no-grad UNet pass each, at most one trained pair in 8; 0 = off). A full fine-tune keeps a frozen copy "
        "of the starting UNet for it",
    )
    window: int = _f(5, "hacking alarm: stages whose trends are compared")
    reward_rise: float = _f(
        0.02, "hacking alarm: training-reward rise over the window (fraction of its level) that counts"
    )
    gold_drop: float = _f(0.05, "hacking alarm: gold-reward fall over the window (fraction) that counts")
    diversity_drop: float = _f(0.10, "hacking alarm: diversity fall over the window (fraction) that counts")
    min_trend_t: float = _f(
        2.0,
        "hacking alarm: a gold-reward or diversity fall counts only when its fitted trend is at least this many "
        "standard errors below flat (stage-to-stage noise such as the prompt mix does not fire it alone); "
        "0 = margins only",
    )
    stop_on_hacking: bool = _f(
        False, "end the run (checkpoint saved, status 'hacking', exit code 3) when the alarm fires"
    )


@dataclass
class RunConfig:
    algo: str = _f("b2", "algorithm: b2 | ddpo | dfusion (D-Fusion pairs + D3PO)")
    preset: str = _f(
        "auto",
        "auto (toy for a toy checkpoint, else official) | toy | official: fills every field not set explicitly "
        "(see module help)",
    )
    stages: int = _f(100, "S: stages (sample → score → select → train)")
    seed: int = _f(42, "run seed (sampling noise, prompt draws, shuffles)")
    prompts: str = _f(
        "toy",
        "training prompts: 'toy' (train split), 'toy:<category>' (single|count|relation), "
        "a .txt (one per line) or a .json list",
    )
    reward: str = _f(
        "toy",
        "reward: toy | clip | aesthetic | pickscore | hpsv2 | jpeg_compressibility | jpeg_incompressibility | "
        "brightness | foreground (pixel rewards; 0/1 with reward_options.threshold) | python:pkg.mod:fn, or "
        "weighted terms such as aesthetic:0.7,clip:0.3 (the toy preset trains B² and DDPO on a sparse pixel reward)",
    )
    reward_options: dict = _f(
        {},
        "keyword options passed to the reward factory (e.g. clip weights path); a multi-reward takes "
        "'<term>.<option>' keys, settable as --set reward_options.clip.checkpoint=PATH",
    )
    reward_aggregate: str = _f(
        "reward",
        "multi-reward terms combined as 'reward' (weighted sum, then normalised) or 'advantage' (each term "
        "normalised on its own, then weighted: the weights mean what they say whatever the scales)",
    )
    reward_timeout_s: float = _f(
        0.0, "abandon a reward call that runs longer than this and end the run (exit 2); 0 = no limit"
    )
    reward_max_nonfinite_fraction: float = _f(
        0.1,
        "NaN/inf scores are left out of statistics and training; a reward call with a larger fraction of "
        "them ends the run (exit 2)",
    )
    log_with: str = _f("none", "extra metrics logger next to metrics.jsonl: none | tensorboard")
    out: str = _f(
        "auto",
        "run directory (metrics.jsonl, checkpoints, grids, plots); 'auto' = a fresh runs/<date-time>/ with a "
        "runs/latest link. A non-empty directory is only reused with --resume",
    )
    checkpoint_every: int = _f(10, "checkpoint every N stages (also at the end and on SIGTERM/SIGINT)")
    stop_timeout_s: float = _f(
        30.0,
        "after SIGTERM/SIGINT the run saves mid-stage at the next sampling batch or optimizer step; if that "
        "takes longer than this, it exits without saving (the last checkpoint stays intact)",
    )
    keep_checkpoints: int = _f(
        0,
        "keep only the newest N checkpoints, deleting older ones once a new one is "
        "safely written (0 = keep all)",
    )
    grid_every: int = _f(10, "save a sample grid every N stages (0 = never)")
    progress: bool = _f(True, "show progress bars")
    deterministic: bool = _f(False, "torch deterministic algorithms (exact resume on GPU)")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "policy"})
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"help": "sampling"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "PPO update"})
    b2: B2Config = field(default_factory=B2Config, metadata={"help": "B²-DiffuRL"})
    ddpo: DDPOConfig = field(default_factory=DDPOConfig, metadata={"help": "DDPO baseline"})
    dfusion: DFusionConfig = field(
        default_factory=DFusionConfig, metadata={"help": "D-Fusion pair construction"}
    )
    dpo: DPOConfig = field(default_factory=DPOConfig, metadata={"help": "D3PO loss (D-Fusion training)"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "held-out evaluation"})
    monitor: MonitorConfig = field(
        default_factory=MonitorConfig, metadata={"help": "reward-hacking monitors and alarm"}
    )


# Algorithms the trainer knows (name -> "module:Class"); new algorithms register here and may add a config
# section (a dataclass field on RunConfig named like the algorithm).
ALGORITHMS = {
    "b2": "b2diffurl.algos.b2:B2Algorithm",
    "ddpo": "b2diffurl.algos.ddpo:DDPOAlgorithm",
    "dfusion": "b2diffurl.algos.dfusion:DFusionAlgorithm",
}
