"""Rasterisation of round-cone segments on local bounding boxes (vectorised numpy).

For a voxel centre p and a segment a->b with radii ra, rb, the projection parameter is
t = clip((p - a).(b - a) / |b - a|^2, 0, 1), the distance d = |p - a - t (b - a)| and the
local radius r(t) = ra + t (rb - ra). The voxel is lumen when d <= r(t); its partial-volume
occupancy is clip(r(t) - d + 1/2, 0, 1), a linear ramp one voxel wide across the wall.

Consecutive segments (a branch's centreline) are burnt in groups that share one bounding
box, each group as a single (segments, z, y, x) array expression, so a tree of tens of
thousands of segments costs a few thousand numpy calls and no per-voxel Python loop.
"""

from __future__ import annotations

import numpy as np

from phantoms.tree import VesselTree

GROUP_SEGMENTS = 16
"""Most segments burnt together."""
GROUP_VOXELS = 4096
"""Largest shared bounding box of a group (a single larger segment goes alone)."""


def _boxes(
    tree: VesselTree, margins: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Integer bounding boxes [lo, hi) of every segment, inflated by its margin."""
    reach = np.maximum(tree.r_start, tree.r_end) + margins + 1.0
    lo = np.floor(np.minimum(tree.starts, tree.ends) - reach[:, None]).astype(np.int64)
    hi = np.ceil(np.maximum(tree.starts, tree.ends) + reach[:, None]).astype(np.int64) + 1
    return np.maximum(lo, 0), np.minimum(hi, np.asarray(shape))


def _groups(tree: VesselTree, lo: np.ndarray, hi: np.ndarray) -> list[tuple[int, int]]:
    """Runs [i, j) of consecutive segments of one kind whose union box stays small."""
    runs = []
    i, n = 0, len(lo)
    while i < n:
        box_lo, box_hi, j = lo[i], hi[i], i + 1
        while j < n and j - i < GROUP_SEGMENTS and tree.kind[j] == tree.kind[i]:
            new_lo, new_hi = np.minimum(box_lo, lo[j]), np.maximum(box_hi, hi[j])
            if np.prod(np.maximum(new_hi - new_lo, 0)) > GROUP_VOXELS:
                break
            box_lo, box_hi, j = new_lo, new_hi, j + 1
        runs.append((i, j))
        i = j
    return runs


def signed_depth(
    lo: np.ndarray, hi: np.ndarray, a: np.ndarray, b: np.ndarray, ra: np.ndarray, rb: np.ndarray
) -> np.ndarray:
    """r(t) - d (positive inside) of K segments at every voxel of the box [lo, hi).

    a, b: (K, 3) end points; ra, rb: (K,) radii. Returns float32 (K, dz, dy, dx). A segment
    with a == b is a sphere.
    """
    a32, u = a.astype(np.float32), (b - a).astype(np.float32)
    uu = np.einsum("ki,ki->k", u, u)
    inv = np.where(uu > 1e-12, 1.0 / np.maximum(uu, 1e-12), 0.0).astype(np.float32)
    axes = [np.arange(lo[i], hi[i], dtype=np.float32) for i in range(3)]
    z = axes[0][None, :, None, None] - a32[:, 0, None, None, None]
    y = axes[1][None, None, :, None] - a32[:, 1, None, None, None]
    x = axes[2][None, None, None, :] - a32[:, 2, None, None, None]
    u0, u1, u2 = (u[:, i, None, None, None] for i in range(3))
    t = (z * u0 + y * u1 + x * u2) * inv[:, None, None, None]
    np.clip(t, 0.0, 1.0, out=t)
    dz, dy, dx = z - t * u0, y - t * u1, x - t * u2
    r0 = ra.astype(np.float32)[:, None, None, None]
    slope = (rb - ra).astype(np.float32)[:, None, None, None]
    return r0 + t * slope - np.sqrt(dz * dz + dy * dy + dx * dx)


def rasterise_tree(
    tree: VesselTree,
    shape: tuple[int, int, int],
    label: np.ndarray,
    signal: np.ndarray,
    canal: np.ndarray | None = None,
    canal_kinds: tuple[int, ...] = (),
    canal_margin: float = 0.0,
) -> None:
    """Burn the tree into `label` (bool, lumen) and `signal` (float32, occupancy x contrast,
    maximum over overlapping segments), in place. Segments whose kind is in `canal_kinds`
    are also burnt, inflated by `canal_margin` voxels, into the bool array `canal`.
    """
    in_canal = np.isin(tree.kind, canal_kinds) & (canal is not None)
    lo, hi = _boxes(tree, np.where(in_canal, canal_margin, 0.0), shape)
    contrast = tree.contrast.astype(np.float32)
    for i, j in _groups(tree, lo, hi):
        box_lo, box_hi = lo[i:j].min(axis=0), hi[i:j].max(axis=0)
        if np.any(box_hi <= box_lo):
            continue
        depth = signed_depth(
            box_lo, box_hi, tree.starts[i:j], tree.ends[i:j], tree.r_start[i:j], tree.r_end[i:j]
        )
        box = tuple(slice(int(a), int(b)) for a, b in zip(box_lo, box_hi, strict=True))
        if in_canal[i]:
            canal[box] |= (depth >= -canal_margin).any(axis=0)
        label[box] |= (depth >= 0).any(axis=0)
        occupancy = np.clip(depth + np.float32(0.5), 0.0, 1.0)
        occupancy *= contrast[i:j, None, None, None]
        np.maximum(signal[box], occupancy.max(axis=0), out=signal[box])
