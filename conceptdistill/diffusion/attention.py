"""Capturing the concept's attention maps from a diffusion model's denoiser (the prompt-to-prompt pattern).

Stage 1 of concept distillation needs, for every layer where image positions attend to the prompt's tokens,
the softmax probability of the concept token(s) at each image position: the cross-attention ("attn2") layers
of a UNet (SD 1.x/2.x, SDXL), the joint attention of an MMDiT (SD3 / 3.5, FLUX: image queries attending to
text and image keys together, normalised over all keys as the model does). diffusers' fused kernels never
materialise those probabilities, so inside a ``with capture_attention(parts, store):`` block those layers get
capturing processors (diffusion/processors.py) whose outputs equal the stock ones, and which hand the concept
probabilities to an `AttentionStore`. The original processors come back on exit.

The store reduces each layer's probabilities to one map per image right away (sum over the concept tokens,
mean over heads, nearest upsampling to the latent grid) and keeps only running sums, so memory does not grow
with the number of layers or timesteps.

A store names the attention space it reads (`space`, the setting `masks.module.attention_space`) and installs
what feeds it (`capture`): this module's store reads cross-attention ("cross"); diffusion/concept_attention.py's
`ConceptAttentionStore` reads an MMDiT's attention outputs ("output", ConceptAttention).
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

    #: the attention space whose maps the store takes (`masks.module.attention_space`)
    space = "cross"

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
        #: timesteps batched into one denoiser call (set by the caller per call): the batch holds that many
        #: copies of the images, step-major, and each layer's maps count once per step
        self.steps_per_call = 1
        self._grid_cache: dict[int, tuple[int, int]] = {}
        self._key_indices: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.reset()

    def capture(self, parts: Any):
        """A context manager installing, on `parts`' denoiser, what feeds this store: the family's capturing
        processors (`DiffusionParts.capturing_processors`)."""
        return _installed(parts.capturing_processors(self), self)

    def reset(self) -> None:
        """Forget everything accumulated (keeps the configuration)."""
        self._sum: torch.Tensor | None = None
        self.count = 0
        self._layer_sums: dict[str, torch.Tensor] = {}
        self._layer_counts: dict[str, int] = {}

    def wants(self, layer_name: str) -> bool:
        """Whether the layer passes the layer filter (only attn2 layers are ever offered)."""
        return self.layers is None or any(part in layer_name for part in self.layers)

    def key_index(self, offset: int, device: torch.device | str) -> torch.Tensor | None:
        """The concept tokens' positions on a key axis whose text tokens start at `offset`: (k,) int64 on `device`
        (None when `token_indices` is None: every key). Made once per offset and device, then reused: a tensor
        made from Python numbers on a GPU is a blocking copy, which once per layer and pass would drain the
        device's queue of work every time."""
        if self.token_indices is None:
            return None
        device = torch.device(device)
        if (offset, device) not in self._key_indices:
            self._key_indices[(offset, device)] = torch.tensor(
                [offset + i for i in self.token_indices], dtype=torch.long, device=device)
        return self._key_indices[(offset, device)]

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
        """(batch*heads, query_len, key_len) probabilities -> (kept batch, h, w) concept maps: the summed
        probability of the concept tokens (all keys when `token_indices` is None), then `reduce_mass`."""
        batch = probs.shape[0] // heads
        probs = probs.detach().reshape(batch, heads, probs.shape[1], probs.shape[2])
        if self.keep is not None:
            probs = probs[self.keep]
        if self.token_indices is None:
            mass = probs.float().sum(dim=-1)
        else:
            mass = probs.index_select(-1, self.key_index(0, probs.device)).float().sum(dim=-1)
        return self._to_maps(mass)

    def reduce_mass(self, mass: torch.Tensor) -> torch.Tensor:
        """(batch, heads, image_queries) concept attention mass (float) -> (kept batch, h, w) maps: mean over
        heads, resized to `output_size` (nearest when enlarging, as the method prescribes; area averaging in
        the rare case of a layer finer than the output)."""
        mass = mass.detach()
        if self.keep is not None:
            mass = mass[self.keep]
        return self._to_maps(mass.float())

    def _to_maps(self, mass: torch.Tensor) -> torch.Tensor:
        maps = mass.mean(dim=1)  # (b, query_len)
        h_l, w_l = self.grid_shape(maps.shape[1])
        maps = maps.reshape(maps.shape[0], 1, h_l, w_l)
        if (h_l, w_l) != self.output_size:
            enlarging = h_l <= self.output_size[0] and w_l <= self.output_size[1]
            maps = F.interpolate(maps, size=self.output_size, mode="nearest" if enlarging else "area")
        return maps[:, 0]

    def __call__(self, layer_name: str, probs: torch.Tensor, heads: int) -> None:
        """Called by a UNet's capturing processor with one layer's probabilities."""
        if self.enabled:
            self.accumulate(layer_name, self.reduce(probs, heads))

    def add_mass(self, layer_name: str, mass: torch.Tensor) -> None:
        """Called by a joint-attention capturing processor with one layer's (batch, heads, image_queries) mass."""
        if self.enabled:
            self.accumulate(layer_name, self.reduce_mass(mass))

    def accumulate(self, layer_name: str, maps: torch.Tensor) -> None:
        """Add one layer's (b, h, w) maps to the running sums (b = steps_per_call x images, step-major: summed over
        the steps, counted once per step). Override to also keep individual maps."""
        steps = int(self.steps_per_call)
        if steps > 1:
            maps = maps.reshape(steps, maps.shape[0] // steps, *maps.shape[1:]).sum(dim=0)
        if self._sum is None:
            self._sum = torch.zeros_like(maps)
        elif self._sum.shape != maps.shape:
            raise ValueError(
                f"attention maps of shape {tuple(maps.shape)} cannot be added to a running sum of shape "
                f"{tuple(self._sum.shape)}: call reset() before a new batch (or check `keep`)"
            )
        self._sum += maps
        self.count += steps
        if self.per_layer:
            if layer_name in self._layer_sums:
                self._layer_sums[layer_name] += maps
            else:
                self._layer_sums[layer_name] = maps.clone()
            self._layer_counts[layer_name] = self._layer_counts.get(layer_name, 0) + steps

    def mean(self) -> torch.Tensor:
        """Mean over all captured layers and steps: (batch, h, w)."""
        if self._sum is None:
            raise RuntimeError("no attention captured yet (was the denoiser run inside capture_attention?)")
        return self._sum / self.count

    def per_layer_mean(self) -> dict[str, torch.Tensor]:
        """Layer name -> mean over steps (batch, h, w); needs ``per_layer=True``."""
        if not self.per_layer:
            raise RuntimeError("per-layer means were not kept: construct the store with per_layer=True")
        return {name: total / self._layer_counts[name] for name, total in self._layer_sums.items()}


def capture_cross_attention(unet: torch.nn.Module, store: AttentionStore):
    """`capture_attention` for a bare UNet (SD 1.x/2.x/SDXL): every attn2 layer accepted by ``store.wants``
    feeds its probabilities to `store` within the block."""
    from conceptdistill.diffusion.processors import unet_capturing_processors

    return _installed(unet_capturing_processors(unet, store), store)


def capture_attention(parts: Any, store: AttentionStore):
    """Within the block, every text-attention layer of the parts' denoiser accepted by ``store.wants`` feeds the
    concept tokens' attention to `store`: a UNet's cross-attention (attn2) layers, an MMDiT's joint attention
    (SD3's and FLUX's double-stream blocks, FLUX's single-stream blocks), each family's processors from
    `DiffusionParts.capturing_processors`. Other layers keep their fast processors; on exit, also after an
    exception, each layer gets back the very processor object it had before.

    A store of another attention space installs its own hooks instead (`store.capture`).

    Raises:
        ValueError: when no layer matches the store's layer filter (`masks.module.layers`).
    """
    return store.capture(parts)


@contextlib.contextmanager
def _installed(processors: dict[str, tuple[Any, Any]], store: AttentionStore) -> Iterator[AttentionStore]:
    """Install {layer name: (attention module, capturing processor)} for the block's duration."""
    if not processors:
        raise ValueError(f"no cross-attention or joint-attention layer of the model matches the layer filter "
                         f"masks.module.layers={store.layers}")
    originals = {name: module.processor for name, (module, _) in processors.items()}
    try:
        for module, processor in processors.values():
            module.set_processor(processor)
        yield store
    finally:
        for name, (module, _) in processors.items():
            module.set_processor(originals[name])
