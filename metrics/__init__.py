"""Segmentation metrics of the vessel challenge and the ``evaluate`` command.

Masks are 3D numpy arrays indexed (z, y, x): ``bool``, or labels where foreground is the
value 1 (as the SHINY-ICARUS scorer reads label files). Spacing is the (z, y, x) voxel size
in mm, the reverse of ``SimpleITK.Image.GetSpacing()``. S is the prediction, G the ground
truth.

Empty masks never give NaN:

========================  ===========================================  ===================
metric                    both empty                                   exactly one empty
========================  ===========================================  ===================
Dice, Re, Pr, Jaccard,    1.0                                          0.0
VS, clDice, clRe, clPr,
smallRe (1.0 when the truth
has no vessel under 1 mm)
bAHD, HD95 (mm)           0.0                                          image diagonal (mm)
Betti0err                 0                                            components of the other
========================  ===========================================  ===================

Usage: ``python -m metrics.evaluate --pred DIR --gt DIR [--csv FILE] [--json FILE]``.
"""

from metrics.case import DISTANCE_METRICS, METRIC_NAMES, score_case
from metrics.distance import balanced_average_hausdorff, hd95, surface, surface_distances
from metrics.masks import as_mask, image_diagonal
from metrics.overlap import (
    dice,
    jaccard,
    precision,
    recall,
    small_vessel_recall,
    volumetric_similarity,
)
from metrics.thickness import small_vessels, vessels_at_least
from metrics.topology import ClDice, betti0_error, cldice, count_components, skeleton

__all__ = [
    "DISTANCE_METRICS",
    "METRIC_NAMES",
    "ClDice",
    "as_mask",
    "balanced_average_hausdorff",
    "betti0_error",
    "cldice",
    "count_components",
    "dice",
    "hd95",
    "image_diagonal",
    "jaccard",
    "precision",
    "recall",
    "score_case",
    "skeleton",
    "small_vessel_recall",
    "small_vessels",
    "surface",
    "surface_distances",
    "vessels_at_least",
    "volumetric_similarity",
]
