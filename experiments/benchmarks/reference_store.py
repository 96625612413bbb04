"""The paper's reference code's way of collecting attention, as an `AttentionStore` subclass (benchmark peer (d)).

The reference code keeps every cross-attention map it sees: all 77 tokens, every cross-attention layer, every
step (heads averaged, each at its layer's own resolution; about 330-400 MB per image at 512 px with T0 = 40), and
reduces them to the concept's map only at the end. `ReferenceStore` does the same, so its memory grows with the
number of steps and layers, while the project's `AttentionStore` reduces each layer's probabilities on arrival
and keeps one running sum. Both give the same map A (up to float rounding); the benchmark checks it.
"""

from __future__ import annotations

import torch

from conceptdistill.diffusion.attention import AttentionStore


class ReferenceStore(AttentionStore):
    """Keeps every (kept batch, key_len, h_l, w_l) head-averaged map; `mean()` reduces them all at the end."""

    needs_probabilities = True  # the capturing processor hands over every token's probabilities

    def reset(self) -> None:
        super().reset()
        self.maps: list[tuple[str, torch.Tensor]] = []

    def __call__(self, layer_name: str, probs: torch.Tensor, heads: int) -> None:
        if not self.enabled:
            return
        batch = probs.shape[0] // heads
        probs = probs.detach().reshape(batch, heads, probs.shape[1], probs.shape[2])
        if self.keep is not None:
            probs = probs[self.keep]
        maps = probs.float().mean(dim=1)  # (b, query_len, key_len): every token's map, heads averaged
        h_l, w_l = self.grid_shape(maps.shape[1])
        self.maps.append((layer_name, maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], h_l, w_l).clone()))

    def stored_bytes(self) -> int:
        return sum(m.numel() * m.element_size() for _, m in self.maps)

    def mean(self) -> torch.Tensor:
        """Reduce everything kept: the concept tokens' maps summed, brought to the latent grid, averaged."""
        if self.maps and self._sum is None:
            for layer_name, maps in self.maps:
                tokens = maps if self.token_indices is None else maps[:, self.token_indices]
                selected = tokens.sum(dim=1)  # (b, h_l, w_l)
                if tuple(selected.shape[-2:]) != self.output_size:
                    h_l, w_l = selected.shape[-2:]
                    enlarging = h_l <= self.output_size[0] and w_l <= self.output_size[1]
                    selected = torch.nn.functional.interpolate(
                        selected[:, None], size=self.output_size, mode="nearest" if enlarging else "area")[:, 0]
                self.accumulate(layer_name, selected)
        return super().mean()
