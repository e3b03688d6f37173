"""Tests of metrics/: hand-worked volumes, cross-checks against SimpleITK, MedPy, MONAI and
SciPy, empty masks, and the ``python -m metrics.evaluate`` command on NIfTI files."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from medpy.metric import binary as medpy_binary
from scipy import ndimage
from skimage.morphology import skeletonize

from inference.naming import case_name
from metrics import (
    METRIC_NAMES,
    balanced_average_hausdorff,
    betti0_error,
    cldice,
    count_components,
    dice,
    hd95,
    image_diagonal,
    jaccard,
    precision,
    recall,
    score_case,
    surface,
    surface_distances,
    volumetric_similarity,
)

REPO = Path(__file__).resolve().parents[1]
medpy_surface_distances = getattr(medpy_binary, "__surface_distances")  # noqa: B009 (module-private)


def voxels(shape: tuple[int, int, int], points) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for p in points:
        mask[p] = True
    return mask


def tube_tree(shape, n_tubes: int, seed: int, max_radius: float = 3.0) -> np.ndarray:
    """Random straight tubes of random radii: vessel-like masks with exact geometry."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n_tubes):
        a, b = rng.uniform(0, np.array(shape) - 1, (2, 3))
        axis = (b - a).astype(np.float32)
        rel = grid - a[:, None, None, None].astype(np.float32)
        t = np.clip(np.tensordot(axis, rel, axes=1) / (axis @ axis), 0, 1)
        dist2 = ((rel - t * axis[:, None, None, None]) ** 2).sum(axis=0)
        mask |= dist2 <= rng.uniform(1.0, max_radius) ** 2
    return mask


def perturb(mask: np.ndarray, seed: int) -> np.ndarray:
    """A plausible prediction: thicker in one half, thinner in the other, shifted, speckled."""
    rng = np.random.default_rng(seed)
    pred = mask.copy()
    half = mask.shape[0] // 2
    pred[:half] = ndimage.binary_dilation(mask[:half])
    pred[half:] = ndimage.binary_erosion(mask[half:])
    pred = np.roll(pred, 1, axis=2)
    pred |= rng.random(mask.shape) < 0.002
    return pred


@pytest.fixture(scope="module")
def vessel_pairs():
    """(pred, gt, spacing (z, y, x)) triples, anisotropic, 48x56x64 voxels."""
    shape = (48, 56, 64)
    out = []
    for seed, spacing in ((1, (0.8, 0.5, 0.3)), (2, (0.227, 0.227, 0.227))):
        gt = tube_tree(shape, 6, seed)
        out.append((perturb(gt, seed + 10), gt, spacing))
    return out


# --- hand-worked volumes -------------------------------------------------------------------


def test_overlap_by_hand():
    # G: 4 voxels on a line, x = 0..3; S: the line shifted to x = 1..4, plus one far voxel.
    gt = voxels((5, 5, 9), [(2, 2, x) for x in range(4)])
    pred = voxels((5, 5, 9), [(2, 2, x) for x in range(1, 5)] + [(0, 0, 0)])
    # TP = |{1,2,3}| = 3, FP = |{4, (0,0,0)}| = 2, FN = |{0}| = 1.
    assert dice(pred, gt) == pytest.approx(2 / 3)  # 2*3 / (6 + 2 + 1) = 6/9
    assert jaccard(pred, gt) == pytest.approx(1 / 2)  # 3 / (3 + 2 + 1)
    assert recall(pred, gt) == pytest.approx(3 / 4)  # 3 / (3 + 1)
    assert precision(pred, gt) == pytest.approx(3 / 5)  # 3 / (3 + 2)
    assert volumetric_similarity(pred, gt) == pytest.approx(8 / 9)  # 1 - |1 - 2| / 9


def test_cldice_parts_by_hand_follow_the_paper():
    gt = voxels((5, 5, 9), [(2, 2, x) for x in range(4)])
    pred = voxels((5, 5, 9), [(2, 2, x) for x in range(1, 5)] + [(0, 0, 0)])
    # Premise: a one-voxel line and an isolated voxel are their own skeletons.
    assert np.array_equal(skeletonize(gt), gt) and np.array_equal(skeletonize(pred), pred)
    cl = cldice(pred, gt)
    # Tprec = |S_P ∩ V_L| / |S_P| = |{1,2,3}| / 5; Tsens = |S_L ∩ V_P| / |S_L| = |{1,2,3}| / 4.
    assert cl.clpr == pytest.approx(3 / 5)
    assert cl.clre == pytest.approx(3 / 4)
    # 2 * 0.6 * 0.75 / (0.6 + 0.75) = 0.9 / 1.35
    assert cl.cldice == pytest.approx(2 / 3)


