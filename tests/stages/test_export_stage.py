"""Stage export: the TorchScript and ONNX files, loaded by their own runtimes, give stage predict's masks on new
images; export.json records what was measured; a difference above the tolerance keeps no file; settings and
upstream changes make the export stale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, one_torch_thread
from test_api import stage_mask, tiny_run_overrides, write_new_images

from conceptdistill.data.datasets.image_folder import ImageFolderDataModule
from conceptdistill.data.decoding import image_size
from conceptdistill.maskmath import resize_nearest
from conceptdistill.pipeline.context import RunContext
from conceptdistill.pipeline.registry import StageError
from conceptdistill.runner import run

TOLERANCE = 1e-4  # conf/export/default.yaml


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    """A tiny finished run (source preliminary), exported, with stage predict's masks of new images."""
    with one_torch_thread():
        run_dir = tmp_path_factory.mktemp("export") / "run"
        images = write_new_images(tmp_path_factory.mktemp("new-images"))
        overrides = [*tiny_run_overrides(tiny_model), "export.sources=[preliminary]"]
        run(compose([*overrides, "stages=[masks,finetune,segment,export]"], run_dir=run_dir))
        run(compose([*overrides, "stages=[predict]", "predict.source=preliminary", f"predict.input_dir={images}"],
                    run_dir=run_dir))
        yield run_dir, images, overrides


def test_exports_give_the_predict_stage_masks(exported):
    import onnxruntime

    run_dir, images, _ = exported
    folder = run_dir / "export" / "preliminary"
    record = json.loads((folder / "export.json").read_text())
    size = record["image_size"]
    assert size == 32 and record["threshold"] == 0.5
    assert record["input"]["shape"] == ["batch", 3, size, size]
    assert record["tolerance"] == {"torchscript": TOLERANCE, "onnx": TOLERANCE}
    for kind in ("torchscript", "onnx"):
        assert 0 <= record["measured"][kind]["max_abs_difference"] <= TOLERANCE, kind
    assert record["checked_on"] == "the first 4 images of the run's test split"
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "segmenter.onnx", "segmenter.pt"]

    # new images prepared as stage predict prepares them
    dataset = ImageFolderDataModule(root=images, image_size=size, num_workers=0).dataset("train")
    batch = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    scripted = torch.jit.load(str(folder / "segmenter.pt"))
    with torch.inference_mode():
        outputs = {"torchscript": scripted(batch).numpy()}
    session = onnxruntime.InferenceSession(str(folder / "segmenter.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("images", ["batch", 3, size, size])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("probabilities", ["batch", size, size])]
    outputs["onnx"] = session.run(None, {"images": batch.numpy()})[0]
    assert session.run(None, {"images": batch[:1].numpy()})[0].shape == (1, size, size)  # any batch size
    for kind, probabilities in outputs.items():
        assert probabilities.shape == (len(dataset), size, size) and probabilities.dtype == np.float32
        for record_, probability in zip(dataset.records, probabilities, strict=True):
            shown = image_size(record_.image)
            mask = resize_nearest(probability, shown) > 0.5
            expected = stage_mask(run_dir, Path(record_.image))
            # equal, except where the probability lies within the tolerance of the threshold
            near = np.abs(resize_nearest(probability, shown) - 0.5) <= TOLERANCE
            assert mask.shape == expected.shape
            assert not np.any((mask != expected) & ~near), (kind, record_.id)
            assert expected.any() or not mask.any()


def test_export_is_stale_when_anything_it_reads_changes(exported):
    run_dir, _, overrides = exported
    assert RunContext(compose(overrides, run_dir=run_dir)).is_complete("export")
    for change in ("segment.max_steps=3", "export.tolerance.torchscript=1e-3", "export.onnx_opset=18",
                   "data.num_test=5"):
        assert not RunContext(compose([*overrides, change], run_dir=run_dir)).is_complete("export"), change
    with pytest.raises(StageError, match="export.sources"):
        run(compose([*overrides, "stages=[export]", "export.sources=[refined]"], run_dir=run_dir))


def test_an_export_beyond_its_tolerance_is_refused_and_keeps_no_file(exported, monkeypatch, tmp_path):
    from conceptdistill.stages import export

    run_dir, images, overrides = exported
    original = export.run_file

    def drifting(kind, path):
        forward = original(kind, path)
        return (lambda batch: forward(batch) + 1e-3) if kind == "onnx" else forward

    monkeypatch.setattr(export, "run_file", drifting)
    cfg = compose([*overrides, "stages=[export]", f"export.check_dir={images}"], run_dir=run_dir)
    with pytest.raises(StageError, match=r"export.tolerance.onnx=0.0001") as error:
        run(cfg)
    assert "7 images of export.check_dir" in str(error.value)
    assert not list((run_dir / "export").rglob("*.partial"))
    assert not (run_dir / "export" / "DONE.json").exists()
    # with a looser tolerance it is kept, and the record says what it was measured on
    summary = run(compose([*overrides, "stages=[export]", f"export.check_dir={images}", "export.tolerance.onnx=0.01"],
                          run_dir=run_dir))["export"]
    assert summary["sources"]["preliminary"]["onnx"]["max_abs_difference"] == pytest.approx(1e-3, rel=1e-2)
    record = json.loads((run_dir / "export" / "preliminary" / "export.json").read_text())
    assert record["tolerance"]["onnx"] == 0.01 and "export.check_dir" in record["checked_on"]


def test_exporting_leaves_the_report_in_place_and_a_mismatch_names_the_command(exported, tmp_path):
    """Export changes nothing the report shows, so the report stays where results are looked for; a command
    missing the run's overrides is told the command that made the run."""
    import shutil

    source, _, overrides = exported
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    with one_torch_thread():
        run(compose([*overrides, "stages=[report]"], run_dir=run_dir))
        (run_dir / "export" / "DONE.json").unlink()  # the export runs again
        run(compose([*overrides, "stages=[export]"], run_dir=run_dir))
    assert (run_dir / "report" / "index.html").exists() and not list(run_dir.glob("report.stale*"))
    with pytest.raises(StageError, match=r"repeat the settings that made it \(its command: "):
        run(compose([*overrides, "segment.max_steps=3", "stages=[export]"], run_dir=run_dir))
