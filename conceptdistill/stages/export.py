"""Stage "export": a run's trained segmenter as TorchScript and ONNX files, each checked against the model.

For each source of `export.sources` it writes `<run>/export/<source, '+' written '_'>/`:

- `segmenter.pt`: TorchScript (traced), `torch.jit.load(path)(images)`;
- `segmenter.onnx`: ONNX (opset `export.onnx_opset`), input "images", output "probabilities", batch axis
  dynamic, image size fixed;
- `export.json`: the input size, threshold, tolerances, and the measured largest absolute difference of
  each export from the PyTorch model (and the mask pixels that differ) on real images.

Both take images float32 (B, 3, S, S) in [0, 1], S = `segment.image_size`, and return foreground
probabilities (B, S, S) in [0, 1]; a mask is probability > threshold. To get stage predict's masks, prepare
images as it does (`conceptdistill.api.Segmenter.prepare`: RGB in [0, 1], resized to S x S with antialiased
bicubic interpolation) and resize each mask back to its image's size by nearest neighbour.

The checks run on the CPU in float32, on the first `export.check_images` images of the run's test split (as
the data set reads them, then resized to S x S), or of the folder `export.check_dir` (read as stage predict
reads new images). A file whose difference exceeds its tolerance is not kept: the stage stops with an error
naming the setting. Files are written under a temporary name and renamed once checked.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from conceptdistill.api import Segmenter
from conceptdistill.pipeline.context import RunContext
from conceptdistill.pipeline.registry import StageError, register_stage
from conceptdistill.utils.io import write_json

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
FILES = {"torchscript": "segmenter.pt", "onnx": "segmenter.onnx"}
#: images per forward pass while measuring (the exports accept any batch size)
CHECK_BATCH = 16


def check_images(ctx: RunContext, segmenter: Segmenter) -> tuple[torch.Tensor, str]:
    """The images the exports are measured on, prepared as the segmenter's input (N, 3, S, S), and what they are.

    Raises:
        StageError: when there are none.
    """
    ex = ctx.cfg.export
    count = int(ex.check_images)
    if ex.check_dir:
        from conceptdistill.data.datasets.image_folder import ImageFolderDataModule

        dataset = ImageFolderDataModule(root=ex.check_dir, image_size=segmenter.image_size,
                                        num_workers=0).dataset("train")
        images = [dataset[i]["image"] for i in range(min(count, len(dataset)))]  # stage predict's preparation
        what = f"images of export.check_dir={ex.check_dir}"
    else:
        dataset = ctx.datamodule.dataset("test")
        images = [segmenter.prepare(dataset[i]["image"].clamp(0, 1)) for i in range(min(count, len(dataset)))]
        what = "images of the run's test split"
    if not images:
        raise StageError(f"stage export has no images to check the exports on ({what}): give "
                         "export.check_dir=/folder/of/images or export.check_images > 0")
    return torch.stack(images), f"the first {len(images)} {what}"


def write_torchscript(module: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, and still what C++ loads
        torch.jit.save(torch.jit.trace(module, example), str(path))


def write_onnx(module: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """ONNX with a dynamic batch axis. The TorchScript-based exporter (dynamo=False): the torch.export-based
    one needs the onnxscript package, which this project does not depend on."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=int(opset),
                          input_names=["images"], output_names=["probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
    model = onnx.load(str(path))
    size = int(example.shape[-1])
    dims = model.graph.output[0].type.tensor_type.shape.dim  # the exporter's inferred names are confusing
    for dim, value in zip(dims, ("batch", size, size), strict=True):
        dim.Clear()
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def run_file(kind: str, path: Path):
    """A function images (N, 3, S, S) -> probabilities (N, S, S), numpy float32, of one written file."""
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu").eval()

        def run_torchscript(images: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return module(images).numpy()

        return run_torchscript
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(["probabilities"], {"images": images.numpy()})[0]


def measure(segmenter: Segmenter, images: torch.Tensor, runners: dict) -> dict[str, dict]:
    """Per format: the largest absolute difference from the PyTorch model and the mask pixels that differ."""
    worst = {kind: 0.0 for kind in runners}
    flipped = {kind: 0 for kind in runners}
    for start in range(0, len(images), CHECK_BATCH):
        batch = images[start:start + CHECK_BATCH]
        with torch.inference_mode():
            reference = segmenter.model(batch).numpy()
        for kind, forward in runners.items():
            output = forward(batch)
            if output.shape != reference.shape:
                raise StageError(f"stage export: the {kind} file returns shape {output.shape}, the model "
                                 f"{reference.shape}")
            difference = np.abs(output.astype(np.float64) - reference)
            worst[kind] = max(worst[kind], float(np.nan_to_num(difference, nan=np.inf).max()))
            flipped[kind] += int(((output > segmenter.threshold) != (reference > segmenter.threshold)).sum())
    return {kind: {"max_abs_difference": worst[kind], "mask_pixels_differing": flipped[kind]} for kind in runners}


def export_source(ctx: RunContext, source: str) -> dict:
    """Write, check and keep (or refuse) the two files of one source; returns its export.json content."""
    ex, size = ctx.cfg.export, int(ctx.cfg.segment.image_size)
    checkpoint = ctx.layout.segmenter_checkpoint(source)
    if not checkpoint.is_file():
        raise StageError(f"stage export: no trained segmenter for source {source!r} ({checkpoint}); export.sources "
                         "must name sources stage segment trained (truth needs a data set with masks)")
    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu", image_size=size)
    images, checked_on = check_images(ctx, segmenter)
    folder = ctx.layout.export_dir(source)
    folder.mkdir(parents=True, exist_ok=True)
    module = segmenter.model.probability_module().eval()
    partial = {kind: folder / f"{FILES[kind]}.partial" for kind in FORMATS}
    write_torchscript(module, images[:1], partial["torchscript"])
    write_onnx(module, images[:1], partial["onnx"], ex.onnx_opset)
    measured = measure(segmenter, images, {kind: run_file(kind, partial[kind]) for kind in FORMATS})
    tolerance = {kind: float(ex.tolerance[kind]) for kind in FORMATS}
    too_far = [kind for kind in FORMATS if not measured[kind]["max_abs_difference"] <= tolerance[kind]]
    if too_far:
        for path in partial.values():
            path.unlink(missing_ok=True)
        raise StageError("stage export: " + "; ".join(
            f"the {kind} export of source {source} differs from the PyTorch model by up to "
            f"{measured[kind]['max_abs_difference']:.3g} on {checked_on}, more than export.tolerance.{kind}="
            f"{tolerance[kind]:g}" for kind in too_far) + "; no file was kept")
    for kind in FORMATS:
        os.replace(partial[kind], folder / FILES[kind])
    import onnxruntime

    record = {
        "source": source,
        "checkpoint": str(checkpoint),
        "files": dict(FILES),
        "input": {"name": "images", "shape": ["batch", 3, size, size], "dtype": "float32", "range": [0.0, 1.0]},
        "output": {"name": "probabilities", "shape": ["batch", size, size], "dtype": "float32", "range": [0.0, 1.0]},
        "image_size": size,
        "threshold": segmenter.threshold,
        "preprocessing": "RGB in [0, 1] resized to image_size x image_size (antialiased bicubic, clamped); mask = "
                         "probability > threshold, resized to the image's size by nearest neighbour",
        "tolerance": tolerance,
        "measured": measured,
        "checked_on": checked_on,
        "onnx_opset": int(ex.onnx_opset),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    }
    write_json(folder / "export.json", record)
    log.info("export %s: %s", source, json.dumps(measured))
    return record


@register_stage("export", inputs=("segment",), settings=("export", "segment.image_size", "segment.sources", "data"))
def run_export(ctx: RunContext) -> dict:
    ex = ctx.cfg.export
    unknown = [source for source in ex.sources if source not in ctx.cfg.segment.sources]
    if unknown or not ex.sources:
        raise StageError(f"export.sources={list(ex.sources)}: each must be one of segment.sources "
                         f"{list(ctx.cfg.segment.sources)} (the segmenters this run trains)")
    for kind in FORMATS:
        if not float(ex.tolerance[kind]) >= 0:
            raise StageError(f"export.tolerance.{kind}={ex.tolerance[kind]} must be a number >= 0")
    records = {source: export_source(ctx, source) for source in ex.sources}
    return {"sources": {source: {"folder": str(ctx.layout.export_dir(source)), **record["measured"]}
                        for source, record in records.items()}}
