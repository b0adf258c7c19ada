"""D-Fusion: mask-guided self-attention K/V fusion that turns poorly aligned "base" samples into visually
consistent, better aligned "target" samples (and keeps the targets' denoising trajectories for RL).

One stage = :func:`generate_pairs`:

1. **Phase A** — ``n`` samples per prompt. Every sample owns a ``torch.Generator`` seeded from (run seed, epoch,
   sample index) that draws ``x_T`` and every step's noise in one fixed draw (:class:`RowNoise`), so any trajectory
   replays from (prompt, seed). While sampling, the conditional cross-attention probabilities of the layers whose
   token grid is ``mask_grid``² are captured and turned into each sample's binary object mask per step (small:
   ``[N, T, grid²]`` bools). A reference replays its own Phase-A trajectory exactly, so this *is* the mask the
   official reference pass computes at the same step — and having it before the fusion call is what lets the
   reference and target rows share one UNet call (the official mask also reads layers that run after the first
   fused layer, so it cannot come from inside the same call).
2. **Pairing** (:func:`pair_indices`) — per prompt, best first: references = top quarter each used twice, bases =
   bottom half.
3. **Fusion** — targets replay their bases' seeds. Per step, *one* batched CFG UNet call holds each distinct
   reference once (its latent read back from the Phase-A trajectory: no DDIM update needed) and every target; the
   fused self-attention modules hand K/V from reference rows to target rows (``K̃ = m·K_ref + (1−m)·K_tgt``, same
   for V; Q is the target's own; both CFG halves). No base pass. Steps before the fusion window are identical to
   the base's (same latent, model and noise), so targets start from the base latent at the first fused step.
4. Targets are scored; (preferred, dispreferred) = (target, base) by reward, ties dropped.

Attention processors: :mod:`b2kernels.integrations.diffusers` — in Phase A a "captured" context on the
cross-attention modules only (all rows are reference streams, no fused layers), during fusion a "given"-mask
context whose fused self-attention calls :func:`b2kernels.kv_inject_attention` with the reference rows of the
same batch (no gather copy).
"""

from b2diffurl.algos.dfusion.algorithm import DFusionAlgorithm
from b2diffurl.algos.dfusion.fusion import fused_step_range, fusion_block_indices, run_fusion, run_phase_a
from b2diffurl.algos.dfusion.generation import DFusionStage, generate_pairs, save_pair_grid
from b2diffurl.algos.dfusion.pairs import (
    RowNoise,
    item_selection,
    object_token_columns,
    pair_indices,
    pairing_sizes,
    sample_seed,
)
from b2diffurl.config import DFusionConfig  # the algorithm's settings (torch-free, part of the run config)

__all__ = [
    "DFusionAlgorithm",
    "DFusionConfig",
    "DFusionStage",
    "RowNoise",
    "fused_step_range",
    "fusion_block_indices",
    "generate_pairs",
    "item_selection",
    "object_token_columns",
    "pair_indices",
    "pairing_sizes",
    "run_fusion",
    "run_phase_a",
    "sample_seed",
    "save_pair_grid",
]
