"""Vessel calibre from a mask alone: which lumen voxels belong to vessels under a diameter.

Local thickness (Hildebrand & Rüegsegger, J Microsc 185:67, 1997): a voxel's thickness is the
diameter of the largest ball that contains it and fits in the lumen. A voxel is at least
``D`` thick exactly when some ball of diameter ``D`` inside the lumen covers it (a larger
ball covering it holds a ball of diameter ``D`` that still covers it), so the voxels of
vessels at least ``D`` wide form the morphological opening of the lumen by that ball. Two
Euclidean distance transforms compute it, with no skeleton and no per-voxel radius map:
the centres where the ball fits, then every voxel within reach of one.

Discretisation: the distance transform measures from a voxel centre to the nearest
background voxel centre, and a ball centred at ``c`` counts as ``2 dt(c)`` wide: on straight
tubes rasterised as the phantoms are (lumen = voxel centres within the radius) that is within
0.4 voxel of the true diameter on average over their placement on the grid (the wall lies
between the last lumen centre and the first background one). The fixed-diameter argument
above moves ball centres continuously; on the grid the nearest centre lies up to half a
voxel diagonal away, so a voxel counts as covered within ``D / 2`` plus that slack (without
it, a tube just over ``D`` wide, whose only centres are on its axis, would lose its rim).
The same definition serves the phantoms' ``major`` annotation (which vessels are
labelled) and the small-vessel recall metric (which truth voxels it counts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

SMALL_VESSEL_DIAMETER_MM = 1.0
"""Vessels narrower than this are "small" (issue 18: recall on truth vessels under 1 mm)."""


def vessels_at_least(mask: np.ndarray, spacing: Sequence[float], diameter_mm: float) -> np.ndarray:
    """The lumen voxels (bool) whose local thickness is at least ``diameter_mm``; beyond the
    array every voxel is background, as the other metrics assume."""
    inner = (slice(1, -1),) * 3
    mask = np.pad(np.asarray(mask, dtype=bool), 1)
    spacing = tuple(float(s) for s in spacing)
    if not mask.any():
        return np.zeros_like(mask[inner])
    reach = diameter_mm / 2.0  # dt of a centre whose ball is diameter_mm wide
    centres = ndimage.distance_transform_edt(mask, sampling=spacing) >= reach
    if not centres.any():
        return np.zeros_like(mask[inner])
    slack = np.sqrt(3.0) / 2.0 * max(spacing)  # a voxel centre from any point of its voxel
    covered = ndimage.distance_transform_edt(~centres, sampling=spacing) <= reach + slack
    return (covered & mask)[inner]


def small_vessels(
    mask: np.ndarray,
    spacing: Sequence[float],
    diameter_mm: float = SMALL_VESSEL_DIAMETER_MM,
) -> np.ndarray:
    """The lumen voxels (bool) whose local thickness is under ``diameter_mm``."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~vessels_at_least(mask, spacing, diameter_mm)
