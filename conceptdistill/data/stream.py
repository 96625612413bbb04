"""Training data as a function of the optimisation step, so that a resumed run sees exactly the batches
(and augmentations) an uninterrupted one would.

Lightning restores the weights, the optimizer and the step counter from a checkpoint, but not where a
shuffled DataLoader was in its epoch nor the global random state that augmentations draw from; resuming from a
mid-epoch checkpoint therefore trains on other batches than the uninterrupted run. Here the stream itself is
indexed by the step: draw number ``p = step * batch_size + i`` takes sample ``perm_e[p mod N]`` of a
permutation seeded by (seed, epoch ``e = p div N``), and the sample is loaded under a torch random state seeded
by (seed, p). A run resumed at step k starts the stream at draw k * batch_size. Nothing here depends on the
process's history. (No library offers a step-addressable sampler; torch's samplers are epoch-addressable.)
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from conceptdistill.utils.seeding import sample_seed


class StepStream(IterableDataset):
    """An endless stream of `dataset`'s samples, batch by batch from step `start_step` on.

    With DataLoader workers, worker w yields the whole batches of steps w, w + W, ...; the DataLoader takes
    one batch from each worker in turn, so batches arrive in step order. Under several processes (DDP) rank
    r of R takes the r-th slice of each step's R * batch_size draws.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, seed: int, salt: str, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if len(dataset) == 0:
            raise ValueError(f"{salt}: the training set is empty")
        self.dataset, self.batch_size, self.seed, self.salt = dataset, int(batch_size), int(seed), salt
        self.start_step, self.rank, self.world_size = int(start_step), int(rank), int(world_size)
        self._permutations: dict[int, np.ndarray] = {}

    def index_of(self, draw: int) -> int:
        """The data-set index of draw number `draw` (0, 1, 2, ... over the whole run)."""
        epoch, offset = divmod(draw, len(self.dataset))
        if epoch not in self._permutations:
            self._permutations = {epoch: np.random.default_rng(sample_seed(self.seed, epoch, self.salt)).permutation(
                len(self.dataset))}
        return int(self._permutations[epoch][offset])

    def sample(self, draw: int) -> dict:
        """Draw `draw`, loaded with torch's random state seeded by (seed, draw) for its augmentations."""
        return self.samples(range(draw, draw + 1))[0]

    def samples(self, draws: range) -> list[dict]:
        """Draws `draws`, each loaded with torch's CPU random state seeded by (seed, draw); the state of the
        caller is restored afterwards.

        Only the CPU generator is seeded (augmentations run on the CPU): `torch.manual_seed` would seed every
        accelerator too, and in a DataLoader worker, where CUDA is never initialised, each such call queues a
        deferred CUDA seeding with a formatted stack trace, which cost about half a millisecond per sample
        and grew without bound over a run. One fork of the state serves the whole batch."""
        with torch.random.fork_rng(devices=[]):
            out = []
            for draw in draws:
                torch.default_generator.manual_seed(sample_seed(self.seed, draw, f"{self.salt}-augment"))
                out.append(self.dataset[self.index_of(draw)])
            return out

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + worker
        per_step = self.batch_size * self.world_size
        while True:
            first = step * per_step + self.rank * self.batch_size
            yield from self.samples(range(first, first + self.batch_size))
            step += workers


def step_loader(datamodule, dataset: Dataset, *, batch_size: int, seed: int, salt: str, start_step: int = 0,
                trainer=None) -> DataLoader:
    """A DataLoader over `StepStream` with the data module's workers and collate function, resuming at
    `start_step` (the step of the checkpoint a run resumes from; 0 for a fresh run)."""
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    stream = StepStream(dataset, batch_size=batch_size, seed=seed, salt=salt, start_step=start_step, rank=rank,
                        world_size=world)
    return DataLoader(stream, batch_size=batch_size, num_workers=datamodule.num_workers,
                      collate_fn=datamodule.loader(dataset).collate_fn)