def test_cldice_ignores_thickness():
    # S: a 3x3-thick bar x = 1..7 (63 voxels); G: its centre line (7 voxels).
    pred = np.zeros((5, 5, 9), dtype=bool)
    pred[1:4, 1:4, 1:8] = True
    gt = voxels((5, 5, 9), [(2, 2, x) for x in range(1, 8)])
    # Premise: the bar's skeleton lies on the centre line (Lee thinning also shortens it).
    skel = skeletonize(pred)
    assert skel.any() and not (skel & ~gt).any()
    cl = cldice(pred, gt)
    assert cl.clre == 1.0  # S_L = the centre line, all inside the bar
    assert cl.clpr == 1.0  # S_P on the centre line = V_L
    assert cl.cldice == 1.0
    assert precision(pred, gt) == pytest.approx(7 / 63)  # while voxel precision is 1/9
    assert dice(pred, gt) == pytest.approx(14 / 70)  # 2*7 / (63 + 7)


def test_cldice_small_blob_is_its_own_skeleton():
    blob = np.zeros((4, 4, 4), dtype=bool)
    blob[1:3, 1:3, 1:3] = True
    assert not skeletonize(blob).any()  # scikit-image thins a 2x2x2 cube away
    assert cldice(blob, blob) == (1.0, 1.0, 1.0)  # documented fallback, no 0/0


def test_distances_by_hand_anisotropic():
    a, b = (1, 1, 1), (1, 1, 3)
    c, d = (2, 1, 1), (1, 3, 3)
    gt = voxels((4, 5, 5), [a, b])
    pred = voxels((4, 5, 5), [a, c, d])
    spacing = (3.0, 1.0, 0.5)  # (z, y, x) mm
    # G -> S: a in S: 0; b -> a: 2 voxels in x = 1.0 mm (b -> d: 2 mm in y).  Sum 1.0.
    # S -> G: a: 0; c -> a: 1 voxel in z = 3.0 mm; d -> b: 2 voxels in y = 2.0 mm.  Sum 5.0.
    # bAHD = (1.0 + 5.0) / (2 * |G|) = 6 / 4
    assert balanced_average_hausdorff(pred, gt, spacing) == pytest.approx(1.5)
    # Every voxel is a surface voxel here. S -> G sorted [0, 2, 3]: P95 at rank 1.9 = 2.9;
    # G -> S [0, 1]: P95 = 0.95. HD95 = max = 2.9.
    assert hd95(pred, gt, spacing) == pytest.approx(2.9)
    # MedPy pools both directions [0, 0, 1, 2, 3]: P95 at rank 3.8 = 2.8, a different statistic.
    assert medpy_binary.hd95(pred, gt, voxelspacing=spacing) == pytest.approx(2.8)
    # Isotropic 1 mm: G -> S: b -> a = 2; S -> G: c -> a = 1, d -> b = 2.  (2 + 3) / 4.
    assert balanced_average_hausdorff(pred, gt, (1.0, 1.0, 1.0)) == pytest.approx(1.25)
    # S -> G [0, 1, 2]: P95 = 1.9; G -> S [0, 2]: P95 = 1.9.
    assert hd95(pred, gt, (1.0, 1.0, 1.0)) == pytest.approx(1.9)


@pytest.mark.parametrize(("axis", "expected"), [(0, 2.0), (1, 0.7)])
def test_shift_costs_the_spacing_of_its_axis(axis, expected):
    gt = voxels((5, 5, 9), [(2, 2, x) for x in range(1, 8)])
    pred = np.roll(gt, 1, axis=axis)
    spacing = (2.0, 0.7, 0.3)
    # Every voxel of either line is one voxel along `axis` from the other line, and no
    # voxel is shared: all distances equal spacing[axis], so bAHD = 7s + 7s / 14 = s.
    assert balanced_average_hausdorff(pred, gt, spacing) == pytest.approx(expected)
    assert hd95(pred, gt, spacing) == pytest.approx(expected)


def test_betti0_by_hand():
    # S: (0,0,0) and (1,1,1) touch at a corner: one component with 26-connectivity (two with
    # 6-connectivity); plus (4,4,4) and (0,4,0): 3 components. G: one voxel, 1 component.
    pred = voxels((5, 5, 5), [(0, 0, 0), (1, 1, 1), (4, 4, 4), (0, 4, 0)])
    gt = voxels((5, 5, 5), [(2, 2, 2)])
    assert count_components(pred) == 3
    assert betti0_error(pred, gt) == 2  # |3 - 1|
    assert betti0_error(gt, pred) == 2


