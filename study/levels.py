"""Where the normalisation puts the vessels: the network's input levels, set by set.

A model learns a vessel's wall at the input levels it was trained on. When a normalisation
puts another family's vessels at other levels (its upper anchor lying on vessels rather than
on bone, say), the walls move. For every case of a set this reads the image and its truth,
normalises the image as training and inference do, and measures, per case: the median level
of the vessel cores (at least 2 voxels deep in vessels of radius 2 or more), of the first voxel
outside their walls, and of thin vessels (radius under 1.5 voxels; radii by local thickness,
as every metric of calibre), and the share of vessel voxels clipped at the top. The table
gives the median over cases and, in brackets, the 10th and 90th percentiles, and in how many
cases the upper anchor's bound (against metal) binds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from inference.naming import CHANNEL_SUFFIX
from inference.preprocessing import (
    DEFAULT_NORMALIZATION,
    LEGACY_NORMALIZATION,
    LEGACY_UPPER_CLIP,
    intensity_anchors,
    normalize,
)
from metrics.thickness import small_vessels, vessels_at_least

NORMALIZATIONS = {
    "99.5th percentile, clipped at 1": LEGACY_NORMALIZATION,
    "default (bounded 99.99th, clipped at 4)": DEFAULT_NORMALIZATION,
}
VOXELS = (1.0, 1.0, 1.0)  # calibres in voxels: the network sees voxels, not millimetres
MEASURES = ("vessel core", "first voxel outside", "thin vessels", "clipped share", "bound binds")


def vessel_regions(vessels: np.ndarray) -> tuple[np.ndarray, ...]:
    """The vessel cores, the first voxel outside them and the thin vessels (bool masks), and
    the vessels themselves: the regions of :data:`MEASURES`, whatever the normalisation.
    Calibre is local thickness (:mod:`metrics.thickness`), in voxels."""
    wide = vessels_at_least(vessels, VOXELS, 4.0)  # radius 2 or more
    depth = ndimage.distance_transform_edt(vessels)
    outside, nearest = ndimage.distance_transform_edt(~vessels, return_indices=True)
    return (
        wide & (depth >= 2),
        (outside == 1) & wide[tuple(nearest)],
        small_vessels(vessels, VOXELS, 3.0),  # radius under 1.5
        vessels,
    )


def case_levels(image: np.ndarray, regions: tuple[np.ndarray, ...], parameters: dict) -> list:
    """:data:`MEASURES` of one case (NaN where it has no such vessels; 1 where the bound binds)."""
    image = image.astype(np.float32)
    levels = normalize(image, parameters)
    *shapes, vessels = regions
    medians = [float(np.median(levels[r])) if r.any() else np.nan for r in shapes]
    top = parameters.get("upper_clip", LEGACY_UPPER_CLIP)
    unbounded = {k: v for k, v in parameters.items() if not k.startswith("upper_bound")}
    binds = intensity_anchors(image, parameters) != intensity_anchors(image, unbounded)
    return medians + [float(np.mean(levels[vessels] >= top * (1 - 1e-6))), float(binds)]


def set_levels(folder: Path, normalizations: dict[str, dict]) -> dict[str, np.ndarray]:
    """(cases, measures) under each normalisation for the ``input/`` + ``ground_truth/`` or
    ``imagesTr/`` + ``labelsTr/`` folder; each case is read and measured out once."""
    rows: dict[str, list] = {name: [] for name in normalizations}
    for truth in sorted([*folder.glob("ground_truth/*.nii.gz"), *folder.glob("labelsTr/*.nii.gz")]):
        stem = truth.name.removesuffix(".nii.gz")
        image = next(folder.glob(f"*/{stem}{CHANNEL_SUFFIX}.nii.gz"))
        voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
        regions = vessel_regions(sitk.GetArrayFromImage(sitk.ReadImage(str(truth))) == 1)
        for name, parameters in normalizations.items():
            rows[name].append(case_levels(voxels, regions, parameters))
    return {name: np.array(values, dtype=float) for name, values in rows.items()}


def levels(sets: dict[str, Path]) -> str:
    """A Markdown table: one row per normalisation and set."""
    measured = {label: set_levels(folder, NORMALIZATIONS) for label, folder in sets.items()}
    lines = ["| normalisation | set | " + " | ".join(MEASURES) + " |"]
    lines.append("|---|---|" + "---|" * len(MEASURES))
    for name in NORMALIZATIONS:
        for label in sets:
            values = measured[label][name]
            cells = [
                f"{np.nanmedian(v):.2f} "
                f"({np.nanpercentile(v, 10):.2f}-{np.nanpercentile(v, 90):.2f})"
                for v in values.T[:-1]
            ]
            cells.append(f"{int(values[:, -1].sum())} of {len(values)}")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
