"""An independent family of synthetic 3DRA phantoms, for evaluation only.

The project's generator (phantoms.generator and friends) grows Ornstein-Uhlenbeck branches
with Murray bifurcations, rasterises round cones and images them with a Gaussian PSF,
Poisson-Gaussian noise and in-plane streaks. A network trained on it may have learned that
generator's look rather than vessels. This module draws cases from different code and
different models, and must never be used for training or tuning:

- anatomy: arterial trees grown by space colonisation (Runions et al. 2005, "Modeling and
  visualization of leaf venation patterns"), radii by the pipe model from the leaves up,
  aneurysms, fusiform dilations, stenoses and anastomoses; bone as signed distance
  functions (a deformed skull shell, skull-base blobs, plates, calcifications, a metal coil
  or clip) with a thresholded band-passed trabecular texture; brain with Voronoi cells;
- rasterisation: dense centreline samples -> Euclidean distance transform with indices of
  the nearest sample (one transform per radius class) -> signed distance to the lumen;
- imaging: an anisotropic Gaussian-mixture PSF applied by FFT, ramp-filtered anisotropic
  noise with a signal-dependent part, cupping, ring artefacts, a cylindrical or spherical
  reconstruction field of view, int16 quantisation.

Everything lives in voxel index coordinates (z, y, x), z up; sizes are drawn in mm and
converted with the spacing. It imports nothing from the rest of the project on purpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import fft, ndimage, special
from scipy.spatial import cKDTree

MIN_SIDE = 32
MIN_RADIUS_VOX = 0.65
"""No lumen is thinner than this (voxels), nor than 0.9 PSF sigmas, so that every vessel
stays visible (a cylinder of radius 0.9 sigma keeps ~33% of its contrast at its axis)."""
SAMPLE_STEP = 0.3
"""Voxels between centreline samples for the rasteriser."""
RADIUS_CLASSES = (0.0, 1.5, 3.0, 6.0, math.inf)
"""Voxel radius classes, one distance transform each (the nearest sample of one class is a
good proxy of the covering one only when radii are alike)."""
EDGE_VOX = 0.3
"""Logistic width (voxels) of the partial-volume edge of every object before the PSF."""
MAX_NODES = 12000
FRACTION_RANGE = (0.005, 0.04)
"""The vessel fraction of the volume is brought into this range by scaling radii."""
AIR = -1000.0


def generate_independent(
    shape: tuple[int, int, int] = (128, 128, 128), seed: int = 0, spacing: float = 0.227
) -> tuple[sitk.Image, sitk.Image]:
    """image: int16 (Hounsfield-like), label: uint8 {0,1} vessel lumen; numpy order (Z, Y, X)
    for shape.

    Both images have isotropic `spacing`, an origin and a direction (a proper rotation by a
    few degrees) drawn from the seed; the same arguments give identical voxels.
    """
    shape = _check_args(shape, spacing)
    rng = np.random.default_rng(np.random.SeedSequence([0x1DE9, int(seed) % 2**63]))
    mm = 1.0 / spacing
    head = _draw_head(rng, shape, mm)
    psf = Psf.draw(rng, mm)
    fov, axis_yx = _draw_fov(rng, shape)
    forest = _grow_forest(rng, fov, mm, head, max(MIN_RADIUS_VOX, 0.9 * psf.sigma.max()))
    samples = _sample_centrelines(forest)
    signed, hu_v = _rasterise(samples, shape)
    _add_aneurysm(rng, forest, shape, signed, hu_v)
    label = (signed >= 0) & fov
    occupancy = special.expit(signed / EDGE_VOX)
    image = _anatomy_image(rng, shape, mm, head, _apparent_level(occupancy * hu_v, label, psf))
    _paint(image, occupancy, hu_v)
    _add_calcifications(rng, head, mm, samples, forest.vessel_hu, image)
    _add_metal(rng, mm, label, image)
    image = _acquire(rng, image, psf, forest.vessel_hu, fov, axis_yx)
    return _to_sitk(rng, image, label.astype(np.uint8), spacing)


# ----------------------------------------------------------------------------- arguments


def _check_args(shape, spacing) -> tuple[int, int, int]:
    """Three sides of at least MIN_SIDE voxels and a positive spacing, or ValueError."""
    if len(shape) != 3 or any(int(s) < MIN_SIDE for s in shape):
        raise ValueError(f"shape must be three sides of at least {MIN_SIDE}, got {shape}")
    if not spacing > 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _grid(shape):
    """Open float32 coordinate arrays z (Z,1,1), y (1,Y,1), x (1,1,X)."""
    return [a.astype(np.float32) for a in np.ogrid[: shape[0], : shape[1], : shape[2]]]


def _unit(v: np.ndarray) -> np.ndarray:
    """Rows of v scaled to unit length (zero rows stay zero)."""
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues' rotation matrix about `axis` by `angle` radians (det +1)."""
    k = _unit(np.asarray(axis, dtype=np.float64))
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * kx + (1 - math.cos(angle)) * kx @ kx


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation (QR of a Gaussian matrix, sign-fixed to det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


# ----------------------------------------------------------------------------- the head


@dataclass
class Head:
    """A deformed ellipsoidal skull: outer surface radius along unit direction u is the
    ellipsoid's radius times (1 + sum amp cos(freq . u + phase)); the shell is `thick`
    voxels deep (varying by +-25% with direction); scalp `scalp` voxels outside it."""

    centre: np.ndarray
    rot: np.ndarray
    axes: np.ndarray
    freq: np.ndarray
    amp: np.ndarray
    phase: np.ndarray
    thick: float
    scalp: float
    thin: bool

    def distance(self, z, y, x):
        """Approximate signed distance to the outer skull surface along the ray from the
        centre (negative inside), and the local shell thickness; broadcasts z, y, x."""
        c, rot, axes = self.centre.tolist(), self.rot.tolist(), self.axes.tolist()
        d = [z - c[0], y - c[1], x - c[2]]  # Python floats keep float32 grids float32
        u = [r[0] * d[0] + r[1] * d[1] + r[2] * d[2] for r in rot]
        rho = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + 1e-3
        q = np.sqrt(sum((u[i] / axes[i]) ** 2 for i in range(3)))
        wobble = 1.0
        for f, a, p in zip(self.freq.tolist(), self.amp.tolist(), self.phase.tolist()):
            wobble = wobble + a * np.cos((f[0] * u[0] + f[1] * u[1] + f[2] * u[2]) / rho + p)
        phase = float(self.phase[0])
        thick = self.thick * (1 + 0.25 * np.cos((u[0] - u[2]) / rho * 2.3 + phase))
        return rho * (1 - wobble / q), thick


def _draw_head(rng: np.random.Generator, shape, mm: float) -> Head:
    """A skull that crosses the volume: semi-axes 0.7-2 times the side, the centre placed
    so that the outer surface passes 0.05-0.5 sides from the volume's centre, mostly above
    it (the calvarium), sometimes to a side. One case in three has a thin (1-1.6 mm) shell,
    otherwise 1.5-8 mm, at most a quarter of the side so that small volumes are not all bone."""
    side = float(np.mean(shape))
    axes = side * rng.uniform(0.7, 2.0, 3)
    up = _unit(np.array([1.0, 0.0, 0.0]) + rng.normal(0, 0.6, 3))
    r_up = 1 / np.sqrt(np.sum((up / axes) ** 2))
    centre = np.array(shape, float) / 2 - up * (r_up - rng.uniform(0.05, 0.5) * side)
    thin = bool(rng.random() < 0.33)
    thick = min((rng.uniform(1.0, 1.6) if thin else rng.uniform(1.5, 8.0)) * mm, 0.25 * side)
    k = int(rng.integers(2, 5))
    return Head(
        centre=centre,
        rot=_rotation(rng.normal(size=3), rng.uniform(-0.4, 0.4)),
        axes=axes,
        freq=rng.normal(0, 2.5, (k, 3)),
        amp=rng.uniform(0.0, 0.05, k),
        phase=rng.uniform(0, 2 * np.pi, k),
        thick=thick,
        scalp=rng.uniform(2.0, 8.0) * mm,
        thin=thin,
    )


def _inside_brain(head: Head, pts: np.ndarray, margin: float = 1.0) -> np.ndarray:
    """Which points (N, 3) lie inside the inner skull surface by at least `margin` voxels."""
    d, thick = head.distance(pts[:, 0], pts[:, 1], pts[:, 2])
    return d < -thick - margin


# ----------------------------------------------------------------------------- vessels


@dataclass
class Forest:
    """Vessel centreline graph in voxels: node positions, radii, intensities, edges (a, b);
    `parent` of tree nodes (-1 for roots); `vessel_hu` the case's reference contrast."""

    pos: np.ndarray
    radius: np.ndarray
    hu: np.ndarray
    parent: np.ndarray
    edges: np.ndarray
    vessel_hu: float


@dataclass
class Growth:
    """Space-colonisation parameters in voxels: node step, kill and influence distances."""

    step: float
    kill: float
    influence: float


def _grow_forest(rng: np.random.Generator, fov, mm: float, head: Head, floor: float) -> Forest:
    """1-3 arterial trees by space colonisation, pipe-model radii, smoothed centrelines,
    radii scaled to a plausible vessel fraction of the field of view `fov` (a mask of the
    volume's shape), then pathologies and intensities. No radius is below `floor` voxels."""
    shape = fov.shape
    step = rng.uniform(0.45, 0.7) * mm
    density = rng.uniform(0.008, 0.025) / mm**3
    reach = density ** (-1 / 3) * rng.uniform(2.0, 3.5)  # beyond the attractors' spacing
    growth = Growth(step, step * rng.uniform(2.0, 3.5), reach)
    attractors = _attractors(rng, shape, density, head)
    roots, dirs = _roots(rng, shape, head, int(rng.integers(1, 4)))
    pos, parent, tree = _colonise(rng, attractors, roots, dirs, growth, shape)
    radius = _pipe_radii(rng, parent, tree, mm, floor)
    main = _main_child(parent, radius)
    for _ in range(4):
        pos = _smooth(pos, parent, main)
    pos = _meander(rng, pos, mm)
    radius = _fit_fraction(pos, parent, radius, fov, floor)
    _dilate_or_narrow(rng, radius, parent, main, floor)
    edges = np.stack([parent[parent >= 0], np.flatnonzero(parent >= 0)], axis=1)
    pos, radius, edges = _add_anastomosis(rng, pos, radius, parent, tree, edges, floor, mm)
    vessel_hu = rng.uniform(800.0, 2200.0)
    hu = _vessel_intensity(rng, radius, tree, len(roots), vessel_hu)
    return Forest(pos, radius, hu, parent, edges, vessel_hu)


def _attractors(rng: np.random.Generator, shape, density: float, head: Head) -> np.ndarray:
    """Attraction points in 1-3 regions: the head interior over the volume extended by 15%
    (so that trees leave and re-enter the field of view) or random ellipsoids centred in
    the brain; points are drawn until `density` (per voxel) of the region's brain part is
    reached, at least 150 per region."""
    ext = np.array(shape, float)
    pts = []
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5:

            def box(n):
                return (rng.random((n, 3)) * 1.3 - 0.15) * ext

            pts.append(_region_points(rng, head, density, box))
            continue
        axes = rng.uniform(0.15, 0.45, 3) * ext.mean()
        rot = _random_rotation(rng)
        centre = _brain_point(rng, head, ext)

        def ellipsoid(n, axes=axes, rot=rot, centre=centre):
            ball = _unit(rng.normal(size=(n, 3))) * rng.random((n, 1)) ** (1 / 3)
            return centre + (ball * axes) @ rot.T

        pts.append(_region_points(rng, head, density, ellipsoid))
    return np.concatenate(pts)[:3000]


def _region_points(rng, head: Head, density: float, draw) -> np.ndarray:
    """Points from `draw(n)` that lie inside the brain: a first batch estimates the
    region's volume, then batches are added until the density is met (at most 6)."""
    batch = 2000
    first = draw(batch)
    box_volume = np.prod(np.ptp(first, axis=0))
    pts = first[_inside_brain(head, first)]
    target = max(int(density * box_volume * len(pts) / batch * 0.6), 150)
    for _ in range(5):
        if len(pts) >= target:
            break
        more = draw(batch)
        pts = np.concatenate([pts, more[_inside_brain(head, more)]])
    return pts[:target]


def _brain_point(rng, head: Head, ext: np.ndarray) -> np.ndarray:
    """A random point of the volume inside the brain (the volume's centre if none found)."""
    cand = rng.uniform(0.1, 0.9, (64, 3)) * ext
    inside = np.flatnonzero(_inside_brain(head, cand))
    return cand[inside[0]] if len(inside) else ext / 2


def _roots(rng: np.random.Generator, shape, head: Head, n: int):
    """Root points just outside random faces of the volume (preferably inside the head)
    and their initial inward directions, tilted by ~17 degrees."""
    ext = np.array(shape, float)
    roots, dirs = [], []
    for _ in range(n):
        for _ in range(12):
            axis, hi = int(rng.integers(3)), bool(rng.integers(2))
            p = rng.uniform(0.15, 0.85, 3) * ext
            p[axis] = ext[axis] + 1.0 if hi else -2.0
            normal = np.zeros(3)
            normal[axis] = -1.0 if hi else 1.0
            if _inside_brain(head, (p + 6 * normal)[None], margin=0.0)[0]:
                break
        roots.append(p)
        dirs.append(_unit(normal + rng.normal(0, 0.3, 3)))
    return np.array(roots), np.array(dirs)


def _colonise(rng, attractors, roots, dirs, growth: Growth, shape):
    """Space colonisation (Runions et al. 2005): each attractor pulls the nearest node
    within the influence distance; every pulled node grows one step along the mean unit
    direction of its attractors; attractors within the kill distance of a new node die.
    Roots that see no attractor yet grow a trunk that turns towards the nearest one."""
    n_trees = len(roots)
    pos = np.zeros((MAX_NODES, 3))
    parent = np.full(MAX_NODES, -1, np.int64)
    tree = np.zeros(MAX_NODES, np.int64)
    pos[:n_trees], tree[:n_trees] = roots, np.arange(n_trees)
    n, tips, reached = n_trees, np.arange(n_trees), np.zeros(n_trees, bool)
    lo, hi = -0.25 * np.array(shape), 1.25 * np.array(shape)
    for _ in range(int(4 * max(shape) / growth.step) + 50):
        kd = cKDTree(pos[:n])
        src, cand = _pulled(rng, kd, pos[:n], attractors, growth)
        reached[tree[src]] = True
        trunk = np.flatnonzero(~reached)
        dirs[trunk] = _steer(dirs[trunk], pos[tips[trunk]], attractors)
        src = np.concatenate([src, tips[trunk]])
        cand = np.concatenate([cand, pos[tips[trunk]] + growth.step * dirs[trunk]])
        keep = np.isinf(kd.query(cand, distance_upper_bound=0.45 * growth.step)[0])
        keep &= np.all((cand > lo) & (cand < hi), axis=1) & (n + np.arange(len(cand)) < MAX_NODES)
        src, cand = src[keep], cand[keep]
        if len(cand) == 0:
            break
        new = np.arange(n, n + len(cand))
        pos[new], parent[new], tree[new] = cand, src, tree[src]
        is_tip = np.isin(src, tips[trunk])
        tips[tree[src[is_tip]]] = new[is_tip]
        n += len(cand)
        dead = np.isfinite(cKDTree(cand).query(attractors, distance_upper_bound=growth.kill)[0])
        attractors = attractors[~dead]
    return _prune(pos[:n], parent[:n], tree[:n])


def _steer(dirs: np.ndarray, tips: np.ndarray, attractors: np.ndarray) -> np.ndarray:
    """Trunk directions turned by up to ~25 degrees a step towards the nearest attractor."""
    if len(attractors) == 0 or len(tips) == 0:
        return dirs
    d = np.linalg.norm(attractors[None] - tips[:, None], axis=2)
    towards = _unit(attractors[np.argmin(d, axis=1)] - tips)
    return _unit(dirs + 0.45 * towards)


def _prune(pos: np.ndarray, parent: np.ndarray, tree: np.ndarray, k: int = 3):
    """Drop twigs: leaf branches of fewer than k nodes after their branching node, which
    colonisation leaves as stubs. Nodes keep their order (parents before children)."""
    n = len(parent)
    n_child = np.bincount(parent[parent >= 0], minlength=n)
    keep = np.ones(n, bool)
    for leaf in np.flatnonzero(n_child == 0):
        twig, a = [], leaf
        while a >= 0 and n_child[a] <= 1 and len(twig) < k:
            twig.append(a)
            a = parent[a]
        if a >= 0 and n_child[a] > 1 and len(twig) < k:
            keep[twig] = False
            n_child[a] -= 1
    new_index = np.cumsum(keep) - 1
    par = parent[keep]
    return pos[keep], np.where(par >= 0, new_index[np.maximum(par, 0)], -1), tree[keep]


def _pulled(rng, kd: cKDTree, pos: np.ndarray, attractors: np.ndarray, growth: Growth):
    """Nodes pulled by attractors and their candidate children (one step along the mean
    unit direction to their attractors, with a little jitter against degenerate ties)."""
    if len(attractors) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 3))
    _, near = kd.query(attractors, distance_upper_bound=growth.influence)
    ok = near < len(pos)
    a, j = attractors[ok], near[ok]
    u = _unit(a - pos[j])
    pull = np.stack([np.bincount(j, u[:, k], minlength=len(pos)) for k in range(3)], 1)
    src = np.unique(j)
    d = pull[src]
    strong = np.linalg.norm(d, axis=1) > 1e-3
    src, d = src[strong], _unit(d[strong])
    d = _unit(d + rng.normal(0, 0.12, d.shape))
    return src, pos[src] + growth.step * d


