"""The training data path: cases preprocessed once into an on-disk cache and read lazily, and
patches made by background workers, identical to those made in the training loop."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import train.data
from train import sampling
from train.config import TrainConfig
from train.data import CachedCase, Case, SiteDataError, list_cases, load_site
from train.sampling import LoaderError, epoch_batches, sample_patch
from train.task import build_network, train_site, training_memory_format

SPACING = (0.227,) * 3


@pytest.fixture(scope="module")
def site_root(tmp_path_factory) -> Path:
    """One phantom site, four 32^3 cases, in the nnU-Net raw layout."""
    from phantoms import write_dataset

    return write_dataset(tmp_path_factory.mktemp("site"), 4, (32, 32, 32), 3, sites=1)[0]


def test_cached_cases_equal_preprocessing_in_memory_and_are_made_once(
    site_root, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    cached = load_site(site_root, SPACING, cache_dir=cache)
    held = load_site(site_root, SPACING, in_memory=True)
    assert list(cached.cases) == list(held.cases)
    for name, case in cached.cases.items():
        assert isinstance(case, CachedCase) and isinstance(held.cases[name], Case)
        assert np.array_equal(case.image, held.cases[name].image)
        assert np.array_equal(case.label, held.cases[name].label)
        assert np.array_equal(case.foreground, held.cases[name].foreground)
        assert case.vessel_voxels == held.cases[name].vessel_voxels > 0
    assert len(list((cache / "cases").iterdir())) == 4

    # Opened again: nothing is read or preprocessed (the file hashes are remembered too).
    monkeypatch.setattr(train.data, "load_case", lambda *a: pytest.fail("preprocessed again"))
    monkeypatch.setattr(train.data.hashlib, "sha256", _no_hashing(train.data.hashlib.sha256))
    again = load_site(site_root, SPACING, cache_dir=cache)
    assert [c.folder for c in again.cases.values()] == [c.folder for c in cached.cases.values()]
    monkeypatch.undo()

    # A case's memory map is copy-on-write: writing to it leaves the cache as it was.
    case = next(iter(again.cases.values()))
    image = case.image
    image[:] = -1.0
    assert case.image.min() >= 0.0

    # Another target spacing or a changed source file is another entry.
    load_site(site_root, (0.3,) * 3, cache_dir=cache)
    assert len(list((cache / "cases").iterdir())) == 8
    image_path = list_cases(site_root)[case.name][0]
    volume = sitk.ReadImage(str(image_path))
    sitk.WriteImage(volume + 1, str(image_path))
    changed = load_site(site_root, SPACING, cache_dir=cache).cases[case.name]
    assert changed.folder != case.folder and len(list((cache / "cases").iterdir())) == 9
    description = json.loads((changed.folder / "case.json").read_text())
    assert description["target_spacing"] == list(SPACING) and description["name"] == case.name


def _no_hashing(sha256):
    """sha256 that refuses to hash a file: ``hashlib.sha256()`` without data (the cache key's
    own hash is given its data at once)."""

    def guarded(*data):
        assert data, "a source file was hashed again"
        return sha256(*data)

    return guarded


def test_patches_of_cached_cases_own_their_voxels_and_cache_errors_are_one_line(
    site_root, tmp_path
):
    case = next(iter(load_site(site_root, SPACING, cache_dir=tmp_path / "c").cases.values()))
    image, label = sample_patch(case, (16, 16, 16), np.random.default_rng(0), 1.0)
    assert type(image) is np.ndarray and image.base is None and label.base is None
    assert label.any()  # centred on a vessel voxel
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    with pytest.raises(SiteDataError, match="not-a-folder: cannot hold the preprocessed case"):
        load_site(site_root, SPACING, cache_dir=blocked)


def test_background_batches_are_those_of_the_training_loop(site_root, tmp_path):
    cases = list(load_site(site_root, SPACING, cache_dir=tmp_path / "c").cases.values())

    def epoch(workers: int) -> list:
        rng = np.random.default_rng(5)
        with epoch_batches(
            cases, (16, 16, 16), 5, 3, rng, 0.5, True, True, workers=workers, copy=False
        ) as batches:
            return [(images.copy(), labels.copy()) for images, labels in batches]

    reference = epoch(0)
    assert [b[0].shape[0] for b in reference] == [3] * 6 + [2]  # 20 patches, batches of 3
    for workers in (1, 3):
        made = epoch(workers)
        assert len(made) == len(reference)
        assert all(
            np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
            for a, b in zip(made, reference)
        )
    assert not multiprocessing.active_children()


class Failing(Case):
    """A case whose voxels cannot be read in a worker process: it raises, or the process is
    killed (as the kernel's out-of-memory killer would)."""

    parent = os.getpid()
    kill = False

    @property
    def shape(self):
        if os.getpid() != self.parent:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError("disk gone")
        return self.image.shape


@pytest.mark.parametrize("kill", [False, True])
def test_a_failed_or_dead_worker_is_an_error_not_a_hang(kill):
    case = Failing(
        "c",
        np.zeros((20, 20, 20), np.float32),
        np.zeros((20, 20, 20), bool),
        np.array([], np.int64),
    )
    case.kill = kill
    start = time.monotonic()
    expected = "died before batch 0 of 3: killed by SIGKILL" if kill else "disk gone"
    rng = np.random.default_rng(0)
    with (
        pytest.raises(LoaderError, match=expected),
        epoch_batches([case], (16, 16, 16), 6, 2, rng, 0.3, True, workers=2) as batches,
    ):
        list(batches)
    assert time.monotonic() - start < 30
    assert not multiprocessing.active_children()


@pytest.fixture
def one_thread():
    """Tiny networks train fastest on one thread (and on a busy machine, much faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_round_trains_the_same_with_background_workers(site_root, tmp_path, one_thread):
    site = load_site(site_root, SPACING, cache_dir=tmp_path / "c")
    config = TrainConfig.from_run_config(
        {"patch-size": 32, "base-channels": 4, "patches-per-case": 2, "precision": "fp32"}
    )
    states = []
    for workers in (0, 2):
        torch.manual_seed(0)
        net = build_network(config)
        result, cases = train_site(net, site, config, 1, torch.device("cpu"), workers)
        assert cases == 3 and result.steps == 3
        states.append(net.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_loader_workers_follow_the_cpus_this_process_may_use(monkeypatch):
    """Half the usable CPUs, the cgroup quota (docker --cpus) included, between 1 and 4."""
    monkeypatch.delenv(sampling.LOADER_WORKERS_ENV, raising=False)
    for cpus, workers in ((1, 1), (2, 1), (6, 3), (32, 4)):
        monkeypatch.setattr(sampling, "available_cpus", lambda cpus=cpus: cpus)
        assert sampling.loader_workers() == workers
    monkeypatch.setenv(sampling.LOADER_WORKERS_ENV, "0")
    assert sampling.loader_workers() == 0


def test_cpu_fp32_training_runs_channels_last_and_replies_in_the_plain_layout(site_root, tmp_path):
    cpu = torch.device("cpu")
    assert training_memory_format(cpu, None) == torch.channels_last_3d
    assert training_memory_format(cpu, torch.bfloat16) == torch.contiguous_format
    assert training_memory_format(torch.device("cuda"), None) == torch.contiguous_format
    site = load_site(site_root, SPACING, cache_dir=tmp_path / "c")
    config = TrainConfig.from_run_config(
        {"patch-size": 32, "base-channels": 4, "patches-per-case": 2, "precision": "fp32"}
    )
    net = build_network(config)
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv3d))
    layouts = []
    first.register_forward_hook(
        lambda module, inputs, output: layouts.append(
            output.is_contiguous(memory_format=torch.channels_last_3d)
        )
    )
    result, _ = train_site(net, site, config, 1, cpu, 0)
    assert result.steps == 3 and layouts == [True] * 3
    assert all(v.is_contiguous() for v in net.state_dict().values())
