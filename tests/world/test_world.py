"""The shapes world: exact masks, determinism, captions, the data module's contract and speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from conceptdistill.data.base import collate_samples
from conceptdistill.utils.io import to_uint8
from conceptdistill.world.datamodule import CaptionedWorldDataset, ShapesWorldDataModule
from conceptdistill.world.figures import save_world_grid
from conceptdistill.world.render import (
    EMPTY_CAPTION,
    WorldConfig,
    concept_mask,
    render_batch,
    render_sample,
)

MULTI = WorldConfig(min_objects=2, max_objects=3, p_empty=0.0)


def _shade_factor(image: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the best scalar f with image ~ f * rgb, and the residual max |image - f * rgb|."""
    f = image.astype(np.float64) @ rgb / (rgb @ rgb)
    return f, np.abs(image - f[..., None] * rgb).max(axis=-1)


@pytest.mark.parametrize("config", [WorldConfig(), MULTI], ids=["one", "multi"])
def test_masks_are_exact(config: WorldConfig) -> None:
    for index in range(150):
        sample = render_sample(config, 3, index)
        union = sample.mask
        for obj in sample.objects:
            rgb = np.asarray(config.colours[obj.colour])
            f, residual = _shade_factor(sample.image, rgb)
            inside = obj.mask
            assert inside.any()
            # every visible pixel is the object's colour times a shading factor in [1 - shading, 1]
            assert residual[inside].max() < 1e-5
            assert f[inside].min() >= 1 - config.shading - 1e-5 and f[inside].max() <= 1 + 1e-5
            # no background pixel comes near any shade of the object's colour
            outside = ~union
            if outside.any():
                f_out = np.clip(f, 1 - config.shading, 1.0)
                dist = np.abs(sample.image - f_out[..., None] * rgb).max(axis=-1)
                assert dist[outside].min() > 0.08
            x0, y0, x1, y1 = obj.box
            rows, cols = np.nonzero(inside)
            assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def test_flat_objects_without_noise_are_one_colour() -> None:
    config = WorldConfig(shading=0.0, pixel_noise=0.0, min_objects=1, max_objects=2, p_empty=0.0)
    for index in range(50):
        sample = render_sample(config, 0, index)
        for obj in sample.objects:
            rgb = np.asarray(config.colours[obj.colour], dtype=np.float32)
            assert np.array_equal(sample.image[obj.mask], np.broadcast_to(rgb, (obj.mask.sum(), 3)))
            others = ~sample.mask
            assert not np.any(np.all(np.abs(sample.image[others] - rgb) < 0.05, axis=-1))


def test_deterministic_per_seed_and_index() -> None:
    config = WorldConfig()
    a, b = render_sample(config, 7, 42), render_sample(config, 7, 42)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.objects, b.objects, strict=True))
    assert not np.array_equal(a.image, render_sample(config, 7, 43).image)
    assert not np.array_equal(a.image, render_sample(config, 8, 42).image)
    assert a.image.dtype == np.float32 and a.image.shape == (32, 32, 3)
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    # render_batch gives the same images, in any order
    batch = render_batch(config, 7, [43, 42])
    assert np.array_equal(batch.images[1], to_uint8(a.image))
    assert batch.images.dtype == np.uint8 and batch.images.shape == (2, 32, 32, 3)
    assert np.array_equal(batch.masks[1], a.mask) and batch.captions[1] == a.caption


def test_captions_match_objects_and_empty_images() -> None:
    config = WorldConfig(min_objects=1, max_objects=3, p_empty=0.2)
    empties = 0
    for index in range(200):
        sample = render_sample(config, 1, index)
        if not sample.objects:
            empties += 1
            assert sample.caption == EMPTY_CAPTION
            assert not sample.mask.any()
            continue
        expected = "a photo of " + " and ".join(f"a {o.colour} {o.shape}" for o in sample.objects)
        assert sample.caption == expected
        assert all(o.shape in config.shapes and o.colour in config.colours for o in sample.objects)
    assert 20 <= empties <= 65  # about 20% of 200
    single = render_sample(WorldConfig(p_empty=0.0), 0, 5)
    assert single.caption == f"a photo of a {single.colour} {single.shape}"


def test_multi_object_visible_masks_do_not_overlap() -> None:
    counts = []
    for index in range(100):
        sample = render_sample(MULTI, 0, index)
        counts.append(len(sample.objects))
        total = np.zeros((32, 32), dtype=int)
        for obj in sample.objects:
            total += obj.mask
        assert total.max() <= 1
        pairs = {(o.shape, o.colour) for o in sample.objects}
        assert len(pairs) == len(sample.objects)
    assert min(counts) >= 1 and max(counts) == 3 and np.mean(counts) > 2.0


