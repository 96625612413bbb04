"""The step-indexed training stream (data/stream.py): each draw is loaded under torch's CPU random state seeded
by (seed, draw), exactly as when every sample forked and seeded the state on its own, the caller's state is left
as it was, and no accelerator is seeded (in a DataLoader worker that queued a stack trace per sample)."""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import Dataset

from conceptdistill.data.stream import StepStream
from conceptdistill.utils.seeding import sample_seed


class Augmented(Dataset):
    """Each item draws from torch's global random state, as a random augmentation does."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "jitter": torch.rand(3), "flip": bool(torch.randint(0, 2, (1,)))}


def per_sample_reference(stream: StepStream, draw: int) -> dict:
    """How each draw was loaded before batches shared one fork of the random state: its own fork, and
    `torch.manual_seed`, which seeds the CPU generator (and every accelerator's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed(stream.seed, draw, f"{stream.salt}-augment"))
        return stream.dataset[stream.index_of(draw)]


def test_each_draw_is_loaded_under_its_own_seed_as_before(monkeypatch):
    stream = StepStream(Augmented(), batch_size=3, seed=7, salt="world", start_step=2)
    expected = [per_sample_reference(stream, draw) for draw in range(6, 6 + 12)]  # steps 2..5, 3 draws each

    torch.manual_seed(123)
    seeded_accelerators = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded_accelerators.append(seed))
    before = torch.get_rng_state()
    got = list(itertools.islice(iter(stream), 12))

    assert torch.equal(torch.get_rng_state(), before), "the caller's random state must be restored"
    assert seeded_accelerators == []
    assert [g["index"] for g in got] == [e["index"] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g["jitter"], e["jitter"]) and g["flip"] == e["flip"]
    assert stream.sample(9)["index"] == expected[3]["index"]
    assert torch.equal(stream.sample(9)["jitter"], expected[3]["jitter"])
    # another draw of the same item (a later epoch) gets another augmentation
    assert not torch.equal(stream.sample(9)["jitter"], stream.sample(9 + 5 * 3)["jitter"])
