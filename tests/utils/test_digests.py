"""File digests remembered across processes: read once while a file is unchanged, read again after any write,
even one that restores the file's size and modification time."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from conceptdistill.diffusion.fingerprint import model_fingerprint
from conceptdistill.utils import digests


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / digests.CACHE_FILE


@pytest.fixture
def reads(monkeypatch):
    """Counts the files whose content is read."""
    count = {"files": 0}
    original = hashlib.file_digest

    def counting(handle, name):
        count["files"] += 1
        return original(handle, name)

    monkeypatch.setattr(hashlib, "file_digest", counting)
    return count


def model_folder(tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    return folder


def test_a_digest_is_read_once_while_the_file_is_unchanged(tmp_path, cache, reads):
    folder = model_folder(tmp_path)
    first = model_fingerprint(folder)
    assert reads["files"] == 2 and cache.exists()
    assert model_fingerprint(folder) == first and reads["files"] == 2  # a later command reads nothing
    entries = json.loads(cache.read_text())
    expected = hashlib.sha256((folder / "unet" / "weights.bin").read_bytes()).hexdigest()
    assert entries[str((folder / "unet" / "weights.bin").resolve())]["sha256"] == expected


def test_weights_rewritten_at_the_same_size_and_time_are_a_new_model(tmp_path, cache, reads):
    """A merge written over the weights, with the old modification time put back (`cp -p`, `touch -r`): the
    file's status-change time still moves, so the fingerprint does too. (The cache of earlier versions, keyed on
    size and modification time within the process, returned the old fingerprint.)"""
    folder = model_folder(tmp_path)
    weights = folder / "unet" / "weights.bin"
    before, stat = model_fingerprint(folder), weights.stat()
    weights.write_bytes(bytes(reversed(range(256))) * 64)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert model_fingerprint(folder) != before
    assert reads["files"] == 3


def test_a_corrupt_or_unwritable_cache_only_costs_reading(tmp_path, cache, reads, monkeypatch):
    folder = model_folder(tmp_path)
    expected = model_fingerprint(folder)
    cache.write_text("{not json")
    assert model_fingerprint(folder) == expected and reads["files"] == 4
    monkeypatch.setenv("CONCEPTDISTILL_CACHE", str(folder / "model_index.json"))  # a file, not a folder
    assert model_fingerprint(folder) == expected


def test_a_linked_subfolder_is_part_of_the_model(tmp_path, cache):
    """A fine-tuned unet/ linked into a base model: pointing the link at other weights is another model. (The
    listing once skipped linked folders, and a masks stage made from other weights was reused.)"""
    folder = model_folder(tmp_path)
    for name, byte in (("unet_a", 1), ("unet_b", 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.bin").write_bytes(bytes([byte]) * 1024)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "model_index.json").write_text("{}")
    (linked / "unet").symlink_to(tmp_path / "unet_a", target_is_directory=True)
    first = model_fingerprint(linked)
    (linked / "unet").unlink()
    (linked / "unet").symlink_to(tmp_path / "unet_b", target_is_directory=True)
    assert model_fingerprint(linked) != first
    (tmp_path / "unet_b" / "loop").symlink_to(linked, target_is_directory=True)  # a cycle ends
    assert model_fingerprint(linked)
    assert model_fingerprint(folder)


def test_hidden_entries_are_not_part_of_the_model(tmp_path, cache):
    """A model kept in git or downloaded with a local cache folder: those entries change without the weights."""
    folder = model_folder(tmp_path)
    first = model_fingerprint(folder)
    (folder / ".git").mkdir()
    (folder / ".git" / "index").write_bytes(b"changes on every git status")
    (folder / ".gitattributes").write_text("*.bin filter=lfs")
    assert model_fingerprint(folder) == first


def test_the_cache_forgets_files_that_are_gone(tmp_path, cache):
    old, new = model_folder(tmp_path / "old"), model_folder(tmp_path / "new")
    model_fingerprint(old)
    shutil.rmtree(old)
    (new / "unet" / "extra.bin").write_bytes(b"x")
    model_fingerprint(new)
    assert all("/new/" in key for key in json.loads(cache.read_text()))


def test_switching_a_link_to_another_folder_under_the_model_changes_it(tmp_path, cache):
    """unet/ linked to one of several unets kept under checkpoints/ (which sorts first): each file is listed
    under every path that reaches it, so the unet/ link counts. (A walk that read each real folder once listed
    both unets under checkpoints/ only, and the switch went unseen.)"""
    folder = model_folder(tmp_path)
    shutil.rmtree(folder / "unet")
    for name, byte in (("unet_a", 1), ("unet_b", 2)):
        (folder / "checkpoints" / name).mkdir(parents=True)
        (folder / "checkpoints" / name / "weights.bin").write_bytes(bytes([byte]) * 1024)
    (folder / "unet").symlink_to(folder / "checkpoints" / "unet_a", target_is_directory=True)
    first = model_fingerprint(folder)
    (folder / "unet").unlink()
    (folder / "unet").symlink_to(folder / "checkpoints" / "unet_b", target_is_directory=True)
    assert model_fingerprint(folder) != first


def test_a_data_link_pointed_at_another_file_with_the_same_times_is_a_change(tmp_path, monkeypatch):
    """Two copies made in one clock tick share size, modification and status-change times: the state still
    tells which file a link reaches."""
    for name in ("x.bmp", "y.bmp"):
        (tmp_path / name).write_bytes(b"same size")
    same = os.stat(tmp_path / "x.bmp")
    monkeypatch.setattr(os, "stat", lambda path, *args, **kwargs: same)  # times and inode coincide
    link = tmp_path / "image.bmp"
    link.symlink_to(tmp_path / "x.bmp")
    before = digests.file_state(link)
    link.unlink()
    link.symlink_to(tmp_path / "y.bmp")
    assert digests.file_state(link) != before
