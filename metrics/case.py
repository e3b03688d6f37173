"""All metrics of one case, computed once on the pair cropped to its union."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metrics.distance import balanced_average_hausdorff_from, directed_pair, hd95_from
from metrics.masks import prepare
from metrics.overlap import (
    confusion,
    dice_of,
    jaccard_of,
    precision_of,
    recall_of,
    small_vessel_recall_of,
    volumetric_similarity_of,
)
from metrics.topology import betti0_error_of, cldice_of

#: Column order: the seed paper's Table 1 (Dice, Re, Pr, clDice, clRe, clPr), then the
#: metrics its text names (Jaccard, volumetric similarity, balanced average Hausdorff),
#: HD95, the Betti-0 error and the recall on small truth vessels (issue 18's Table 4).
METRIC_NAMES: tuple[str, ...] = (
    "Dice", "Re", "Pr", "clDice", "clRe", "clPr", "Jaccard", "VS", "bAHD", "HD95", "Betti0err",
    "smallRe",
)  # fmt: skip

#: Metrics in mm (the others are ratios in [0, 1], except the Betti-0 error, a count).
DISTANCE_METRICS = ("bAHD", "HD95")


def score_case(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Every metric of :data:`METRIC_NAMES` for one (prediction, ground truth) pair.

    ``pred`` and ``gt`` are (z, y, x) arrays (bool, or labels where 1 is foreground),
    ``spacing`` their (z, y, x) voxel size in mm. Definitions and empty-mask values are
    those of :mod:`metrics.overlap`, :mod:`metrics.topology` and :mod:`metrics.distance`;
    ``smallRe`` is :func:`metrics.overlap.small_vessel_recall`.
    """
    pair = prepare(pred, gt, spacing)
    counts = confusion(pair)
    cl = cldice_of(pair)
    if pair.both_empty or pair.one_empty:
        hd = bahd = 0.0 if pair.both_empty else pair.worst_distance()
    else:
        to_gt, to_pred = directed_pair(pair)
        hd = hd95_from(to_gt, to_pred)
        bahd = balanced_average_hausdorff_from(pair, to_gt, to_pred)
    return {
        "Dice": dice_of(pair, counts),
        "Re": recall_of(pair, counts),
        "Pr": precision_of(pair, counts),
        "clDice": cl.cldice,
        "clRe": cl.clre,
        "clPr": cl.clpr,
        "Jaccard": jaccard_of(pair, counts),
        "VS": volumetric_similarity_of(pair, counts),
        "bAHD": bahd,
        "HD95": hd,
        "Betti0err": float(betti0_error_of(pair)),
        "smallRe": small_vessel_recall_of(pair),
    }
