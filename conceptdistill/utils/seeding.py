"""Per-sample randomness.

Every random draw that belongs to one sample (noise for its attention maps, its inpainting, a synthetic
image) comes from a generator seeded by (run seed, sample id). Results then do not depend on the number of
devices, the batch size or the order in which samples are processed.
"""

from __future__ import annotations

import hashlib

import torch


def sample_seed(seed: int, sample_id: str | int, salt: str = "") -> int:
    """A stable 63-bit seed for one sample; `salt` separates independent streams (e.g. 'masks', 'inpaint')."""
    digest = hashlib.sha256(f"{seed}/{salt}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_generator(seed: int, sample_id: str | int, salt: str = "", device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(sample_seed(seed, sample_id, salt))
    return generator


def sample_generators(seed: int, sample_ids: list[str], salt: str = "") -> list[torch.Generator]:
    """One CPU generator per sample; keep them across steps to draw that sample's successive noises."""
    return [sample_generator(seed, sid, salt) for sid in sample_ids]


def per_sample_randint(generators: list[torch.Generator], high: int) -> torch.Tensor:
    """(B,) int64 on the CPU, entry i uniform in [0, high) from `generators[i]`: bit for bit
    ``torch.randint(0, high, (1,), generator=g)`` per sample, each generator advancing the same way."""
    values = torch.empty(len(generators), dtype=torch.int64)
    for i, generator in enumerate(generators):
        values[i : i + 1].random_(0, int(high), generator=generator)
    return values
