"""Domain-randomised 3DRA phantoms: the vessels' shapes are modelled, everything else is drawn.

A network trained on one generator's intensities and bone shapes learns that generator, not
vessels. Following SynthSeg (Billot et al. 2023, Med Image Anal 86:102789) and vesselFM's
domain-randomised generator (Wittmann et al. 2025, CVPR; ``vesselfm/d_drand``), every case
draws, independently:

* the vessels: one to three trees (:func:`phantoms.tree.grow_tree` with jittered calibre,
  length, tortuosity and branching; later trees flipped and turned to enter from other faces),
  a Circle-of-Willis-like ring with branches, stenoses and fusiform dilations, saccular
  aneurysms; a field of view that cuts them into several true components;
* the structures around them, each with its own random intensity, which may be brighter
  than, equal to or darker than the vessels: the reference skull base and calvarium, thin or
  thick curved bone shells and plates, skull-base-like blobs on one side of the volume, bright
  spots (calcifications, coils), each kept out of the lumen and, mostly, out of a canal
  around it, half of them cancellous (marrow spaces between trabeculae inside a cortex); air
  cells, and in a fifth of the cases air past the skin filling 10-60 % of the volume; a
  background of smooth textures at several scales and Voronoi cells, at a fraction of the
  vessel contrast, inverted with probability 0.3;
* the imaging: vessels painted over or added to what lies beneath, an (an)isotropic Gaussian
  point-spread with, in half the cases, a heavy tail (detector glare, scatter), white or
  correlated noise with a signal-dependent part, Rician noise, streaks, a multiplicative bias
  field, a gamma, the reconstruction cylinder or sphere filled with a constant at the
  minimum, and a random linear map to 16-bit values;
* with ``cone_beam`` (the family ``randomised-cone``, a candidate for the next version, not
  yet trained on: README, Pilot), the cone beam's own artefacts: additive low-frequency
  shading (scatter and cupping raise whole regions of tissue by up to half the vessel
  contrast, so that a vessel in a dark region is no brighter than the tissue of a bright
  one), a bright truncation rim inside the reconstruction's edge, and a scalp band under the
  skin where air is in view. They draw from a stream of their own: the same seed draws the
  same case, artefacts aside.

Intensities are drawn on a unit scale (tissue 0.2-0.6, vessel contrast 0.15-1.2 above it), so
that the vessels are sometimes barely above tissue and no global threshold segments them; the
texture and noise stay below the vessel contrast, so that every labelled vessel is visible.
The label is the lumen: every 26-connected piece the field of view leaves. A share of the
cases (:data:`REFERENCE_SHARE`) keeps the site's fixed reference look instead.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from phantoms.anatomy import (
    Anatomy,
    SmoothField,
    calvarium_slab,
    make_anatomy,
    skull_base_slab,
)
from phantoms.generator import Phantom, check_request, generate_volume, random_geometry
from phantoms.imaging import make_streaks
from phantoms.profiles import DEFAULT_PROFILE, SiteProfile
from phantoms.raster import rasterise_tree
from phantoms.tree import KIND_ANEURYSM, MIN_RADIUS_VOXELS, VesselTree, grow_tree

UNIT = np.float32
REFERENCE_SHARE = 0.5
"""Cases drawn with the site's fixed reference look (phantoms.generator) instead: vesselFM
likewise mixes domain-randomised volumes with ones of a realistic look. At 0.3 the pilot's
model drew the reference family's vessels a voxel too wide (README, Pilot)."""
OUTSIDE_HEAD_SHARE = 0.2
"""Randomised cases whose field of view reaches past the skin into air (:func:`_skin_depth`)."""
PSF_TAIL_SHARE = 0.5
"""Randomised cases whose point-spread has a heavy tail (:func:`_add_psf_tail`)."""
CANCELLOUS_SHARE = 0.5
"""Bone structures whose interior is cancellous: marrow spaces between trabeculae."""
MAX_VESSEL_FRACTION = 0.03
"""No further tree is added once the lumen fills this fraction of the volume (3DRA: 1-3 %)."""
SHADING_SHARE = 0.5
"""Randomised cases with additive low-frequency shading (:func:`_shading`)."""
TRUNCATION_SHARE = 0.5
"""Randomised cases with a field of view whose edge carries a truncation rim
(:func:`_truncation_rim`)."""