def test_concept_mask_selects_words() -> None:
    for index in range(60):
        sample = render_sample(MULTI, 2, index)
        circles = concept_mask(sample, "circle")
        expected = np.zeros((32, 32), dtype=bool)
        for o in sample.objects:
            if o.shape == "circle":
                expected |= o.mask
        assert np.array_equal(circles, expected)
        assert np.array_equal(concept_mask(sample, ["circle", "square", "triangle"]), sample.mask)
        red = concept_mask(sample, ["red"])
        assert np.array_equal(
            red, sum((o.mask for o in sample.objects if o.colour == "red"), np.zeros((32, 32), dtype=bool))
        )


def test_datamodule_splits_and_contract() -> None:
    dm = ShapesWorldDataModule(concept="circle", num_train=40, num_val=12, num_test=20, batch_size=8, max_objects=2)
    assert dm.truth == "mask"
    seen: dict[str, set[int]] = {}
    for split, size in (("train", 40), ("val", 12), ("test", 20)):
        ds = dm.dataset(split)
        assert len(ds) == size
        seen[split] = set(ds.indices)
        ids = [ds[i]["id"] for i in range(len(ds))]
        assert len(set(ids)) == size and all(i.startswith(f"{split}-") and "/" not in i for i in ids)
        for i in range(len(ds)):
            sample = ds[i]
            assert set(sample) == {"id", "image", "mask", "caption"}
            assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 32, 32)
            assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0
            assert sample["mask"].dtype == torch.bool and sample["mask"].shape == (32, 32)
            assert sample["mask"].any() and "circle" in sample["caption"]
            # the mask is exactly the concept's visible pixels of the rendered image
            world = render_sample(dm.world, dm.seed, ds.indices[i])
            assert np.array_equal(sample["mask"].numpy(), concept_mask(world, "circle"))
            assert np.array_equal(
                (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), to_uint8(world.image)
            )
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["mask"].shape == (8, 32, 32)
    assert len(batch["id"]) == 8 and len(batch["caption"]) == 8
    # deterministic across instances
    again = ShapesWorldDataModule(concept="circle", num_train=40, num_val=12, num_test=20, max_objects=2)
    assert again.dataset("val").indices == dm.dataset("val").indices


def test_datamodule_rejects_unknown_concept() -> None:
    with pytest.raises(ValueError):
        ShapesWorldDataModule(concept="dog")
    dm = ShapesWorldDataModule(concept=["red", "square"], num_train=10, num_val=2, num_test=2)
    ds = dm.dataset("train")
    assert all(("red" in ds[i]["caption"]) or ("square" in ds[i]["caption"]) for i in range(len(ds)))


def test_caption_dataset_has_all_kinds() -> None:
    dm = ShapesWorldDataModule(num_train=1, num_val=1, num_test=1)
    ds = dm.caption_dataset(300)
    assert isinstance(ds, CaptionedWorldDataset) and len(ds) == 300
    samples = [ds[i] for i in range(len(ds))]
    assert set(samples[0]) == {"id", "image", "caption", "mask", "shape", "colour"}
    assert {s["shape"] for s in samples} == {"", "circle", "square", "triangle"}
    assert {s["colour"] for s in samples} == {"", *dm.world.colours}
    for s in samples:
        if s["shape"]:
            assert s["caption"] == f"a photo of a {s['colour']} {s['shape']}" and s["mask"].any()
        else:
            assert s["caption"] == EMPTY_CAPTION and not s["mask"].any() and s["colour"] == ""
    assert samples[0]["id"] == "world-000000"
    # never the same images as D's splits
    assert min(ds.indices) > max(dm.dataset("test").indices)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 3, 32, 32) and len(batch["shape"]) == 16


def test_render_speed() -> None:
    render_batch(None, 0, range(10))  # warm caches
    start = time.perf_counter()
    batch = render_batch(None, 0, range(2000))
    elapsed = time.perf_counter() - start
    assert batch.images.shape == (2000, 32, 32, 3)
    assert elapsed < 5.0, f"2000 images took {elapsed:.2f} s"


def test_save_world_grid(tmp_path) -> None:
    from PIL import Image

    samples = [render_sample(None, 0, i) for i in range(5)] + [render_sample(MULTI, 0, 0)]
    path = tmp_path / "grid.png"
    save_world_grid(path, samples, ncols=4)
    image = Image.open(path)
    assert image.mode == "RGB" and image.size == (4 * 98 + 2, 2 * 2 * 98 + 2)  # 2 rows of images + masks
    dm = ShapesWorldDataModule(num_train=3, num_val=1, num_test=1)
    save_world_grid(tmp_path / "dicts.png", [dm.dataset("train")[i] for i in range(3)])
    assert (tmp_path / "dicts.png").stat().st_size > 0
