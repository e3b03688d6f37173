"""Growth of a tortuous, tapering arterial tree with saccular aneurysms.

The tree starts as the internal carotid artery entering through the skull base and is grown
branch by branch (breadth first, so the largest vessels come first):

* each branch follows a smooth random centreline: its curvature vector is an
  Ornstein-Uhlenbeck process (correlation length a few radii), and it is steered away from
  the bone and the edges of the field of view when it comes close;
* it tapers linearly and ends in a bifurcation whose radii obey Murray's law
  r0^3 = r1^3 + r2^3 and whose angles minimise the tree's pumping and volume cost,
  cos(theta_1) = (r0^4 + r1^4 - r2^4) / (2 r0^2 r1^2) (Murray 1926, PNAS 12:207 and
  J Gen Physiol 9:835; Zamir 1978, J Gen Physiol 72:837);
* large branches also give off thin side branches (perforators);
* branches thinner than the profile's minimum radius are not grown.

Children start on their parent's centreline and every radius is at least 0.9 voxel, so
the rasterised lumen is one 26-connected component by construction: the voxel nearest to
any centreline point (at most sqrt(3)/2 voxel away) lies inside the lumen, and as the point
moves those voxels step to 26-neighbours.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from phantoms.anatomy import TRUNK_ENTRY_DEPTH, Anatomy
from phantoms.profiles import SiteProfile

KIND_VESSEL, KIND_TRUNK, KIND_ANEURYSM = 0, 1, 2
LENGTH_EXPONENT = 0.3
FOV_STEERING = 0.5
TRUNK_TRIES = 8
"""How much the edges of the field of view deflect a branch, relative to bone."""
MIN_RADIUS_VOXELS = 0.9
"""Keeps thin vessels 26-connected after rasterisation (> sqrt(3)/2)."""


@dataclass
class VesselTree:
    """Round-cone segments (a sphere when start == end), in voxel coordinates (z, y, x)."""

    starts: np.ndarray
    ends: np.ndarray
    r_start: np.ndarray
    r_end: np.ndarray
    contrast: np.ndarray
    """Relative opacification of each segment (1 = fully opacified)."""
    kind: np.ndarray
    """KIND_VESSEL, KIND_TRUNK or KIND_ANEURYSM."""
    n_branches: int = 0
    n_bifurcations: int = 0
    max_generation: int = 0
    """Most bifurcations (or side-branch origins) between the trunk and any branch."""
    aneurysm_centres: list[np.ndarray] = field(default_factory=list)


@dataclass
class _Branch:
    start: np.ndarray
    direction: np.ndarray
    radius: float
    generation: int
    contrast: float
    trunk: bool = False


@dataclass
class _Builder:
    starts: list[np.ndarray] = field(default_factory=list)
    ends: list[np.ndarray] = field(default_factory=list)
    r_start: list[float] = field(default_factory=list)
    r_end: list[float] = field(default_factory=list)
    contrast: list[float] = field(default_factory=list)
    kind: list[int] = field(default_factory=list)

    def add(self, a: np.ndarray, b: np.ndarray, ra: float, rb: float, c: float, k: int) -> None:
        self.starts.append(a)
        self.ends.append(b)
        self.r_start.append(ra)
        self.r_end.append(rb)
        self.contrast.append(c)
        self.kind.append(k)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


def _perpendicular(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector orthogonal to the unit vector `d`."""
    v = rng.standard_normal(3)
    return _unit(v - np.dot(v, d) * d)


def murray_children(r0: float, split: float) -> tuple[float, float, float, float]:
    """Radii and angles (rad) of the two children of a vessel of radius r0.

    r1^3 = split * r0^3, r2^3 = (1 - split) * r0^3 (Murray's law); the angles follow
    cos(theta_i) = (r0^4 + ri^4 - rj^4) / (2 r0^2 ri^2) (Zamir 1978).
    """
    r1 = r0 * split ** (1 / 3)
    r2 = r0 * (1 - split) ** (1 / 3)

    def angle(ri: float, rj: float) -> float:
        c = (r0**4 + ri**4 - rj**4) / (2 * r0**2 * ri**2)
        return math.acos(min(1.0, max(-1.0, c)))

    return r1, r2, angle(r1, r2), angle(r2, r1)


