"""The head around the vessels: soft tissue, skull base, calvarium, reconstruction cylinder.

Everything here lives in voxel index coordinates (z, y, x), z pointing up (index 0 is the
most inferior slice, where the internal carotid artery enters through the skull base).
Structures are analytic (a height map, a spherical shell), so that the vessel tree can ask
"how far am I from the bone?" at any point while it grows, and the intensities can be
evaluated slab by slab without ever holding more than one float32 volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from phantoms.profiles import SiteProfile

AIR_HU = -1000.0
TRUNK_ENTRY_DEPTH = 2.0
"""The trunk starts this many voxels below the bottom slice."""


def _gaussian_interpolation_matrix(n: int, cell: float) -> sparse.csr_array:
    """Sparse weights (n x m) that resample m coarse nodes, `cell` voxels apart, onto n voxels.

    Row i holds exp(-(x_i - c_j)^2 / (2 s^2)), s = 0.7 cell, cut at 3 s and normalised to
    unit L2 norm, so that iid unit-variance node values give a smooth field of unit variance
    at every voxel (the variance of a weighted sum of iid values is the sum of the squared
    weights). About five non-zeros per row.
    """
    m = int(math.ceil(n / cell)) + 4
    nodes = (np.arange(m) - 2.0) * cell
    x = np.arange(n, dtype=np.float64)[:, None]
    sigma = 0.7 * cell
    w = np.exp(-((x - nodes[None, :]) ** 2) / (2.0 * sigma**2))
    w[np.abs(x - nodes[None, :]) > 3 * sigma] = 0.0
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    return sparse.csr_array(w.astype(np.float32))


def _resample_axis(values: np.ndarray, weights: sparse.csr_array, axis: int) -> np.ndarray:
    """Apply `weights` (n x m) along `axis` (length m) of `values`, giving length n."""
    moved = np.moveaxis(values, axis, 0)
    flat = weights @ moved.reshape(moved.shape[0], -1)
    return np.moveaxis(flat.reshape((weights.shape[0], *moved.shape[1:])), 0, axis)


class SmoothField:
    """Smooth random field of unit variance, correlation length ~`cell` voxels.

    Coarse iid normal nodes are interpolated with separable, banded Gaussian weights: the
    in-plane products once (a (nodes_z, Y * X) plane), the z product per slab, so a
    512x512x400 field never exists as a whole and costs well under a second.
    """

    def __init__(self, shape: tuple[int, ...], cell: float, rng: np.random.Generator) -> None:
        weights = [_gaussian_interpolation_matrix(n, cell) for n in shape]
        field = rng.standard_normal(tuple(w.shape[1] for w in weights), dtype=np.float32)
        for axis in range(1, len(shape)):
            field = _resample_axis(field, weights[axis], axis)
        self._shape = tuple(shape)
        self._wz = weights[0]
        self._plane = np.ascontiguousarray(field.reshape(field.shape[0], -1), dtype=np.float32)

    def full(self) -> np.ndarray:
        """The whole field (float32); meant for 2D fields and small volumes."""
        return self.slab(0, self._shape[0])

    def slab(self, z0: int, z1: int) -> np.ndarray:
        """Rows z0:z1 along the first axis, shape (z1 - z0, *shape[1:]), float32."""
        out = self._wz[z0:z1] @ self._plane
        return np.asarray(out, dtype=np.float32).reshape((z1 - z0, *self._shape[1:]))


@dataclass
class Anatomy:
    """Analytic head: skull-base height map, calvarium shell, reconstruction cylinder."""

    shape: tuple[int, int, int]
    base_height: np.ndarray
    """Top surface of the skull base, z (voxels) as a function of (y, x)."""
    base_grad: tuple[np.ndarray, np.ndarray]
    """d(base_height)/dy and d/dx, for the surface normal."""
    base_thickness: np.ndarray
    """Thickness (voxels) of the skull base below its top surface, as a function of (y, x)."""
    air_cells: list[tuple[np.ndarray, np.ndarray]]
    """Air-filled sinus and mastoid cells: (centre, semi-axes), voxels."""
    skull_centre: np.ndarray
    skull_inner_radius: float
    skull_thickness: float
    cortical_thickness: float
    scalp_thickness: float
    fov_centre: tuple[float, float]
    fov_radius: float | None

    def domain(self, p: np.ndarray, trunk: bool) -> tuple[float, np.ndarray, bool]:
        """Signed distance (voxels, > 0 inside) from `p` to the boundary of the space where
        arteries may run, the inward unit normal of the nearest boundary, and whether that
        boundary is bone (True) or merely the edge of the reconstructed field of view.

        The space is the intersection of the volume, the reconstruction cylinder, the inside
        of the calvarium and the space above the skull base. The trunk starts just below the
        bottom face and may cross the skull base: it enters through the carotid canal.
        """
        z, y, x = float(p[0]), float(p[1]), float(p[2])
        nz, ny, nx = self.shape
        best = (math.inf, (0.0, 0.0, 0.0), False)
        faces = (
            (nz - 1 - z, (-1.0, 0.0, 0.0)),
            (y, (0.0, 1.0, 0.0)),
            (ny - 1 - y, (0.0, -1.0, 0.0)),
            (x, (0.0, 0.0, 1.0)),
            (nx - 1 - x, (0.0, 0.0, -1.0)),
        )
        for sd, normal in faces:
            if sd < best[0]:
                best = (sd, normal, False)
        bottom = z + (TRUNK_ENTRY_DEPTH if trunk else 0.0)
        if bottom < best[0]:
            best = (bottom, (1.0, 0.0, 0.0), False)
        if self.fov_radius is not None:
            dy, dx = y - self.fov_centre[0], x - self.fov_centre[1]
            rho = math.hypot(dy, dx) + 1e-9
            sd = self.fov_radius - rho
            if sd < best[0]:
                best = (sd, (0.0, -dy / rho, -dx / rho), False)
        cz, cy, cx = self.skull_centre
        dz, dy, dx = z - cz, y - cy, x - cx
        r = math.sqrt(dz * dz + dy * dy + dx * dx) + 1e-9
        sd = self.skull_inner_radius - r
        if sd < best[0]:
            best = (sd, (-dz / r, -dy / r, -dx / r), True)
        if not trunk:
            iy = min(max(int(round(y)), 0), ny - 1)
            ix = min(max(int(round(x)), 0), nx - 1)
            gy, gx = float(self.base_grad[0][iy, ix]), float(self.base_grad[1][iy, ix])
            norm = math.sqrt(1.0 + gy * gy + gx * gx)
            sd = (z - float(self.base_height[iy, ix])) / norm
            if sd < best[0]:
                best = (sd, (1.0 / norm, -gy / norm, -gx / norm), True)
        return best[0], np.asarray(best[1]), best[2]

    def base_top(self, p: np.ndarray) -> float:
        """Height (z, voxels) of the skull base's top surface under the point p."""
        iy = min(max(int(round(float(p[1]))), 0), self.shape[1] - 1)
        ix = min(max(int(round(float(p[2]))), 0), self.shape[2] - 1)
        return float(self.base_height[iy, ix])

    def fov_mask(self) -> np.ndarray | None:
        """In-plane boolean mask (Y, X) of the reconstructed cylinder, None if unbounded."""
        if self.fov_radius is None:
            return None
        yy, xx = np.ogrid[: self.shape[1], : self.shape[2]]
        rho2 = (yy - self.fov_centre[0]) ** 2 + (xx - self.fov_centre[1]) ** 2
        return rho2 <= self.fov_radius**2


