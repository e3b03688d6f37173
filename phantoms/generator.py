"""One synthetic 3DRA case: anatomy -> vessel tree -> imaging chain -> 16-bit volume + label.

Full-size arrays: the float32 image being formed, the float32 vessel signal, the bool label
and the bool carotid canal; tissue, bone and noise are evaluated slab by slab.
"""

from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial.transform import Rotation

from phantoms.anatomy import Anatomy, SmoothField, make_anatomy, tissue_and_bone_slab
from phantoms.imaging import (
    Streak,
    blur_in_place,
    gaussian_noise_gain,
    make_streaks,
    noise_std,
    quantise,
)
from phantoms.profiles import DEFAULT_PROFILE, SiteProfile
from phantoms.raster import rasterise_tree
from phantoms.tree import KIND_TRUNK, VesselTree, grow_tree

SLAB = 16
"""Slices evaluated at a time (bounds the temporaries; also fixes the noise draw order)."""
TEXTURE_MM = 4.0
"""Correlation length of the soft-tissue texture (at most a quarter of the volume)."""
GRAIN_MM = 0.6
"""Correlation length of the trabecular grain of bone (at least two voxels)."""


@dataclass
class Phantom:
    """A generated case as arrays (numpy order z, y, x) and its world geometry (x, y, z)."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    """Row-major 3x3 rotation, as SimpleITK's SetDirection takes it."""
    tree: VesselTree
    profile: SiteProfile

    def to_sitk(self) -> tuple[sitk.Image, sitk.Image]:
        """The image and label as SimpleITK images sharing this geometry."""
        out = []
        for array in (self.image, self.label):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing(self.spacing)
            img.SetOrigin(self.origin)
            img.SetDirection(self.direction)
            out.append(img)
        return out[0], out[1]


def check_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The shape as three ints (Z, Y, X), each at least 32; ValueError otherwise."""
    if len(shape) != 3 or any(int(s) < 32 for s in shape):
        raise ValueError(f"shape must be three sizes (Z, Y, X) of at least 32, got {shape}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def check_request(
    shape: tuple[int, ...], spacing: float, dtype: type[np.integer]
) -> tuple[int, int, int]:
    """The shape as three ints, once shape, spacing and 16-bit dtype are valid (ValueError
    otherwise); shared by every generator of volumes."""
    shape = check_shape(tuple(shape))
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    if np.dtype(dtype) not in (np.dtype(np.int16), np.dtype(np.uint16)):
        raise ValueError(f"dtype must be int16 or uint16, got {np.dtype(dtype)}")
    return shape


def random_geometry(
    shape: tuple[int, int, int], spacing: float, rng: np.random.Generator
) -> tuple[tuple[float, float, float], tuple[float, ...]]:
    """Origin and direction of a volume tilted by a few degrees around a random centre.

    The direction is a proper rotation (orthonormal, det +1) drawn as a rotation vector with
    3 degree standard deviation per axis; the origin places the volume's centre at a point
    within ~10 mm of the world origin, as a patient-centred reconstruction would.
    """
    rot = Rotation.from_rotvec(rng.normal(0.0, np.radians(3.0), 3)).as_matrix()
    half_xyz = (np.array(shape[::-1], dtype=np.float64) - 1) * spacing / 2
    centre = rng.normal(0.0, 10.0, 3)
    origin = centre - rot @ half_xyz
    return tuple(float(v) for v in np.round(origin, 4)), tuple(float(v) for v in rot.ravel())


def keep_main_tree(label: np.ndarray, signal: np.ndarray) -> int:
    """Keep the largest 26-connected component of the lumen; erase the rest from the label
    and (with a 2-voxel margin) from the vessel signal, so that nothing visible is left
    unlabelled. Returns the number of components found. The tree is connected by
    construction (see phantoms.tree); this enforces it where the field of view cuts it.
    """
    components, n = cc3d.connected_components(label, connectivity=26, return_N=True)
    if n <= 1:
        return n
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = components == np.argmax(sizes)
    drop = label & ~keep
    signal[ndimage.binary_dilation(drop, iterations=2) & ~keep] = 0
    label &= keep
    return n


def _draw_vessels(
    tree: VesselTree, anatomy: Anatomy, spacing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lumen label (bool), vessel signal (float32 occupancy x opacification) and carotid
    canal (bool: the trunk inflated by 0.3 mm, where the skull base is hollowed out)."""
    shape = anatomy.shape
    label = np.zeros(shape, dtype=bool)
    signal = np.zeros(shape, dtype=np.float32)
    canal = np.zeros(shape, dtype=bool)
    rasterise_tree(tree, shape, label, signal, canal, (KIND_TRUNK,), max(1.0, 0.3 / spacing))
    fov = anatomy.fov_mask()
    if fov is not None:  # the scanner reconstructs nothing outside its cylinder
        label &= fov[None]
    keep_main_tree(label, signal)
    return label, signal, canal


