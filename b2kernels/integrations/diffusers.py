"""diffusers glue for D-Fusion-style self-attention K/V injection on any ``UNet2DConditionModel`` (no fork).

Three pieces:

* :class:`InjectionConfig` — *what* to fuse: which cross-attention blocks (``layers``), which denoising steps
  (``steps``), which components (``"q"``, ``"k"``, ``"v"``), and how the object mask is obtained.
* :class:`StreamLayout` — *who is who* in the batch: per row a role (reference / target / plain), the reference
  stream a target takes K/V from, and the CFG half. Uncond rows pair with uncond rows, cond with cond.
* :class:`InjectionContext` + :func:`attach` — the state shared by all processors (current step, layout, object
  mask, captured cross-attention maps, stored reference K/V) and the context manager that installs the
  processors on a UNet and restores the originals afterwards.

One UNet call per denoising step serves every stream: put reference rows and target rows (and plain rows) in one
batch; in each fused self-attention the target rows attend to ``m·K_ref + (1−m)·K_self`` (same for V) where
K_ref/V_ref are the reference rows' keys/values *of the same call* — read in place through ``ref_index`` by
:func:`b2kernels.kv_inject_attention`, no gather copy. Separate calls also work (the official code's way): a call
whose layout has reference rows and no targets stores their K/V, and a later call with target rows only injects
the stored K/V.

Masks. In ``mask_mode="captured"`` the cross-attention processors of the layers whose token grid is ``mask_grid``
only *record*, for the conditional reference rows, the softmax probabilities of the object-token columns averaged
over heads; when the UNet call ends these are averaged over layers into :attr:`InjectionContext.cross_maps`. A
target row that needs a mask gets :meth:`InjectionContext.object_mask`: built once from the last recorded maps by
:func:`b2kernels.integrations.masks.object_mask` (each column an item, thresholded, united), resized nearest to
each fused layer's grid. So the mask of a call comes from the maps of the *previous* call: with separate calls
(reference call, then target call) that is the same step as D-Fusion's code; with one batched call per step it is
the previous step's reference maps (the current step's 16×16 up-block maps are produced after the mid block has
already been fused, so they cannot be used within the same call). Callers that build their own mask (D-Fusion)
read ``cross_maps`` and pass the result to :meth:`InjectionContext.set_mask`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from b2kernels.integrations.masks import object_mask, resize_mask
from b2kernels.ops.kv_inject_attention import KVMask, kv_inject_attention
from b2kernels.ops.kv_inject_attention.reference import blend, expand_rows

__all__ = [
    "InjectionConfig",
    "StreamLayout",
    "InjectionContext",
    "KVInjectionAttnProcessor",
    "attach",
    "cross_attention_blocks",
    "token_grid",
]

ROLES = ("ref", "target", "plain")
_COMPONENTS = ("q", "k", "v")
_MASK_MODES = ("captured", "given", "full")


# ----------------------------------------------------------------------------------------------- config / layout


@dataclass(frozen=True)
class InjectionConfig:
    """What to fuse. Defaults are D-Fusion's (SD 1.x/2.x, 20 DDIM steps).

    layers: indices of the UNet blocks that contain cross-attention, counted in execution order (down blocks,
        mid block, up blocks); their self-attention modules are fused. D-Fusion: blocks 3..6 (SD: mid + the three
        cross-attention up blocks, 10 self-attention modules). See :func:`cross_attention_blocks`.
    steps: denoising step indices i (0 = noisiest) at which fusion is active. D-Fusion: 2..19 of 20.
    components: which of "q", "k", "v" are blended with the reference. D-Fusion: ("k", "v") (Q stays the target's).
    mask_mode: "captured" (object mask from the reference rows' cross-attention maps, D-Fusion's rule),
        "given" (set with :meth:`InjectionContext.set_mask`), or "full" (m ≡ 1: replace K/V entirely).
    mask_grid: token grid (side, or (h, w)) of the cross-attention layers whose maps build the mask. SD: 16.
    threshold: default per-item binarisation threshold of the averaged cross-attention map (official fallback
        0.05; per-prompt/per-item values via :meth:`InjectionContext.set_objects`).
    backend: backend of :func:`b2kernels.kv_inject_attention` ("auto" | "triton" | "reference").
    """

    layers: tuple[int, ...] = (3, 4, 5, 6)
    steps: tuple[int, ...] = tuple(range(2, 20))
    components: tuple[str, ...] = ("k", "v")
    mask_mode: str = "captured"
    mask_grid: int | tuple[int, int] = 16
    threshold: float = 0.05
    backend: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "steps", tuple(int(i) for i in self.steps))
        object.__setattr__(self, "components", tuple(self.components))
        bad = [c for c in self.components if c not in _COMPONENTS]
        if bad or not self.components:
            raise ValueError(
                f"InjectionConfig.components must be a non-empty subset of {_COMPONENTS}, got {self.components}"
            )
        if self.mask_mode not in _MASK_MODES:
            raise ValueError(
                f"InjectionConfig.mask_mode must be one of {_MASK_MODES}, got {self.mask_mode!r}"
            )
        g = self.mask_grid
        grid = (g, g) if isinstance(g, int) else tuple(g)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"InjectionConfig.mask_grid must be a side or (h, w), got {g!r}")
        object.__setattr__(self, "mask_grid", grid)


@dataclass(frozen=True)
class StreamLayout:
    """Per batch row: ``role`` ("ref" | "target" | "plain"), ``ref_id`` (ref rows: their stream id 0..R-1;
    target rows: the reference stream they take K/V and mask from; plain rows: -1), ``cond`` (True for the
    conditional CFG half; the whole batch is "cond" without CFG).

    A target row reads the K/V of the reference row with the same ``ref_id`` and the same ``cond`` — in the same
    batch if there is one, else from the K/V stored by an earlier reference-only call.
    """

    role: tuple[str, ...]
    ref_id: tuple[int, ...]
    cond: tuple[bool, ...]

    def __post_init__(self):
        n = len(self.role)
        if len(self.ref_id) != n or len(self.cond) != n:
            raise ValueError("StreamLayout: role, ref_id and cond must have one entry per batch row")
        bad = [r for r in self.role if r not in ROLES]
        if bad:
            raise ValueError(f"StreamLayout: roles must be in {ROLES}, got {bad[:3]}")
        seen = set()
        for role, rid, c in zip(self.role, self.ref_id, self.cond):
            if role in ("ref", "target") and rid < 0:
                raise ValueError(f"StreamLayout: a {role} row needs ref_id >= 0")
            if role == "ref":
                if (rid, c) in seen:
                    raise ValueError(f"StreamLayout: two reference rows with ref_id={rid}, cond={c}")
                seen.add((rid, c))

    @classmethod
    def cfg(
        cls,
        num_ref: int = 0,
        num_target: int = 0,
        num_plain: int = 0,
        *,
        pairing: Sequence[int] | None = None,
        cfg: bool = True,
    ) -> StreamLayout:
        """Rows ``[refs, targets, plains]`` (uncond half) then the same again (cond half) — the ``[uncond; cond]``
        CFG batch diffusers pipelines build, so ``noise_pred.chunk(2)`` still works. ``cfg=False``: one half.

        ``pairing[j]`` is the reference stream of target j. Default: D-Fusion's — each reference serves
        ``num_target // num_ref`` consecutive targets (``j * num_ref // num_target``). In a target-only call
        (``num_ref=0``) ``pairing`` indexes the streams stored by the previous reference-only call.
        """
        if pairing is None:
            if num_target and not num_ref:
                raise ValueError(
                    "StreamLayout.cfg: a target-only layout needs an explicit pairing (stored ref ids)"
                )
            pairing = [j * num_ref // num_target for j in range(num_target)] if num_target else []
        pairing = [int(p) for p in pairing]
        if len(pairing) != num_target:
            raise ValueError(f"StreamLayout.cfg: pairing has {len(pairing)} entries for {num_target} targets")
        if num_ref and any(not 0 <= p < num_ref for p in pairing):
            raise ValueError(f"StreamLayout.cfg: pairing entries must lie in [0, {num_ref}), got {pairing}")
        role = ["ref"] * num_ref + ["target"] * num_target + ["plain"] * num_plain
        rid = list(range(num_ref)) + pairing + [-1] * num_plain
        halves = (False, True) if cfg else (True,)
        return cls(
            role=tuple(role * len(halves)),
            ref_id=tuple(rid * len(halves)),
            cond=tuple(c for c in halves for _ in role),
        )

    @property
    def batch(self) -> int:
        return len(self.role)

    def rows(self, role: str) -> list[int]:
        return [i for i, r in enumerate(self.role) if r == role]

    @property
    def has_targets(self) -> bool:
        return "target" in self.role

    @property
    def has_refs(self) -> bool:
        return "ref" in self.role

    def ref_row(self, ref_id: int, cond: bool) -> int | None:
        for i, (r, rid, c) in enumerate(zip(self.role, self.ref_id, self.cond)):
            if r == "ref" and rid == ref_id and c == cond:
                return i
        return None

    def cond_ref_rows(self) -> list[int]:
        """Conditional reference rows ordered by ref_id (rows whose cross-attention builds the masks)."""
        rows = [
            (rid, i)
            for i, (r, rid, c) in enumerate(zip(self.role, self.ref_id, self.cond))
            if r == "ref" and c
        ]
        return [i for _, i in sorted(rows)]


# --------------------------------------------------------------------------------------------- UNet structure


def _block_prefix(name: str) -> str:
    parts = name.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


def cross_attention_blocks(unet) -> list[str]:
    """Prefixes (``"down_blocks.1"``, ``"mid_block"``, ``"up_blocks.2"``…) of the UNet blocks that contain
    cross-attention, in execution order: index i of this list is block i of :attr:`InjectionConfig.layers`."""
    names = list(unet.attn_processors)
    cross = {_block_prefix(n) for n in names if ".attn2." in n}

    def order(p):
        if p == "mid_block":
            return (1, 0)
        kind, idx = p.split(".")
        return (0 if kind == "down_blocks" else 2, int(idx))

    return sorted(cross, key=order)


def token_grid(num_tokens: int, sample_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer with ``num_tokens`` tokens in a UNet whose input latent is ``sample_hw``
    (each downsample halves the side, rounding up like diffusers' stride-2 padded convs)."""
    h, w = sample_hw
    for _ in range(16):
        if h * w == num_tokens:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        return side, side
    raise ValueError(f"cannot place {num_tokens} tokens on a grid of the {sample_hw} latent")


# --------------------------------------------------------------------------------------------- shared context


@dataclass
class _Stored:
    layout: StreamLayout
    q: torch.Tensor | None
    k: torch.Tensor | None
    v: torch.Tensor | None


@dataclass
class InjectionContext:
    """State shared by every processor attached to one UNet.

    Set before each UNet call: ``step`` (denoising step index i) and, when it changes, ``layout``. Object tokens
    for the mask: :meth:`set_objects`. Explicit masks: :meth:`set_mask`. ``enabled = False`` turns everything off
    (the processors then compute exactly what diffusers' ``AttnProcessor2_0`` computes).
    """

    config: InjectionConfig = field(default_factory=InjectionConfig)
    layout: StreamLayout | None = None
    step: int | None = None
    enabled: bool = True
    mask: torch.Tensor | None = None  # [R, h, w] per reference stream, set by set_mask ("given" mode)
    # Filled by the processors / call hooks:
    cross_maps: torch.Tensor | None = None  # [R, h·w, I] last call's averaged object-token maps
    stored: dict[str, _Stored] = field(
        default_factory=dict
    )  # layer name → reference K/V of the last ref-only call
    _tokens: torch.Tensor | None = None
    _mask_binary: bool = True
    _thresholds: object = None
    _sample_hw: tuple[int, int] | None = None
    _maps_this_call: list = field(default_factory=list)
    _row_mask_cache: dict = field(default_factory=dict)
    _index_cache: dict = field(default_factory=dict)
    _captured: tuple = (None, None)  # (the cross_maps tensor, the mask built from it)
    block_of: dict[str, int] = field(default_factory=dict)

    # -- user API --------------------------------------------------------------------------------------------

    def set_objects(self, token_indices, thresholds: float | Sequence | torch.Tensor | None = None) -> None:
        """Object-token columns of the cross-attention (tokenizer positions: word index + 1 for BOS), one list
        shared by all reference streams ([I]) or one per stream ([R, I]); thresholds: float, [I] or [R, I]
        (default ``config.threshold``). Enables cross-attention capture on the conditional reference rows."""
        t = torch.as_tensor(token_indices, dtype=torch.long)
        if t.dim() not in (1, 2) or t.numel() == 0:
            raise ValueError(
                f"set_objects: token_indices must be [I] or [R, I] and non-empty, got {list(t.shape)}"
            )
        self._tokens = t
        self._index_cache = {k: v for k, v in self._index_cache.items() if k[0] != "tokens"}
        self._thresholds = self.config.threshold if thresholds is None else thresholds

    def set_mask(self, mask: torch.Tensor) -> None:
        """Explicit mask per reference stream: [R, h, w] (any grid; resized nearest per layer) bool/float in [0,1].
        Pass bool masks in loops: a float mask is range-checked (a device sync)."""
        if mask.dim() != 3:
            raise ValueError(f"set_mask: expected [R, h, w], got {list(mask.shape)}")
        if mask.dtype == torch.bool:  # binary by type: no device sync (the per-step hot path)
            self._mask_binary = True
        else:  # float: range check + binary test read back scalars (syncs)
            KVMask(mask.reshape(mask.shape[0], -1)).validate()
            self._mask_binary = bool(((mask == 0) | (mask == 1)).all())
        self.mask = mask.to(torch.float32)
        self._row_mask_cache.clear()

    def object_mask(self) -> torch.Tensor | None:
        """The object mask [R, h, w] the next fused call uses: the given one, m ≡ None for ``"full"``, or (mode
        ``"captured"``) the one built from the last recorded :attr:`cross_maps` (built once per maps)."""
        if self.config.mask_mode != "captured":
            return self.mask
        maps, built = self._captured
        if maps is not self.cross_maps:
            built = None
            if self.cross_maps is not None:
                grid = self.config.mask_grid
                if self.cross_maps.shape[1] != grid[0] * grid[1]:
                    raise ValueError(
                        f"captured maps have {self.cross_maps.shape[1]} cells, not the grid {grid}"
                    )
                built = object_mask(self.cross_maps, self._thresholds).reshape(-1, *grid)
            self._captured = (self.cross_maps, built)
        return built

    def clear(self) -> None:
        """Forget masks, maps and stored K/V (e.g. between batches of prompts)."""
        self.mask = None
        self.cross_maps = None
        self._captured = (None, None)
        self.stored.clear()
        self._maps_this_call.clear()
        self._row_mask_cache.clear()
        self._index_cache.clear()

    # -- decisions -------------------------------------------------------------------------------------------

    def _step_active(self) -> bool:
        if self.step is None:
            raise RuntimeError("InjectionContext.step is not set: assign ctx.step = i before each UNet call")
        return self.step in self.config.steps

    def fuses(self, name: str) -> bool:
        return self.enabled and self.block_of.get(name, -1) in self.config.layers and self._step_active()

    def _check_layout(self, batch: int) -> StreamLayout:
        if self.layout is None:
            raise RuntimeError(
                "InjectionContext.layout is not set: assign a StreamLayout before the UNet call"
            )
        if self.layout.batch != batch:
            raise ValueError(
                f"StreamLayout describes {self.layout.batch} rows but the UNet batch has {batch}; "
                "build the layout with the same counts (and cfg) as the batch"
            )
        return self.layout

    # -- call hooks ------------------------------------------------------------------------------------------

    def _begin_call(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        self._sample_hw = tuple(sample.shape[-2:])
        self._maps_this_call.clear()
        self._row_mask_cache.clear()

    def _end_call(self, module, args, kwargs, output):
        if self._maps_this_call:
            self.cross_maps = torch.stack(self._maps_this_call).mean(dim=0)  # [R, N, I]
            self._maps_this_call.clear()
        self._row_mask_cache.clear()
        return output

    # -- per-layer helpers -----------------------------------------------------------------------------------

    def _grid(self, num_tokens: int) -> tuple[int, int]:
        if self._sample_hw is None:
            side = math.isqrt(num_tokens)
            return side, num_tokens // max(side, 1)
        return token_grid(num_tokens, self._sample_hw)

    def row_mask(self, layout: StreamLayout, num_tokens: int, device) -> torch.Tensor:
        """[B, N]: target rows get their reference's mask at this layer's grid, other rows 0. Bool when the mask
        is binary (captured / full / a binary given mask): the kernel then skips the fp32 blend."""
        key = (num_tokens, str(device), layout)
        hit = self._row_mask_cache.get(key)
        if hit is not None:
            return hit
        tgt = layout.rows("target")
        out = torch.zeros(layout.batch, num_tokens, dtype=torch.float32, device=device)
        if self.config.mask_mode == "full":
            out[self._index_tensors(layout, device)[0]] = 1.0
        else:
            mask = self.object_mask()
            if mask is None:
                how = (
                    "call ctx.set_mask(...)"
                    if self.config.mask_mode == "given"
                    else "call ctx.set_objects(...) and run a UNet call with reference rows first (the mask of a call "
                    "comes from the reference cross-attention of the previous call)"
                )
                raise RuntimeError(f"K/V injection needs an object mask but none is available: {how}")
            ids = [layout.ref_id[i] for i in tgt]
            if max(ids) >= mask.shape[0]:
                raise ValueError(
                    f"target rows use ref_id up to {max(ids)} but the mask has {mask.shape[0]} streams"
                )
            per_ref = resize_mask(mask.to(device), self._grid(num_tokens)).flatten(1)
            tgt_t, ids_t = self._index_tensors(layout, device)
            out[tgt_t] = per_ref[ids_t]
        if self.config.mask_mode != "given" or self._mask_binary:
            out = out.bool()
        self._row_mask_cache[key] = out
        return out

    def _cached(self, key, build):
        """One device tensor per key, built on first use: index tensors are made once per (layout, device),
        not per UNet call, so steady-state calls copy nothing from the host (CUDA-graph friendly)."""
        hit = self._index_cache.get(key)
        if hit is None:
            hit = self._index_cache[key] = build()
        return hit

    def _index_tensors(self, layout: StreamLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
        def build():
            tgt = layout.rows("target")
            return (
                torch.tensor(tgt, device=device),
                torch.tensor([layout.ref_id[i] for i in tgt], device=device),
            )

        return self._cached(("targets", layout, str(device)), build)

    def ref_index(self, layout: StreamLayout, source: StreamLayout, device) -> torch.Tensor:
        """[B] int32: row of ``source`` whose K/V row b reads (targets: their reference; others: themselves)."""

        def build():
            idx = list(range(layout.batch))
            for i in layout.rows("target"):
                j = source.ref_row(layout.ref_id[i], layout.cond[i])
                if j is None:
                    raise RuntimeError(
                        f"target row {i} takes K/V from reference stream {layout.ref_id[i]} "
                        f"({'cond' if layout.cond[i] else 'uncond'} half), which is neither in this batch nor "
                        "stored by a previous reference-only call"
                    )
                idx[i] = j
            return torch.tensor(idx, dtype=torch.int32, device=device)

        return self._cached((layout, source, str(device)), build)

    def _capture_inputs(self, layout: StreamLayout, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional reference rows [R], object-token columns [I] or [R, I]) on ``device``, cached."""
        return (
            self._cached(
                ("cond_refs", layout, str(device)),
                lambda: torch.tensor(layout.cond_ref_rows(), device=device),
            ),
            self._cached(("tokens", str(device)), lambda: self._tokens.to(device)),
        )


# ------------------------------------------------------------------------------------------------- processor


class KVInjectionAttnProcessor:
    """``AttnProcessor2_0`` plus K/V capture/injection (self-attention) and object-map capture (cross-attention).

    With nothing to do for this layer/step it runs exactly diffusers' ``AttnProcessor2_0`` computation.
    """

    def __init__(self, ctx: InjectionContext, name: str):
        self.ctx = ctx
        self.name = name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_self = encoder_hidden_states is None
        batch_size, sequence_length, _ = hidden_states.shape if is_self else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = None
        if is_self:
            hidden_states = self._self_attention(query, key, value, attention_mask)
        if hidden_states is None:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            if not is_self:
                self._capture_cross(query, key)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    # Self-attention: store reference K/V (reference-only call) or inject into target rows.
    def _self_attention(self, query, key, value, attention_mask):
        ctx = self.ctx
        if not ctx.fuses(self.name):
            return None
        layout = ctx._check_layout(query.shape[0])
        comps = ctx.config.components
        if not layout.has_targets:
            if layout.has_refs:
                ctx.stored[self.name] = _Stored(
                    layout,
                    query if "q" in comps else None,
                    key if "k" in comps else None,
                    value if "v" in comps else None,
                )
            return None
        if attention_mask is not None:
            raise NotImplementedError(f"{self.name}: K/V injection with an attention_mask is not supported")
        if layout.has_refs:  # one batched call: references are rows of this very batch
            src, q_src, k_src, v_src = layout, query, key, value
        else:
            st = ctx.stored.get(self.name)
            if st is None:
                raise RuntimeError(
                    f"{self.name}: the batch has target rows but no reference rows, and no reference K/V was stored "
                    "for this layer (run a reference-only call at this step first, or put the references in the batch)"
                )
            src, q_src, k_src, v_src = st.layout, st.q, st.k, st.v
        ridx = ctx.ref_index(layout, src, query.device)
        mask = ctx.row_mask(layout, key.shape[2], query.device)
        if "k" in comps and "v" in comps:  # D-Fusion's case: the fused kernel
            return kv_inject_attention(
                query,
                key,
                value,
                k_ref=k_src,
                v_ref=v_src,
                mask=mask,
                q_ref=q_src if "q" in comps else None,
                ref_index=ridx,
                backend=ctx.config.backend,
                validate=False,
            )
        # Other subsets (q only, k only, ...): rare, materialised with the reference blend.
        B = query.shape[0]
        q2 = blend(query, expand_rows(q_src, B, ridx), mask) if "q" in comps else query
        k2 = blend(key, expand_rows(k_src, B, ridx), mask) if "k" in comps else key
        v2 = blend(value, expand_rows(v_src, B, ridx), mask) if "v" in comps else value
        return F.scaled_dot_product_attention(q2, k2, v2)

    # Cross-attention: record head-averaged object-token probabilities of the conditional reference rows.
    def _capture_cross(self, query, key):
        ctx = self.ctx
        if not ctx.enabled or ctx._tokens is None or ctx.config.mask_mode != "captured" or ctx.layout is None:
            return
        if ctx._grid(query.shape[2]) != ctx.config.mask_grid:
            return
        layout = ctx._check_layout(query.shape[0])
        rows = layout.cond_ref_rows()
        if not rows:
            return
        sel, tok = ctx._capture_inputs(layout, query.device)
        q = query.index_select(0, sel).to(torch.float32)
        k = key.index_select(0, sel).to(torch.float32)
        probs = torch.softmax(q @ k.transpose(-1, -2) * (query.shape[-1] ** -0.5), dim=-1)  # [R, H, N, L]
        if tok.dim() == 1:
            cols = probs[..., tok]  # [R, H, N, I]
        else:
            if tok.shape[0] != len(rows):
                raise ValueError(
                    f"set_objects: {tok.shape[0]} rows of token indices for {len(rows)} reference streams"
                )
            cols = torch.gather(
                probs, 3, tok[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
            )
        ctx._maps_this_call.append(cols.mean(dim=1))  # [R, N, I]


# ----------------------------------------------------------------------------------------------------- attach


@contextlib.contextmanager
def attach(unet, ctx: InjectionContext, *, capture_cross: bool = True):
    """Install K/V-injection processors on ``unet`` for the duration of the ``with`` block.

    Self-attention modules of the fused blocks (``ctx.config.layers``) and, if ``capture_cross``, every
    cross-attention module get a :class:`KVInjectionAttnProcessor`; every other module keeps its processor. The
    original processors are restored on exit (also on error). Yields ``ctx``.
    """
    originals = dict(unet.attn_processors)
    blocks = cross_attention_blocks(unet)
    index = {p: i for i, p in enumerate(blocks)}
    bad = [i for i in ctx.config.layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(
            f"InjectionConfig.layers {bad} out of range: this UNet has {len(blocks)} cross-attention blocks {blocks}"
        )
    procs = {}
    for name, proc in originals.items():
        blk = index.get(_block_prefix(name), -1)
        is_self = ".attn1." in name
        want = (is_self and blk in ctx.config.layers) or (not is_self and capture_cross and ".attn2." in name)
        key = name[: -len(".processor")] if name.endswith(".processor") else name
        if want:
            ctx.block_of[key] = blk
            procs[name] = KVInjectionAttnProcessor(ctx, key)
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    pre = unet.register_forward_pre_hook(ctx._begin_call, with_kwargs=True)
    post = unet.register_forward_hook(ctx._end_call, with_kwargs=True)
    try:
        yield ctx
    finally:
        pre.remove()
        post.remove()
        unet.set_attn_processor(originals)