def _air_cells(
    height: np.ndarray,
    thickness: np.ndarray,
    ridge_dist: np.ndarray,
    rng: np.random.Generator,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A sphenoid sinus under the skull base and a few mastoid cells inside the ridge."""
    ny, nx = height.shape
    n = min(ny, nx)
    cells = []
    iy, ix = int(ny * rng.uniform(0.3, 0.7)), int(nx * rng.uniform(0.3, 0.7))
    axes = n * rng.uniform(0.06, 0.11, 3)
    cells.append((np.array([height[iy, ix] - thickness[iy, ix] - 0.4 * axes[0], iy, ix]), axes))
    on_ridge = np.flatnonzero((np.abs(ridge_dist) < 0.05 * n).ravel())
    for flat in rng.choice(on_ridge, size=min(len(on_ridge), int(rng.integers(3, 8)))):
        iy, ix = divmod(int(flat), nx)
        depth = rng.uniform(0.3, 0.7) * thickness[iy, ix]
        cells.append((np.array([height[iy, ix] - depth, iy, ix]), n * rng.uniform(0.015, 0.035, 3)))
    return cells


def _skull_base(
    shape: tuple[int, int, int], amount: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Top-surface height and thickness maps (voxels) of the skull base, and its air cells.

    A rough plate at ~17% of the height, thickened and raised along a petrous ridge that
    runs obliquely across the volume; `amount` scales heights and thicknesses.
    """
    nz, ny, nx = shape
    n = min(shape)
    plate = SmoothField((ny, nx), max(ny, nx) / 5.0, rng).full()
    angle = rng.uniform(0.0, math.pi)
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    offset = rng.uniform(-0.15, 0.15) * n
    dist = (yy - ny / 2) * math.cos(angle) - (xx - nx / 2) * math.sin(angle) - offset
    ridge = np.exp(-(dist**2) / (2 * (0.08 * n) ** 2))
    height = nz * (0.17 * amount + 0.035 * plate + 0.08 * amount * ridge)
    thickness = nz * amount * (0.06 + 0.01 * plate + 0.1 * ridge)
    height, thickness = height.astype(np.float32), thickness.astype(np.float32)
    return height, thickness, _air_cells(height, thickness, dist, rng)


def _calvarium(
    shape: tuple[int, int, int], thickness: float, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Centre and inner radius (voxels) of a spherical skull whose shell cuts the upper
    corners of the volume: the inner surface passes between the top face's centre and its
    farthest corner, so vessels have room under it and the shell shows in most volumes."""
    nz, ny, nx = shape
    centre = np.array(
        [nz * rng.uniform(0.05, 0.25), ny * rng.uniform(0.42, 0.58), nx * rng.uniform(0.42, 0.58)]
    )
    corner = np.array(
        [nz - 1.0, 0.0 if centre[1] > ny / 2 else ny - 1.0, 0.0 if centre[2] > nx / 2 else nx - 1.0]
    )
    far = float(np.linalg.norm(corner - centre))
    top = nz - 1.0 - centre[0]
    return centre, top + rng.uniform(0.35, 0.75) * (far - top) - thickness * 0.5


def make_anatomy(
    shape: tuple[int, int, int], spacing: float, profile: SiteProfile, rng: np.random.Generator
) -> Anatomy:
    """Draw a skull base and a calvarium that fit the field of view.

    Sizes are physical (calvarium ~6 mm, cortex ~1.5 mm, scalp ~5 mm) but capped by a
    fraction of the field of view, so that a 64^3 test volume still holds bone of every kind.
    """
    _, ny, nx = shape
    n = min(shape)
    height, base_thickness, air_cells = _skull_base(shape, profile.bone_amount, rng)
    grad = np.gradient(height)
    thickness = min(6.0 / spacing, 0.12 * n) * profile.bone_amount
    centre, inner = _calvarium(shape, thickness, rng)
    fov_radius = None
    if profile.fov_radius is not None:
        fov_radius = profile.fov_radius * 0.5 * min(ny, nx)
    return Anatomy(
        shape=shape,
        base_height=height,
        base_grad=(grad[0].astype(np.float32), grad[1].astype(np.float32)),
        base_thickness=base_thickness,
        air_cells=air_cells,
        skull_centre=centre,
        skull_inner_radius=float(inner),
        skull_thickness=float(thickness),
        cortical_thickness=float(max(2.0, min(1.5 / spacing, 0.3 * thickness))),
        scalp_thickness=float(min(5.0 / spacing, 0.1 * n)),
        fov_centre=((ny - 1) / 2.0, (nx - 1) / 2.0),
        fov_radius=fov_radius,
    )


def _ramp(x: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy of a voxel whose centre is `x` voxels inside a surface."""
    return np.clip(x + 0.5, 0.0, 1.0)


def skull_base_slab(anatomy: Anatomy, z: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Occupancy and cortical fraction of the skull-base plate in slices `z` (None if the
    slab misses it): depth below the top surface, cortical at both faces of the plate."""
    top = anatomy.base_height
    if z[0] > top.max() + 1 or z[-1] < (top - anatomy.base_thickness).min() - 1:
        return None
    depth = top[None] - z[:, None, None]
    thick = anatomy.base_thickness[None]
    tc = anatomy.cortical_thickness
    occupancy = _ramp(depth) * _ramp(thick - depth)
    cortical = np.maximum(_ramp(tc - depth), _ramp(depth - (thick - tc)))
    return occupancy, cortical


def calvarium_slab(
    anatomy: Anatomy, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Occupancy and cortical fraction of the calvarium (inner table, diploe, outer table),
    and the fractions outside the skull and in the air beyond the scalp, for slices `z`;
    None where the whole slab lies inside the skull."""
    _, ny, nx = anatomy.shape
    cz, cy, cx = anatomy.skull_centre
    yy, xx = np.ogrid[:ny, :nx]
    rho2 = ((yy - cy) ** 2 + (xx - cx) ** 2).astype(np.float32)
    dz2 = ((z - np.float32(cz)) ** 2)[:, None, None]
    if math.sqrt(float(rho2.max() + dz2.max())) < anatomy.skull_inner_radius - 1:
        return None
    s = np.sqrt(rho2[None] + dz2) - np.float32(anatomy.skull_inner_radius)
    t, tc = anatomy.skull_thickness, anatomy.cortical_thickness
    occupancy = _ramp(s) * _ramp(t - s)
    cortical = np.maximum(_ramp(tc - s), _ramp(s - (t - tc)))
    return occupancy, cortical, _ramp(s - t), _ramp(s - t - anatomy.scalp_thickness)


def tissue_and_bone_slab(
    anatomy: Anatomy,
    profile: SiteProfile,
    z0: int,
    z1: int,
    texture: np.ndarray,
    grain: np.ndarray,
    canal: np.ndarray | None,
) -> np.ndarray:
    """Noise-free intensities (HU, float32) of slices z0:z1 before vessels are added.

    I = (1 - b) * T + b * B, with T soft tissue (brain, or scalp and air outside the
    skull) carrying a smooth texture, b the bone occupancy and B the bone intensity:
    cortical near the surfaces of skull base and calvarium, trabecular inside, modulated
    by a finer random grain. `canal` (bool, same slab) carves the carotid canal out of the
    bone; air cells are carved last.
    """
    z = np.arange(z0, z1, dtype=np.float32)
    out = np.float32(profile.tissue_hu) + np.float32(profile.texture_hu) * texture
    base, shell = skull_base_slab(anatomy, z), calvarium_slab(anatomy, z)
    if shell is not None:
        outside, air = shell[2], shell[3]
        scalp = (1 - air) * np.float32(profile.tissue_hu - 25.0) + air * np.float32(AIR_HU)
        out = (1 - outside) * out + outside * scalp
    if base is not None and shell is not None:
        cortical = np.where(base[0] >= shell[0], base[1], shell[1])
        bone = np.maximum(base[0], shell[0])
    elif base is not None or shell is not None:
        bone, cortical = (base if base is not None else shell)[:2]
    else:
        bone = None
    if bone is not None:
        if canal is not None:
            bone *= ~canal
        contrast = np.float32(profile.cortical_hu - profile.diploe_hu)
        bone_hu = np.float32(profile.diploe_hu) + contrast * cortical
        bone_hu *= 1.0 + np.float32(0.18) * grain
        out += bone * (bone_hu - out)
    for centre, axes in anatomy.air_cells:
        _carve_air(out, z0, centre, axes)
    return out.astype(np.float32, copy=False)


def _carve_air(slab: np.ndarray, z0: int, centre: np.ndarray, axes: np.ndarray) -> None:
    """Fill an axis-aligned ellipsoid with air, in place, on its bounding box only.

    Occupancy is the ramp of (1 - q) * min(axes), q = sqrt(sum(((p - c) / axes)^2)), a
    partial-volume edge about one voxel wide.
    """
    lo = np.floor(centre - axes - 1).astype(int)
    hi = np.ceil(centre + axes + 1).astype(int) + 1
    lo[0], hi[0] = max(lo[0], z0), min(hi[0], z0 + slab.shape[0])
    lo[1:] = np.maximum(lo[1:], 0)
    hi[1:] = np.minimum(hi[1:], slab.shape[1:])
    if np.any(hi <= lo):
        return
    grids = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    q = sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, axes, strict=True))
    air = _ramp((1 - np.sqrt(q)) * float(axes.min())).astype(np.float32)
    view = slab[lo[0] - z0 : hi[0] - z0, lo[1] : hi[1], lo[2] : hi[2]]
    view *= 1 - air
    view += air * np.float32(AIR_HU)
