"""Write phantoms as nnU-Net raw datasets, one per simulated site.

Layout "nnunet" (nnU-Net v2 raw format, the default)::

    OUT/                      without sites      OUT/site1/, OUT/site2/, ...  with sites
        dataset.json
        imagesTr/case_000_0000.nii.gz            imagesTr/site1_000_0000.nii.gz
        labelsTr/case_000.nii.gz                 labelsTr/site1_000.nii.gz

Layout "challenge" (what a SHINY-ICARUS container reads, plus the reference masks)::

    OUT/input/case_000_0000.nii.gz
    OUT/ground_truth/case_000.nii.gz

Every case's seed derives from (seed, site, case index) only, so a case can be regenerated
alone and adding sites or cases never changes the others.

Three families of phantoms (``family``): ``randomised`` (the default, for training:
:mod:`phantoms.randomised`, the vessel model with every look drawn at random; with
``randomised-cone`` the same cases with the cone beam's artefacts too), ``reference``
(:mod:`phantoms.generator`, one fixed 3DRA-like look per site: the project's held-out test
set and the bundled sample) and ``independent`` (:mod:`phantoms.independent`, other code and
another model of anatomy and imaging, for evaluation only: never train or tune on it).

A site may be partially labelled (``annotation``, one for all sites or one per site; see
:mod:`phantoms.annotation`): its labels then mark what it did not trace as the ignore label
(2), declared in its ``dataset.json``, or as background with ``naive``. The challenge layout
holds test sets and their reference masks, which stay fully labelled.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from phantoms.annotation import FULL, IGNORE_LABEL, Annotation, annotate
from phantoms.generator import check_shape, generate_case
from phantoms.independent import generate_independent
from phantoms.profiles import DEFAULT_PROFILE, SiteProfile, site_profile
from phantoms.randomised import generate_randomised

CHANNEL_NAMES = {"0": "3DRA"}
LABELS = {"background": 0, "vessel": 1}
FILE_ENDING = ".nii.gz"
FAMILIES = ("randomised", "randomised-cone", "reference", "independent")
FAMILY_VERSIONS = {"randomised": 2, "randomised-cone": 1, "reference": 1, "independent": 1}
"""Raised with every change to a family's generator that alters the case a seed draws, and
recorded in ``dataset.json``: data of an older version is another dataset (randomised 2: air
past the skin, cancellous bone, a heavy-tailed point-spread; randomised-cone 1: randomised 2
with shading, a truncation rim and a scalp band)."""


def generate_family_case(
    family: str, shape: tuple[int, int, int], seed: int, spacing: float, profile: SiteProfile
) -> tuple[sitk.Image, sitk.Image]:
    """One case of ``family`` as (16-bit image, uint8 label); the independent family has no
    site profiles."""
    if family.startswith("randomised"):
        cone_beam = family == "randomised-cone"
        return generate_randomised(shape, seed, spacing, profile, cone_beam=cone_beam).to_sitk()
    if family == "reference":
        return generate_case(shape, seed, spacing, profile)
    if family == "independent":
        return generate_independent(shape, seed, spacing)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def case_seed(seed: int, site: int, index: int) -> int:
    """Seed of one case: the first 32-bit word of SeedSequence([seed, site, index]).

    `site` is 0 for a dataset without sites, k >= 1 for site k.
    """
    return int(np.random.SeedSequence([seed, site, index]).generate_state(1)[0])


def dataset_case_name(site: int, index: int) -> str:
    """`case_000` without sites, `site3_000` for the first case of site 3."""
    return f"{'case' if site == 0 else f'site{site}'}_{index:03d}"


def write_image(image: sitk.Image, path: Path) -> None:
    """Write a compressed image atomically: to a temporary name, then rename."""
    tmp = path.with_name(f".{path.name[: -len(FILE_ENDING)]}.tmp{FILE_ENDING}")
    sitk.WriteImage(image, str(tmp), useCompression=True)
    os.replace(tmp, path)


def dataset_json(
    name: str,
    n_cases: int,
    profile: SiteProfile,
    shape: tuple[int, int, int],
    spacing: float,
    seeds: dict[str, int],
    site: int,
    family: str,
) -> dict:
    """nnU-Net v2 `dataset.json`, plus a `phantom` block recording how it was made."""
    return {
        "name": name,
        "description": (
            "Synthetic 3D rotational angiography of the internal carotid artery tree with "
            "exact lumen labels (phantoms package)"
            + (f", site {site} ({profile.name})" if site else "")
        ),
        "reference": "synthetic, no patient data",
        "licence": "CC0-1.0",
        "channel_names": CHANNEL_NAMES,
        "labels": LABELS,
        "numTraining": n_cases,
        "file_ending": FILE_ENDING,
        "phantom": {
            "family": family,
            "version": FAMILY_VERSIONS[family],
            "site": site or None,
            "shape_zyx": list(shape),
            "spacing_mm": spacing,
            "case_seeds": seeds,
            "profile": None if family == "independent" else dataclasses.asdict(profile),
        },
    }


def declare_annotation(meta: dict, annotation: Annotation, has_ignore: bool) -> dict:
    """``meta`` with the annotation in its ``phantom`` block, and the ignore label among its
    labels only where the written labels hold it (nnU-Net: the highest label value)."""
    labels = {**LABELS, "ignore": IGNORE_LABEL} if has_ignore else LABELS
    phantom = {**meta["phantom"], "annotation": annotation.record()}
    return {**meta, "labels": labels, "phantom": phantom}


LAYOUT_FOLDERS = {"nnunet": ("imagesTr", "labelsTr"), "challenge": ("input", "ground_truth")}


def _write_one_dataset(
    root: Path,
    names: list[str],
    seeds: list[int],
    shape: tuple[int, int, int],
    site: int,
    profile: SiteProfile,
    spacing: float,
    layout: str,
    family: str,
    annotation: Annotation = FULL,
) -> Path:
    images, labels = (root / folder for folder in LAYOUT_FOLDERS[layout])
    planned = {f"{n}_0000{FILE_ENDING}" for n in names} | {f"{n}{FILE_ENDING}" for n in names}
    for folder in (images, labels):
        stray = sorted(p.name for p in folder.glob(f"*{FILE_ENDING}") if p.name not in planned)
        if stray:  # they would break numTraining and pair with nothing of this run
            raise ValueError(f"{folder}: holds other cases ({stray[0]}, ...); use an empty folder")
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    has_ignore = False
    for name, case in zip(names, seeds, strict=True):
        image, label = generate_family_case(family, shape, case, spacing, profile)
        label = annotated(label, annotation)
        has_ignore |= bool(np.any(sitk.GetArrayViewFromImage(label) == IGNORE_LABEL))
        write_image(image, images / f"{name}_0000{FILE_ENDING}")
        write_image(label, labels / f"{name}{FILE_ENDING}")
    if layout == "nnunet":
        title = "Phantom3DRA" + (f"_site{site}" if site else "")
        seed_map = dict(zip(names, seeds, strict=True))
        meta = dataset_json(title, len(names), profile, shape, spacing, seed_map, site, family)
        meta = declare_annotation(meta, annotation, has_ignore)
        (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return root


def annotated(label: sitk.Image, annotation: Annotation) -> sitk.Image:
    """``label`` as a site with ``annotation`` writes it (the same image when ``full``)."""
    if annotation.mode == "full":
        return label
    spacing = label.GetSpacing()[::-1]
    array = annotate(sitk.GetArrayViewFromImage(label), spacing, annotation)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(label)
    return out


def site_annotations(annotation: Annotation | Sequence[Annotation], count: int) -> list[Annotation]:
    """One annotation per dataset: the same for all, or one each (a list of ``count``)."""
    if isinstance(annotation, Annotation):
        return [annotation] * count
    annotations = list(annotation)
    if len(annotations) == 1:
        return annotations * count
    if len(annotations) != count:
        raise ValueError(
            f"give one annotation for every site or one per site ({count}), got {len(annotations)}"
        )
    return annotations


def write_dataset(
    out_dir: str | Path,
    cases: int,
    shape: tuple[int, int, int] = (128, 128, 128),
    seed: int = 0,
    sites: int | None = None,
    *,
    spacing: float = 0.227,
    profile: SiteProfile | None = None,
    layout: str = "nnunet",
    name: str | None = None,
    family: str = "randomised",
    annotation: Annotation | Sequence[Annotation] = FULL,
) -> list[Path]:
    """Write `cases` phantoms (per site) and return the dataset roots.

    Without `sites`: one dataset in `out_dir`, cases `case_000...`, made with `profile`
    (default: the reference profile). With `sites=K`: datasets `out_dir/site1 ... siteK`,
    cases `site<k>_000...`, site k made with `site_profile(k, seed)`. `layout` is "nnunet"
    (imagesTr/labelsTr/dataset.json) or "challenge" (input/ground_truth). `name` renames
    the single case of a single dataset (e.g. the bundled sample); its seed is unchanged.
    ``family`` is one of :data:`FAMILIES` (see the module docstring). ``annotation``: how
    every site labels its cases, or a list with one per site (:mod:`phantoms.annotation`);
    the challenge layout refuses anything but full labels.
    """
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if sites is not None and sites < 1:
        raise ValueError(f"sites must be >= 1, got {sites}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if layout not in LAYOUT_FOLDERS:
        raise ValueError(f"layout must be one of {sorted(LAYOUT_FOLDERS)}, got {layout!r}")
    if name is not None and (cases != 1 or sites is not None or not name.isidentifier()):
        raise ValueError(f"name {name!r} needs --cases 1, no sites, and letters/digits/_ only")
    shape = check_shape(tuple(shape))
    annotations = site_annotations(annotation, sites or 1)
    if layout == "challenge" and any(a.mode != "full" for a in annotations):
        raise ValueError(
            "the challenge layout holds test sets and their reference masks, which must be "
            "fully labelled: use --annotation full (the default) with --layout challenge"
        )
    out = Path(out_dir)
    roots = []
    for site in range(1, sites + 1) if sites else [0]:
        root = out / f"site{site}" if site else out
        site_prof = site_profile(site, seed) if site else profile or DEFAULT_PROFILE
        names = [name] if name else [dataset_case_name(site, i) for i in range(cases)]
        seeds = [case_seed(seed, site, i) for i in range(cases)]
        site_annotation = annotations[max(site, 1) - 1]
        roots.append(
            _write_one_dataset(
                root,
                names,
                seeds,
                shape,
                site,
                site_prof,
                spacing,
                layout,
                family,
                site_annotation,
            )
        )
    return roots
