"""The study's data: phantom federations, the held-out test set and the independent family.

``data/federation``: three non-IID sites (site profiles a, b, c; 13 cases each at 128^3, seed
700) of domain-randomised phantoms (``phantoms.randomised``); ``federation-reference``: the
same sites and seeds drawn by the reference generator (for the pilot); ``test``: a held-out
set of the reference family (seed 9000, three cases from each of sites a, b, c and three from
site d, whose acquisition settings no training run sees); ``independent``: the independent
family (other code, another model of anatomy and imaging, seed 4242, never trained or tuned
on); ``independent-coil``: the same cases with a coil pack beside the vessels (metal must not
set the normalisation's anchor). ``pooled/`` puts every site's cases into one dataset
(centralised training) and ``siteK-alone/`` holds site K only; both link to the federation's
files.

Table 4 (partially labelled sites): the same federation with :data:`PARTIAL_SITE` labelled
otherwise (:data:`PARTIAL_FEDERATIONS`: ``major`` with the ignore label, the same written
naively as background, ``sparse`` slabs), and ``federation-without-<site>`` leaving it out.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from inference.backend_base import available_cpus
from inference.naming import case_name
from phantoms.dataset import FAMILY_VERSIONS
from study.paths import REPOSITORY, StudyPaths
from train.data import dataset_description

FEDERATION = {"cases": 13, "size": 128, "seed": 700, "sites": 3}
TEST_SET = {"cases": 3, "size": 128, "seed": 9000, "sites": 4}
INDEPENDENT_SET = {"cases": 8, "size": 128, "seed": 4242}
PARTIAL_SITE = "site3"
"""The site that labels partially in Table 4 (small field of view, tortuous small vessels)."""
PARTIAL_FEDERATIONS = {
    "federation-major": ("major",),
    "federation-major-naive": ("major", "--naive"),
    "federation-sparse": ("sparse",),
}
EVALUATION_SETS = {
    "held-out": "test",
    "independent": "independent",
    "independent, coil": "independent-coil",
}
"""Label of each scored set -> its folder under ``data/`` (``input/`` + ``ground_truth/``)."""


def python(*args: str) -> None:
    """Run ``python ARGS`` from the repository in this environment; a failure stops the study."""
    subprocess.run([sys.executable, *args], check=True, cwd=REPOSITORY)


def phantoms(out: Path, spec: dict, *options: str) -> None:
    """``python -m phantoms`` for ``spec`` (cases per site, cube size, seed, sites)."""
    sites = ("--sites", str(spec["sites"])) if "sites" in spec else ()
    size = [str(spec["size"])] * 3
    python(
        "-m",
        "phantoms",
        "--out",
        str(out),
        "--cases",
        str(spec["cases"]),
        "--size",
        *size,
        "--seed",
        str(spec["seed"]),
        *sites,
        *options,
    )


def make_data(paths: StudyPaths) -> None:
    """Write whatever of the federations, test sets and data views is missing; the sets are
    independent generator runs, so they run side by side, one per available CPU."""
    data = paths.data
    _refuse_stale_federations(data)
    federation = data / "federation"
    jobs = []
    if not federation.exists():
        jobs.append(functools.partial(phantoms, federation, FEDERATION, "--family", "randomised"))
    if not (data / "federation-reference").exists():
        reference = data / "federation-reference"
        jobs.append(functools.partial(phantoms, reference, FEDERATION, "--family", "reference"))
    if not (data / "test").exists():
        jobs.append(functools.partial(_flat_test_set, data))
    if not (data / "independent").exists():
        options = ("--layout", "challenge", "--family", "independent")
        jobs.append(functools.partial(phantoms, data / "independent", INDEPENDENT_SET, *options))
    jobs += _partial_federations(data)
    with ThreadPoolExecutor(max(1, min(len(jobs), available_cpus()))) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()  # a failure stops the study
    if not (data / "independent-coil").exists():
        _coiled_set(data / "independent", data / "independent-coil")
    sites = sorted(p for p in federation.iterdir() if (p / "imagesTr").is_dir())
    _link_views(data, sites)


def _refuse_stale_federations(data: Path) -> None:
    """Stop when a federation on disk was drawn by an older version of its generator: the
    study would otherwise train and resume on data this code no longer writes."""
    for site in sorted(data.glob("*/site*/")):
        phantom = dataset_description(site).get("phantom", {})
        family, version = phantom.get("family"), phantom.get("version", 1)
        if family in FAMILY_VERSIONS and version != FAMILY_VERSIONS[family]:
            raise SystemExit(
                f"python -m study: {site.parent} holds {family} phantoms of "
                f"version {version}, this code draws version {FAMILY_VERSIONS[family]}; "
                f"delete {data} and the runs trained on it to start over"
            )


def _partial_federations(data: Path) -> list[Callable[[], None]]:
    """The missing of the federation's images again, :data:`PARTIAL_SITE` labelled as each of
    :data:`PARTIAL_FEDERATIONS` says (same seeds: only that site's labels differ)."""
    sites = [f"site{k}" for k in range(1, FEDERATION["sites"] + 1)]
    jobs = []
    for name, (mode, *naive) in PARTIAL_FEDERATIONS.items():
        if not (data / name).exists():
            modes = [mode if site == PARTIAL_SITE else "full" for site in sites]
            options = ("--family", "randomised", "--annotation", *modes, *naive)
            jobs.append(functools.partial(phantoms, data / name, FEDERATION, *options))
    return jobs


def _flat_test_set(data: Path) -> None:
    """All test sites' cases in one ``input/`` and one ``ground_truth/`` folder."""
    staging = data / "test-sites"
    phantoms(staging, TEST_SET, "--layout", "challenge", "--family", "reference")
    for part in ("input", "ground_truth"):
        (data / "test" / part).mkdir(parents=True)
        for file in sorted(staging.glob(f"site*/{part}/*")):
            file.rename(data / "test" / part / file.name)
    shutil.rmtree(staging)


COIL_RADIUS = 8
"""Voxels: a 3.6 mm coil pack, about 0.1 % of a 128^3 volume (below the 0.5 % of the
normalisation's bound, above the 0.01 % of its anchor); an eighth of a smaller volume."""


def _coiled_set(independent: Path, out: Path) -> None:
    """Each independent case with a platinum coil pack: a ball of :data:`COIL_RADIUS` at four
    times the case's brightest voxel, blurred like the scanner (sigma 1 voxel), inside the head
    and as far from the vessels as the volume allows, up to 6 voxels beyond its radius (the
    labels stay as they are; a link to them)."""
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "input").mkdir(parents=True)
    for index, path in enumerate(sorted((independent / "input").glob("*.nii.gz"))):
        image = sitk.ReadImage(str(path))
        voxels = sitk.GetArrayFromImage(image).astype(np.float32)
        truth = independent / "ground_truth" / f"{case_name(path)}.nii.gz"
        vessels = sitk.GetArrayFromImage(sitk.ReadImage(str(truth))) > 0
        radius = min(COIL_RADIUS, min(voxels.shape) // 8)
        clearance = ndimage.distance_transform_edt(~vessels) * (voxels > np.median(voxels))
        inner = tuple(slice(radius + 4, n - radius - 4) for n in voxels.shape)
        room = clearance[inner]
        candidates = np.argwhere(room >= min(radius + 6, room.max())) + radius + 4
        centre = candidates[np.random.default_rng(index).integers(len(candidates))]
        grid = np.ogrid[tuple(slice(0, n) for n in voxels.shape)]
        ball = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2
        voxels += ndimage.gaussian_filter(ball.astype(np.float32), 1.0) * 4 * voxels.max()
        coiled = sitk.GetImageFromArray(np.clip(voxels, -32768, 32767).astype(np.int16))
        coiled.CopyInformation(image)
        sitk.WriteImage(coiled, str(staging / "input" / path.name), useCompression=True)
    (staging / "ground_truth").symlink_to(os.path.relpath(independent / "ground_truth", staging))
    staging.rename(out)


def _link_views(data: Path, sites: list[Path]) -> None:
    """``siteK-alone/siteK`` and ``pooled/pooled``: relative links to the federation."""
    for site in sites:
        alone = data / f"{site.name}-alone"
        alone.mkdir(exist_ok=True)
        if not (alone / site.name).exists():
            (alone / site.name).symlink_to(os.path.relpath(site, alone))
    without = data / f"federation-without-{PARTIAL_SITE}"
    without.mkdir(exist_ok=True)
    for site in sites:
        if site.name != PARTIAL_SITE and not (without / site.name).exists():
            (without / site.name).symlink_to(os.path.relpath(site, without))
    pooled = data / "pooled" / "pooled"
    for part in ("imagesTr", "labelsTr"):  # every missing link, so that a broken view mends
        (pooled / part).mkdir(parents=True, exist_ok=True)
        for site in sites:
            for file in sorted((site / part).iterdir()):
                link = pooled / part / file.name
                if not link.is_symlink():
                    link.symlink_to(os.path.relpath(file, pooled / part))