# -- vessels ------------------------------------------------------------------------------


def _vessel_profile(profile: SiteProfile, rng: np.random.Generator) -> SiteProfile:
    """The site's vessel settings, each scaled by a random factor (sites stay non-IID)."""
    low, high = profile.length_factor
    stretch = rng.uniform(0.7, 1.3)
    return profile.replace(
        trunk_radius_mm=profile.trunk_radius_mm * rng.uniform(0.55, 1.25),
        min_radius_mm=profile.min_radius_mm * rng.uniform(0.8, 1.4),
        tortuosity=profile.tortuosity * rng.uniform(0.5, 1.8),
        side_branch_rate=profile.side_branch_rate * rng.uniform(0.3, 1.4),
        aneurysm_rate=profile.aneurysm_rate * rng.uniform(0.0, 1.6),
        length_factor=(low * stretch, high * stretch),
        contrast_jitter=rng.uniform(0.03, 0.25),
        fov_radius=None,  # the field of view is drawn later and cuts the vessels
    )


def _vary_calibre(tree: VesselTree, rng: np.random.Generator) -> None:
    """Stenoses (narrowing by 30-70 %) and fusiform dilations (50-150 % wider) on a few runs
    of contiguous segments of large vessels, as smooth Gaussian bumps of the radius."""
    large = np.flatnonzero((tree.kind != KIND_ANEURYSM) & (tree.r_start >= 1.5))
    for centre in rng.choice(large, size=min(large.size, int(rng.integers(0, 4))), replace=False):
        amplitude = -rng.uniform(0.3, 0.7) if rng.random() < 0.6 else rng.uniform(0.5, 1.5)
        half = int(rng.integers(3, 9))
        for j in range(centre - half, centre + half + 1):
            if not 0 <= j < len(tree.starts) or not _contiguous(tree, centre, j):
                continue
            for radii, offset in ((tree.r_start, j), (tree.r_end, j + 1)):
                bump = math.exp(-(((offset - centre) / (0.5 * half)) ** 2))
                radii[j] = max(MIN_RADIUS_VOXELS, radii[j] * (1 + amplitude * bump))


def _contiguous(tree: VesselTree, i: int, j: int) -> bool:
    """Whether segments i..j (either order) form one unbroken centreline."""
    lo, hi = min(i, j), max(i, j)
    return bool(np.allclose(tree.ends[lo:hi], tree.starts[lo + 1 : hi + 1]))


def _ring(shape: tuple[int, int, int], spacing: float, rng: np.random.Generator) -> VesselTree:
    """A closed, wobbly elliptical loop (Circle-of-Willis-like) in a random plane, with two
    to five short tapering branches leaving it outwards."""
    n = min(shape)
    axes = np.minimum(rng.uniform(3.0, 8.0, 2) / spacing, 0.3 * n)
    centre = np.asarray(shape) * rng.uniform(0.3, 0.7, 3)
    basis = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()
    radius = max(MIN_RADIUS_VOXELS, min(rng.uniform(0.35, 1.1) / spacing, 0.05 * n))
    theta = np.linspace(0, 2 * np.pi, 49)
    wobble = 1 + 0.12 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi))
    ring = centre + (
        np.outer(axes[0] * np.cos(theta) * wobble, basis[0])
        + np.outer(axes[1] * np.sin(theta) * wobble, basis[1])
    )
    starts, ends, r0, r1 = [ring[:-1]], [ring[1:]], [np.full(48, radius)], [np.full(48, radius)]
    for k in rng.choice(48, size=int(rng.integers(2, 6)), replace=False):
        out = ring[k] - centre
        direction = out / np.linalg.norm(out) + 0.5 * rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        tip = ring[k] + direction * rng.uniform(8, 20) * radius
        starts.append(ring[k][None])
        ends.append(tip[None])
        r0.append([0.8 * radius])
        r1.append([max(MIN_RADIUS_VOXELS, 0.5 * radius)])
    count = sum(len(r) for r in r0)
    return VesselTree(
        starts=np.concatenate(starts),
        ends=np.concatenate(ends),
        r_start=np.concatenate(r0).astype(np.float64),
        r_end=np.concatenate(r1).astype(np.float64),
        contrast=rng.uniform(0.8, 1.1, count),
        kind=np.zeros(count, dtype=np.int8),
    )


