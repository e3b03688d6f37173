"""Sliding-window prediction: window placement, Gaussian importance, stitching.

Windows follow nnU-Net (Isensee et al., Nature Methods 2021, ``compute_steps_for_sliding_window``):
along an axis of ``size`` voxels a window of ``patch`` voxels takes
``n = ceil((size - patch) / (patch * (1 - overlap))) + 1`` positions spread evenly from the
first to the last voxel, so every voxel is covered and no window leaves the volume. Windows are
the Cartesian product of the per-axis positions.

Each window's prediction is weighted by a Gaussian importance map centred on the window with
``sigma = sigma_scale * patch`` (``sigma_scale = 1/8`` as nnU-Net): voxels near a window's
border, which see less context, count less. The stitched value at voxel ``v`` is

    p(v) = sum_w g(v - s_w) p_w(v) / sum_w g(v - s_w),

and because the map is a product of 1D Gaussians and the windows are a Cartesian product, the
denominator is the outer product of three 1D sums: it is never stored as a full volume.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

SIGMA_SCALE = 1.0 / 8.0


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """First voxel of each window along one axis (``size >= patch``), nnU-Net's placement."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size < patch:
        raise ValueError(f"axis of {size} voxels is smaller than the patch ({patch}); pad first")
    if size == patch:
        return [0]
    target_step = max(patch * (1.0 - overlap), 1.0)
    count = math.ceil((size - patch) / target_step) + 1
    step = (size - patch) / (count - 1)
    return [round(step * i) for i in range(count)]


def gaussian_1d(patch: int, sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """``exp(-d^2 / (2 sigma^2))`` with ``d`` the distance to the window centre, maximum 1."""
    distance = np.arange(patch, dtype=np.float64) - (patch - 1) / 2.0
    sigma = sigma_scale * patch
    return np.exp(-(distance**2) / (2.0 * sigma**2))


@dataclass(frozen=True)
class WindowPlan:
    """Where the windows of one (padded) volume lie."""

    shape: tuple[int, int, int]
    patch: tuple[int, int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    @classmethod
    def create(cls, shape, patch, overlap: float) -> WindowPlan:
        shape, patch = tuple(int(s) for s in shape), tuple(int(p) for p in patch)
        starts = tuple(tuple(window_starts(s, p, overlap)) for s, p in zip(shape, patch))
        return cls(shape=shape, patch=patch, starts=starts)

    def __len__(self) -> int:
        return math.prod(len(s) for s in self.starts)

    def windows(self) -> Iterator[tuple[slice, slice, slice]]:
        """The windows as slices of the volume, in C order."""
        for corner in itertools.product(*self.starts):
            yield tuple(slice(c, c + p) for c, p in zip(corner, self.patch))

    def importance(self, sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
        """The 3D Gaussian importance map of one window, float32."""
        gz, gy, gx = (gaussian_1d(p, sigma_scale) for p in self.patch)
        return (gz[:, None, None] * gy[None, :, None] * gx[None, None, :]).astype(np.float32)

    def axis_normalizers(self, sigma_scale: float = SIGMA_SCALE) -> list[np.ndarray]:
        """Per axis, the sum of the 1D Gaussians of the windows covering each voxel; their outer
        product is the stitching denominator."""
        sums = []
        for size, patch, starts in zip(self.shape, self.patch, self.starts):
            total = np.zeros(size, dtype=np.float64)
            weights = gaussian_1d(patch, sigma_scale)
            for start in starts:
                total[start : start + patch] += weights
            sums.append(total)
        return sums


def normalize_in_place(accumulator, plan: WindowPlan, passes: int, as_array=np.asarray):
    """Divide a stitched sum by ``passes`` times the Gaussian denominator, axis by axis, in place.

    ``accumulator`` is a numpy array or a torch tensor; ``as_array`` turns a float32 numpy vector
    into the same kind (e.g. a tensor on the accumulator's device).
    """
    nz, ny, nx = plan.axis_normalizers()
    accumulator /= as_array((nz * passes).astype(np.float32))[:, None, None]
    accumulator /= as_array(ny.astype(np.float32))[None, :, None]
    accumulator /= as_array(nx.astype(np.float32))[None, None, :]
    return accumulator


def pad_to_patch(volume: np.ndarray, patch) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """``volume`` padded with zeros, centred, to at least ``patch`` along every axis, and the
    slices that crop the padding away again. Unchanged (no copy) when already large enough."""
    pads = [max(p - s, 0) for s, p in zip(volume.shape, patch)]
    if not any(pads):
        return volume, tuple(slice(0, s) for s in volume.shape)
    widths = [(pad // 2, pad - pad // 2) for pad in pads]
    padded = np.pad(volume, widths, mode="constant", constant_values=0)
    crop = tuple(slice(before, before + s) for (before, _), s in zip(widths, volume.shape))
    return padded, crop


def mirror_axes(tta: bool) -> list[tuple[int, ...]]:
    """Flip combinations for mirroring test-time augmentation over the three spatial axes
    (nnU-Net's 8 passes); only the identity without TTA."""
    if not tta:
        return [()]
    axes = (0, 1, 2)
    return [combo for r in range(4) for combo in itertools.combinations(axes, r)]
