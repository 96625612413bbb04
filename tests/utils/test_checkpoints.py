"""The training stages' checkpoint callback: one resumable file, written atomically."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from conceptdistill.utils.checkpoints import AtomicCheckpointIO, resumable_checkpoints


class Line(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_index):
        (x,) = batch
        return ((self.weight - x) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_only_last_ckpt_is_kept_however_often_it_is_written(tmp_path):
    """Lightning's default also keeps an epoch=..-step=..ckpt copy beside last.ckpt: twice the disk, and a
    fine-tuning checkpoint holds the whole diffusion model."""
    trainer = pl.Trainer(max_steps=5, callbacks=[resumable_checkpoints(tmp_path / "checkpoints", 2)],
                         plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(Line(), DataLoader(TensorDataset(torch.ones(8, 1)), batch_size=2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] in (4, 5)
