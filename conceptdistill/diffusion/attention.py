"""Capturing cross-attention maps from a diffusers UNet (the prompt-to-prompt pattern).

Stage 1 of concept distillation needs, for every cross-attention ("attn2") layer, the softmax probabilities
of the concept token(s) over the image positions. diffusers' default processor computes attention with
`scaled_dot_product_attention`, which never materialises those probabilities, so for the duration of a
``with capture_cross_attention(unet, store):`` block the attn2 layers get a `CapturingAttnProcessor` that
computes attention explicitly (same result as diffusers' `AttnProcessor`) and hands the probabilities to an
`AttentionStore`. Self-attention layers keep their fast processor; the original processors come back on exit.

The store reduces each layer's probabilities to one map per image right away (sum over the concept tokens,
mean over heads, nearest upsampling to the latent grid) and keeps only running sums, so memory does not grow
with the number of layers or timesteps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F


class AttentionStore:
    """Accumulates concept-token attention maps over layers and steps; ``mean()`` is the map A of stage 1.

    Args:
        token_indices: positions of the concept token(s) in the tokenized prompt (see
            `concept_token_indices`); their probabilities are summed. ``None`` sums over every token, which
            gives maps of exactly 1 (a sanity check that the captured values are probabilities).
        output_size: (h, w) of the latent grid the maps are brought to. Each layer's square-or-not query grid
            is derived from it (UNet downsampling halves with rounding up; otherwise the aspect ratio).
        layers: optional substrings; only attn2 layers whose name contains one of them are captured (e.g.
            ``["up_blocks"]`` or ``["down_blocks.1", "mid_block"]``). ``None`` captures all attn2 layers.
        keep: batch slice kept before reduction. Under classifier-free guidance the UNet batch is
            ``[unconditional..., conditional...]``: pass ``keep=slice(n, None)`` (n = unconditional rows) or
            ``keep=slice(-n_images, None)`` to keep the conditional half only. ``None`` keeps every row.
        per_layer: also keep a running mean per layer (`per_layer_mean`), to measure which layers carry the
            concept (a property of the trained model, not something to assume).

    Maps are detached float32 tensors on the UNet's device. Set ``enabled = False`` to skip steps without
    uninstalling the processors. Call `reset` between batches of images.
    """

    def __init__(
        self,
        token_indices: Sequence[int] | None,
        output_size: tuple[int, int],
        *,
        layers: Sequence[str] | None = None,
        keep: slice | None = None,
        per_layer: bool = False,
    ) -> None:
        self.token_indices = None if token_indices is None else [int(i) for i in token_indices]
        if self.token_indices is not None and not self.token_indices:
            raise ValueError("token_indices is empty: no concept token to capture")
        self.output_size = (int(output_size[0]), int(output_size[1]))
        self.layers = None if layers is None else list(layers)
        self.keep = keep
        self.per_layer = per_layer
        self.enabled = True
        self._grid_cache: dict[int, tuple[int, int]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated (keeps the configuration)."""
        self._sum: torch.Tensor | None = None
        self.count = 0
        self._layer_sums: dict[str, torch.Tensor] = {}
        self._layer_counts: dict[str, int] = {}

    def wants(self, layer_name: str) -> bool:
        """Whether the layer passes the layer filter (only attn2 layers are ever offered)."""
        return self.layers is None or any(part in layer_name for part in self.layers)

    def grid_shape(self, query_len: int) -> tuple[int, int]:
        """(h_l, w_l) of a layer's query grid with ``h_l * w_l == query_len``, consistent with `output_size`."""
        if query_len not in self._grid_cache:
            self._grid_cache[query_len] = self._solve_grid(query_len)
        return self._grid_cache[query_len]

    def _solve_grid(self, query_len: int) -> tuple[int, int]:
        h, w = self.output_size
        # UNet resolutions: each Downsample2D (3x3 conv, stride 2, padding 1) maps n -> ceil(n / 2).
        while h * w > query_len:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w == query_len:
            return h, w
        # Otherwise (e.g. a grid finer than output_size): the factorisation closest to the aspect ratio.
        target = self.output_size[0] / self.output_size[1]
        best = min(
            ((d, query_len // d) for d in range(1, query_len + 1) if query_len % d == 0),
            key=lambda hw: abs(math.log(hw[0] / hw[1]) - math.log(target)),
        )
        return best

    def reduce(self, probs: torch.Tensor, heads: int) -> torch.Tensor:
        """(batch*heads, query_len, key_len) probabilities -> (kept batch, h, w) concept maps.

        Sum over the concept tokens, mean over heads, resize to `output_size` (nearest when enlarging, as the
        method prescribes; area averaging in the rare case of a layer finer than the output).
        """
        batch = probs.shape[0] // heads
        probs = probs.detach().reshape(batch, heads, probs.shape[1], probs.shape[2])
        if self.keep is not None:
            probs = probs[self.keep]
        if self.token_indices is None:
            selected = probs.float().sum(dim=-1)
        else:
            selected = probs[..., self.token_indices].float().sum(dim=-1)
        maps = selected.mean(dim=1)  # (b, query_len)
        h_l, w_l = self.grid_shape(maps.shape[1])
        maps = maps.reshape(maps.shape[0], 1, h_l, w_l)
        if (h_l, w_l) != self.output_size:
            enlarging = h_l <= self.output_size[0] and w_l <= self.output_size[1]
            maps = F.interpolate(maps, size=self.output_size, mode="nearest" if enlarging else "area")
        return maps[:, 0]

    def __call__(self, layer_name: str, probs: torch.Tensor, heads: int) -> None:
        """Called by `CapturingAttnProcessor` with one layer's probabilities."""
        if self.enabled:
            self.accumulate(layer_name, self.reduce(probs, heads))

    def accumulate(self, layer_name: str, maps: torch.Tensor) -> None:
        """Add one layer's (b, h, w) maps to the running sums. Override to also keep individual maps."""
        if self._sum is None:
            self._sum = torch.zeros_like(maps)
        elif self._sum.shape != maps.shape:
            raise ValueError(
                f"attention maps of shape {tuple(maps.shape)} cannot be added to a running sum of shape "
                f"{tuple(self._sum.shape)}: call reset() before a new batch (or check `keep`)"
            )
        self._sum += maps
        self.count += 1
        if self.per_layer:
            if layer_name in self._layer_sums:
                self._layer_sums[layer_name] += maps
            else:
                self._layer_sums[layer_name] = maps.clone()
            self._layer_counts[layer_name] = self._layer_counts.get(layer_name, 0) + 1

    def mean(self) -> torch.Tensor:
        """Mean over all captured layers and steps: (batch, h, w)."""
        if self._sum is None:
            raise RuntimeError("no attention captured yet (was the UNet run inside capture_cross_attention?)")
        return self._sum / self.count

    def per_layer_mean(self) -> dict[str, torch.Tensor]:
        """Layer name -> mean over steps (batch, h, w); needs ``per_layer=True``."""
        if not self.per_layer:
            raise RuntimeError("per-layer means were not kept: construct the store with per_layer=True")
        return {name: total / self._layer_counts[name] for name, total in self._layer_sums.items()}


class CapturingAttnProcessor:
    """diffusers `AttnProcessor` arithmetic with the attention probabilities handed to a store.

    Installed on cross-attention layers only (see `capture_cross_attention`); its output equals the default
    processor's up to floating-point rounding. Projections are called as modules, so LoRA-wrapped (peft)
    ``to_q``/``to_k``/``to_v``/``to_out`` layers behave as usual.
    """

    def __init__(self, store: AttentionStore, layer_name: str) -> None:
        self.store = store
        self.layer_name = layer_name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,  # e.g. the deprecated LoRA `scale`, ignored as diffusers' AttnProcessor does
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, key_len, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)
        value = attn.to_v(context)

        # (batch*heads, len, head_dim), batch-major: row b*heads + h is image b, head h.
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if is_cross:
            self.store(self.layer_name, probs, attn.heads)

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Attention modules whose processor name ends in ``attn2.processor``, by module name.

    Walks ``named_modules`` rather than ``unet.attn_processors`` so that a UNet wrapped by peft (whose
    module names gain a prefix) works too.
    """
    return {
        name: module
        for name, module in unet.named_modules()
        if hasattr(module, "set_processor") and f"{name}.processor".endswith("attn2.processor")
    }


@contextlib.contextmanager
def capture_cross_attention(unet: torch.nn.Module, store: AttentionStore) -> Iterator[AttentionStore]:
    """Within the block, every attn2 layer accepted by ``store.wants`` feeds its probabilities to `store`.

    Self-attention (attn1) processors are not touched. On exit, also after an exception, each layer gets back
    the very processor object it had before.
    """
    targets = {name: module for name, module in cross_attention_layers(unet).items() if store.wants(name)}
    if not targets:
        raise ValueError(f"no cross-attention (attn2) layer of the model matches the layer filter {store.layers}")
    originals = {name: module.processor for name, module in targets.items()}
    try:
        for name, module in targets.items():
            module.set_processor(CapturingAttnProcessor(store, name))
        yield store
    finally:
        for name, module in targets.items():
            module.set_processor(originals[name])
