"""Distance metrics in mm: balanced average Hausdorff distance and the 95th-percentile Hausdorff.

Voxels are points at their centres, scaled by the (z, y, x) spacing, so anisotropic voxels
give true millimetre distances. ``d(x, A)`` is the Euclidean distance from voxel x to the
nearest voxel of A.

Nearest voxels come from k-d trees (``scipy.spatial.cKDTree``) built on the masks' surface
voxels, never from pairwise distances: the nearest voxel of A seen from a voxel outside A is
always a surface voxel of A (were it interior, its face neighbour towards x would be nearer),
so the trees hold only surfaces while the results are exact for all voxels. Cost and memory
grow with the number of foreground voxels, not with the image, and queries run in chunks.

Surface voxels (MedPy's ``__surface_distances``, MONAI's ``get_mask_edges``): foreground
voxels with a 6-neighbour in the background, ``A ^ binary_erosion(A)`` with a 6-connected
structure; the world outside the image counts as background.

Empty masks: both empty gives 0.0; exactly one empty gives the image diagonal in mm
(:func:`metrics.masks.image_diagonal`), the largest distance possible in the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from metrics.masks import MaskPair, Spacing, prepare

#: Query points per k-d tree call; bounds the temporary coordinates at 24 MiB.
QUERY_CHUNK = 1 << 20

_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels of a bool mask: ``mask & ~erosion(mask)``, 6-neighbourhood."""
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE_NEIGHBOURS, border_value=0)


def _coordinates_mm(flat_index: np.ndarray, shape: tuple[int, ...], spacing: Spacing) -> np.ndarray:
    return np.column_stack(np.unravel_index(flat_index, shape)) * np.asarray(spacing)


def surface_tree(mask_surface: np.ndarray, spacing: Spacing) -> cKDTree:
    """k-d tree on surface voxel centres in mm.

    Sliding-midpoint splits (``balanced_tree=False``) answer queries from far-away voxels
    (false-positive speckle) about 3x faster than median splits on vessel surfaces.
    """
    points = _coordinates_mm(np.flatnonzero(mask_surface), mask_surface.shape, spacing)
    return cKDTree(points, leafsize=32, balanced_tree=False, compact_nodes=False)


def nearest_distances(
    flat_index: np.ndarray, shape: tuple[int, ...], tree: cKDTree, spacing: Spacing
) -> np.ndarray:
    """Distance in mm from each voxel (flat C-order index into ``shape``) to ``tree``'s nearest."""
    out = np.empty(flat_index.size)
    for start in range(0, flat_index.size, QUERY_CHUNK):
        chunk = flat_index[start : start + QUERY_CHUNK]
        out[start : start + chunk.size], _ = tree.query(_coordinates_mm(chunk, shape, spacing))
    return out


@dataclass(frozen=True)
class Directed:
    """One direction A -> B: d(a, dB) for each surface voxel a of A (C order), and the sum
    of d(a, B) over all voxels a of A."""

    surface: np.ndarray
    total: float


def directed(
    source: np.ndarray,
    source_surface: np.ndarray,
    target: np.ndarray,
    tree: cKDTree,
    spacing: Spacing,
) -> Directed:
    """Distances from ``source`` to ``target`` (both non-empty), ``tree`` on target's surface.

    One query serves both sets: the surface voxels of the source (to the target's surface,
    as MedPy and MONAI measure) and its voxels outside the target (whose nearest target
    voxel is a target surface voxel); source voxels inside the target add 0 to the sum.
    """
    outside = source & ~target
    query = source_surface | outside
    flat = np.flatnonzero(query)
    distances = nearest_distances(flat, query.shape, tree, spacing)
    return Directed(
        surface=distances[source_surface.ravel()[flat]],
        total=float(distances[outside.ravel()[flat]].sum()),
    )


def directed_pair(pair: MaskPair) -> tuple[Directed, Directed]:
    """(S -> G, G -> S) of a pair of non-empty masks."""
    if pair.n_pred == 0 or pair.n_gt == 0:
        raise ValueError("surface distances need two non-empty masks")
    spacing = pair.require_spacing()
    pred_surface, gt_surface = surface(pair.pred), surface(pair.gt)
    pred_tree, gt_tree = surface_tree(pred_surface, spacing), surface_tree(gt_surface, spacing)
    return (
        directed(pair.pred, pred_surface, pair.gt, gt_tree, spacing),
        directed(pair.gt, gt_surface, pair.pred, pred_tree, spacing),
    )


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (each surface voxel of S to the surface of G, and G to S).

    The same sets as MedPy's ``__surface_distances(result, reference)`` and its reverse,
    in C order of the voxels. Raises ``ValueError`` when a mask is empty.
    """
    to_gt, to_pred = directed_pair(prepare(pred, gt, spacing))
    return to_gt.surface, to_pred.surface


def hd95_from(to_gt: Directed, to_pred: Directed) -> float:
    """``max(P95(d(dS -> dG)), P95(d(dG -> dS)))`` with NumPy's linear percentile."""
    return float(max(np.percentile(to_gt.surface, 95), np.percentile(to_pred.surface, 95)))


def balanced_average_hausdorff_from(pair: MaskPair, to_gt: Directed, to_pred: Directed) -> float:
    """``(sum_{g in G} d(g, S) + sum_{s in S} d(s, G)) / (2 |G|)``."""
    return (to_pred.total + to_gt.total) / (2 * pair.n_gt)


def _empty_distance(pair: MaskPair) -> float | None:
    """0 for two empty masks, the image diagonal for one, ``None`` when both have voxels."""
    if pair.both_empty:
        return 0.0
    return pair.worst_distance() if pair.one_empty else None


def hd95_of(pair: MaskPair) -> float:
    empty = _empty_distance(pair)
    return empty if empty is not None else hd95_from(*directed_pair(pair))


def balanced_average_hausdorff_of(pair: MaskPair) -> float:
    empty = _empty_distance(pair)
    if empty is not None:
        return empty
    return balanced_average_hausdorff_from(pair, *directed_pair(pair))


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm over surface voxels.

    ``HD95 = max(P95{d(s, dG) : s in dS}, P95{d(g, dS) : g in dG})`` with dA the surface
    voxels of A (Huttenlocher et al., IEEE TPAMI 15(9), 1993, for the Hausdorff distance;
    the percentile variant as in MONAI's ``compute_hausdorff_distance(percentile=95)``).
    MedPy's ``hd95`` instead takes one percentile of both directions pooled; its sets of
    distances are the same as here (see :func:`surface_distances`).
    Both empty: 0; one empty: the image diagonal in mm.
    """
    return hd95_of(prepare(pred, gt, spacing))


def balanced_average_hausdorff(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Balanced average Hausdorff distance (bAHD) in mm over all foreground voxels.

    ``bAHD = (sum_{g in G} d(g, S) + sum_{s in S} d(s, G)) / (2 |G|)`` (Aydin et al.,
    "On the usage of average Hausdorff distance for segmentation performance assessment:
    hidden error when used for ranking", European Radiology Experimental 5:4, 2021). Both
    directed sums are divided by |G|, unlike the average Hausdorff distance (each sum over
    its own set's size), so that a misplaced voxel weighs the same whichever mask it is in;
    Aydin et al. show that the plain average misranks segmentations.
    Both empty: 0; one empty: the image diagonal in mm.
    """
    return balanced_average_hausdorff_of(prepare(pred, gt, spacing))
