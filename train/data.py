"""A site's dataset in the nnU-Net raw layout, preprocessed once to an on-disk cache.

Layout (nnU-Net v2 raw): ``imagesTr/NAME_0000.nii.gz`` (the 3DRA volume), ``labelsTr/NAME.nii.gz``
(vessel lumen, every non-zero label), optional ``dataset.json`` whose ``file_ending`` is
honoured. Its ``labels`` may declare an ``ignore`` label as nnU-Net v2 does (the highest
label value, e.g. ``{"background": 0, "vessel": 1, "ignore": 2}``): those voxels are neither
vessel nor background (a site that traced only some vessels, or some slabs), and a case
carries them as a separate ``ignore`` mask that the loss, the sampling and the validation
skip. Where ``labels`` is declared, a label value it does not declare is refused (a forgotten
``ignore`` would otherwise train the unlabelled voxels as vessel).

Each volume goes through :func:`inference.preprocessing.preprocess` (resampling to the
model's spacing, percentile normalisation), the one code path shared with inference; its
label (and ignore mask) follows onto the same grid by linear interpolation of the mask and a
0.5 threshold, as nnU-Net resamples segmentations (:func:`load_case`).

A case of the SHINY-ICARUS set (512x512x400 voxels) is 0.5 GB once preprocessed (float32
image, bool label), so a site does not hold its cases in memory. As nnU-Net preprocesses once
to disk, :func:`cache_case` writes each preprocessed case to a cache folder as ``.npy`` files
(``image.npy`` float32, ``label.npy`` bool, ``foreground.npy``, ``case.json``), keyed by the
SHA-256 of the source image and label and by everything the result depends on (target spacing,
normalisation, foreground sampling, the source of :mod:`inference.preprocessing`). A
:class:`CachedCase` holds only its name, shape and foreground indices; ``case.image`` and
``case.label`` memory-map the files afresh at each access, so a training patch reads only its
region, and the pages it touched leave the process's resident memory when the patch is cut.
A site's memory is therefore bounded by a patch, a validation volume and the network, whatever
its number of cases. The cache folder is ``$VESSEL_SEG_TRAIN_CACHE``, else
``$XDG_CACHE_HOME/vessel-seg/train`` (``~/.cache/vessel-seg/train``); it holds the site's
images, preprocessed, and stays on the site's machine. Entries are written to a temporary
folder and renamed, so concurrent processes and interrupted writes never see half an entry;
source hashes are remembered by file size, modification time and inode, so an unchanged site
is opened without reading its images again.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk

import inference.preprocessing
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
CACHE_ENV = "VESSEL_SEG_TRAIN_CACHE"
CACHE_FORMAT = "vessel-train-cache/1"  # bump when what load_case computes changes


class SiteDataError(ValueError):
    """A site dataset that cannot be trained on; the message names the file and the problem."""


@dataclass(eq=False)
class Case:
    """One preprocessed case on the model's grid, held in memory."""

    name: str
    image: np.ndarray  # float32 (z, y, x), normalised
    label: np.ndarray  # bool (z, y, x), vessel lumen
    foreground: np.ndarray  # flat indices of (up to MAX_FOREGROUND_SAMPLES) vessel voxels
    ignore: np.ndarray | None = None  # bool (z, y, x), the ignore label; None: none there

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape)

    @property
    def vessel_voxels(self) -> int:
        return int(np.count_nonzero(self.label))

    @property
    def ignored_voxels(self) -> int:
        return 0 if self.ignore is None else int(np.count_nonzero(self.ignore))