def test_empty_masks_give_documented_values():
    shape, spacing = (3, 4, 5), (1.0, 2.0, 3.0)
    diagonal = math.sqrt(3**2 + 8**2 + 15**2)  # extents (3, 8, 15) mm
    assert image_diagonal(shape, spacing) == pytest.approx(diagonal)
    empty = np.zeros(shape, dtype=bool)
    full = voxels(shape, [(0, 0, 0), (2, 3, 4)])  # two components
    both = score_case(empty, empty, spacing)
    assert both == {**dict.fromkeys(METRIC_NAMES, 1.0), "bAHD": 0.0, "HD95": 0.0, "Betti0err": 0.0}
    for pred, gt in ((empty, full), (full, empty)):
        one = score_case(pred, gt, spacing)
        expected = {**dict.fromkeys(METRIC_NAMES, 0.0), "bAHD": diagonal, "HD95": diagonal}
        assert one == pytest.approx({**expected, "Betti0err": 2.0})
        assert balanced_average_hausdorff(pred, gt, spacing) == pytest.approx(diagonal)
        assert hd95(pred, gt, spacing) == pytest.approx(diagonal)
        assert cldice(pred, gt) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(empty, full, spacing)


def test_label_arrays_count_label_one_only():
    gt_bool = tube_tree((24, 24, 24), 3, seed=5)
    labels = gt_bool.astype(np.uint8)
    labels[0, :4, :4] = 2  # another label: background for the metrics
    pred = np.roll(gt_bool, 1, axis=1)
    assert score_case(pred.astype(np.int16), labels, (1, 1, 1)) == score_case(
        pred, gt_bool, (1, 1, 1)
    )


