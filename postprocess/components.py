"""Remove small disconnected fragments from a binary vessel mask.

A cerebral artery tree segmented from 3DRA is one large connected structure (plus, at most, a
few large pieces where the field of view cuts it); false positives are small isolated blobs
(noise, bone edges, metal streaks). Components are found with 26-connectivity (voxels that
share a face, an edge or a corner are connected: a thin oblique vessel stays one piece), by
``cc3d`` (Silversmith, connected-components-3d). A component is kept when both

    volume_mm3   >= min_volume_mm3                      (absolute physical size), and
    voxels       >= min_fraction_of_largest * largest   (relative to the main tree),

where ``volume_mm3 = voxels * prod(spacing)``. The thresholds are physical, so they mean the
same at every resolution.

A third criterion, off by default, asks for confidence instead of size (hysteresis
thresholding, as Canny's edges): a component of the mask (probability > 0.5) is kept only
when its most confident voxel reaches ``min_peak_probability``. A true vessel cut off by the
field of view is small but confidently seen; a false blob on a bone edge or in noise is
seldom certain anywhere. It needs the probability map, which the predictor holds.

The thresholds come from the weights manifest's ``postprocess`` dict (keys as in
:class:`CleaningSettings`), falling back to :data:`DEFAULT_SETTINGS`; callers may override
single keys.

Defaults: ``min_volume_mm3 = 1.0`` (about 85 voxels at 0.227 mm, a sphere of 1.2 mm diameter:
smaller than any vessel segment worth reporting, larger than speckle), and
``min_fraction_of_largest = 0.01`` (fragments below 1 % of the main tree).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import cc3d
import numpy as np

CONNECTIVITY = 26


@dataclass(frozen=True)
class CleaningSettings:
    """Thresholds of :func:`clean_mask`; 0 disables a criterion."""

    min_volume_mm3: float = 1.0
    min_fraction_of_largest: float = 0.01
    min_peak_probability: float = 0.0

    @classmethod
    def from_dict(cls, settings: dict | None, **overrides) -> CleaningSettings:
        """Settings from a manifest's ``postprocess`` dict; unknown keys raise, ``None`` overrides
        are ignored."""
        merged = dict(settings or {})
        merged.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"unknown postprocess settings {unknown}; known: {sorted(known)}")
        result = replace(DEFAULT_SETTINGS, **{k: float(v) for k, v in merged.items()})
        fractions = (result.min_fraction_of_largest, result.min_peak_probability)
        if result.min_volume_mm3 < 0 or not all(0 <= f <= 1 for f in fractions):
            raise ValueError(f"postprocess settings out of range: {result}")
        return result

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_SETTINGS = CleaningSettings()


def component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected component labels of ``mask`` and the voxel count of each label
    (``sizes[0]`` is the background)."""
    labels, count = cc3d.connected_components(
        mask, connectivity=CONNECTIVITY, return_N=True, binary_image=True
    )
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    return labels, sizes


def clean_mask(
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    settings: CleaningSettings = DEFAULT_SETTINGS,
    probability: np.ndarray | None = None,
) -> np.ndarray:
    """``mask`` (any integer or bool array, nonzero = vessel) without the components below the
    thresholds of ``settings``, as uint8 {0, 1}. ``spacing`` is in mm; ``probability`` (the
    mask's shape) is needed only by ``min_peak_probability``."""
    binary = np.asarray(mask) != 0
    if not binary.any():
        return binary.view(np.uint8)
    labels, sizes = component_sizes(binary)
    voxel_mm3 = float(np.prod(spacing))
    threshold = max(
        settings.min_volume_mm3 / voxel_mm3,
        settings.min_fraction_of_largest * sizes[1:].max(),
    )
    keep = sizes >= threshold
    if settings.min_peak_probability > 0:
        keep &= component_peaks(labels, binary, probability, len(sizes)) >= (
            settings.min_peak_probability
        )
    keep[0] = False
    if keep[1:].all():
        return binary.view(np.uint8)
    return keep.view(np.uint8)[labels]


def component_peaks(
    labels: np.ndarray, binary: np.ndarray, probability: np.ndarray | None, count: int
) -> np.ndarray:
    """The highest probability inside each of ``count`` labels (0 for the background)."""
    if probability is None or probability.shape != labels.shape:
        shape = None if probability is None else probability.shape
        raise ValueError(
            f"min_peak_probability needs the probability map of the mask's shape "
            f"{labels.shape}, got {shape}"
        )
    peaks = np.zeros(count, dtype=np.float32)
    np.maximum.at(peaks, labels[binary], probability[binary])  # vessel voxels only: a few %
    return peaks