def _reorient(arrays: tuple[np.ndarray, ...], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The same random flips and (where sizes allow) axis swap applied to every array."""
    axes = list(range(3))
    i, j = rng.choice(3, size=2, replace=False)
    if arrays[0].shape[i] == arrays[0].shape[j]:
        axes[i], axes[j] = axes[j], axes[i]
    flips = [a for a in range(3) if rng.random() < 0.5]
    return tuple(np.ascontiguousarray(np.flip(np.transpose(a, axes), flips)) for a in arrays)


def draw_vessels(
    anatomy: Anatomy, spacing: float, profile: SiteProfile, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, VesselTree]:
    """Lumen label (bool), vessel signal (float32 occupancy x opacification) of one to three
    trees and, with probability 0.5, a ring; and the first tree (as grown, not turned)."""
    shape = anatomy.shape
    label = np.zeros(shape, dtype=bool)
    signal = np.zeros(shape, dtype=np.float32)
    trees = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    first = None
    for index in range(trees + (rng.random() < 0.5)):
        if label.mean() > MAX_VESSEL_FRACTION:
            break
        if index == 0:
            tree = grow_tree(anatomy, spacing, profile, rng)
        elif index < trees:  # a smaller artery entering elsewhere
            radius = profile.trunk_radius_mm * rng.uniform(0.4, 0.8)
            tree = grow_tree(anatomy, spacing, profile.replace(trunk_radius_mm=radius), rng)
        else:
            tree = _ring(shape, spacing, rng)
        _vary_calibre(tree, rng)
        one_label = np.zeros(shape, dtype=bool)
        one_signal = np.zeros(shape, dtype=np.float32)
        rasterise_tree(tree, shape, one_label, one_signal)
        if 0 < index < trees:
            one_label, one_signal = _reorient((one_label, one_signal), rng)
        first = first or tree
        label |= one_label
        np.maximum(signal, one_signal, out=signal)
    return label, signal, first


# -- structures around the vessels --------------------------------------------------------


def _ramp(x: np.ndarray) -> np.ndarray:
    return np.clip(x + 0.5, 0.0, 1.0).astype(UNIT)


def _grid(shape: tuple[int, int, int]) -> list[np.ndarray]:
    return [g.astype(UNIT) for g in np.ogrid[: shape[0], : shape[1], : shape[2]]]


def _half_thickness(shape, rng: np.random.Generator) -> float:
    """Half the thickness of a shell or plate (voxels): thin (1-4 voxels, a sinus wall, a
    thin calvarium) or thick (up to a third of the volume, a thick calvarium or skull base)
    with equal probability: large homogeneous bright regions must not pass for vessels."""
    if rng.random() < 0.5:
        return rng.uniform(0.5, 2.0)
    return rng.uniform(2.0, max(2.5, min(shape) / 6))


def _shell(shape, rng) -> np.ndarray:
    """A curved bone shell, thin or thick: part of an ellipsoid surface cut by a random plane
    (a calvarium over the brain, a sinus wall)."""
    n = np.asarray(shape, dtype=float)
    centre = n * rng.uniform(-0.2, 1.2, 3)
    axes = n.min() * rng.uniform(0.4, 1.2, 3)
    g = _grid(shape)
    q = np.sqrt(sum(((gi - c) / a) ** 2 for gi, c, a in zip(g, centre, axes)))
    distance = (q - 1) * UNIT(axes.min())
    occupancy = _ramp(UNIT(_half_thickness(shape, rng)) - np.abs(distance))
    normal = rng.normal(size=3)
    side = sum(gi * UNIT(v) for gi, v in zip(g, normal)) - UNIT(normal @ (n / 2))
    return occupancy * (side > rng.uniform(-0.3, 0.3) * n.min())


def _plate(shape, rng) -> np.ndarray:
    """A flat or gently curved plate of random orientation, thin or thick, on a disc."""
    n = np.asarray(shape, dtype=float)
    centre = n * rng.uniform(0.1, 0.9, 3)
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    g = _grid(shape)
    rel = [gi - UNIT(c) for gi, c in zip(g, centre)]
    height = sum(r * UNIT(v) for r, v in zip(rel, normal))
    bend = UNIT(rng.uniform(-1, 1) / n.min())
    in_plane2 = sum(r * r for r in rel) - height * height
    distance = height + bend * in_plane2
    radius = n.min() * rng.uniform(0.25, 0.7)
    return _ramp(UNIT(_half_thickness(shape, rng)) - np.abs(distance)) * _ramp(
        UNIT(radius) - np.sqrt(np.maximum(in_plane2, 0))
    )


def _blobs(shape, rng) -> np.ndarray:
    """Skull-base-like lumps: the top 1-10 % of a smooth random field, on one side of a
    random plane (bone sits at the skull base, not everywhere)."""
    field = SmoothField(shape, rng.uniform(5, 14), rng).full()
    threshold = np.quantile(field[::4, ::4, ::4], rng.uniform(0.9, 0.99))
    lumps = np.clip((field - threshold) * UNIT(4.0), 0, 1).astype(UNIT)
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    n = np.asarray(shape, dtype=float)
    side = sum(gi * UNIT(v) for gi, v in zip(_grid(shape), normal)) - UNIT(normal @ (n / 2))
    return lumps * _ramp(side / UNIT(4.0) + UNIT(rng.uniform(-0.3, 0.3) * n.min() / 4.0))


def _spots(shape, rng) -> np.ndarray:
    """One to fifteen small dense spheres, radius 0.7-3 voxels (calcifications, clips)."""
    occupancy = np.zeros(shape, dtype=UNIT)
    for _ in range(int(rng.integers(1, 16))):
        centre = np.asarray(shape) * rng.uniform(0.05, 0.95, 3)
        radius = rng.uniform(0.7, 3.0)
        lo = np.maximum(np.floor(centre - radius - 1).astype(int), 0)
        hi = np.minimum(np.ceil(centre + radius + 2).astype(int), shape)
        g = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        d = np.sqrt(sum((gi - c) ** 2 for gi, c in zip(g, centre)))
        box = occupancy[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        np.maximum(box, _ramp(radius - d), out=box)
    return occupancy


def _reference_skull(anatomy: Anatomy) -> np.ndarray:
    """Occupancy of the reference skull base and calvarium (phantoms.anatomy)."""
    z = np.arange(anatomy.shape[0], dtype=UNIT)
    occupancy = np.zeros(anatomy.shape, dtype=UNIT)
    for part in (skull_base_slab(anatomy, z), calvarium_slab(anatomy, z)):
        if part is not None:
            np.maximum(occupancy, part[0], out=occupancy)
    return occupancy


def _background(shape, tissue: float, contrast: float, rng: np.random.Generator) -> np.ndarray:
    """Tissue level plus smooth textures at one to three scales, Voronoi cells with
    probability 0.3, the whole texture inverted with probability 0.3. The texture's amplitude
    is a fraction of the vessel contrast (vesselFM keeps vessels 0.4 of the range away from
    the background mean): a faint vessel is still above the texture it crosses, so that no
    label marks a vessel that the image does not show."""
    texture = np.zeros(shape, dtype=UNIT)
    for _ in range(int(rng.integers(1, 4))):
        cell = rng.uniform(2.5, min(shape) / 4)
        texture += UNIT(contrast * rng.uniform(0.0, 0.08)) * SmoothField(shape, cell, rng).full()
    if rng.random() < 0.3:
        texture += _voronoi(shape, contrast * rng.uniform(0.02, 0.08), rng)
    if rng.random() < 0.3:
        texture *= -1
    return texture + UNIT(tissue)


def _voronoi(shape, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Voronoi polyhedra around 20-80 random seeds, each at its own level (std ``spread``);
    cells are assigned on a half-resolution grid."""
    seeds = np.asarray(shape) * rng.random((int(rng.integers(20, 81)), 3))
    levels = rng.normal(0, spread, len(seeds)).astype(UNIT)
    half = [np.arange(0, s, 2) + 0.5 for s in shape]
    points = np.stack(np.meshgrid(*half, indexing="ij"), axis=-1).reshape(-1, 3)
    nearest = cKDTree(seeds).query(points)[1].reshape([len(h) for h in half])
    cells = levels[nearest].repeat(2, 0).repeat(2, 1).repeat(2, 2)
    return cells[: shape[0], : shape[1], : shape[2]]


# -- imaging ------------------------------------------------------------------------------


def _paint(
    image: np.ndarray, occupancy: np.ndarray, level: float, grain: np.ndarray | None = None
) -> None:
    """image <- image (1 - o) + o * level * (1 + 0.15 grain), in place."""
    value = UNIT(level) if grain is None else UNIT(level) * (1 + UNIT(0.15) * grain)
    image += occupancy * (value - image)


def _noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of std ``std``, white or spatially correlated, growing with signal."""
    noise = rng.standard_normal(image.shape, dtype=UNIT)
    if rng.random() < 0.5:
        ndimage.gaussian_filter(noise, rng.uniform(0.5, 1.2), output=noise)
        noise /= max(float(noise.std()), 1e-6)
    gain = rng.uniform(0.0, 0.8)
    return noise * UNIT(std) * np.sqrt(np.maximum(1 + UNIT(gain) * image, 0.25))


def _field_of_view(shape, rng: np.random.Generator) -> np.ndarray | None:
    """None (whole volume, p 0.35), a cylinder around a random axis (p 0.5) or a sphere."""
    u = rng.random()
    if u < 0.35:
        return None
    n = np.asarray(shape, dtype=UNIT)
    g = _grid(shape)
    rel = [(gi - (s - 1) / 2) / (s / 2) for gi, s in zip(g, n)]
    if u < 0.85:
        axis = int(rng.integers(3))
        rho2 = sum(r * r for i, r in enumerate(rel) if i != axis)
        return rho2 <= UNIT(rng.uniform(0.8, 1.0) ** 2)
    return sum(r * r for r in rel) <= UNIT(rng.uniform(0.9, 1.3) ** 2)


def _acquire(
    image: np.ndarray,
    anatomy: Anatomy,
    spacing: float,
    contrast: float,
    sources: list[np.ndarray],
    rng: np.random.Generator,
) -> None:
    """Point-spread, noise, streaks, bias and gamma, in place on the unit scale."""
    sigma = rng.uniform(0.0, 0.35) / spacing
    sigmas = sigma * (rng.uniform(0.6, 1.4, 3) if rng.random() < 0.3 else np.ones(3))
    ndimage.gaussian_filter(image, sigmas, output=image, mode="nearest")
    image += _noise(image, contrast * rng.uniform(0.01, 0.08), rng)
    if rng.random() < 0.3:  # Rician: the magnitude of a complex signal (MR-like)
        floor = UNIT(image.min())
        spread = UNIT(contrast * rng.uniform(0.01, 0.04))
        second = rng.standard_normal(image.shape, dtype=UNIT) * spread
        image[:] = np.hypot(image - floor, second) + floor
    if rng.random() < 0.4 and sources:
        amplitude = contrast * rng.uniform(0.05, 0.4)
        for streak in make_streaks(anatomy, sources, amplitude, rng):
            image += streak.weights(0, anatomy.shape[0]) * streak.pattern
    if rng.random() < 0.7:
        bias = SmoothField(anatomy.shape, min(anatomy.shape) / 2, rng).full()
        image *= np.exp(UNIT(rng.uniform(0.05, 0.3)) * bias)
    if rng.random() < 0.5:
        low, high = np.percentile(image[::3, ::3, ::3], [0.5, 99.9])
        scaled = np.clip((image - low) / max(high - low, 1e-6), 0, None)
        image[:] = scaled ** UNIT(rng.uniform(0.6, 1.6)) * UNIT(high - low) + UNIT(low)


def _marrow_spaces(occupancy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The marrow spaces of a bone's cancellous interior (diploe, skull base): holes of
    0.3-1 mm filling 30-70 % of the bone deeper than a cortical layer of 1-2.5 voxels. The
    trabeculae left between them are bright specks and rods of a vessel's size and level,
    which the network must learn to leave out; a smooth bone never shows it one."""
    cortex = rng.uniform(1.0, 2.5)
    depth = ndimage.distance_transform_edt(occupancy >= 0.5).astype(UNIT)
    field = SmoothField(occupancy.shape, rng.uniform(1.3, 4.0), rng).full()
    threshold = np.quantile(field[::2, ::2, ::2], 1 - rng.uniform(0.3, 0.7))
    holes = np.clip((field - threshold) * UNIT(3.0) + UNIT(0.5), 0, 1)
    return holes * _ramp(depth - UNIT(cortex))


def _add_psf_tail(image: np.ndarray, spacing: float, rng: np.random.Generator) -> None:
    """Mix a wide blur into the image, in place: a C-arm's point-spread is not Gaussian.
    Veiling glare in the detector (light spreading in the scintillator) and scatter that the
    reconstruction does not remove move a share of each voxel's signal millimetres away, and
    motion or an imperfect calibration widens it further. A tail of 0.2-1.2 mm holding 5-35 %
    lifts the voxels just outside a vessel towards the vessel's level without moving the
    lumen's edge, so that the network must place the edge by shape, not by a fixed level."""
    sigma = math.exp(rng.uniform(math.log(0.2), math.log(1.2))) / spacing
    share = UNIT(rng.uniform(0.05, 0.35))
    tail = ndimage.gaussian_filter(image, sigma, mode="nearest")
    image *= 1 - share
    image += share * tail


def _skin_depth(shape, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """The depth (voxels) below the skin, negative in air (``_ramp`` of it: inside the head
    against air, ramped over a voxel): a sphere of head size (70-100 mm) whose surface crosses
    the volume so that 10-60 % of it is air. Wide or off-centre reconstructions hold that much
    air; the median of such a case falls in air."""
    radius = rng.uniform(70.0, 100.0) / spacing
    normal = rng.standard_normal(3)
    normal /= np.linalg.norm(normal)
    g = _grid(shape)
    centre_of_volume = (np.asarray(shape) - 1) / 2
    # Sample the depth of the skin along the normal so that the air fraction is as drawn.
    along = sum((gi - c) * UNIT(n) for gi, c, n in zip(g, centre_of_volume, normal))
    along = np.broadcast_to(along, shape)
    depth = float(np.quantile(along[::4, ::4, ::4], 1 - rng.uniform(0.1, 0.6)))
    centre = centre_of_volume + normal * (depth - radius)
    distance = np.sqrt(sum((gi - UNIT(c)) ** 2 for gi, c in zip(g, centre)))
    return UNIT(radius) - distance


def _shading(shape, contrast: float, rng: np.random.Generator) -> np.ndarray:
    """Additive low-frequency shading: scatter and cupping that the cone-beam reconstruction
    leaves. Unlike the multiplicative bias field it shifts tissue and vessel alike, so that
    a vessel keeps its contrast to the tissue around it but not to the tissue elsewhere: in
    a raised region the tissue reaches the level of vessels in a dark one (std 0.1-0.3 of the
    vessel contrast, over a quarter to two thirds of the volume's side)."""
    cell = min(shape) * rng.uniform(0.25, 0.65)
    return UNIT(contrast * rng.uniform(0.1, 0.3)) * SmoothField(shape, cell, rng).full()


def _truncation_rim(fov: np.ndarray, contrast: float, rng: np.random.Generator) -> np.ndarray:
    """A bright rim inside the reconstruction's edge, fading inwards over 1-8 voxels: the
    head is wider than the detector, and the projections' cut-off lifts the values the
    reconstruction puts at its edge. A curved sheet of up to a vessel's brightness, cut by
    the field of view, which is not a vessel."""
    depth = ndimage.distance_transform_edt(fov).astype(UNIT) - 1
    width = UNIT(rng.uniform(1.0, 8.0))
    return UNIT(contrast * rng.uniform(0.2, 1.0)) * np.exp(-depth / width) * fov


def _scalp(
    depth: np.ndarray, spacing: float, tissue: float, contrast: float, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """The band under the skin (scalp and temporal muscle, 2-8 mm) and its level: tissue
    from a little darker (fat) to brighter than the brain, never a vessel's level."""
    thickness = UNIT(rng.uniform(2.0, 8.0) / spacing)
    band = _ramp(depth) - _ramp(depth - thickness)
    return band, tissue + contrast * rng.uniform(-0.2, 0.6)


def _quantise(
    image: np.ndarray, fov: np.ndarray | None, rng: np.random.Generator, dtype: type[np.integer]
) -> np.ndarray:
    """A random linear map to 16-bit values; outside the field of view, one constant at or
    below the minimum (what a reconstruction writes there)."""
    scale = rng.uniform(400.0, 2500.0)
    values = image * UNIT(scale)
    info = np.iinfo(dtype)
    low = info.min + 200 if info.min < 0 else 200
    values += UNIT(max(rng.uniform(-1100.0, 300.0), low - float(values.min())))
    if fov is not None:
        values[~np.broadcast_to(fov, values.shape)] = float(values.min()) - rng.uniform(0, 200)
    np.clip(np.rint(values, out=values), info.min, info.max, out=values)
    return values.astype(dtype)


def generate_randomised(
    shape: tuple[int, int, int] = (128, 128, 128),
    seed: int = 0,
    spacing: float = 0.227,
    profile: SiteProfile | None = None,
    dtype: type[np.integer] = np.int16,
    cone_beam: bool = False,
) -> Phantom:
    """One domain-randomised case (see the module docstring); same seed, same voxels.

    ``profile`` sets the site's vessel tree (calibre, branching, tortuosity, aneurysms),
    which is then jittered; its intensities and imaging settings are used only by the
    :data:`REFERENCE_SHARE` of cases drawn with the reference look.
    """
    shape = check_request(shape, spacing, dtype)
    if np.random.default_rng([seed, 0x5EF]).random() < REFERENCE_SHARE:
        return generate_volume(shape, seed, spacing, profile, dtype)
    rng = np.random.default_rng(seed)
    vessels = _vessel_profile(profile or DEFAULT_PROFILE, rng)
    bone = vessels.replace(bone_amount=rng.uniform(0.6, 1.5))
    anatomy = make_anatomy(shape, spacing, bone, rng)
    label, signal, tree = draw_vessels(anatomy, spacing, vessels, rng)
    tissue, contrast = rng.uniform(0.2, 0.6), rng.uniform(0.15, 1.2)
    image = _background(shape, tissue, contrast, rng)
    grain = SmoothField(shape, max(2.0, 0.6 / spacing), rng).full()
    makers = [_shell, _plate, _blobs, _spots]
    chosen = [m for m in makers if rng.random() < 0.55]
    structures = [_reference_skull(anatomy)] if rng.random() < 0.6 else []
    structures += [maker(shape, rng) for maker in chosen]
    clearance = _clearance(label, rng)
    # Marrow, air past the skin and the point-spread's tail draw from streams of their own,
    # so that every other draw of the case stays as it was.
    bone_rng, air_rng, tail_rng = (np.random.default_rng([seed, k]) for k in (0xB0E, 0xA1E, 0x7A1))
    for occupancy in structures:
        _paint(image, occupancy * clearance, tissue + contrast * rng.uniform(0.4, 1.8), grain)
        if bone_rng.random() < CANCELLOUS_SHARE:
            marrow = tissue + contrast * bone_rng.uniform(0.0, 0.4)
            _paint(image, _marrow_spaces(occupancy, bone_rng) * clearance, marrow)
    for _ in range(int(rng.integers(0, 4))):  # air cells: dark ellipsoids
        _paint(image, _air_cell(shape, rng), rng.uniform(-0.3, 0.1))
    vessel_level = UNIT(contrast * rng.uniform(0.9, 1.1))
    if rng.random() < 0.8:  # painted over what lies beneath, or added to it
        _paint(image, np.minimum(signal, 1), tissue + float(vessel_level))
    else:
        image += vessel_level * signal
    streak_sources = tree.aneurysm_centres[:1] + _bright_points(structures)
    cone_rng = np.random.default_rng([seed, 0xC0B]) if cone_beam else None
    if air_rng.random() < OUTSIDE_HEAD_SHARE:
        depth = _skin_depth(shape, spacing, air_rng)
        head = _ramp(depth)
        _paint(image, 1 - head, tissue - contrast * air_rng.uniform(0.5, 3.0))
        label &= head >= 0.5
        if cone_rng is not None:
            band, level = _scalp(depth, spacing, tissue, contrast, cone_rng)
            _paint(image, band * clearance, level)  # kept out of the lumen, as bone is
    if tail_rng.random() < PSF_TAIL_SHARE:  # before the core blur and the noise: they commute
        _add_psf_tail(image, spacing, tail_rng)
    if cone_rng is not None and cone_rng.random() < SHADING_SHARE:
        image += _shading(shape, contrast, cone_rng)
    _acquire(image, anatomy, spacing, contrast, streak_sources, rng)
    fov = _field_of_view(shape, rng)
    if fov is not None:
        label &= np.broadcast_to(fov, shape)
        if cone_rng is not None and cone_rng.random() < TRUNCATION_SHARE:  # after the noise
            image += _truncation_rim(fov, contrast, cone_rng)
    origin, direction = random_geometry(shape, spacing, rng)
    return Phantom(
        image=_quantise(image, fov, rng, dtype),
        label=label.view(np.uint8),
        spacing=(spacing,) * 3,
        origin=origin,
        direction=direction,
        tree=tree,
        profile=vessels,
    )


def _clearance(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where bone may lie: nowhere in the lumen and, in three cases of four, not within a
    0.5-2.5 voxel canal around it (as the carotid canal holds the artery); else bone touches
    the vessel wall. A vessel running inside bone of its own brightness would be a label
    without an image."""
    margin = 0.0 if rng.random() < 0.25 else rng.uniform(0.5, 2.5)
    distance = ndimage.distance_transform_edt(~label).astype(UNIT)
    return _ramp(distance - UNIT(margin + 0.5))


def _air_cell(shape, rng: np.random.Generator) -> np.ndarray:
    """An air cell: an ellipsoid of 2-8 % of the volume's side."""
    centre = np.asarray(shape) * rng.uniform(0.1, 0.9, 3)
    axes = min(shape) * rng.uniform(0.02, 0.08, 3)
    g = _grid(shape)
    q = np.sqrt(sum(((gi - c) / a) ** 2 for gi, c, a in zip(g, centre, axes)))
    return _ramp((1 - q) * UNIT(axes.min()))


def _bright_points(structures: list[np.ndarray]) -> list[np.ndarray]:
    """Centres for streaks: the densest voxel of the first structure, if any."""
    if not structures:
        return []
    return [np.asarray(np.unravel_index(np.argmax(structures[0]), structures[0].shape), float)]
