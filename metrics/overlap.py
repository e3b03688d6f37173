"""Voxel-overlap metrics of a predicted mask S against a ground-truth mask G.

With TP = |S ∩ G|, FP = |S \\ G|, FN = |G \\ S| (Taha & Hanbury, "Metrics for evaluating 3D
medical image segmentation: analysis, selection, and tool", BMC Medical Imaging 15:29, 2015):

- Dice = 2 TP / (2 TP + FP + FN)
- Jaccard = TP / (TP + FP + FN)
- recall (sensitivity) = TP / (TP + FN)
- precision = TP / (TP + FP)
- volumetric similarity VS = 1 - |FN - FP| / (2 TP + FP + FN)
- small-vessel recall smallRe = |S ∩ G_small| / |G_small|, G_small the truth voxels whose
  local thickness is under 1 mm (:func:`metrics.thickness.small_vessels`): the vessels a
  site that labels only major arteries would teach a model to miss (issue 18)

Empty masks: both empty gives 1.0 for every metric here; exactly one empty gives 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from metrics.masks import MaskPair, prepare, ratio
from metrics.thickness import SMALL_VESSEL_DIAMETER_MM, small_vessels


@dataclass(frozen=True)
class Confusion:
    """Voxel counts of a prediction against its ground truth."""

    tp: int
    fp: int
    fn: int


def confusion(pair: MaskPair) -> Confusion:
    """TP, FP and FN of a prepared pair."""
    tp = int(np.count_nonzero(pair.pred & pair.gt))
    return Confusion(tp=tp, fp=pair.n_pred - tp, fn=pair.n_gt - tp)


def dice_of(pair: MaskPair, c: Confusion) -> float:
    return ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn, pair)


def jaccard_of(pair: MaskPair, c: Confusion) -> float:
    return ratio(c.tp, c.tp + c.fp + c.fn, pair)


def recall_of(pair: MaskPair, c: Confusion) -> float:
    return ratio(c.tp, c.tp + c.fn, pair)


def precision_of(pair: MaskPair, c: Confusion) -> float:
    return ratio(c.tp, c.tp + c.fp, pair)


def volumetric_similarity_of(pair: MaskPair, c: Confusion) -> float:
    if pair.both_empty:
        return 1.0
    return 1.0 - abs(c.fn - c.fp) / (2 * c.tp + c.fp + c.fn)


def small_vessel_recall_of(pair: MaskPair, diameter_mm: float = SMALL_VESSEL_DIAMETER_MM) -> float:
    """Recall on the truth voxels thinner than ``diameter_mm``. The empty-mask values of the
    other ratios; 1.0 where both masks hold vessels but the truth none that thin (nothing
    to miss)."""
    if pair.both_empty or pair.one_empty:
        return 1.0 if pair.both_empty else 0.0
    small = small_vessels(pair.gt, pair.require_spacing(), diameter_mm)
    n_small = int(np.count_nonzero(small))
    return float(np.count_nonzero(small & pair.pred)) / n_small if n_small else 1.0


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2 TP / (2 TP + FP + FN) (Dice 1945; Taha & Hanbury 2015)."""
    pair = prepare(pred, gt)
    return dice_of(pair, confusion(pair))


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard = TP / (TP + FP + FN) (Jaccard 1912; Taha & Hanbury 2015)."""
    pair = prepare(pred, gt)
    return jaccard_of(pair, confusion(pair))


def recall(pred: np.ndarray, gt: np.ndarray) -> float:
    """Recall (sensitivity, Re) = TP / (TP + FN) (Taha & Hanbury 2015)."""
    pair = prepare(pred, gt)
    return recall_of(pair, confusion(pair))


def precision(pred: np.ndarray, gt: np.ndarray) -> float:
    """Precision (Pr) = TP / (TP + FP) (Taha & Hanbury 2015)."""
    pair = prepare(pred, gt)
    return precision_of(pair, confusion(pair))


def volumetric_similarity(pred: np.ndarray, gt: np.ndarray) -> float:
    """VS = 1 - |FN - FP| / (2 TP + FP + FN) (Taha & Hanbury 2015).

    In [0, 1], 1 when both volumes are equal. This is not SimpleITK's
    ``LabelOverlapMeasuresImageFilter.GetVolumeSimilarity()``, which is the signed
    ``2 (|S| - |G|) / (|S| + |G|)``; the two relate as ``VS = 1 - |signed| / 2``.
    """
    pair = prepare(pred, gt)
    return volumetric_similarity_of(pair, confusion(pair))


def small_vessel_recall(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    diameter_mm: float = SMALL_VESSEL_DIAMETER_MM,
) -> float:
    """smallRe = |S ∩ G_small| / |G_small|, G_small the truth voxels of vessels narrower than
    ``diameter_mm`` (local thickness from the truth alone, ``spacing`` (z, y, x) in mm)."""
    return small_vessel_recall_of(prepare(pred, gt, spacing), diameter_mm)