def _pipe_radii(rng, parent: np.ndarray, tree: np.ndarray, mm: float, floor: float) -> np.ndarray:
    """Pipe model from the leaves up, r_parent^g = sum r_child^g (g 2.5-3), leaf radii
    0.12-0.3 mm; each tree is compressed as a power law so that its root is at most
    1-2.5 mm. Returns radii in voxels, at least `floor`."""
    n = len(parent)
    gamma = rng.uniform(2.5, 3.0)
    lo = rng.uniform(0.12, 0.2)
    leaf = rng.uniform(lo, rng.uniform(lo + 0.02, 0.3), n) * mm
    has_child = np.zeros(n, bool)
    has_child[parent[parent >= 0]] = True
    acc = np.where(has_child, 0.0, leaf**gamma)
    for i in range(n - 1, 0, -1):  # children are always created after their parents
        if parent[i] >= 0:
            acc[parent[i]] += acc[i]
    radius = acc ** (1 / gamma)
    leaf_ref = lo * mm
    for t in np.unique(tree):
        sel = tree == t
        root_r, cap = radius[sel].max(), rng.uniform(1.0, 2.5) * mm
        if root_r > cap:
            k = math.log(cap / leaf_ref) / math.log(root_r / leaf_ref)
            big = sel & (radius > leaf_ref)
            radius[big] = leaf_ref * (radius[big] / leaf_ref) ** k
    return np.maximum(radius, floor)


