"""Export a fold's best global model in the shipped format, merged into the folder's manifest.

``OUT/fold_<f>.safetensors`` (fp16, :func:`model.weights.save_fold`) and ``OUT/manifest.json``
(:func:`model.weights.write_manifest`). Five fold runs, one after the other or at the same
time, build one manifest: each adds or replaces its own fold entry and provenance under a
file lock, and refuses to join a manifest whose architecture, patch size, spacing or
normalisation differ (inference runs all folds with one set of plans).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from inference.preprocessing import DEFAULT_NORMALIZATION
from model.weights import (
    MANIFEST,
    FoldEntry,
    Manifest,
    WeightError,
    load_manifest,
    save_fold,
    write_manifest,
)
from train.config import TrainConfig
from train.task import build_network


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Exclusive lock on ``directory/.manifest.lock`` for a read-modify-write of the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".manifest.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def plans_of(config: TrainConfig) -> Manifest:
    """A manifest without folds holding what inference must reproduce of this training."""
    return Manifest(
        architecture=config.architecture,
        patch_size=config.patch_shape,
        target_spacing=config.spacing,
        normalization=dict(DEFAULT_NORMALIZATION),
    )


def check_compatible(existing: Manifest, new: Manifest, path: Path) -> None:
    """Raise WeightError naming the first setting in which the fold cannot join ``existing``."""
    for name in ("architecture", "patch_size", "target_spacing", "normalization"):
        have, want = getattr(existing, name), getattr(new, name)
        if have != want:
            raise WeightError(
                f"{path}: its folds use {name} {have}, this fold {want}; "
                "export to another folder or retrain with the same settings"
            )


@contextmanager
def folder_manifest(out_dir: Path, plans: Manifest) -> Iterator[Manifest]:
    """Under the folder's lock: its manifest, checked to accept folds of ``plans``, else
    ``plans`` itself (a folder without folds yet). The caller writes it back."""
    with locked(out_dir):
        if not (out_dir / MANIFEST).is_file():
            yield plans
            return
        manifest = load_manifest(out_dir)
        check_compatible(manifest, plans, out_dir / MANIFEST)
        yield manifest


def add_folds(manifest: Manifest, entries: list[FoldEntry], provenance: dict[str, dict]) -> None:
    """Put ``entries`` into ``manifest`` (replacing folds of the same number) with the
    provenance of each (keyed by fold number as text)."""
    numbers = {entry.fold for entry in entries}
    kept = [entry for entry in manifest.folds if entry.fold not in numbers]
    manifest.folds = sorted(kept + entries, key=lambda entry: entry.fold)
    folds = {**manifest.provenance.get("folds", {}), **provenance}
    manifest.provenance = {**manifest.provenance, "folds": dict(sorted(folds.items()))}


def export_fold(
    arrays: dict[str, np.ndarray], config: TrainConfig, out_dir: str | Path, provenance: dict
) -> Path:
    """Write fold ``config.fold`` from ``arrays`` and merge it into ``out_dir/manifest.json``."""
    out_dir = Path(out_dir)
    net = build_network(config, {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
    with folder_manifest(out_dir, plans_of(config)) as manifest:
        entry = save_fold(net, out_dir / f"fold_{config.fold}.safetensors", config.fold)
        manifest.provenance = {
            **manifest.provenance,
            "training": "federated averaging (Flower FedAvg, sites weighted by training cases)",
        }
        add_folds(manifest, [entry], {str(config.fold): provenance})
        return write_manifest(out_dir, manifest)
