"""One tester for the four per-image stages (masks, inpaint, synthesize, predict): each writes one file per sample
and output, a resumed run computes exactly what is missing and writes the same bytes, and a sample's outputs do
not depend on which other samples share its batch (what distributed prediction changes).

Each case builds the stage's LightningModule, data set and writer as the stage does, over a tiny finished run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import compose, one_torch_thread
from hydra.utils import instantiate
from PIL import Image
from test_end_to_end import TINY_STEPS
from torch.utils.data import Dataset, Subset

from conceptdistill.pipeline.artifacts import ArtifactStore, SampleWriter, WithArtifacts, pending
from conceptdistill.pipeline.context import RunContext
from conceptdistill.runner import run

BATCH = 2


@dataclass
class Case:
    """What a per-image stage runs: its module, its data set, its outputs and the writer that stores them."""

    module: object
    dataset: Dataset
    outputs: dict[str, str]
    writer: Callable[[ArtifactStore], SampleWriter] = SampleWriter


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model):
    with one_torch_thread():
        run_dir = tmp_path_factory.mktemp("per-image") / "run"
        overrides = [f"diffusion.path={tiny_model}", "data.num_train=4", "data.num_test=5", "logger=none", *TINY_STEPS,
                     "segment.sources=[preliminary]", "synthesize.num_samples=5"]
        run(compose([*overrides, "stages=[masks,finetune,segment]"], run_dir=run_dir))
        images = tmp_path_factory.mktemp("new-images")
        rng = np.random.default_rng(0)
        for index, size in enumerate([(20, 24), (32, 32), (17, 40), (32, 16), (25, 25)]):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"photo {index}.png")
        yield RunContext(compose(overrides, run_dir=run_dir)), images


def build_case(stage: str, ctx: RunContext, images: Path) -> Case:
    from conceptdistill.modules.synthesizer import SyntheticIds
    from conceptdistill.pipeline.layout import INPAINT_OUTPUTS, MASK_OUTPUTS, SYNTHETIC_OUTPUTS
    from conceptdistill.stages.synthesize import build_generator

    cfg = ctx.full_cfg
    if stage == "masks":
        return Case(instantiate(cfg.masks.module, _convert_="all")(ctx.load_parts()), ctx.datamodule.dataset("test"),
                    MASK_OUTPUTS)
    if stage == "inpaint":
        dataset = WithArtifacts(ctx.datamodule.dataset("test"), {"prelim_mask": (ctx.layout.mask_store("test"), "mask")})
        return Case(instantiate(cfg.inpaint.module, _convert_="all")(ctx.load_parts(finetuned=True)), dataset,
                    INPAINT_OUTPUTS)
    if stage == "synthesize":
        return Case(build_generator(cfg, ctx.load_parts(finetuned=True)), SyntheticIds(5), SYNTHETIC_OUTPUTS)
    from conceptdistill.data.datasets.image_folder import ImageFolderDataModule
    from conceptdistill.data.decoding import image_size
    from conceptdistill.modules.segmenter import SegmentationModel
    from conceptdistill.stages.predict import OriginalSizeMaskWriter

    dataset = ImageFolderDataModule(root=images, image_size=cfg.segment.image_size, num_workers=0).dataset("train")
    sizes = {record.id: image_size(record.image) for record in dataset.records}
    model = SegmentationModel.load_from_checkpoint(ctx.layout.segmenter_checkpoint("preliminary"), map_location="cpu")
    return Case(model, dataset, {"mask": "mask"}, lambda store: OriginalSizeMaskWriter(store, sizes))


def predict_into(ctx: RunContext, case: Case, store: ArtifactStore, dataset: Dataset) -> None:
    trainer = ctx.trainer("test", callbacks=[case.writer(store)], logger=False, enable_progress_bar=False,
                          default_root_dir=str(store.folder))
    trainer.predict(case.module, ctx.datamodule.loader(dataset, batch_size=BATCH), return_predictions=False)


def ids_of(dataset: Dataset) -> list[str]:
    return [dataset[index]["id"] for index in range(len(dataset))]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("stage", ["masks", "inpaint", "synthesize", "predict"])
def test_per_image_stage_writes_one_file_per_sample_resumes_and_ignores_batch_mates(stage, finished, tmp_path):
    ctx, images = finished
    case = build_case(stage, ctx, images)
    ids = ids_of(case.dataset)
    assert len(ids) == 5

    one_go = ArtifactStore(tmp_path / "one_go", case.outputs)
    predict_into(ctx, case, one_go, case.dataset)  # batches [0, 1], [2, 3], [4]
    for output in case.outputs:  # exactly one file per sample and output, nothing half-written beside them
        assert one_go.ids(output) == sorted(ids), output
        assert sorted(p.name for p in (one_go.folder / output).iterdir()) == sorted(
            one_go.path(output, sid).name for sid in ids)

    # two devices as a distributed sampler deals them: the same per-device batch size, other batch-mates
    shards = ArtifactStore(tmp_path / "shards", case.outputs)
    predict_into(ctx, case, shards, Subset(case.dataset, [0, 2, 4]))
    predict_into(ctx, case, shards, Subset(case.dataset, [1, 3]))
    for output in case.outputs:
        for sid in ids:
            assert shards.path(output, sid).read_bytes() == one_go.path(output, sid).read_bytes(), (output, sid)

    # a run killed after writing some files: only the missing sample is computed again, to the same bytes
    lost = sorted(ids)[1]
    first_output = next(iter(case.outputs))
    shards.path(first_output, lost).unlink()
    untouched = {p: p.stat().st_mtime_ns for p in shards.folder.rglob("*.*") if lost not in p.name}
    todo = pending(case.dataset, shards)
    assert ids_of(todo) == [lost]
    predict_into(ctx, case, shards, todo)
    assert len(pending(case.dataset, shards)) == 0
    # The resumed sample runs in a batch of one, not two: masks are the same bytes, while float kernels may round
    # differently at another batch shape, which moves an image pixel by at most one 8-bit level (measured: the
    # synthetic backgrounds, on 0.03% of their values).
    for output, kind in case.outputs.items():
        if kind == "mask":
            assert shards.path(output, lost).read_bytes() == one_go.path(output, lost).read_bytes(), output
        else:
            np.testing.assert_allclose(shards.load(output, lost), one_go.load(output, lost), atol=1 / 255 + 1e-6,
                                       rtol=0, err_msg=output)
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched
