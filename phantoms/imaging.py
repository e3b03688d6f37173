"""How the C-arm sees the head: point spread, noise, streaks, 16-bit quantisation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from phantoms.anatomy import Anatomy

UNSIGNED_OFFSET = 1024.0
"""Added before storing as an unsigned type, so that air (-1000 HU) stays positive."""


def gaussian_noise_gain(sigma_voxels: float) -> float:
    """L2 norm of the discrete 3D Gaussian kernel that scipy applies for `sigma_voxels`.

    Blurring white noise of std s with kernel k leaves std s * ||k||_2; ||k||_2 of a
    separable kernel is the product of its 1D norms. Used to pre-scale the noise that is
    added before the point-spread blur, so that the final noise has the profile's std.
    """
    if sigma_voxels <= 0:
        return 1.0
    radius = int(4.0 * sigma_voxels + 0.5)
    delta = np.zeros(2 * radius + 1)
    delta[radius] = 1.0
    k1 = ndimage.gaussian_filter1d(delta, sigma_voxels, mode="constant")
    return float(np.sqrt(np.sum(k1**2)) ** 3)


def noise_std(signal: np.ndarray, noise_hu: float, gain: float, tissue_hu: float) -> np.ndarray:
    """Poisson-Gaussian noise model (Foi et al. 2008, IEEE TIP 17:1737):
    var = noise_hu^2 * max(0.25, 1 + gain * (I - I_tissue) / 1000), float32."""
    rel = np.float32(gain / 1000.0) * (signal - np.float32(tissue_hu)) + np.float32(1.0)
    np.maximum(rel, np.float32(0.25), out=rel)
    return np.sqrt(rel) * np.float32(noise_hu)


def blur_in_place(volume: np.ndarray, sigma_voxels: float) -> None:
    """Gaussian point-spread function, applied axis by axis into the same float32 array.

    scipy's 1D filters copy each line into a buffer before writing it, so filtering into the
    input array is safe and avoids a second full-size volume.
    """
    if sigma_voxels <= 0:
        return
    for axis in range(3):
        ndimage.gaussian_filter1d(volume, sigma_voxels, axis=axis, output=volume, mode="nearest")


@dataclass
class Streak:
    """In-plane streak pattern radiating from a dense object, faded along z."""

    pattern: np.ndarray
    z_centre: float
    z_half_width: float

    def weights(self, z0: int, z1: int) -> np.ndarray:
        """cos^2 envelope over slices z0:z1, shape (z1 - z0, 1, 1)."""
        z = np.arange(z0, z1, dtype=np.float32) - np.float32(self.z_centre)
        w = np.cos(np.clip(z / self.z_half_width, -1, 1) * (math.pi / 2)) ** 2
        return w.astype(np.float32)[:, None, None]


def make_streaks(
    anatomy: Anatomy,
    sources: list[np.ndarray],
    amplitude: float,
    rng: np.random.Generator,
) -> list[Streak]:
    """Streaks of cone-beam reconstruction: bright and dark lines in the axial plane (the
    C-arm's rotation plane) through dense objects (petrous bone, a contrast-filled sac),
    fading with distance from the object.
    Each line is A * exp(-d_perp^2 / (2 w^2)) * exp(-|d_along| / L), signs alternating."""
    _, ny, nx = anatomy.shape
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    fade = 0.5 * min(ny, nx)
    streaks = []
    for src in sources:
        pattern = np.zeros((ny, nx), np.float32)
        n_lines = int(rng.integers(6, 14))
        for j, theta in enumerate(rng.uniform(0, math.pi, n_lines)):
            c, s = math.cos(theta), math.sin(theta)
            dy, dx = yy - np.float32(src[1]), xx - np.float32(src[2])
            perp = -dy * s + dx * c
            along = np.abs(dy * c + dx * s)
            width = rng.uniform(1.0, 2.5)
            sign = 1.0 if j % 2 == 0 else -1.0
            amp = sign * amplitude * rng.uniform(0.4, 1.0)
            pattern += np.float32(amp) * np.exp(-(perp**2) / (2 * width**2) - along / fade)
        half_width = float(rng.uniform(0.04, 0.1) * anatomy.shape[0])
        streaks.append(Streak(pattern, float(src[0]), half_width))
    return streaks


def quantise(values: np.ndarray, dtype: type[np.integer]) -> np.ndarray:
    """Round to the nearest integer and clip to the range of `dtype` (16-bit output);
    unsigned types store values + UNSIGNED_OFFSET (so -1024 HU and below become 0)."""
    info = np.iinfo(dtype)
    out = np.rint(values)
    if info.min == 0:
        out += UNSIGNED_OFFSET
    np.clip(out, info.min, info.max, out=out)
    return out.astype(dtype)
