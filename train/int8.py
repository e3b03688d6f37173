"""``python -m train.int8 WEIGHTS``: the int8 OpenVINO models of a weights folder, at build time.

NNCF's post-training quantisation (:func:`inference.openvino_backend.quantize`) needs
calibration windows: phantoms (``phantoms.generate_case``, seeds apart from every evaluation
set) preprocessed as a case is, half centred on vessels (the rare bright voxels that set the
activation ranges), half anywhere, and other phantoms' windows for the accuracy control. The
image holds neither ``phantoms`` nor ``nncf``: it reads the int8 IR this writes into
``WEIGHTS/openvino`` (or ``--output``), with ``--precision int8``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.openvino_backend import prepare
from inference.preprocessing import Geometry, preprocess
from model.weights import load_manifest
from phantoms import generate_case

CALIBRATION_SEED = 90_000  # phantoms never used for evaluation (those start at 0)


def calibration_windows(manifest, count: int = 64, seed: int = CALIBRATION_SEED) -> list:
    """``count`` windows ``(1, 1, *patch)`` of phantoms (``phantoms.generate_case``) preprocessed
    as a case is: the activation ranges int8 must cover. Half are centred on vessels (the rare,
    bright voxels that set the ranges), half anywhere."""

    patch = np.array(manifest.patch_size)
    rng = np.random.default_rng(seed)
    windows, case = [], 0
    while len(windows) < count:
        shape = tuple(int(p) for p in 2 * patch)  # drawn at the model's spacing: no resampling
        image, label = generate_case(shape, seed=seed + case, spacing=min(manifest.target_spacing))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        volume = preprocess(array, Geometry.of(image), manifest)
        vessels = np.argwhere(sitk.GetArrayFromImage(label) > 0)
        for k in range(min(8, count - len(windows))):
            centre = vessels[rng.integers(len(vessels))] if k % 2 else rng.integers(volume.shape)
            start = np.clip(centre - patch // 2, 0, np.array(volume.shape) - patch)
            box = tuple(slice(a, a + p) for a, p in zip(start, patch))
            windows.append(np.ascontiguousarray(volume[box])[None, None])
        case += 1
    return windows


def check_windows(manifest) -> list:
    """Windows for the accuracy control of :func:`quantize`, from other phantoms."""
    return calibration_windows(manifest, count=16, seed=CALIBRATION_SEED + 1000)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.int8", description=__doc__)
    parser.add_argument("weights", type=Path, help="weights folder with manifest.json")
    parser.add_argument("--output", type=Path, help="where the IR goes (default WEIGHTS/openvino)")
    args = parser.parse_args(argv)
    manifest = load_manifest(args.weights)
    calibration = (calibration_windows(manifest), check_windows(manifest))
    for path in prepare(args.weights, args.output, calibration):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
