"""A site's dataset in the nnU-Net raw layout, preprocessed exactly as inference does.

Layout (nnU-Net v2 raw): ``imagesTr/NAME_0000.nii.gz`` (the 3DRA volume), ``labelsTr/NAME.nii.gz``
(vessel lumen, every non-zero label), optional ``dataset.json`` whose ``file_ending`` is
honoured. Each volume goes through :func:`inference.preprocessing.preprocess` (resampling to
the model's spacing, percentile normalisation), the one code path shared with inference; its
label follows onto the same grid by linear interpolation of the mask and a 0.5 threshold, as
nnU-Net resamples segmentations. Preprocessed sites stay cached in the process that loaded
them, so a simulated site reads its files once, not every round.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk

from inference.preprocessing import (
    DEFAULT_NORMALIZATION,
    needs_resampling,
    preprocess,
    read_image,
    resample,
)
from train.folds import split_cases

CHANNEL_SUFFIX = "_0000"
MAX_FOREGROUND_SAMPLES = 10_000  # vessel voxels kept per case for oversampling (as nnU-Net)


class SiteDataError(ValueError):
    """A site dataset that cannot be trained on; the message names the file and the problem."""


@dataclass
class Case:
    """One preprocessed case on the model's grid."""

    name: str
    image: np.ndarray  # float32 (z, y, x), normalised
    label: np.ndarray  # bool (z, y, x), vessel lumen
    foreground: np.ndarray  # flat indices of (up to MAX_FOREGROUND_SAMPLES) vessel voxels


@dataclass
class Site:
    """All cases of one site, and their fold split."""

    name: str
    path: Path
    cases: dict[str, Case]

    def split(self, fold: int, num_folds: int) -> tuple[list[Case], list[Case]]:
        """Training and validation cases of ``fold`` (see :mod:`train.folds`)."""
        training, validation = split_cases(list(self.cases), fold, num_folds)
        return [self.cases[n] for n in training], [self.cases[n] for n in validation]


def file_ending(root: Path) -> str:
    """``dataset.json``'s ``file_ending``, ``.nii.gz`` without one."""
    description = root / "dataset.json"
    if not description.is_file():
        return ".nii.gz"
    try:
        ending = json.loads(description.read_text()).get("file_ending", ".nii.gz")
    except json.JSONDecodeError as error:
        raise SiteDataError(f"{description}: not valid JSON ({error})") from None
    return str(ending)


def list_cases(root: str | Path) -> dict[str, tuple[Path, Path]]:
    """``{name: (image, label)}`` of an nnU-Net raw dataset, every image with its label."""
    root = Path(root)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise SiteDataError(f"{root}: not an nnU-Net raw dataset (needs imagesTr/ and labelsTr/)")
    ending = file_ending(root)
    cases = {}
    for image in sorted(images_dir.glob(f"*{CHANNEL_SUFFIX}{ending}")):
        name = image.name[: -len(CHANNEL_SUFFIX + ending)]
        label = labels_dir / f"{name}{ending}"
        if not label.is_file():
            raise SiteDataError(f"{image}: no label {label.name} in {labels_dir}")
        cases[name] = (image, label)
    if not cases:
        raise SiteDataError(f"{images_dir}: no images named NAME{CHANNEL_SUFFIX}{ending}")
    return cases


def load_case(
    name: str, image_path: Path, label_path: Path, spacing: tuple[float, float, float]
) -> Case:
    """Read, resample and normalise one case as inference will (see module docstring)."""
    array, geometry = read_image(image_path)
    plans = SimpleNamespace(target_spacing=spacing, normalization=DEFAULT_NORMALIZATION)
    image = preprocess(array, geometry, plans)
    try:
        label_image = sitk.ReadImage(str(label_path))
    except RuntimeError:
        raise SiteDataError(f"{label_path}: not a readable image") from None
    label = sitk.GetArrayFromImage(label_image)
    if label.shape != geometry.shape:
        raise SiteDataError(
            f"{label_path}: size {label.shape[::-1]} differs from its image's "
            f"{geometry.shape[::-1]}"
        )
    mask = label > 0
    if needs_resampling(geometry.spacing, spacing):
        mask = resample(mask.astype(np.float32), geometry.spacing, spacing, image.shape) >= 0.5
    foreground = np.flatnonzero(mask)
    if foreground.size > MAX_FOREGROUND_SAMPLES:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        foreground = np.sort(rng.choice(foreground, MAX_FOREGROUND_SAMPLES, replace=False))
    return Case(name=name, image=image, label=mask, foreground=foreground)


_SITES: dict[tuple, Site] = {}


def load_site(
    root: str | Path, spacing: tuple[float, float, float], name: str | None = None
) -> Site:
    """Every case of the dataset at ``root`` on the model grid (cached per process)."""
    root = Path(root).resolve()
    files = list_cases(root)
    key = (str(root), tuple(spacing), tuple(sorted(files)))
    if key not in _SITES:
        cases = {n: load_case(n, image, label, spacing) for n, (image, label) in files.items()}
        _SITES[key] = Site(name=name or root.name, path=root, cases=cases)
    site = _SITES[key]
    return Site(name=name or root.name, path=site.path, cases=site.cases)


def vessel_fraction(cases: list[Case]) -> float:
    """Fraction of vessel voxels in ``cases`` (for the WBCE weight)."""
    voxels = sum(c.label.size for c in cases)
    return sum(int(np.count_nonzero(c.label)) for c in cases) / max(voxels, 1)
