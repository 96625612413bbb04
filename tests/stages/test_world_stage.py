"""Stage "world": training a world model from random weights through the runner, measuring an existing model
without training it, and the fidelity judge (degradations while training only, a receptive field that spans
the image)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose
from torch import nn

from conceptdistill.diffusion.loading import load_diffusion_parts
from conceptdistill.runner import run
from conceptdistill.stages.world import FIDELITY_KEYS
from conceptdistill.utils.io import read_json
from conceptdistill.world.fidelity import ShapeColourClassifier, sample_like_degradation
from conceptdistill.world.render import WorldConfig, render_sample

pytestmark = pytest.mark.usefixtures("single_thread")

#: a 16-32-32 UNet, two training steps, a judge trained for one epoch on 32 images, 8 two-step samples
TINY_WORLD = [
    "stages=[world]", "logger=none", "world.num_images=16", "world.batch_size=8", "world.max_steps=2",
    "world.module.warmup_steps=0", "world.checkpoint_every=1000", "world.architecture.block_out_channels=[16,32,32]",
    "world.architecture.text_dim=16", "world.architecture.attention_heads=2", "world.fidelity.num_samples=6",
    "world.fidelity.num_background_samples=2", "world.fidelity.steps=2", "world.fidelity.classifier_images=32",
    "world.fidelity.classifier_epochs=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def trained_world(tmp_path_factory):
    """A run folder whose world stage trained a tiny model from random weights (once for this module)."""
    import torch as _torch

    threads = _torch.get_num_threads()
    _torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("world") / "run"
    summaries = run(compose(TINY_WORLD, run_dir=run_dir))
    _torch.set_num_threads(threads)
    return run_dir, summaries["world"]


def weights(folder) -> dict[str, torch.Tensor]:
    parts = load_diffusion_parts(str(folder))
    return {f"{name}.{key}": value for name, module in (("unet", parts.denoiser), ("text", parts.text_encoder))
            for key, value in module.state_dict().items()}


def test_world_stage_trains_a_model_the_ordinary_loader_reads(trained_world):
    run_dir, summary = trained_world
    pipeline = run_dir / "world" / "pipeline"
    record = read_json(pipeline / "training.json")
    assert record["steps"] == 2 and record["settings"]["max_steps"] == 2
    assert record["command"].startswith("python -m conceptdistill") and record["seed"] == 0
    assert set(FIDELITY_KEYS) <= set(record)
    assert 0.0 <= record["prompt_fidelity"] <= 1.0 and 0.0 <= record["background_fidelity"] <= 1.0
    assert record["word_fidelity"] and all(0.0 <= v <= 1.0 for v in record["word_fidelity"].values())
    assert record["fidelity_settings"]["guidance_scale"] == 2.0
    assert list(load_diffusion_parts(str(pipeline)).denoiser.config.block_out_channels) == [16, 32, 32]
    assert (run_dir / "world" / "samples_grid.png").exists()
    assert summary["prompt_fidelity"] == record["prompt_fidelity"]


def test_max_steps_zero_measures_a_model_and_keeps_its_weights_and_training_record(trained_world, tmp_path):
    source = trained_world[0] / "world" / "pipeline"
    run_dir = tmp_path / "measure"
    run(compose([*TINY_WORLD, f"world.init_from={source}", "world.max_steps=0", "world.fidelity.guidance_scale=1.5"],
                run_dir=run_dir))
    measured = run_dir / "world" / "pipeline"
    before, after = weights(source), weights(measured)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file() and p.name != "training.json")
    assert files == sorted(p.relative_to(measured) for p in measured.rglob("*") if p.is_file() and p.name != "training.json")
    assert all((source / f).read_bytes() == (measured / f).read_bytes() for f in files)  # not re-saved
    old, new = read_json(source / "training.json"), read_json(measured / "training.json")
    for key in ("steps", "command", "settings", "train_seconds"):
        assert new[key] == old[key]  # how the model was trained is carried over
    assert new["fidelity_settings"]["guidance_scale"] == 1.5  # what was measured is new
    assert new["fidelity_settings"]["command"].startswith("python -m conceptdistill")


def test_max_steps_zero_without_a_model_to_measure_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        run(compose([*TINY_WORLD, "world.max_steps=0"], run_dir=tmp_path / "run"))


class CountingIdentity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return image


def test_judge_degrades_each_training_image_and_never_what_it_labels():
    judge = ShapeColourClassifier(["circle", "square"], ["red", "blue"])
    judge.degrade = CountingIdentity()
    images = torch.rand(3, 3, 32, 32)
    batch = {"image": images, "shape": ["circle", "square", ""], "colour": ["red", "blue", ""]}
    with pytest.warns(UserWarning):  # self.log outside a Trainer warns and does nothing
        loss = judge.training_step(batch, 0)
    assert loss.ndim == 0 and judge.degrade.calls == 3
    judge.labels(images)
    assert judge.degrade.calls == 3


def test_degradation_keeps_the_object_and_roughens_its_edges():
    flat = WorldConfig(pixel_noise=0.0, shading=0.0)
    sample = next(s for s in (render_sample(flat, seed=0, index=i) for i in range(20)) if s.objects)
    image = torch.from_numpy(sample.image).permute(2, 0, 1).float()
    torch.manual_seed(0)
    degraded = torch.stack([sample_like_degradation()(image) for _ in range(8)])
    assert degraded.shape == (8, *image.shape) and degraded.min() >= 0 and degraded.max() <= 1
    colour = image[:, torch.from_numpy(sample.mask)].mean(dim=1)  # the object's flat colour
    near = ((degraded - colour[None, :, None, None]).abs().amax(dim=1) < 0.15).float().mean(dim=(1, 2))
    area = float(sample.mask.mean())
    assert torch.all((near - area).abs() < 0.3 * area)  # the object is still there, about as large
    assert (degraded - image).abs().mean() > 0.005  # and the image did change


def test_judge_features_see_the_whole_image():
    """Before pooling, the top-left feature cell responds to 31 x 31 of the 32 x 32 pixels: a shape is judged
    as a whole, not from its corners alone."""
    judge = ShapeColourClassifier(["circle"], ["red"]).eval()
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    before_pooling = judge.features[:-2](image * 2 - 1)
    before_pooling[0, :, 0, 0].sum().backward()
    seen = image.grad[0].abs().sum(dim=0) > 0
    assert seen[:31, :31].all()


def test_fidelity_check_is_strict_by_hand_and_compares_labels_on_clear_samples_only():
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("fidelity_check", REPO / "experiments/shapes/fidelity_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    asked = [("circle", "red"), ("square", "blue"), ("", ""), ("circle", "red")]
    hand = [check.hand_label(text) for text in ["circle red", "unclear blue", "none", "square red"]]
    judge = [("circle", "red"), ("square", "blue"), ("", ""), ("circle", "red")]
    row = check.agreement_row(asked, hand, judge)
    assert row["hand_prompt_fidelity"] == pytest.approx(1 / 3)  # "unclear" is not faithful
    assert row["judge_prompt_fidelity"] == 1.0
    assert row["hand_background_fidelity"] == row["judge_background_fidelity"] == 1.0
    assert row["unclear_samples"] == 1
    assert row["label_agreement_on_clear"] == pytest.approx(2 / 3)
    assert row["verdict_agreement"] == pytest.approx(1 / 3)
    assert check.judge_label(("circle", "")) == "circle none"


def test_word_fidelity_scores_each_word_by_its_own_label():
    """A shape word counts the shape seen, a colour word the colour seen; background prompts count for neither."""
    from conceptdistill.world.fidelity import NONE, fidelity_scores

    asked = [("circle", "red"), ("circle", "blue"), ("square", "red"), (NONE, NONE)]
    seen = [("circle", "blue"), ("circle", "blue"), (NONE, NONE), ("square", "red")]
    scores = fidelity_scores(asked, seen)
    assert scores["word_fidelity"] == {"blue": 1.0, "circle": 1.0, "red": 0.0, "square": 0.0}
    assert scores["prompt_fidelity"] == pytest.approx(1 / 3) and scores["background_fidelity"] == 0.0
