"""Small-vessel recall: recall on the truth vessels under 1 mm, from the truth's local
thickness. Missing a thin tube must sink it while the overall recall hardly moves."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from metrics import METRIC_NAMES, recall, score_case, small_vessel_recall, small_vessels
from metrics.evaluate import main as evaluate_main

SPACING = (0.2, 0.2, 0.2)  # mm: 1 mm is 5 voxels


def tube(shape, centre_yx, radius_voxels) -> np.ndarray:
    """A straight tube along z, 4 voxels short of both faces, of the given radius in voxels."""
    z, y, x = np.indices(shape)
    inside = (z >= 4) & (z < shape[0] - 4)
    return inside & ((y - centre_yx[0]) ** 2 + (x - centre_yx[1]) ** 2 <= radius_voxels**2)


@pytest.fixture
def thick_and_thin():
    shape = (32, 48, 48)
    thick = tube(shape, (16, 16), 6.0)  # about 2.4 mm wide
    thin = tube(shape, (34, 34), 1.0)  # 3 voxels, 0.6 mm wide
    return thick, thin


def test_local_thickness_tells_the_thin_tube_from_the_thick_one(thick_and_thin):
    thick, thin = thick_and_thin
    small = small_vessels(thick | thin, SPACING)
    assert small[thin].all()
    assert small[thick].mean() < 0.02  # the rims of its flat ends only
    assert small_vessels(thick | thin, (0.05, 0.05, 0.05))[thick].all()  # finer grid: 0.6 mm


def test_missing_the_thin_tube_sinks_small_vessel_recall_not_recall(thick_and_thin):
    thick, thin = thick_and_thin
    truth = thick | thin
    assert small_vessel_recall(truth, truth, SPACING) == 1.0
    assert small_vessel_recall(thick, truth, SPACING) < 0.1
    assert recall(thick, truth) > 0.9
    scores = score_case(thick, truth, SPACING)
    assert scores["smallRe"] == small_vessel_recall(thick, truth, SPACING)
    assert scores["Re"] - scores["smallRe"] > 0.8
    assert small_vessel_recall(thin, truth, SPACING) > 0.9  # the thin tube alone: most found


def test_small_vessel_recall_follows_the_empty_mask_conventions(thick_and_thin):
    thick, _ = thick_and_thin
    empty = np.zeros_like(thick)
    assert small_vessel_recall(empty, empty, SPACING) == 1.0
    assert small_vessel_recall(empty, thick, SPACING) == 0.0
    assert small_vessel_recall(thick, empty, SPACING) == 0.0
    assert small_vessel_recall(thick, thick, (0.5, 0.5, 0.5)) == 1.0  # nothing under 1 mm
    assert not small_vessels(thick, (0.5, 0.5, 0.5)).any()


def test_evaluate_reports_the_small_vessel_recall_column(thick_and_thin, tmp_path, capsys):
    thick, thin = thick_and_thin
    assert METRIC_NAMES[-1] == "smallRe"
    for folder, mask in (("gt", thick | thin), ("pred", thick)):
        (tmp_path / folder).mkdir()
        image = sitk.GetImageFromArray(mask.astype(np.uint8))
        image.SetSpacing(SPACING[::-1])
        sitk.WriteImage(image, str(tmp_path / folder / "case.nii.gz"))
    csv = tmp_path / "scores.csv"
    code = evaluate_main(
        ["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--csv", str(csv)]
    )
    assert code == 0 and "smallRe" in capsys.readouterr().out
    header, row = csv.read_text().splitlines()[:2]
    value = float(row.split(",")[header.split(",").index("smallRe")])
    assert value == pytest.approx(small_vessel_recall(thick, thick | thin, SPACING))