def _streak_sources(tree: VesselTree, anatomy: Anatomy) -> list[np.ndarray]:
    """Dense objects that streak: the first aneurysm sac and the top of the petrous ridge."""
    iy, ix = np.unravel_index(np.argmax(anatomy.base_height), anatomy.base_height.shape)
    ridge = np.array([anatomy.base_height[iy, ix], iy, ix], dtype=np.float64)
    return [*tree.aneurysm_centres[:1], ridge]


def _acquire(
    anatomy: Anatomy,
    profile: SiteProfile,
    spacing: float,
    fields: tuple[SmoothField, SmoothField],
    signal: np.ndarray,
    canal: np.ndarray,
    streaks: list[Streak],
    rng: np.random.Generator,
    dtype: type[np.integer],
) -> np.ndarray:
    """The imaging chain, slab by slab: tissue and bone, vessels on top
    (I <- I (1 - min(v, 1)) + HU_vessel v), Poisson-Gaussian noise, Gaussian PSF over the
    whole volume (which also correlates the noise, as reconstruction does), streaks, the
    reconstruction cylinder, and quantisation to `dtype`."""
    shape = anatomy.shape
    texture, grain = fields
    sigma = profile.psf_sigma_mm / spacing
    pre_noise = profile.noise_hu / gaussian_noise_gain(sigma)
    image = np.empty(shape, dtype=np.float32)
    for z0 in range(0, shape[0], SLAB):
        z1 = min(z0 + SLAB, shape[0])
        slab = tissue_and_bone_slab(
            anatomy, profile, z0, z1, texture.slab(z0, z1), grain.slab(z0, z1), canal[z0:z1]
        )
        vessel = signal[z0:z1]
        slab *= 1 - np.minimum(vessel, 1)
        slab += np.float32(profile.vessel_hu) * vessel
        std = noise_std(slab, pre_noise, profile.noise_signal_gain, profile.tissue_hu)
        slab += std * rng.standard_normal(slab.shape, dtype=np.float32)
        image[z0:z1] = slab
    blur_in_place(image, sigma)
    fov = anatomy.fov_mask()
    out = np.empty(shape, dtype=dtype)
    for z0 in range(0, shape[0], SLAB):
        z1 = min(z0 + SLAB, shape[0])
        slab = image[z0:z1]
        for streak in streaks:
            slab += streak.weights(z0, z1) * streak.pattern
        if fov is not None:
            slab[:, ~fov] = profile.outside_hu
        out[z0:z1] = quantise(slab, dtype)
    return out


def generate_volume(
    shape: tuple[int, int, int] = (128, 128, 128),
    seed: int = 0,
    spacing: float = 0.227,
    profile: SiteProfile | None = None,
    dtype: type[np.integer] = np.int16,
) -> Phantom:
    """Generate one phantom as arrays; see :func:`generate_case` for the images."""
    shape = check_request(shape, spacing, dtype)
    profile = profile or DEFAULT_PROFILE
    rng = np.random.default_rng(seed)
    anatomy = make_anatomy(shape, spacing, profile, rng)
    texture = SmoothField(shape, min(TEXTURE_MM / spacing, min(shape) / 4), rng)
    grain = SmoothField(shape, max(2.0, GRAIN_MM / spacing), rng)
    tree = grow_tree(anatomy, spacing, profile, rng)
    label, signal, canal = _draw_vessels(tree, anatomy, spacing)
    origin, direction = random_geometry(shape, spacing, rng)
    streaks = []
    if profile.streak_hu:
        streaks = make_streaks(anatomy, _streak_sources(tree, anatomy), profile.streak_hu, rng)
    image = _acquire(
        anatomy, profile, spacing, (texture, grain), signal, canal, streaks, rng, dtype
    )
    return Phantom(
        image=image,
        label=label.view(np.uint8),
        spacing=(spacing, spacing, spacing),
        origin=origin,
        direction=direction,
        tree=tree,
        profile=profile,
    )


def generate_case(
    shape: tuple[int, int, int] = (128, 128, 128),
    seed: int = 0,
    spacing: float = 0.227,
    profile: SiteProfile | None = None,
    *,
    dtype: type[np.integer] = np.int16,
) -> tuple[sitk.Image, sitk.Image]:
    """Generate one synthetic 3DRA case: a 16-bit image and its uint8 {0, 1} vessel label.

    `shape` is numpy order (Z, Y, X), so the SimpleITK size is (X, Y, Z); `spacing` is
    isotropic (mm). Both images share spacing, a non-trivial origin and a small rotation as
    direction. Intensities are Hounsfield-like (int16; uint16 stores HU + 1024, clipped at
    0, as CT scanners' raw values do). The same (shape, seed, spacing, profile) gives the
    same voxels.
    """
    return generate_volume(shape, seed, spacing, profile, dtype).to_sitk()
