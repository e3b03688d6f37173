"""The independent evaluation phantoms (phantoms/independent.py): reproducible, well-formed,
vessels visible but not separable from bone by one global threshold, and built from code
that shares nothing with the training generator."""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from phantoms.independent import generate_independent

SHAPE = (64, 64, 64)
SOURCE = Path(__file__).resolve().parents[1] / "phantoms" / "independent.py"
PROJECT_PACKAGES = {"phantoms", "model", "train", "inference", "metrics", "postprocess"}


@cache
def _case(seed: int, shape=SHAPE, spacing=0.227):
    image, label = generate_independent(shape, seed=seed, spacing=spacing)
    return image, label, sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)


def _best_threshold_dice(image: np.ndarray, label: np.ndarray) -> float:
    """Best Dice of `image > t` against the label over t at the image's percentiles."""
    truth = label.astype(bool)
    best = 0.0
    for t in np.unique(np.percentile(image, np.linspace(50, 99.9, 100))):
        mask = image > t
        best = max(best, 2 * np.count_nonzero(mask & truth) / (mask.sum() + truth.sum()))
    return best


def test_same_seed_same_case_other_seed_other_case():
    image, label, a, b = _case(3)
    image2, label2 = generate_independent(SHAPE, seed=3)
    np.testing.assert_array_equal(a, sitk.GetArrayFromImage(image2))
    np.testing.assert_array_equal(b, sitk.GetArrayFromImage(label2))
    assert image.GetOrigin() == image2.GetOrigin()
    assert image.GetDirection() == image2.GetDirection()
    _, _, c, d = _case(4)
    assert not np.array_equal(a, c) and not np.array_equal(b, d)
    assert _case(4)[0].GetOrigin() != image.GetOrigin()


def test_types_and_geometry():
    image, label, a, b = _case(5, shape=(40, 48, 56), spacing=0.3)
    assert a.dtype == np.int16 and b.dtype == np.uint8
    assert a.shape == b.shape == (40, 48, 56)
    assert set(np.unique(b)) <= {0, 1}
    for prop in ("GetSpacing", "GetOrigin", "GetDirection", "GetSize"):
        assert getattr(image, prop)() == getattr(label, prop)()
    np.testing.assert_allclose(image.GetSpacing(), (0.3, 0.3, 0.3))
    assert np.linalg.norm(image.GetOrigin()) > 1.0
    rot = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    angle = np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1)))
    assert 0.5 < angle < 10


def test_vessel_fraction_and_cut_trees_keep_all_components():
    counts = []
    for seed in range(4):
        b = _case(seed)[3].astype(bool)
        assert 0.003 <= b.mean() <= 0.05, (seed, b.mean())
        _, n = ndimage.label(b, structure=np.ones((3, 3, 3)))
        counts.append(n)
    # trees leaving and re-entering the field of view give several components, all kept
    assert max(counts) > 1, counts


def test_no_global_threshold_segments_the_vessels():
    for seed in (0, 1, 2):
        _, _, a, b = _case(seed)
        assert _best_threshold_dice(a.astype(np.float32), b) < 0.75, seed


def test_vessels_are_visible():
    local = []
    for seed in (0, 1, 2, 3):
        _, _, a, b = _case(seed)
        a, lumen = a.astype(np.float32), b.astype(bool)
        assert a[lumen].mean() > np.median(a) + 200, seed
        # against the tissue 2-4 voxels around the lumen (bone where a vessel crosses it)
        around = ndimage.binary_dilation(lumen, iterations=4) & ~ndimage.binary_dilation(
            lumen, iterations=2
        )
        local.append(np.median(a[lumen]) - np.median(a[around]))
    assert min(local) > 100 and np.mean(local) > 250, local


def test_imports_nothing_from_the_project():
    tree = ast.parse(SOURCE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add(node.module.split(".")[0])
    assert not roots & PROJECT_PACKAGES, roots
    third_party = roots - set(sys.stdlib_module_names)
    assert third_party <= {"numpy", "scipy", "SimpleITK", "cc3d"}, third_party


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((31, 64, 64), 0.227), ((64, 64), 0.227), ((64, 64, 64), 0.0), ((64, 64, 64), -0.2)],
)
def test_bad_arguments_raise(shape, spacing):
    with pytest.raises(ValueError):
        generate_independent(shape, seed=0, spacing=spacing)
