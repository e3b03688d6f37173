"""Remove small disconnected fragments from a binary vessel mask.

A cerebral artery tree segmented from 3DRA is one large connected structure (plus, at most, a
few large pieces where the field of view cuts it); false positives are small isolated blobs
(noise, bone edges, metal streaks). Components are found with 26-connectivity (voxels that
share a face, an edge or a corner are connected: a thin oblique vessel stays one piece), by
``cc3d`` (Silversmith, connected-components-3d). A component is kept when both

    volume_mm3   >= min_volume_mm3                      (absolute physical size), and
    voxels       >= min_fraction_of_largest * largest   (relative to the main tree),

where ``volume_mm3 = voxels * prod(spacing)``. The thresholds are physical, so they mean the
same at every resolution. They come from the weights manifest's ``postprocess`` dict (keys as
in :class:`CleaningSettings`), falling back to :data:`DEFAULT_SETTINGS`; callers may override
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
        if result.min_volume_mm3 < 0 or not 0 <= result.min_fraction_of_largest <= 1:
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
) -> np.ndarray:
    """``mask`` (any integer or bool array, nonzero = vessel) without the components below the
    thresholds of ``settings``, as uint8 {0, 1}. ``spacing`` is in mm."""
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
    keep[0] = False
    if keep[1:].all():
        return binary.view(np.uint8)
    return keep.view(np.uint8)[labels]