@dataclass(eq=False, frozen=True)
class CachedCase:
    """One preprocessed case in the on-disk cache (see module docstring): ``image`` and
    ``label`` are memory maps opened at each access, copy-on-write (a write stays in the
    process; the cache never changes)."""

    name: str
    folder: Path
    shape: tuple[int, int, int]
    vessel_voxels: int
    foreground: np.ndarray = field(repr=False)
    ignored_voxels: int = 0

    @property
    def image(self) -> np.ndarray:
        return np.load(self.folder / "image.npy", mmap_mode="c")

    @property
    def label(self) -> np.ndarray:
        return np.load(self.folder / "label.npy", mmap_mode="c")

    @property
    def ignore(self) -> np.ndarray | None:
        """The ignore label's voxels (bool), or None where the case has none."""
        if not self.ignored_voxels:
            return None
        return np.load(self.folder / "ignore.npy", mmap_mode="c")


@dataclass
class Site:
    """All cases of one site, and their fold split."""

    name: str
    path: Path
    cases: dict[str, Case | CachedCase]

    def split(
        self, fold: int, num_folds: int
    ) -> tuple[list[Case | CachedCase], list[Case | CachedCase]]:
        """Training and validation cases of ``fold`` (see :mod:`train.folds`)."""
        training, validation = split_cases(list(self.cases), fold, num_folds)
        return [self.cases[n] for n in training], [self.cases[n] for n in validation]


def dataset_description(root: Path) -> dict:
    """``dataset.json`` of the dataset at ``root``, ``{}`` without one."""
    description = root / "dataset.json"
    if not description.is_file():
        return {}
    try:
        value = json.loads(description.read_text())
    except json.JSONDecodeError as error:
        raise SiteDataError(f"{description}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise SiteDataError(f"{description}: not a JSON object")
    return value


def file_ending(root: Path) -> str:
    """``dataset.json``'s ``file_ending``, ``.nii.gz`` without one."""
    return str(dataset_description(root).get("file_ending", ".nii.gz"))


@dataclass(frozen=True)
class LabelScheme:
    """What a label file's values mean: ``declared`` (None: any value, every non-zero one
    vessel, as without ``dataset.json``) and the ``ignore`` value (None: no ignore label)."""

    declared: frozenset[int] | None = None
    ignore: int | None = None

    def cache_settings(self) -> dict:
        """The part of the cache key (empty without ignore label: old entries stay valid)."""
        return {} if self.ignore is None else {"ignore_label": self.ignore}


def label_scheme(root: str | Path) -> LabelScheme:
    """The labels ``dataset.json`` declares; ``ignore`` must be the highest (nnU-Net v2)."""
    description = Path(root) / "dataset.json"
    labels = dataset_description(Path(root)).get("labels")
    if labels is None:
        return LabelScheme()
    values = list(labels.values()) if isinstance(labels, dict) else None
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise SiteDataError(f"{description}: 'labels' must map names to integer values")
    ignore = labels.get("ignore")
    if ignore is not None and ignore != max(values):
        raise SiteDataError(
            f"{description}: the ignore label ({ignore}) must be the highest label value "
            f"({max(values)}), as nnU-Net v2 requires"
        )
    if ignore == 0:
        raise SiteDataError(f"{description}: the ignore label cannot be 0 (background)")
    return LabelScheme(frozenset(values), ignore)


def check_label_values(label: np.ndarray, scheme: LabelScheme, path: Path) -> None:
    """Refuse values ``dataset.json`` does not declare, naming the fix for the likely one."""
    if scheme.declared is None:
        return
    undeclared = sorted(set(np.unique(label).tolist()) - scheme.declared)
    if undeclared:
        hint = (
            ' (declare "ignore" in dataset.json\'s labels if these voxels are unlabelled)'
            if scheme.ignore is None
            else ""
        )
        raise SiteDataError(
            f"{path}: label values {undeclared} are not declared in dataset.json's labels "
            f"{sorted(scheme.declared)}{hint}"
        )


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
    name: str,
    image_path: Path,
    label_path: Path,
    spacing: tuple[float, float, float],
    scheme: LabelScheme = LabelScheme(),
) -> Case:
    """Read, resample and normalise one case as inference will (see module docstring); with
    an ignore label in ``scheme``, its voxels go to ``Case.ignore``, never to the vessels."""
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
    check_label_values(label, scheme, label_path)
    ignore = None if scheme.ignore is None else label == scheme.ignore
    mask = (label > 0) if ignore is None else (label > 0) & ~ignore
    if needs_resampling(geometry.spacing, spacing):
        mask = resample(mask.astype(np.float32), geometry.spacing, spacing, image.shape) >= 0.5
        if ignore is not None:
            ignore = resample(ignore.astype(np.float32), geometry.spacing, spacing, image.shape)
            ignore = ignore >= 0.5
            mask &= ~ignore
    if ignore is not None and not ignore.any():
        ignore = None
    foreground = np.flatnonzero(mask)
    if foreground.size > MAX_FOREGROUND_SAMPLES:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        foreground = np.sort(rng.choice(foreground, MAX_FOREGROUND_SAMPLES, replace=False))
    return Case(name=name, image=image, label=mask, foreground=foreground, ignore=ignore)