def _main_child(parent: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """For each node its thickest child (-1 for leaves): the continuation of its vessel."""
    main = np.full(len(parent), -1, np.int64)
    best = np.full(len(parent), -1.0)
    for i in np.flatnonzero(parent >= 0):
        if radius[i] > best[parent[i]]:
            best[parent[i]], main[parent[i]] = radius[i], i
    return main


def _smooth(pos: np.ndarray, parent: np.ndarray, main: np.ndarray) -> np.ndarray:
    """One pass of neighbour averaging (1/4, 1/2, 1/4) along parent - node - main child,
    so that the step-wise colonisation paths become smooth curves; roots and leaves stay."""
    inner = (parent >= 0) & (main >= 0)
    out = pos.copy()
    out[inner] = 0.5 * pos[inner] + 0.25 * (pos[parent[inner]] + pos[main[inner]])
    return out


def _meander(rng, pos: np.ndarray, mm: float) -> np.ndarray:
    """Tortuosity: displace all nodes by one smooth random field (3 plane waves of
    0.3-0.8 mm amplitude, 4-10 mm wavelength), which bends the colonisation's straight
    runs into gentle curves while keeping the topology."""
    out = pos.copy()
    for _ in range(3):
        k = _unit(rng.normal(size=3)) * 2 * np.pi / (rng.uniform(4.0, 10.0) * mm)
        amp = _unit(rng.normal(size=3)) * rng.uniform(0.3, 0.8) * mm
        out += np.sin(pos @ k + rng.uniform(0, 2 * np.pi))[:, None] * amp
    return out


def _fit_fraction(pos, parent, radius, fov: np.ndarray, floor: float) -> np.ndarray:
    """Scale radii (keeping the minimum) so that the lumen volume inside the field of view,
    estimated as the sum of pi r^2 l over edges, falls within FRACTION_RANGE."""
    child = np.flatnonzero(parent >= 0)
    mid = np.rint(0.5 * (pos[child] + pos[parent[child]])).astype(np.int64)
    inside = np.all((mid >= 0) & (mid < np.array(fov.shape)), axis=1)
    inside[inside] = fov[tuple(mid[inside].T)]
    length = np.linalg.norm(pos[child] - pos[parent[child]], axis=1)
    frac = np.sum(np.pi * radius[child] ** 2 * length * inside) / fov.size
    target = np.clip(frac, *FRACTION_RANGE)
    if frac <= 0 or target == frac:
        return radius
    return np.maximum(radius * math.sqrt(target / frac), floor)


def _chain(node: int, parent: np.ndarray, main: np.ndarray, k: int) -> np.ndarray:
    """Up to k ancestors and k main-line descendants of `node`, in order along the vessel."""
    up, down, a, b = [], [], node, node
    for _ in range(k):
        a = parent[a] if a >= 0 else -1
        b = main[b] if b >= 0 else -1
        if a >= 0:
            up.append(a)
        if b >= 0:
            down.append(b)
    return np.array(up[::-1] + [node] + down)


def _dilate_or_narrow(rng, radius: np.ndarray, parent: np.ndarray, main: np.ndarray, floor):
    """With probability 0.35 each, a fusiform dilation (x1.5-2.2) and a stenosis
    (x0.3-0.7, never below `floor`) of a vessel segment, as a raised-cosine bump
    over ~9-13 nodes of one vessel of radius >= 1.5 voxels."""
    big = np.flatnonzero((radius >= 1.5) & (parent >= 0) & (main >= 0))
    for factor in (rng.uniform(1.5, 2.2), rng.uniform(0.3, 0.7)):
        if rng.random() >= 0.35 or len(big) == 0:
            continue
        k = int(rng.integers(4, 7))
        chain = _chain(int(rng.choice(big)), parent, main, k)
        bump = 0.5 + 0.5 * np.cos(np.linspace(-np.pi, np.pi, len(chain)))
        radius[chain] = np.maximum(radius[chain] * (1 + (factor - 1) * bump), floor)


def _add_anastomosis(rng, pos, radius, parent, tree, edges, floor, mm):
    """With probability 0.35 a loop: a curved vessel joining two nodes (radius >= 1 voxel)
    2-6 mm apart whose tree paths are long (another tree, or no common ancestor within 20
    steps), like a communicating artery."""
    if rng.random() >= 0.35:
        return pos, radius, edges
    kd = cKDTree(pos)
    cands = rng.permutation(np.flatnonzero(radius >= 1.0))[:60]
    for i in cands:
        near = [j for j in kd.query_ball_point(pos[i], 6 * mm) if radius[j] >= 1.0]
        near = [j for j in near if np.linalg.norm(pos[j] - pos[i]) > 2 * mm]
        near = [j for j in near if _far(i, j, parent, tree)]
        if near:
            return _bridge(rng, pos, radius, edges, int(i), int(rng.choice(near)), floor)
    return pos, radius, edges


def _far(i: int, j: int, parent: np.ndarray, tree: np.ndarray, k: int = 20) -> bool:
    """True when nodes i, j are in different trees or share no ancestor within k steps."""
    if tree[i] != tree[j]:
        return True
    seen, a = set(), i
    for _ in range(k):
        seen.add(a)
        a = parent[a]
        if a < 0:
            break
    b = j
    for _ in range(k):
        if b in seen:
            return False
        b = parent[b]
        if b < 0:
            break
    return True


def _bridge(rng, pos, radius, edges, i: int, j: int, floor: float):
    """Append a quadratic Bezier vessel from node i to node j, bulging sideways, with the
    smaller radius of the two (x0.8), as new nodes and edges."""
    mid = 0.5 * (pos[i] + pos[j]) + rng.normal(0, 0.25 * np.linalg.norm(pos[j] - pos[i]), 3)
    t = np.linspace(0, 1, 8)[1:-1, None]
    pts = (1 - t) ** 2 * pos[i] + 2 * t * (1 - t) * mid + t**2 * pos[j]
    new = np.arange(len(pos), len(pos) + len(pts))
    r = max(0.8 * min(radius[i], radius[j]), floor)
    chain = np.concatenate([[i], new, [j]])
    bridge = np.stack([chain[:-1], chain[1:]], axis=1)
    return (
        np.concatenate([pos, pts]),
        np.concatenate([radius, np.full(len(pts), r)]),
        np.concatenate([edges, bridge]),
    )


def _vessel_intensity(rng, radius, tree, n_trees: int, vessel_hu: float) -> np.ndarray:
    """Contrast per node: the case's vessel level times a per-tree factor (0.8-1.1,
    different injection mixing), dimmed distally (thin vessels at 65-90% of the trunk)."""
    per_tree = rng.uniform(0.8, 1.1, n_trees)
    dim = rng.uniform(0.65, 0.9)
    tree_of = np.concatenate([tree, np.full(len(radius) - len(tree), tree[0])])
    return vessel_hu * per_tree[tree_of] * (dim + (1 - dim) * np.sqrt(np.clip(radius / 4, 0, 1)))


# ----------------------------------------------------------------------------- rasterising


@dataclass
class Samples:
    """Dense centreline samples: positions (S, 3), radii, intensities, unit tangents."""

    pos: np.ndarray
    radius: np.ndarray
    hu: np.ndarray
    tangent: np.ndarray


def _sample_centrelines(forest: Forest) -> Samples:
    """Points every SAMPLE_STEP voxels along every edge, radius and intensity interpolated
    linearly between the edge's nodes."""
    a, b = forest.edges[:, 0], forest.edges[:, 1]
    vec = forest.pos[b] - forest.pos[a]
    counts = np.ceil(np.linalg.norm(vec, axis=1) / SAMPLE_STEP).astype(np.int64) + 1
    e = np.repeat(np.arange(len(a)), counts)
    first = np.cumsum(counts) - counts
    t = ((np.arange(len(e)) - first[e]) / np.maximum(counts[e] - 1, 1))[:, None]

    def lerp(v):
        return v[a[e]] + (v[b[e]] - v[a[e]]) * t[:, 0]

    return Samples(
        pos=forest.pos[a[e]] + vec[e] * t,
        radius=lerp(forest.radius),
        hu=lerp(forest.hu),
        tangent=_unit(vec[e]),
    )


def _rasterise(samples: Samples, shape) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance to the lumen (radius of the nearest sample minus the distance to it,
    positive inside) and the vessel intensity of that sample, per voxel.

    Unlike a per-segment box rasteriser, samples are rounded to voxels and one Euclidean
    distance transform per radius class finds each voxel's nearest sample; the distance to
    that sample's exact position is then measured. The best class wins."""
    signed = np.full(shape, -100.0, np.float32)
    hu = np.zeros(shape, np.float32)
    for lo, hi in zip(RADIUS_CLASSES[:-1], RADIUS_CLASSES[1:]):
        sel = np.flatnonzero((samples.radius >= lo) & (samples.radius < hi))
        if len(sel):
            _rasterise_class(samples, sel, shape, signed, hu)
    return signed, hu


def _rasterise_class(samples: Samples, sel: np.ndarray, shape, signed, hu) -> None:
    """One radius class: seeds at the rounded sample positions (the sample nearest to the
    voxel centre owns a voxel), EDT with indices over the seeds' box plus a margin, exact
    distances where the EDT says a lumen may be near; update where this class is better."""
    r_max = float(samples.radius[sel].max())
    margin = int(math.ceil(r_max)) + 3
    vox = np.rint(samples.pos[sel]).astype(np.int64)
    ok = np.all((vox >= -margin) & (vox < np.array(shape) + margin), axis=1)
    sel, vox = sel[ok], vox[ok]
    if len(sel) == 0:
        return
    lo = np.maximum(vox.min(0) - margin, 0)
    hi = np.minimum(vox.max(0) + margin + 1, shape)
    if np.any(hi <= lo):
        return
    box0 = np.maximum(vox.min(0) - margin, -margin)  # seeds beyond it cannot reach inside
    box_shape = tuple(np.minimum(vox.max(0) + margin + 1, np.array(shape) + margin) - box0)
    resid = np.linalg.norm(samples.pos[sel] - vox, axis=1)
    flat = np.ravel_multi_index(tuple((vox - box0).T), box_shape)
    order = np.lexsort((resid, flat))
    first = order[np.r_[True, flat[order][1:] != flat[order][:-1]]]
    owner = np.full(box_shape, -1, np.int64)
    owner.flat[flat[first]] = sel[first]
    crop = tuple(slice(a - b, c - b) for a, b, c in zip(lo, box0, hi))
    dist, idx = ndimage.distance_transform_edt(owner < 0, return_indices=True)
    near = dist[crop] <= r_max + 2.5
    zyx = np.nonzero(near)
    nearest = owner[tuple(ix[crop][zyx] for ix in idx)]
    world = np.stack([c + o for c, o in zip(zyx, lo)], axis=1)
    s = samples.radius[nearest] - np.linalg.norm(world - samples.pos[nearest], axis=1)
    target = tuple(world.T)
    better = s > signed[target]
    target = tuple(w[better] for w in target)
    signed[target] = s[better]
    hu[target] = samples.hu[nearest[better]]


def _add_aneurysm(rng, forest: Forest, shape, signed, hu) -> None:
    """With probability 0.5 a saccular aneurysm: an ellipsoid of radius 1.2-3x the local
    vessel radius (at most a quarter of the smallest side), axes varying by +-25%, attached
    sideways to a node inside the volume so that its neck overlaps the lumen."""
    if rng.random() >= 0.5:
        return
    n = len(forest.parent)
    pos, r = forest.pos[:n], forest.radius[:n]
    inside = np.all((pos > 4) & (pos < np.array(shape) - 4), axis=1)
    cands = np.flatnonzero(inside & (forest.parent >= 0) & (r >= 0.9) & (r <= 6))
    if len(cands) == 0:
        return
    i = int(rng.choice(cands))
    tangent = _unit(pos[i] - pos[forest.parent[i]])
    side = _unit(np.cross(tangent, rng.normal(size=3)))
    size = min(r[i] * rng.uniform(1.2, 3.0), 0.25 * min(shape))
    axes = size * rng.uniform(0.75, 1.25, 3)
    centre = pos[i] + side * (r[i] + 0.6 * size)
    rot = _random_rotation(rng)
    _paint_ellipsoid(centre, axes, rot, signed, hu, forest.hu[i])


def _paint_ellipsoid(centre, axes, rot, signed, hu, value: float) -> None:
    """Max an ellipsoid's approximate signed distance (min axis x (1 - q)) into `signed`
    over its bounding box, setting `hu` where it wins."""
    reach = int(math.ceil(axes.max())) + 3
    lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
    hi = np.minimum(np.floor(centre).astype(int) + reach + 1, signed.shape)
    if np.any(hi <= lo):
        return
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    g = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    local = (g - centre) @ rot
    q = np.sqrt(np.sum((local / axes) ** 2, axis=-1))
    s = (axes.min() * (1 - q)).astype(np.float32)
    better = s > signed[box]
    signed[box] = np.where(better, s, signed[box])
    hu[box] = np.where(better, value, hu[box])


# ----------------------------------------------------------------------------- anatomy


def _paint(image: np.ndarray, occupancy: np.ndarray, value) -> None:
    """Partial-volume overwrite: image <- image (1 - occupancy) + value occupancy."""
    image += occupancy * (value - image)


def _spectral_noise(rng, shape, gain) -> np.ndarray:
    """White noise filtered in Fourier space by gain(kz, ky, kx) (cycles/voxel, rfft
    layout), normalised to unit standard deviation."""
    spec = fft.rfftn(rng.standard_normal(shape, dtype=np.float32), workers=1)
    kz, ky, kx = _freqs(shape)
    out = fft.irfftn(spec * gain(kz, ky, kx).astype(np.float32), shape, workers=1)
    return (out / max(float(out.std()), 1e-6)).astype(np.float32)


def _freqs(shape):
    """Broadcastable frequency axes (cycles/voxel) of an rfftn of `shape`."""
    kz = fft.fftfreq(shape[0]).astype(np.float32)[:, None, None]
    ky = fft.fftfreq(shape[1]).astype(np.float32)[None, :, None]
    kx = fft.rfftfreq(shape[2]).astype(np.float32)[None, None, :]
    return kz, ky, kx


def _lowpass(rng, shape, corr: float) -> np.ndarray:
    """Smooth unit-variance random field with correlation length ~`corr` voxels."""
    return _spectral_noise(rng, shape, lambda a, b, c: np.exp(-((a * a + b * b + c * c) * corr**2)))


def _bandpass(rng, shape, wavelength: float) -> np.ndarray:
    """Unit-variance noise concentrated around spatial `wavelength` voxels (a log-normal
    ring in frequency), the raw material of trabecular bone."""
    f0 = 1.0 / max(wavelength, 2.5)

    def gain(a, b, c):
        k = np.sqrt(a * a + b * b + c * c) + 1e-6
        return np.exp(-(np.log(k / f0) ** 2) / 0.5)

    return _spectral_noise(rng, shape, gain)


def _voronoi(rng, shape, cell: float) -> np.ndarray:
    """Piecewise-constant unit-variance field on Voronoi cells of mean size `cell` voxels
    (nearest seed by an EDT on a 2x coarser grid, then upsampled)."""
    coarse = tuple(int(math.ceil(s / 2)) for s in shape)
    n = min(max(int(np.prod(coarse) / (max(cell, 3.0) / 2) ** 3), 4), np.prod(coarse) // 4)
    seeds = np.ones(coarse, bool)
    seeds.flat[rng.choice(seeds.size, n, replace=False)] = False
    idx = ndimage.distance_transform_edt(seeds, return_distances=False, return_indices=True)
    values = rng.standard_normal(coarse).astype(np.float32)
    cells = values[tuple(idx)]
    for ax in range(3):
        cells = np.repeat(cells, 2, axis=ax)
    return cells[: shape[0], : shape[1], : shape[2]]


def _apparent_level(vessels: np.ndarray, label: np.ndarray, psf: Psf) -> float:
    """Median over the label of the blurred vessel signal: how bright the vessels will
    look, the reference for bone (the PSF dims thin vessels to a fraction of their HU)."""
    if not label.any():
        return float(vessels.max(initial=1000.0))
    return float(np.median(_blur(vessels, psf)[label]))


def _anatomy_image(rng, shape, mm: float, head: Head, vessel_hu: float) -> np.ndarray:
    """Ideal (noise-free, unblurred) image without vessels: brain and scalp with two
    textures, air outside the head, bone and air cells; bone levels are relative to the
    apparent vessel level `vessel_hu`."""
    z, y, x = _grid(shape)
    d_head, thick = head.distance(z, y, x)
    brain = rng.uniform(15.0, 60.0)
    image = np.full(shape, brain, np.float32)
    image += _lowpass(rng, shape, rng.uniform(0.3, 0.6) * np.mean(shape)) * rng.uniform(5, 25)
    image += _voronoi(rng, shape, rng.uniform(1.5, 4.0) * mm) * rng.uniform(3, 12)
    _paint(image, special.expit((d_head - head.scalp) / EDGE_VOX), AIR)
    bone = _Bone.draw(rng, shape, mm, vessel_hu)
    skull_sd = np.abs(d_head + thick / 2) - thick / 2
    skull_hu = vessel_hu * rng.uniform(0.9, 1.15) if head.thin else None
    bone.paint(image, skull_sd, value=skull_hu)
    del d_head, thick, skull_sd
    bone.paint(image, _skull_base_sd(rng, head, mm, z, y, x))
    bone.paint(image, _plates_sd(rng, shape, mm, z, y, x))
    _air_cells(rng, head, mm, z, y, x, image, bone)
    return image


class _Bone:
    """Bone intensities of one case: a cortical level (0.65-0.88, 0.88-1.15 or 1.25-2.2 times
    the apparent vessel level: darker than, like, or brighter than the vessels) modulated by a
    smooth +-15% field, cortex 0.4-1.2 mm deep, and a trabecular interior from thresholded
    band-passed noise (bright struts, darker marrow)."""

    def __init__(self, cortical, cortex_vox, trabecular):
        self.cortical, self.cortex, self.trabecular = cortical, cortex_vox, trabecular

    @classmethod
    def draw(cls, rng, shape, mm: float, vessel_hu: float) -> _Bone:
        lo, hi = [(0.65, 0.88), (0.88, 1.15), (1.25, 2.2)][int(rng.integers(3))]
        level = vessel_hu * rng.uniform(lo, hi)
        cortical = level * (1 + 0.15 * _lowpass(rng, shape, 0.25 * np.mean(shape)))
        struts = _bandpass(rng, shape, rng.uniform(0.8, 1.6) * mm)
        strut = special.expit((struts - rng.uniform(-0.3, 0.6)) / 0.25)
        marrow, bright = rng.uniform(0.2, 0.45), rng.uniform(0.6, 0.9)
        trabecular = cortical * (marrow + (bright - marrow) * strut)
        return cls(cortical, rng.uniform(0.4, 1.2) * mm, trabecular)

    def paint(self, image: np.ndarray, sd: np.ndarray | None, value=None) -> None:
        """Paint bone where the signed distance `sd` < 0: cortical within `cortex` of the
        surface, trabecular deeper; `value` overrides the cortical level."""
        if sd is None:
            return
        cortical = self.cortical if value is None else value
        inner = special.expit((-sd - self.cortex) / EDGE_VOX)
        level = cortical + inner * (self.trabecular - cortical)
        _paint(image, special.expit(-sd / EDGE_VOX), level)


def _head_point(rng, head: Head, shape, lo, hi) -> np.ndarray:
    """A point drawn uniformly in the box [lo, hi] x shape, inside the outer skull surface
    if one of 10 tries is (bone and air cells belong inside the head)."""
    for _ in range(10):
        c = rng.uniform(lo, hi) * np.array(shape, float)
        if head.distance(*c)[0] < 0:
            break
    return c


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (a smooth union of two signed distance functions)."""
    h = np.maximum(k - np.abs(a - b), 0) / k
    return np.minimum(a, b) - h * h * k / 4


def _skull_base_sd(rng, head: Head, mm, z, y, x):
    """With probability 0.7, 2-5 ellipsoids (1.5-5 mm) around the lower quarter of the
    volume merged by a smooth union: skull-base-like blobs (petrous bone, clinoids)."""
    if rng.random() >= 0.7:
        return None
    shape = (z.shape[0], y.shape[1], x.shape[2])
    sd = None
    for _ in range(int(rng.integers(2, 6))):
        c = _head_point(rng, head, shape, [-0.15, -0.1, -0.1], [0.25, 1.1, 1.1])
        axes = rng.uniform(1.5, 5.0, 3) * mm
        rot = _random_rotation(rng)
        c, r, a = c.tolist(), rot.tolist(), axes.tolist()  # keep float32 grids float32
        dz, dy, dx = z - c[0], y - c[1], x - c[2]
        u = [r[0][i] * dz + r[1][i] * dy + r[2][i] * dx for i in range(3)]
        q = np.sqrt(sum((u[i] / a[i]) ** 2 for i in range(3)))
        blob = min(a) * (q - 1)
        sd = blob if sd is None else _smin(sd, blob, rng.uniform(1.0, 3.0) * mm)
    return sd


def _plates_sd(rng, shape, mm, z, y, x):
    """0-2 flat or gently curved plates of random orientation, 0.7-3 mm thick, limited to a
    disc (like a sphenoid wing, the petrous ridge or the orbital roof)."""
    ext = np.array(shape, float)
    sd = None
    for _ in range(int(rng.integers(0, 3))):
        n = _unit(rng.normal(size=3)).tolist()
        c = (rng.uniform(0.1, 0.9, 3) * ext).tolist()
        dz, dy, dx = z - c[0], y - c[1], x - c[2]
        along = n[0] * dz + n[1] * dy + n[2] * dx
        r2 = dz * dz + dy * dy + dx * dx
        bend = rng.uniform(-1.0, 1.0) / (ext.mean() * 2)
        plate = np.abs(along + bend * (r2 - along * along)) - rng.uniform(0.35, 1.5) * mm
        plate = np.maximum(plate, np.sqrt(r2) - rng.uniform(0.3, 0.7) * ext.mean())
        sd = plate if sd is None else np.minimum(sd, plate)
    return sd


def _air_cells(rng, head: Head, mm, z, y, x, image, bone: _Bone) -> None:
    """With probability 0.6, 2-8 air cells / sinuses (ellipsoids of -950..-600 HU with a
    thin bony rim) in the lower 35% of the volume."""
    if rng.random() >= 0.6:
        return
    shape = image.shape
    for _ in range(int(rng.integers(2, 9))):
        c = _head_point(rng, head, shape, [0.0, 0.05, 0.05], [0.35, 0.95, 0.95])
        axes = rng.uniform(1.0, 4.0, 3) * mm
        rim = rng.uniform(0.2, 0.5) * mm
        lo = np.maximum(np.floor(c - axes.max() - rim - 2).astype(int), 0)
        hi = np.minimum(np.ceil(c + axes.max() + rim + 3).astype(int), shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        q = np.sqrt(
            ((z[box[0], :, :] - c[0]) / axes[0]) ** 2
            + ((y[:, box[1], :] - c[1]) / axes[1]) ** 2
            + ((x[:, :, box[2]] - c[2]) / axes[2]) ** 2
        )
        sd = axes.min() * (q - 1)
        sub = image[box]
        _paint(sub, special.expit((-sd + rim) / EDGE_VOX), bone.cortical[box])
        _paint(sub, special.expit(-sd / EDGE_VOX), rng.uniform(-950, -600))


def _add_calcifications(rng, head: Head, mm, samples: Samples, vessel_hu, image) -> None:
    """3-15 bright spots of 0.3-1.5 mm diameter (1.2-3x the vessel level): half touching a
    vessel wall from outside (the label does not include them), half anywhere in the head."""
    shape = image.shape
    z, y, x = _grid(shape)
    for i in range(int(rng.integers(3, 16))):
        r = rng.uniform(0.15, 0.75) * mm
        if i % 2 == 0 and len(samples.pos):
            j = int(rng.integers(len(samples.pos)))
            side = _unit(np.cross(samples.tangent[j], rng.normal(size=3)))
            c = samples.pos[j] + side * (samples.radius[j] + r + 0.7)
        else:
            c = _head_point(rng, head, shape, [0.0] * 3, [1.0] * 3)
        _paint_ball(image, z, y, x, c, r, vessel_hu * rng.uniform(1.2, 3.0))


def _paint_ball(image, z, y, x, c, r, value) -> None:
    """Partial-volume sphere of radius r voxels at c, painted in its bounding box."""
    lo = np.maximum(np.floor(c - r - 2).astype(int), 0)
    hi = np.minimum(np.ceil(c + r + 3).astype(int), image.shape)
    if np.any(hi <= lo):
        return
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    dz, dy, dx = z[box[0]] - c[0], y[:, box[1]] - c[1], x[:, :, box[2]] - c[2]
    d = np.sqrt(dz * dz + dy * dy + dx * dx)
    _paint(image[box], special.expit((r - d) / EDGE_VOX), value)


def _add_metal(rng, mm: float, label: np.ndarray, image: np.ndarray) -> None:
    """With probability 0.25 a coil (a tangled Lissajous wire within +-1-2.5 mm) or a clip
    (a straight bar, 2.4-8 mm long), one voxel thick, 6000-20000 HU, placed (30 tries)
    where its bounding box grown by 1.5 mm holds no lumen."""
    if rng.random() >= 0.25:
        return
    shape = np.array(label.shape)
    size = rng.uniform(1.0, 2.5) * mm
    t = np.linspace(0, 2 * np.pi, 4000)[:, None]
    if rng.random() < 0.5:
        wire = size * np.sin(rng.integers(3, 9, 3) * t + rng.uniform(0, 2 * np.pi, 3))
    else:
        wire = (t / np.pi - 1) * _unit(rng.normal(size=3)) * size * rng.uniform(1.2, 1.6)
    clear = int(math.ceil(1.5 * mm)) + 1
    for _ in range(30):
        vox = np.rint(rng.uniform(0.15, 0.85, 3) * shape + wire).astype(np.int64)
        vox = vox[np.all((vox >= 0) & (vox < shape), axis=1)]
        lo, hi = np.maximum(vox.min(0) - clear, 0), vox.max(0) + clear + 1
        if not label[tuple(slice(a, b) for a, b in zip(lo, hi))].any():
            break
    else:
        return
    metal = np.zeros(label.shape, bool)
    metal[tuple(vox.T)] = True
    image[ndimage.binary_dilation(metal)] = rng.uniform(6000, 20000)


# ----------------------------------------------------------------------------- imaging


def _draw_fov(rng, shape) -> tuple[np.ndarray, tuple[float, float]]:
    """Rotation axis (y, x), parallel to z near the volume's centre, and the reconstructed
    region: a cylinder around it (40%), a sphere (25%) or the whole volume (35%), as a
    boolean mask of `shape`."""
    z, y, x = _grid(shape)
    side = float(np.mean(shape))
    cy, cx = (np.array(shape[1:]) / 2 + rng.normal(0, 0.04 * side, 2)).tolist()
    kind = rng.choice(3, p=[0.4, 0.25, 0.35])
    if kind == 0:
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= (rng.uniform(0.45, 0.62) * side) ** 2
        return np.broadcast_to(mask, shape), (cy, cx)
    if kind == 1:
        cz = shape[0] / 2 + rng.normal(0, 0.04 * side)
        r = rng.uniform(0.58, 0.8) * side
        return (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r, (cy, cx)
    return np.ones(shape, bool), (cy, cx)


@dataclass
class Psf:
    """Point spread as a two-Gaussian mixture: a core of sigma (z, y, x) voxels plus a
    fraction `tail` of a `wide` times wider Gaussian (heavier tails than one Gaussian)."""

    sigma: np.ndarray
    tail: float
    wide: float

    @classmethod
    def draw(cls, rng, mm: float) -> Psf:
        """Core sigma 0.1-0.35 mm in-plane, z 0.7-1.3x and y +-15% (anisotropic); 8-25% of
        a 2.5-4x wider tail."""
        sigma = rng.uniform(0.1, 0.35) * mm
        aniso = np.array([rng.uniform(0.7, 1.3), rng.uniform(0.85, 1.15), 1.0])
        return cls(sigma * aniso, rng.uniform(0.08, 0.25), rng.uniform(2.5, 4.0))

    def gain(self, shape) -> np.ndarray:
        """Frequency response on an rfftn grid of `shape`."""
        kz, ky, kx = _freqs(shape)
        s = self.sigma
        q = (s[0] * kz) ** 2 + (s[1] * ky) ** 2 + (s[2] * kx) ** 2
        core = np.exp(-2 * np.pi**2 * q)
        return (1 - self.tail) * core + self.tail * np.exp(-2 * np.pi**2 * self.wide**2 * q)


def _blur(image: np.ndarray, psf: Psf) -> np.ndarray:
    """Apply the PSF by FFT, with edge padding against wrap-around."""
    pad = 12
    padded = np.pad(image, pad, mode="edge")
    gain = psf.gain(padded.shape).astype(np.float32)
    out = fft.irfftn(fft.rfftn(padded, workers=1) * gain, padded.shape, workers=1)
    return out[pad:-pad, pad:-pad, pad:-pad].astype(np.float32)


def _noise(rng, shape) -> np.ndarray:
    """Unit correlated noise with a CT-like ramp spectrum in the axial plane (|k|^a,
    a 0.5-1, apodised) and a different Gaussian roll-off along z: anisotropic grain."""
    a, kc, kcz = rng.uniform(0.5, 1.0), rng.uniform(0.15, 0.35), rng.uniform(0.1, 0.3)

    def gain(kz, ky, kx):
        k = np.sqrt(ky * ky + kx * kx)
        return (k + 0.02) ** (a / 2) * np.exp(-((k / kc) ** 2) - (kz / kcz) ** 2)

    return _spectral_noise(rng, shape, gain)


def _acquire(rng, ideal: np.ndarray, psf: Psf, vessel_hu: float, fov, axis_yx) -> np.ndarray:
    """Imaging chain: PSF, cupping (0-80 HU, darker towards the rotation axis),
    correlated noise whose level grows with the signal, rings (50%), field of view
    (outside filled with -1024, 0 or the minimum), int16 quantisation."""
    shape = ideal.shape
    image = _blur(ideal, psf)
    del ideal
    side = float(np.mean(shape))
    _, y, x = _grid(shape)
    rho = np.sqrt((y - axis_yx[0]) ** 2 + (x - axis_yx[1]) ** 2)
    dense = np.clip((image - AIR) / 1000.0, 0, 1.5)
    cup = rng.uniform(0, 80) * (1 - (rho / (rng.uniform(0.7, 1.1) * side)) ** 2)
    sigma = rng.uniform(8, 35) * (1 + rng.uniform(0.2, 1.0) * np.clip(image / vessel_hu, 0, 2))
    image -= cup * dense
    image += sigma * _noise(rng, shape)
    if rng.random() < 0.5:
        image += _rings(rng, rho, side)
    outside = {0: -1024.0, 1: 0.0, 2: float(image.min())}[int(rng.integers(3))]
    image = np.where(fov, image, np.float32(outside))
    return np.clip(np.rint(image), -32768, 32767).astype(np.int16)


def _rings(rng, rho: np.ndarray, side: float) -> np.ndarray:
    """2-6 thin concentric rings (+-15-80 HU, 0.35-0.8 voxel wide) around the rotation
    axis, constant along z: a miscalibrated detector element."""
    out = np.zeros_like(rho)
    for _ in range(int(rng.integers(2, 7))):
        r0, w = rng.uniform(2.0, 0.7 * side), rng.uniform(0.35, 0.8)
        out += rng.choice([-1, 1]) * rng.uniform(15, 80) * np.exp(-((rho - r0) ** 2) / (2 * w * w))
    return out


def _to_sitk(rng, image: np.ndarray, label: np.ndarray, spacing: float):
    """Wrap both arrays with the same geometry: origin within +-150 mm, direction a
    rotation by 1-6 degrees about a random axis."""
    rot = _rotation(rng.normal(size=3), math.radians(rng.uniform(1.0, 6.0)))
    origin = tuple(float(v) for v in np.round(rng.uniform(-150, 150, 3), 3))
    out = []
    for arr in (image, label):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((float(spacing),) * 3)
        img.SetOrigin(origin)
        img.SetDirection(tuple(float(v) for v in rot.ravel()))
        out.append(img)
    return out[0], out[1]
