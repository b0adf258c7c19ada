"""What makes a D-Fusion pair: who pairs with whom (:func:`pair_indices`), which tokens are the objects whose
attention builds the mask (:func:`item_selection`), and the per-sample noise that lets a target replay its base
(:class:`RowNoise`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from b2diffurl.config import DFusionConfig
from b2diffurl.config import dfusion_pairing_sizes as pairing_sizes


def pair_indices(
    scores: torch.Tensor, ref_fraction: float = 0.25, base_fraction: float = 0.5, reuse: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair references with bases per prompt.

    ``scores`` [P, n] (row = prompt). Returns ``(ref_idx, base_idx)``, both [P, n_base] LongTensors of sample
    indices within the prompt's row: sorted best first (stable: ties keep the lower index first), references are
    the top ``n·ref_fraction`` each repeated ``reuse`` times in order [o₁, o₁, o₂, o₂, …]; bases are the last
    ``n·base_fraction`` of the order. Pair i = (ref_idx[:, i], base_idx[:, i]). A NaN score (no finite reward)
    ranks last: such a sample is a reference only when too few are scored, and a pair with a NaN base is left
    out of the preferences (:func:`preference_pairs`).
    """
    p, n = scores.shape
    n_ref, n_base = pairing_sizes(n, ref_fraction, base_fraction, reuse)
    ranked = torch.where(scores.isnan(), float("-inf"), scores)  # torch sorts NaN above everything
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)
    refs = order[:, :n_ref].repeat_interleave(reuse, dim=1)
    bases = order[:, n - n_base :]
    return refs, bases


def _token_ids(tokenizer, text: str, special: bool) -> list[int]:
    """Token ids of one text (a Hugging Face tokenizer, or any callable returning ``{"input_ids": [...]}``)."""
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def object_token_columns(
    tokenizer, prompt: str, words: Sequence[str], *, required: bool
) -> list[tuple[str, list[int]]]:
    """The mask items of ``prompt``: one ``(word, token columns)`` per *occurrence* of an object word (columns are
    positions in the encoded prompt, BOS included), in the order of ``words`` then of the prompt.

    Words are located by tokenising the word alone and searching that id sequence in the tokenised prompt, so a
    multi-token word gives several columns (one item: see :mod:`b2kernels.integrations.masks`) and nothing depends
    on word positions. ``required``: a word that does not occur raises ValueError.
    """
    prompt_ids = _token_ids(tokenizer, prompt, special=True)
    items = []
    for word in words:
        wid = _token_ids(tokenizer, word, special=False)
        if not wid:
            raise ValueError(f"object word {word!r} tokenises to nothing")
        starts = [i for i in range(len(prompt_ids) - len(wid) + 1) if prompt_ids[i : i + len(wid)] == wid]
        items += [(word, list(range(i, i + len(wid)))) for i in starts]
        if not starts and required:
            raise ValueError(
                f"object word {word!r} is not in prompt {prompt!r} (its tokens {wid} do not occur in "
                f"the prompt's {prompt_ids}); set dfusion.object_words to words every prompt contains"
            )
    return items


def item_selection(
    tokenizer, prompts: Sequence[str], cfg: DFusionConfig, seq_len: int, default_words: Sequence[str] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt: item weights [P, L, I] (1 at the token columns of each item = each occurrence of an object
    word) and thresholds [P, I] (+inf on padded items, so they never switch a cell on).

    Object words: ``cfg.object_words`` (each must occur in every prompt), else those of ``default_words`` (the
    policy's :attr:`~b2diffurl.models.Policy.object_words`) that occur in the prompt."""
    words = tuple(cfg.object_words) or tuple(default_words)
    if not words:
        raise ValueError(
            "dfusion needs object words for its masks: set dfusion.object_words (this model names none)"
        )
    per_prompt = []
    for p in prompts:
        present = [w for w in words if w in p.lower().split()] if not cfg.object_words else list(words)
        if not present:
            raise ValueError(f"no object word of {list(words)} in prompt {p!r}: set dfusion.object_words")
        per_prompt.append(object_token_columns(tokenizer, p, present, required=True))
    n_items = max(len(items) for items in per_prompt)
    sel = torch.zeros(len(prompts), seq_len, n_items)
    thr = torch.full((len(prompts), n_items), math.inf)
    for pi, items in enumerate(per_prompt):
        for ii, (w, c) in enumerate(items):
            if max(c) >= seq_len:
                raise ValueError(
                    f"object word {w!r} of prompt {prompt_preview(prompts[pi])} sits at token "
                    f"{max(c)} beyond the encoder's {seq_len} tokens"
                )
            sel[pi, c, ii] = 1.0
            thr[pi, ii] = cfg.item_thresholds.get(w, cfg.mask_threshold)
    return sel, thr


def prompt_preview(p: str) -> str:
    return repr(p if len(p) < 60 else p[:57] + "...")


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    """Seed of sample ``index`` of stage ``epoch`` (distinct for index < 2²⁴ and epoch < 2²⁴)."""
    return (int(run_seed) * 2**48 + int(epoch) * 2**24 + int(index)) % (2**63 - 1)


class RowNoise:
    """Per-sample noise: one CPU ``torch.Generator`` per row, seeded by :func:`sample_seed`, draws a single
    [T+1, C, H, W] standard normal tensor: slot 0 is x_T, slot i+1 the noise of DDIM step i. Drawing on CPU makes
    the stream independent of device and batch composition, so a row replays bit-identically from its seed."""

    def __init__(
        self, seeds: Sequence[int], num_steps: int, latent_shape: Sequence[int], device, dtype=torch.float32
    ):
        self.seeds = [int(s) for s in seeds]
        draws = []
        for s in self.seeds:
            g = torch.Generator(device="cpu").manual_seed(s)
            draws.append(torch.randn((num_steps + 1, *latent_shape), generator=g, dtype=torch.float32))
        self.noise = torch.stack(draws).to(device=device, dtype=dtype)  # [N, T+1, C, H, W]

    def x_T(self) -> torch.Tensor:
        return self.noise[:, 0]

    def step(self, i: int) -> torch.Tensor:
        return self.noise[:, i + 1]


def preference_pairs(
    ids_a: torch.Tensor, ids_b: torch.Tensor, reward_a: torch.Tensor, reward_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(preferred ids, dispreferred ids, decisive mask) of the pairs (a_i, b_i): the higher reward wins; a tie
    or a NaN reward (no finite score) gives no preference and the pair is left out."""
    win, lose = reward_a > reward_b, reward_a < reward_b
    decisive = win | lose
    preferred = torch.where(win, ids_a, ids_b)[decisive]
    dispreferred = torch.where(win, ids_b, ids_a)[decisive]
    return preferred, dispreferred, decisive