def default_cache_dir() -> Path:
    """``$VESSEL_SEG_TRAIN_CACHE``, else ``$XDG_CACHE_HOME/vessel-seg/train``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vessel-seg" / "train"


def _write_json(path: Path, value: dict) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(value, stream)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def file_digest(path: Path, cache_dir: Path) -> str:
    """SHA-256 of a file's bytes, remembered in ``cache_dir/hashes`` under the file's absolute
    path, size, modification time and inode: a changed file is hashed again."""
    path = path.resolve()
    try:
        status = path.stat()
    except OSError as error:
        raise SiteDataError(f"{path}: cannot be read ({error.strerror or error})") from None
    stamp = {"size": status.st_size, "mtime_ns": status.st_mtime_ns, "inode": status.st_ino}
    memo = cache_dir / "hashes" / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
    try:
        saved = json.loads(memo.read_text())
        if saved.get("stamp") == stamp:
            return str(saved["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 22):
                digest.update(chunk)
    except OSError as error:
        raise SiteDataError(f"{path}: cannot be read ({error.strerror or error})") from None
    memo.parent.mkdir(parents=True, exist_ok=True)
    _write_json(memo, {"path": str(path), "stamp": stamp, "sha256": digest.hexdigest()})
    return digest.hexdigest()


@functools.cache
def preprocessing_source() -> str:
    """SHA-256 of :mod:`inference.preprocessing`'s source: a change there may change every
    preprocessed voxel, so it invalidates the cache."""
    return hashlib.sha256(inspect.getsource(inference.preprocessing).encode()).hexdigest()


def preprocessing_settings(spacing: tuple[float, float, float]) -> dict:
    """Everything a cached case depends on besides its files (part of the cache key)."""
    return {
        "format": CACHE_FORMAT,
        "target_spacing": [float(s) for s in spacing],
        "normalization": DEFAULT_NORMALIZATION,
        "max_foreground": MAX_FOREGROUND_SAMPLES,
        "preprocessing_source": preprocessing_source(),
    }


def cache_key(
    name: str,
    image_path: Path,
    label_path: Path,
    spacing: tuple[float, float, float],
    cache_dir: Path,
    scheme: LabelScheme = LabelScheme(),
) -> str:
    """The cache entry of a case: its name (which seeds its foreground sample), the hashes of
    its files, :func:`preprocessing_settings` and the ignore label, if any."""
    key = {
        "name": name,
        "image": file_digest(image_path, cache_dir),
        "label": file_digest(label_path, cache_dir),
        **preprocessing_settings(spacing),
        **scheme.cache_settings(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def open_cached(folder: Path) -> CachedCase | None:
    """The cached case in ``folder``, or None when the entry is missing or incomplete."""
    try:
        description = json.loads((folder / "case.json").read_text())
        foreground = np.load(folder / "foreground.npy")
        shape = tuple(int(n) for n in description["shape"])
        ignored = int(description.get("ignored_voxels", 0))
        parts = [("image", np.float32), ("label", np.bool_)] + [("ignore", np.bool_)] * bool(
            ignored
        )
        for part, dtype in parts:
            stored = np.load(folder / f"{part}.npy", mmap_mode="r")
            if stored.shape != shape or stored.dtype != dtype:
                return None
    except (OSError, ValueError, KeyError):
        return None
    return CachedCase(
        description["name"], folder, shape, int(description["vessel_voxels"]), foreground, ignored
    )


def cache_case(
    name: str,
    image_path: Path,
    label_path: Path,
    spacing: tuple[float, float, float],
    cache_dir: Path,
    scheme: LabelScheme = LabelScheme(),
) -> CachedCase:
    """The case from the cache, preprocessed with :func:`load_case` and written there first
    when it is not (see module docstring)."""
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = cache_key(name, image_path, label_path, spacing, cache_dir, scheme)
        folder = cache_dir / "cases" / f"{name}-{key}"
        cached = open_cached(folder)
        if cached is None:
            case = load_case(name, image_path, label_path, spacing, scheme)
            write_cached(case, folder, spacing)
            cached = open_cached(folder)
    except OSError as error:
        raise SiteDataError(
            f"{cache_dir}: cannot hold the preprocessed case {name} ({error}); set {CACHE_ENV} "
            "to a writable folder with room for the site's preprocessed cases"
        ) from None
    if cached is None:
        raise SiteDataError(f"{folder}: the cached case cannot be read back")
    return cached


def write_cached(case: Case, folder: Path, spacing: tuple[float, float, float]) -> None:
    """Write ``case`` to a temporary folder beside ``folder``, then rename it to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        np.save(staging / "image.npy", case.image)
        np.save(staging / "label.npy", case.label)
        np.save(staging / "foreground.npy", case.foreground)
        description = {
            "name": case.name,
            "shape": list(case.shape),
            "vessel_voxels": case.vessel_voxels,
            **preprocessing_settings(spacing),
        }
        if case.ignore is not None:
            np.save(staging / "ignore.npy", case.ignore)
            description["ignored_voxels"] = case.ignored_voxels
        (staging / "case.json").write_text(json.dumps(description, indent=1))
        if folder.exists():  # a broken entry (open_cached refused it): replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:  # another process wrote the same entry first
            if open_cached(folder) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_site(
    root: str | Path,
    spacing: tuple[float, float, float],
    name: str | None = None,
    cache_dir: str | Path | None = None,
    in_memory: bool = False,
) -> Site:
    """Every case of the dataset at ``root`` on the model grid: from the on-disk cache
    (``cache_dir``, default :func:`default_cache_dir`), preprocessing the cases not yet in
    it, or, with ``in_memory``, read and held in memory (0.5 GB per 512x512x400 case)."""
    root = Path(root).resolve()
    files, scheme = list_cases(root), label_scheme(root)
    if in_memory:
        cases = {
            n: load_case(n, image, label, spacing, scheme) for n, (image, label) in files.items()
        }
    else:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        cases = {
            n: cache_case(n, image, label, spacing, folder, scheme)
            for n, (image, label) in files.items()
        }
    return Site(name=name or root.name, path=root, cases=cases)


def vessel_fraction(cases: list[Case | CachedCase]) -> float:
    """Fraction of vessel voxels among the labelled voxels of ``cases`` (for the WBCE
    weight): the ignore label's voxels are neither vessel nor background."""
    voxels = sum(math.prod(c.shape) - c.ignored_voxels for c in cases)
    return sum(c.vessel_voxels for c in cases) / max(voxels, 1)


def has_ignore(cases: list[Case | CachedCase]) -> bool:
    """True where any of ``cases`` holds ignore-label voxels (the loss must mask them)."""
    return any(c.ignored_voxels for c in cases)
