"""A training stage's progress bar counts its optimizer steps against its step budget, also after a resume
(Lightning's own labels step-budget training "Epoch 0/-2" and, resumed, counts on against the steps left:
"20/10")."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import compose

from conceptdistill.pipeline.context import RunContext


class Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(3, generator=generator)


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_index):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("rich", [True, False], ids=["rich", "tqdm"])
def test_a_resumed_stage_counts_its_steps_against_its_budget(tmp_path, capsys, monkeypatch, rich):
    """Both of Lightning's bars: Rich where it is installed, tqdm otherwise."""
    from pytorch_lightning.callbacks.progress import rich_progress

    monkeypatch.setattr(rich_progress, "_RICH_AVAILABLE", rich_progress._RICH_AVAILABLE and rich)
    ctx = RunContext(compose(["logger=none"], run_dir=tmp_path / "run"))
    data = torch.utils.data.DataLoader(Endless(), batch_size=4)
    first = ctx.trainer("segment-refined", max_steps=10, max_epochs=-1, default_root_dir=str(tmp_path / "fit"))
    first.fit(Regression(), data)
    checkpoint = next((tmp_path / "fit").rglob("*.ckpt"))
    capsys.readouterr()
    resumed = ctx.trainer("segment-refined", max_steps=20, max_epochs=-1, default_root_dir=str(tmp_path / "fit"))
    resumed.fit(Regression(), data, ckpt_path=str(checkpoint))
    captured = capsys.readouterr()
    out = (captured.out + captured.err).replace("\r", "\n")
    assert "segment-refined" in out and "Epoch" not in out
    assert "20/20" in out and "20/10" not in out
    if not rich:  # tqdm starts at the restored step, and its speed counts only this run's batches
        assert "Training" not in out and "| 10/20" in out


def test_with_gradient_accumulation_the_bar_counts_the_batches_of_the_budget(tmp_path, capsys):
    ctx = RunContext(compose(["logger=none"], run_dir=tmp_path / "run"))
    trainer = ctx.trainer("finetune", max_steps=5, max_epochs=-1, accumulate_grad_batches=2,
                          default_root_dir=str(tmp_path / "fit"))
    trainer.fit(Regression(), torch.utils.data.DataLoader(Endless(), batch_size=4))
    captured = capsys.readouterr()
    out = (captured.out + captured.err).replace("\r", "\n")
    assert trainer.global_step == 5 and "10/10" in out and "10/5" not in out