def branch_length(radius: float, r_trunk: float, factor: float) -> float:
    """Length of a branch (voxels): factor * r_trunk^(1 - b) * r^b with b = 0.3.

    Thin arteries are relatively longer than thick ones (cortical branches run for
    centimetres at under a millimetre of calibre), so length grows slower than radius.
    """
    return factor * r_trunk ** (1 - LENGTH_EXPONENT) * radius**LENGTH_EXPONENT


def _trace(
    branch: _Branch,
    length: float,
    r_end: float,
    anatomy: Anatomy,
    tortuosity: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Centreline points and radii of one branch; the flag says whether it left the domain.

    Direction update per step h: d <- unit(d + h * kappa * k_perp + s * n), with k an
    Ornstein-Uhlenbeck curvature vector (unit stationary variance, correlation length
    max(4 r, 12) voxels), kappa = 0.12 * tortuosity / max(r, 3), and n the inward normal
    of the nearest boundary, pushed by s = w (0.3 + 1.5 max(0, -d.n)) with
    w = clip(1 - sd / margin, 0, 1): the closer the boundary and the more the branch heads
    into it, the harder it turns away (FOV_STEERING times less for the edge of the field
    of view than for bone). The trunk is also lifted (+0.25 z per step) and goes on, up to
    three times its length, until it has cleared the skull base.
    """
    r0 = branch.radius
    step = min(max(0.8 * r0, 1.0), 4.0)
    n_steps = max(2, int(math.ceil(length / step)))
    max_steps = 3 * n_steps if branch.trunk else n_steps
    rho = math.exp(-step / max(4.0 * r0, 12.0))
    kappa = 0.12 * tortuosity / max(r0, 3.0)
    margin = 2.0 * r0 + 4.0
    noise = rng.standard_normal((max_steps + 1, 3))
    up = np.array([1.0, 0.0, 0.0])
    k = noise[0]
    p = branch.start.astype(np.float64)
    d = _unit(branch.direction)
    points, radii = [p], [r0]
    for i in range(1, max_steps + 1):
        below_base = p[0] < anatomy.base_top(p) + 2.0 * r0
        if i > n_steps and not (branch.trunk and below_base):
            break
        k = rho * k + math.sqrt(1 - rho * rho) * noise[i]
        k_perp = k - np.dot(k, d) * d
        sd, normal, bone = anatomy.domain(p, branch.trunk)
        near = min(1.0, max(0.0, 1.0 - sd / margin))
        push = near * (0.3 + 1.5 * max(0.0, -float(np.dot(d, normal))))
        if not bone and not branch.trunk:  # arteries may leave a crop; bone deflects them
            push *= FOV_STEERING
        lift = 0.25 if branch.trunk and below_base else 0.0
        d = _unit(d + step * kappa * k_perp + push * normal + lift * up)
        p = p + step * d
        points.append(p)
        radii.append(r0 + (r_end - r0) * min(1.0, i / n_steps))
        if anatomy.domain(p, branch.trunk)[0] < 0:
            return np.asarray(points), np.asarray(radii), True
    return np.asarray(points), np.asarray(radii), False


def _trunk(anatomy: Anatomy, r_trunk: float, rng: np.random.Generator) -> _Branch:
    """The internal carotid artery: enters just below the bottom slice, near the middle
    (inside the reconstructed cylinder), heading up with a random tilt of 11-34 degrees."""
    _, ny, nx = anatomy.shape
    yx = np.array([ny, nx]) * rng.uniform(0.35, 0.65, size=2)
    if anatomy.fov_radius is not None:
        c = np.asarray(anatomy.fov_centre)
        yx = c + (yx - c) * min(1.0, 0.5 * anatomy.fov_radius / (np.linalg.norm(yx - c) + 1e-9))
    up = np.array([1.0, 0.0, 0.0])
    tilt = _perpendicular(up, rng) * rng.uniform(0.2, 0.6)
    start = np.array([1.0 - TRUNK_ENTRY_DEPTH, yx[0], yx[1]])
    return _Branch(start, _unit(up + tilt), r_trunk, 0, 1.0, trunk=True)


def _bifurcate(
    parent: _Branch,
    end: np.ndarray,
    d_end: np.ndarray,
    r_end: float,
    r_min: float,
    profile: SiteProfile,
    rng: np.random.Generator,
) -> list[_Branch]:
    """The children (thicker than r_min) of a bifurcation at `end`, in a random plane."""
    r1, r2, t1, t2 = murray_children(r_end, rng.uniform(0.5, 0.85))
    u = _perpendicular(d_end, rng)
    children = []
    for r_child, theta, sign in ((r1, t1, 1.0), (r2, t2, -1.0)):
        if r_child < r_min:
            continue
        d_child = math.cos(theta) * d_end + sign * math.sin(theta) * u
        contrast = _child_contrast(parent, profile, rng)
        children.append(_Branch(end, d_child, r_child, parent.generation + 1, contrast))
    return children


def grow_tree(
    anatomy: Anatomy,
    spacing: float,
    profile: SiteProfile,
    rng: np.random.Generator,
    max_segments: int = 60000,
) -> VesselTree:
    """Grow the arterial tree of one case (see the module docstring for the model)."""
    n = min(anatomy.shape)
    # The trunk keeps its physical size in large volumes and shrinks with small ones.
    r_trunk = max(2.0, min(profile.trunk_radius_mm / spacing, 1.0 + 0.035 * n))
    r_min = max(MIN_RADIUS_VOXELS, profile.min_radius_mm / spacing)
    # Small crops: shorter branches, so that several generations fit before they leave.
    crop_scale = min(1.0, n / 400) ** 0.5
    queue = deque([_trunk(anatomy, r_trunk, rng)])
    out = _Builder()
    bifurcations: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    n_branches = max_generation = 0
    while queue and len(out.starts) < max_segments:
        b = queue.popleft()
        n_branches += 1
        max_generation = max(max_generation, b.generation)
        if b.trunk:
            length = anatomy.shape[0] * rng.uniform(0.4, 0.6)
        else:
            factor = rng.uniform(*profile.length_factor) * crop_scale
            length = max(6.0, branch_length(b.radius, r_trunk, factor))
        r_end = max(r_min, b.radius * rng.uniform(0.92, 1.0))
        tortuosity = profile.tortuosity * (1.5 if b.trunk else 1.0)
        pts, radii, exited = _trace(b, length, r_end, anatomy, tortuosity, rng)
        for _ in range(TRUNK_TRIES if b.trunk else 0):  # the trunk must reach the brain
            if not exited:
                break
            pts, radii, exited = _trace(b, length, r_end, anatomy, tortuosity, rng)
        kind = KIND_TRUNK if b.trunk else KIND_VESSEL
        for i in range(len(pts) - 1):
            out.add(pts[i], pts[i + 1], float(radii[i]), float(radii[i + 1]), b.contrast, kind)
        queue.extend(_side_branches(b, pts, radii, r_min, profile, rng))
        if not exited:
            d_end = _unit(pts[-1] - pts[-2])
            bifurcations.append((pts[-1], d_end, float(radii[-1]), b.contrast))
            queue.extend(_bifurcate(b, pts[-1], d_end, float(radii[-1]), r_min, profile, rng))
    centres = _add_aneurysms(bifurcations, r_trunk, anatomy, profile, rng, out)
    return VesselTree(
        starts=np.asarray(out.starts, dtype=np.float64).reshape(-1, 3),
        ends=np.asarray(out.ends, dtype=np.float64).reshape(-1, 3),
        r_start=np.asarray(out.r_start),
        r_end=np.asarray(out.r_end),
        contrast=np.asarray(out.contrast),
        kind=np.asarray(out.kind, dtype=np.int8),
        n_branches=n_branches,
        n_bifurcations=len(bifurcations),
        max_generation=max_generation,
        aneurysm_centres=centres,
    )


def _child_contrast(parent: _Branch, profile: SiteProfile, rng: np.random.Generator) -> float:
    """Opacification drifts a little from branch to branch (incomplete mixing)."""
    return float(np.clip(parent.contrast * (1 + profile.contrast_jitter * rng.normal()), 0.6, 1.2))


def _side_branches(
    parent: _Branch,
    pts: np.ndarray,
    radii: np.ndarray,
    r_min: float,
    profile: SiteProfile,
    rng: np.random.Generator,
) -> list[_Branch]:
    """Thin branches leaving a large parent at 50-90 degrees (perforators, small cortical
    branches); their count is Poisson with mean rate * parent length / (10 * radius)."""
    if parent.radius < 2.5 * r_min or len(pts) < 3:
        return []
    seg_len = float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum())
    count = rng.poisson(profile.side_branch_rate * seg_len / (10.0 * parent.radius))
    children = []
    for _ in range(count):
        i = int(rng.integers(1, len(pts) - 1))
        d = _unit(pts[i + 1] - pts[i - 1])
        theta = rng.uniform(math.radians(50), math.radians(90))
        d_side = math.cos(theta) * d + math.sin(theta) * _perpendicular(d, rng)
        r_side = rng.uniform(r_min, max(r_min, 0.45 * float(radii[i])))
        contrast = _child_contrast(parent, profile, rng)
        children.append(_Branch(pts[i], d_side, r_side, parent.generation + 1, contrast))
    return children


def _add_aneurysms(
    bifurcations: list[tuple[np.ndarray, np.ndarray, float, float]],
    r_trunk: float,
    anatomy: Anatomy,
    profile: SiteProfile,
    rng: np.random.Generator,
    out: _Builder,
) -> list[np.ndarray]:
    """Put saccular aneurysms on the apex of some large bifurcations.

    The sac (radius 1.3-2.6 times the parent's) is centred on the continuation of the
    parent, p + d (0.75 R + 0.3 r), so it swallows the apex where haemodynamic stress is
    highest; half of them carry a small daughter sac (bleb). Sacs whose centre would lie
    within half a radius of bone or of the field of view's edge are not placed.
    """
    candidates = [b for b in bifurcations if b[2] >= max(1.5, 0.25 * r_trunk)]
    if profile.aneurysm_rate <= 0 or not candidates:
        return []
    count = int(rng.poisson(profile.aneurysm_rate))
    count = max(count, 1 if profile.aneurysm_rate >= 0.5 else 0)
    centres = []
    for j in rng.permutation(len(candidates)):
        if len(centres) >= count:
            break
        p, d, r, contrast = candidates[int(j)]
        radius = r * rng.uniform(1.3, 2.6)
        centre = p + d * (0.75 * radius + 0.3 * r)
        if anatomy.domain(centre, trunk=False)[0] < 0.5 * radius:
            continue
        out.add(centre, centre, radius, radius, contrast, KIND_ANEURYSM)
        if rng.random() < 0.5:
            bleb_dir = _unit(d + 0.8 * _perpendicular(d, rng))
            bleb = centre + bleb_dir * 0.85 * radius
            r_bleb = 0.35 * radius
            out.add(bleb, bleb, r_bleb, r_bleb, contrast, KIND_ANEURYSM)
        centres.append(centre)
    return centres
