"""Binary masks as the metrics see them: validation, foreground convention, cropping.

Arrays are indexed (z, y, x), as ``SimpleITK.GetArrayFromImage`` returns them, and the
spacing is given in the same (z, y, x) order, in millimetres (the reverse of
``SimpleITK.Image.GetSpacing()``).

Foreground: a ``bool`` array is taken as it is; any other dtype counts the voxels equal to 1,
as the SHINY-ICARUS scorer reads label 1 of a label file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Spacing = tuple[float, float, float]

#: Background voxels kept around the union's bounding box. Outside that box every voxel is
#: background, which is what erosion (``border_value=0``) and scikit-image's skeletonize (zero
#: padding) assume beyond an array's edge, and distances only involve foreground voxels; so
#: cropping changes no result, margin or not. The margin keeps that background explicit.
#: Where the box meets the image border the crop stops there.
CROP_MARGIN = 1


def as_mask(array: np.ndarray, name: str = "mask") -> np.ndarray:
    """Return ``array`` as a 3D bool mask: ``bool`` as is, any other dtype ``== 1``."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a 3D (z, y, x) mask, got shape {array.shape}")
    return array if array.dtype == np.bool_ else array == 1


def as_spacing(spacing: Sequence[float]) -> Spacing:
    """Validate a (z, y, x) voxel spacing in mm: three finite positive numbers."""
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be three positive (z, y, x) sizes in mm, got {spacing}")
    return values  # type: ignore[return-value]


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the image's diagonal, ``sqrt(sum_i (n_i * s_i)^2)``.

    The worst distance a mask can be from another in this image; the distance metrics
    return it when exactly one of the two masks is empty.
    """
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


@dataclass(frozen=True)
class MaskPair:
    """A prediction S and a ground truth G cropped to their union's bounding box.

    ``shape`` is the full image's shape (for the worst distance), ``spacing`` its (z, y, x)
    voxel size in mm or ``None`` where no distance is asked for.
    """

    pred: np.ndarray
    gt: np.ndarray
    shape: tuple[int, int, int]
    spacing: Spacing | None
    n_pred: int
    n_gt: int

    @property
    def both_empty(self) -> bool:
        return self.n_pred == 0 and self.n_gt == 0

    @property
    def one_empty(self) -> bool:
        return (self.n_pred == 0) != (self.n_gt == 0)

    def worst_distance(self) -> float:
        """The image diagonal in mm (see :func:`image_diagonal`)."""
        return image_diagonal(self.shape, self.require_spacing())

    def require_spacing(self) -> Spacing:
        if self.spacing is None:
            raise ValueError("distance metrics need the voxel spacing (z, y, x) in mm")
        return self.spacing


def union_bounding_box(pred: np.ndarray, gt: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the union's bounding box grown by ``margin`` voxels, clipped to the image."""
    union = pred | gt
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=others))
        if hits.size == 0:
            return tuple(slice(0, 0) for _ in range(union.ndim))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, union.shape[axis])))
    return tuple(box)


def prepare(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> MaskPair:
    """Validate a (prediction, ground truth) pair and crop both to their union plus a margin."""
    pred_mask, gt_mask = as_mask(pred, "pred"), as_mask(gt, "gt")
    if pred_mask.shape != gt_mask.shape:
        raise ValueError(f"pred shape {pred_mask.shape} differs from gt shape {gt_mask.shape}")
    box = union_bounding_box(pred_mask, gt_mask, CROP_MARGIN)
    return MaskPair(
        pred=pred_mask[box],
        gt=gt_mask[box],
        shape=pred_mask.shape,  # type: ignore[arg-type]
        spacing=None if spacing is None else as_spacing(spacing),
        n_pred=int(np.count_nonzero(pred_mask)),
        n_gt=int(np.count_nonzero(gt_mask)),
    )


def ratio(numerator: float, denominator: float, pair: MaskPair) -> float:
    """``numerator / denominator``, and for ``0 / 0`` 1.0 when both masks are empty, else 0.0."""
    if denominator == 0:
        return 1.0 if pair.both_empty else 0.0
    return float(numerator) / float(denominator)