def test_bad_input_is_refused():
    mask = np.zeros((4, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        dice(mask, np.zeros((4, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="3D"):
        dice(mask[0], mask[0])
    with pytest.raises(ValueError, match="spacing"):
        hd95(mask, mask, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        score_case(mask, mask, (1.0, 1.0))


def test_crop_is_invisible(vessel_pairs):
    pred, gt, spacing = vessel_pairs[0]
    # The tubes touch the image border; padding adds background there, which is what the
    # metrics assume beyond the border, and moves the union's box away from the border.
    padded = [np.pad(m, ((3, 5), (7, 2), (4, 4))) for m in (pred, gt)]
    scores, scores_padded = score_case(pred, gt, spacing), score_case(*padded, spacing)
    assert scores_padded == pytest.approx(scores, rel=1e-12)
    assert (gt[0].any() or gt[-1].any()) and 0 < scores["bAHD"] < scores["HD95"]


# --- cross-checks against other libraries --------------------------------------------------


def overlap_filter(pred: np.ndarray, gt: np.ndarray) -> sitk.LabelOverlapMeasuresImageFilter:
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(
        sitk.GetImageFromArray(pred.astype(np.uint8)), sitk.GetImageFromArray(gt.astype(np.uint8))
    )
    return overlap


def test_overlap_matches_simpleitk_and_medpy(vessel_pairs):
    rng = np.random.default_rng(7)
    pairs = [(p, g) for p, g, _ in vessel_pairs]
    pairs.append((rng.random((20, 30, 40)) < 0.3, rng.random((20, 30, 40)) < 0.2))
    for pred, gt in pairs:
        itk = overlap_filter(pred, gt)
        assert dice(pred, gt) == pytest.approx(itk.GetDiceCoefficient(), rel=1e-9)
        assert jaccard(pred, gt) == pytest.approx(itk.GetJaccardCoefficient(), rel=1e-9)
        # SimpleITK's volume similarity is the signed 2(|S| - |G|) / (|S| + |G|);
        # Taha & Hanbury's is 1 - |FN - FP| / (|S| + |G|) = 1 - |signed| / 2.
        signed = itk.GetVolumeSimilarity()
        assert volumetric_similarity(pred, gt) == pytest.approx(1 - abs(signed) / 2, rel=1e-9)
        assert abs(signed) > 0.01  # the pairs differ in volume, so the two definitions differ
        assert recall(pred, gt) == pytest.approx(medpy_binary.recall(pred, gt), rel=1e-12)
        assert precision(pred, gt) == pytest.approx(medpy_binary.precision(pred, gt), rel=1e-12)


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
def test_surface_distances_match_medpy_and_monai(vessel_pairs):
    from monai.metrics import compute_hausdorff_distance

    for pred, gt, spacing in vessel_pairs:
        ours = surface_distances(pred, gt, spacing)
        # Same voxels, same order, same distances as MedPy's (full-image EDT) sets.
        np.testing.assert_allclose(ours[0], medpy_surface_distances(pred, gt, spacing), rtol=1e-12)
        np.testing.assert_allclose(ours[1], medpy_surface_distances(gt, pred, spacing), rtol=1e-12)
        pooled = np.hstack(ours)
        assert np.percentile(pooled, 95) == pytest.approx(
            medpy_binary.hd95(pred, gt, voxelspacing=spacing), rel=1e-12
        )
        assert pooled.max() == pytest.approx(medpy_binary.hd(pred, gt, voxelspacing=spacing))
        assert pooled.mean() == pytest.approx(  # MedPy 0.5's assd pools both directions
            medpy_binary.assd(pred, gt, voxelspacing=spacing), rel=1e-12
        )
        # HD95 as max of the directed 95th percentiles is MONAI's definition.
        monai = compute_hausdorff_distance(
            pred[None, None],
            gt[None, None],
            include_background=True,
            percentile=95,
            spacing=spacing,
        )
        assert hd95(pred, gt, spacing) == pytest.approx(float(monai.item()), rel=1e-6)


def test_balanced_average_hausdorff_matches_full_distance_transforms(vessel_pairs):
    for pred, gt, spacing in vessel_pairs:
        # Independent route: exact EDT over the whole image, every foreground voxel.
        to_pred = ndimage.distance_transform_edt(~pred, sampling=spacing)
        to_gt = ndimage.distance_transform_edt(~gt, sampling=spacing)
        expected = (to_pred[gt].sum() + to_gt[pred].sum()) / (2 * gt.sum())
        assert balanced_average_hausdorff(pred, gt, spacing) == pytest.approx(expected, rel=1e-9)


def test_balanced_average_hausdorff_matches_medpy_on_thin_masks():
    # Sparse random voxels have no interior voxel, so MedPy's surface sets are the whole
    # masks and bAHD = (|S| asd(S, G) + |G| asd(G, S)) / (2 |G|).
    rng = np.random.default_rng(3)
    spacing = (1.5, 0.6, 0.4)
    pred, gt = rng.random((2, 30, 30, 30)) < np.array([0.01, 0.004])[:, None, None, None]
    assert np.array_equal(surface(pred), pred) and np.array_equal(surface(gt), gt)
    asd_pg = medpy_binary.asd(pred, gt, voxelspacing=spacing)
    asd_gp = medpy_binary.asd(gt, pred, voxelspacing=spacing)
    expected = (pred.sum() * asd_pg + gt.sum() * asd_gp) / (2 * gt.sum())
    assert balanced_average_hausdorff(pred, gt, spacing) == pytest.approx(expected, rel=1e-9)
    # Unlike the plain average Hausdorff, bAHD weighs the false positives by |G| too:
    average_hd = (asd_pg + asd_gp) / 2
    assert balanced_average_hausdorff(pred, gt, spacing) > average_hd


def test_distances_scale_with_spacing(vessel_pairs):
    pred, gt, spacing = vessel_pairs[0]
    scaled = tuple(2.5 * s for s in spacing)
    for metric in (hd95, balanced_average_hausdorff):
        assert metric(pred, gt, scaled) == pytest.approx(2.5 * metric(pred, gt, spacing))
    # Stretching one axis changes distances; isotropic spacing would be wrong here.
    stretched = (spacing[0] * 3, spacing[1], spacing[2])
    assert hd95(pred, gt, stretched) != pytest.approx(hd95(pred, gt, spacing))


def test_case_names():
    assert case_name("CASE_0000.nii.gz") == "CASE"
    assert case_name("CASE.mha") == "CASE"
    assert case_name("a_0001.NRRD") == "a_0001"
    assert case_name("dataset.json") is None


# --- the evaluate command ------------------------------------------------------------------


def write_mask(path: Path, mask: np.ndarray, spacing_xyz=(0.25, 0.5, 0.75)) -> None:
    # Spacings exact in float32, as NIfTI stores them, so scores compare to 1e-9.
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path))


def run_evaluate(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metrics.evaluate", *map(str, args)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_evaluate_command(tmp_path, vessel_pairs):
    (pred_a, gt_a, _), (pred_b, gt_b, _) = vessel_pairs
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    write_mask(gt_dir / "A.nii.gz", gt_a)
    write_mask(pred_dir / "A_0000.nii.gz", pred_a)  # nnU-Net channel suffix
    write_mask(gt_dir / "B_0000.nii.gz", gt_b)
    write_mask(pred_dir / "B.mha", pred_b)
    write_mask(gt_dir / "C.nii.gz", gt_a)
    write_mask(pred_dir / "C.nrrd", gt_a, spacing_xyz=(0.25, 0.5, 0.76))  # spacing differs
    write_mask(gt_dir / "D.nii.gz", gt_b)  # no prediction
    write_mask(gt_dir / "F.nii.gz", gt_a)
    write_mask(pred_dir / "F.nii.gz", gt_a[:, :, :-1])  # size differs
    write_mask(pred_dir / "E.nii", gt_a)  # no ground truth
    write_mask(gt_dir / "G.nii.gz", gt_b)
    (pred_dir / "G.nii.gz").write_bytes(b"not an image")  # unreadable
    (pred_dir / "notes.txt").write_text("not a mask")  # ignored

    run = run_evaluate("--pred", pred_dir, "--gt", gt_dir, "--csv", tmp_path / "r.csv",
                       "--json", tmp_path / "r.json", "--workers", "2")  # fmt: skip
    assert run.returncode == 1, run.stderr
    errors = run.stderr.splitlines()
    assert any(str(pred_dir / "C.nrrd") in e and str(gt_dir / "C.nii.gz") in e for e in errors)
    assert any(str(pred_dir / "F.nii.gz") in e and str(gt_dir / "F.nii.gz") in e for e in errors)
    assert any("D" in e and "no prediction" in e for e in errors)
    assert any(str(pred_dir / "E.nii") in e for e in errors)
    assert any(str(pred_dir / "G.nii.gz") in e and "cannot read" in e for e in errors)
    assert "Traceback" not in run.stderr
    for column in ("Dice", "Re", "Pr", "clDice", "clRe", "clPr", "Jaccard", "VS", "bAHD"):
        assert column in run.stdout.splitlines()[0]

    result = json.loads((tmp_path / "r.json").read_text())
    cases = {c["case"]: c for c in result["cases"]}
    assert {k: c["status"] for k, c in cases.items()} == {
        "A": "ok", "B": "ok", "C": "refused", "D": "missing", "F": "refused", "G": "refused",
    }  # fmt: skip
    spacing_zyx = (0.75, 0.5, 0.25)
    expected = {
        "A": score_case(pred_a, gt_a, spacing_zyx),
        "B": score_case(pred_b, gt_b, spacing_zyx),
        "D": score_case(np.zeros_like(gt_b), gt_b, spacing_zyx),
    }
    for case, scores in expected.items():
        assert cases[case]["metrics"] == pytest.approx(scores, rel=1e-9)
    assert cases["D"]["metrics"]["HD95"] == pytest.approx(image_diagonal(gt_b.shape, spacing_zyx))
    assert result["summary"]["n"] == 3
    for name in METRIC_NAMES:
        values = [s[name] for s in expected.values()]
        assert result["summary"]["mean"][name] == pytest.approx(np.mean(values), rel=1e-9)
        assert result["summary"]["std"][name] == pytest.approx(np.std(values, ddof=1), rel=1e-9)
    assert result["missing"] == ["D"] and result["refused"] == ["C", "F", "G"]

    with (tmp_path / "r.csv").open() as f:
        rows = {row["case"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["A", "B", "C", "D", "F", "G"]
    assert float(rows["A"]["clDice"]) == pytest.approx(expected["A"]["clDice"], rel=1e-6)
    assert rows["C"]["Dice"] == "" and rows["D"]["status"] == "missing"


def test_evaluate_command_clean_run_and_usage_errors(tmp_path):
    gt = tube_tree((16, 20, 24), 2, seed=9)
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    write_mask(gt_dir / "X.nii.gz", gt)
    write_mask(pred_dir / "X.nii.gz", gt)
    run = run_evaluate("--pred", pred_dir, "--gt", gt_dir)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert run.stdout.splitlines()[2].split()[:4] == ["X", "1.0000", "1.0000", "1.0000"]

    write_mask(pred_dir / "X_0000.mha", gt)  # a second file for case X
    run = run_evaluate("--pred", pred_dir, "--gt", gt_dir)
    assert run.returncode == 2
    assert str(pred_dir / "X.nii.gz") in run.stderr and str(pred_dir / "X_0000.mha") in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1

    run = run_evaluate("--pred", tmp_path / "nowhere", "--gt", gt_dir)
    assert run.returncode == 2 and "nowhere" in run.stderr
