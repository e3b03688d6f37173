"""Time ``metrics.score_case`` on a 512x512x400 vessel-like pair; print JSON.

The ground truth is a random tree of tubes (radii 1-8 voxels, 0.227 mm voxels, as in
SHINY-ICARUS 3DRA); the prediction thickens half of it, thins the other half, misses two
branches and adds speckle, so every metric has work to do. ``--speckle`` sets the fraction of
false-positive noise voxels (the distance metrics' cost grows with it). ``--baseline`` also
times MedPy's ``hd95`` (full-volume distance transforms) on the same pair.

    python bench/bench_metrics.py [--speckle 0.001] [--baseline]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from metrics import score_case  # noqa: E402

SHAPE = (400, 512, 512)
SPACING = (0.227, 0.227, 0.227)


def draw_tube(mask: np.ndarray, start: np.ndarray, end: np.ndarray, radius: float) -> None:
    """Set the voxels within ``radius`` of the segment [start, end] (voxel units)."""
    lo = np.maximum(np.floor(np.minimum(start, end) - radius - 1).astype(int), 0)
    hi = np.minimum(np.ceil(np.maximum(start, end) + radius + 2).astype(int), mask.shape)
    if np.any(hi <= lo):
        return
    grid = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    axis = end - start
    t = sum((g - s) * a for g, s, a in zip(grid, start, axis, strict=True)) / max(axis @ axis, 1e-9)
    t = np.clip(t, 0.0, 1.0)
    dist2 = sum((g - s - t * a) ** 2 for g, s, a in zip(grid, start, axis, strict=True))
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= dist2 <= radius**2


def vessel_tree(shape: tuple[int, int, int], n_segments: int, rng: np.random.Generator):
    """A tree of tubes grown from the bottom centre; returns the mask and its segments."""
    mask = np.zeros(shape, dtype=bool)
    nodes = [(np.array([0.0, shape[1] / 2, shape[2] / 2]), 8.0)]
    segments = []
    for _ in range(n_segments):
        start, radius = nodes[rng.integers(len(nodes))]
        end = np.clip(start + rng.normal(0, 70, 3) + [40, 0, 0], 0, np.array(shape) - 1)
        child = max(1.0, radius * rng.uniform(0.6, 0.95))
        draw_tube(mask, start, end, child)
        segments.append((start, end, child))
        nodes.append((end, child))
    return mask, segments


def make_pair(speckle: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt, segments = vessel_tree(SHAPE, 120, rng)
    half = SHAPE[0] // 2
    pred = np.empty_like(gt)
    pred[:half] = ndimage.binary_dilation(gt[:half])
    pred[half:] = ndimage.binary_erosion(gt[half:])
    for start, end, radius in segments[-2:]:  # two missed branches
        missed = np.zeros_like(gt)
        draw_tube(missed, start, end, radius + 1)
        pred &= ~missed
    noise = rng.integers(0, pred.size, size=int(speckle * pred.size))  # repeats are harmless
    pred.reshape(-1)[noise] = True
    return pred, gt


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speckle", type=float, default=0.001)
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()

    pred, gt = make_pair(args.speckle)
    rss_inputs = peak_rss_gib()
    start = time.perf_counter()
    scores = score_case(pred, gt, SPACING)
    seconds = time.perf_counter() - start
    result = {
        "shape_zyx": SHAPE,
        "foreground_gt": int(gt.sum()),
        "foreground_pred": int(pred.sum()),
        "seconds": round(seconds, 2),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "peak_rss_before_scoring_gib": round(rss_inputs, 3),
        "scores": {k: round(v, 4) for k, v in scores.items()},
    }
    if args.baseline:
        from medpy.metric.binary import hd95 as medpy_hd95

        start = time.perf_counter()
        medpy_hd95(pred, gt, voxelspacing=SPACING)
        result["medpy_hd95_seconds"] = round(time.perf_counter() - start, 2)
        result["score_case_vs_medpy_hd95_alone"] = round(result["medpy_hd95_seconds"] / seconds, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
