"""Tests of the synthetic 3DRA phantoms: determinism, labels, geometry, sites, files, CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from scipy import ndimage
from skimage.morphology import skeletonize

from phantoms import (
    SITE_PROFILES,
    case_seed,
    generate_case,
    generate_volume,
    site_profile,
    write_dataset,
)
from phantoms.generator import keep_main_tree
from phantoms.preview import GAP, auto_scale, render_preview

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "test" / "sample"
# Keep in step with test/sample/README.md (the command that regenerates the sample).
SAMPLE_SEED, SAMPLE_SHAPE = 2026, (128, 128, 128)


def sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def best_threshold_dice(image: np.ndarray, label: np.ndarray) -> float:
    """Highest Dice of `image >= t` over every threshold t, chosen knowing the label.

    Counts per intensity value, accumulated from the top, give for each t the predicted
    volume P(t) and true positives TP(t); Dice(t) = 2 TP / (P + |G|).
    """
    values = image.ravel().astype(np.int64)
    values -= values.min()
    all_counts = np.bincount(values)
    label_counts = np.bincount(values[label.ravel() > 0], minlength=all_counts.size)
    predicted = np.cumsum(all_counts[::-1])
    true_pos = np.cumsum(label_counts[::-1])
    return float((2 * true_pos / (predicted + label.sum())).max())


@pytest.fixture(scope="module")
def phantom64():
    return generate_volume((64, 64, 64), seed=3)


def test_same_seed_same_files_other_seed_differs(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", 1, (48, 48, 48), seed=11)[0]
    b = write_dataset(tmp_path / "b", 1, (48, 48, 48), seed=11)[0]
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 3  # image, label, dataset.json
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = write_dataset(tmp_path / "c", 1, (48, 48, 48), seed=12)[0]
    read = sitk.GetArrayFromImage
    img_a = read(sitk.ReadImage(str(a / "imagesTr" / "case_000_0000.nii.gz")))
    img_c = read(sitk.ReadImage(str(c / "imagesTr" / "case_000_0000.nii.gz")))
    assert sha(img_a) != sha(img_c)
    first, again = generate_volume((48, 48, 48), seed=5), generate_volume((48, 48, 48), seed=5)
    assert sha(first.image) == sha(again.image) and sha(first.label) == sha(again.label)


def test_label_is_one_bright_tree_that_no_threshold_separates_from_bone(phantom64) -> None:
    image, label = phantom64.image, phantom64.label.astype(bool)
    assert 0.002 < label.mean() < 0.15
    assert image[label].mean() > image[~label].mean() + 200
    # Bone is as bright as the vessels: the best global threshold, chosen knowing the
    # answer, still scores poorly.
    assert best_threshold_dice(image, label) < 0.8
    assert cc3d.connected_components(label, connectivity=26, return_N=True)[1] == 1


def test_tree_tapers_from_trunk_to_thin_branches_with_aneurysm(phantom64) -> None:
    label = phantom64.label.astype(bool)
    radius = ndimage.distance_transform_edt(label)[skeletonize(label)]
    assert (radius <= 1.5).sum() > 20  # vessels only a few voxels wide
    assert radius.max() >= 2.5  # the trunk
    assert phantom64.tree.max_generation >= 4
    assert label[0].any()  # the carotid enters through the bottom (inferior) slice
    centres = phantom64.tree.aneurysm_centres
    assert centres
    inside = [label[tuple(np.clip(np.round(c).astype(int), 0, 63))] for c in centres]
    assert any(inside)


def test_geometry_is_written_as_asked(tmp_path: Path) -> None:
    image, label = generate_case((40, 48, 56), seed=2, spacing=0.3)
    assert image.GetSize() == (56, 48, 40)  # SimpleITK x, y, z versus numpy z, y, x
    assert image.GetPixelID() == sitk.sitkInt16 and label.GetPixelID() == sitk.sitkUInt8
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(direction) == pytest.approx(1.0)
    assert not np.allclose(direction, np.eye(3))
    assert np.linalg.norm(image.GetOrigin()) > 1.0
    for img in (image, label):
        assert img.GetSpacing() == pytest.approx((0.3, 0.3, 0.3))
    assert label.GetOrigin() == image.GetOrigin()
    assert label.GetDirection() == image.GetDirection()
    assert set(np.unique(sitk.GetArrayViewFromImage(label))) <= {0, 1}
    path = tmp_path / "x.nii.gz"
    sitk.WriteImage(image, str(path), useCompression=True)
    back = sitk.ReadImage(str(path))
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-5)
    assert sha(sitk.GetArrayViewFromImage(back)) == sha(sitk.GetArrayViewFromImage(image))


def test_unsigned_output_stores_hounsfield_plus_1024() -> None:
    signed = generate_volume((40, 40, 40), seed=9).image
    unsigned = generate_volume((40, 40, 40), seed=9, dtype=np.uint16).image
    assert unsigned.dtype == np.uint16 and signed.dtype == np.int16
    expected = np.maximum(signed.astype(np.int32), -1024) + 1024  # air below -1024 clips
    np.testing.assert_array_equal(unsigned.astype(np.int32), expected)


def test_keep_main_tree_drops_stray_pieces_from_label_and_image() -> None:
    label = np.zeros((20, 20, 20), dtype=bool)
    label[2:12, 5, 5] = True  # the tree
    label[12, 6, 6] = True  # diagonal neighbour: same 26-connected component
    label[17, 15, 15] = True  # a stray piece
    signal = label.astype(np.float32)
    assert keep_main_tree(label, signal) == 2
    assert label[12, 6, 6] and not label[17, 15, 15] and label.sum() == 11
    assert signal[17, 15, 15] == 0 and signal[2, 5, 5] == 1


def _tissue_noise(image: np.ndarray, label: np.ndarray) -> float:
    """Robust std (1.4826 MAD) of soft tissue: far from vessels, neither bone nor air."""
    far = ~ndimage.binary_dilation(label.astype(bool), iterations=3)
    tissue = image[far & (image > -300) & (image < 300)].astype(np.float64)
    return 1.4826 * float(np.median(np.abs(tissue - np.median(tissue))))


def test_sites_differ_in_their_statistics() -> None:
    stats = {}
    for k in (1, 2, 3, 4):
        ph = generate_volume((64, 64, 64), seed=5, profile=site_profile(k, seed=0))
        stats[k] = {
            "noise": _tissue_noise(ph.image, ph.label),
            "vessel": float(np.median(ph.image[ph.label > 0])),
            "outside": float((ph.image == int(ph.profile.outside_hu)).mean()),
        }
    assert stats[2]["noise"] > 1.5 * stats[1]["noise"]  # noisier scanner
    assert stats[4]["vessel"] < 0.8 * stats[1]["vessel"]  # weaker contrast injection
    assert stats[3]["outside"] > 0.1  # reconstructed cylinder smaller than the volume
    assert all(stats[k]["outside"] == 0 for k in (1, 2, 4))
    assert site_profile(5, 0).name != site_profile(1, 0).name
    assert site_profile(1, 0) == site_profile(1, 0) != site_profile(1, 1)
    assert len({p.name for p in SITE_PROFILES}) == len(SITE_PROFILES)


def test_sites_are_valid_nnunet_datasets(tmp_path: Path) -> None:
    roots = write_dataset(tmp_path, cases=2, shape=(48, 40, 40), seed=1, sites=2)
    assert roots == [tmp_path / "site1", tmp_path / "site2"]
    for k, root in enumerate(roots, start=1):
        meta = json.loads((root / "dataset.json").read_text())
        assert meta["channel_names"] == {"0": "3DRA"}
        assert meta["labels"]["background"] == 0 and meta["labels"]["vessel"] == 1
        assert meta["file_ending"] == ".nii.gz"
        images = sorted((root / "imagesTr").iterdir())
        labels = sorted((root / "labelsTr").iterdir())
        assert meta["numTraining"] == len(images) == len(labels) == 2
        for image_path in images:
            name = image_path.name.removesuffix("_0000.nii.gz")
            assert name.startswith(f"site{k}_")
            label_path = root / "labelsTr" / f"{name}.nii.gz"
            assert label_path.is_file()
            image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
            assert image.GetSize() == label.GetSize() == (40, 40, 48)
            assert label.GetPixelID() == sitk.sitkUInt8
            np.testing.assert_allclose(image.GetOrigin(), label.GetOrigin(), atol=1e-4)
        index = {f"site{k}_000": 0, f"site{k}_001": 1}
        for name, seed in meta["phantom"]["case_seeds"].items():
            assert seed == case_seed(1, k, index[name])
    assert not list(tmp_path.rglob(".*tmp*"))  # atomic writes leave no temporary files


def test_command_and_preview_run_as_processes(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "phantoms", "--out", str(out), "--cases", "1"]
    cmd += ["--size", "40", "48", "56", "--seed", "3"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    image = out / "imagesTr" / "case_000_0000.nii.gz"
    label = out / "labelsTr" / "case_000.nii.gz"
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1
    png = tmp_path / "mip.png"
    cmd = [sys.executable, "-m", "phantoms.preview", str(image), "--label", str(label)]
    run = subprocess.run(
        [*cmd, "--png", str(png)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    scale = auto_scale((40, 48, 56))
    with Image.open(png) as picture:
        # axial (Y x X), coronal (Z x X), sagittal (Z x Y), side by side
        assert picture.size == (scale * (56 + 56 + 48) + 2 * GAP, scale * 48)
        rgb = np.asarray(picture.convert("RGB")).astype(int)
    assert (rgb[..., 0] - rgb[..., 1] > 60).any()  # the red overlay of the mask
    assert rgb.std() > 10
    other = tmp_path / "other.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkUInt8), str(other))
    cmd = [sys.executable, "-m", "phantoms.preview", str(image), "--label", str(other)]
    run = subprocess.run(
        [*cmd, "--png", str(png)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1 and "differs" in run.stderr
    truth = sitk.ReadImage(str(label))
    empty = sitk.Image(truth.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(truth)
    sitk.WriteImage(empty, str(other))
    cmd = [sys.executable, "-m", "phantoms.preview", str(image), "--label", str(other)]
    run = subprocess.run(
        [*cmd, "--truth", str(label), "--png", str(png)], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert (rgb[..., 2] - rgb[..., 0] > 60).any()  # an empty mask misses every vessel: blue
    assert not (rgb[..., 0] - rgb[..., 1] > 60).any()  # and marks nothing false: no red
    run = subprocess.run([*cmd[:4], "--truth", str(label), "--png", str(png)], cwd=REPO)
    assert run.returncode == 2


def test_bad_requests_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        generate_case((64, 64))
    with pytest.raises(ValueError, match="cases"):
        write_dataset(tmp_path, cases=0)
    with pytest.raises(ValueError, match="site index"):
        site_profile(0)
    with pytest.raises(ValueError, match="layout"):
        write_dataset(tmp_path, cases=1, shape=(32, 32, 32), layout="bids")
    write_dataset(tmp_path / "ds", cases=2, shape=(32, 32, 32))
    with pytest.raises(ValueError, match="other cases"):  # case_001 would be left behind
        write_dataset(tmp_path / "ds", cases=1, shape=(32, 32, 32))


def test_bundled_sample_is_small_and_regenerates() -> None:
    image_path = SAMPLE / "input" / "sample_0000.nii.gz"
    label_path = SAMPLE / "ground_truth" / "sample.nii.gz"
    assert image_path.stat().st_size + label_path.stat().st_size < 3 * 2**20
    image, label = sitk.ReadImage(str(image_path)), sitk.ReadImage(str(label_path))
    assert image.GetSize() == label.GetSize() == SAMPLE_SHAPE[::-1]
    assert label.GetPixelID() == sitk.sitkUInt8
    fresh_image, fresh_label = generate_case(SAMPLE_SHAPE, case_seed(SAMPLE_SEED, 0, 0))
    # Another CPU's float32 exp/log may differ in the last bit, hence tolerances rather than
    # equality; a generator change that alters the phantoms fails here: regenerate the sample.
    stored = sitk.GetArrayViewFromImage(label).astype(bool)
    fresh = sitk.GetArrayViewFromImage(fresh_label).astype(bool)
    assert 2 * (stored & fresh).sum() / (stored.sum() + fresh.sum()) > 0.999
    diff = np.abs(
        sitk.GetArrayViewFromImage(image).astype(np.int32)
        - sitk.GetArrayViewFromImage(fresh_image).astype(np.int32)
    )
    assert (diff > 1).mean() < 1e-3
    np.testing.assert_allclose(image.GetOrigin(), fresh_image.GetOrigin(), atol=1e-3)


def test_preview_against_a_truth_colours_found_false_and_missed_voxels() -> None:
    truth = np.zeros((12, 20, 30), dtype=np.uint8)
    truth[6, 10, 2:20] = 1  # a vessel along x
    mask = truth.copy()
    mask[6, 10, 12:20] = 0  # its second half missed
    mask[3, 2:5, 25:28] = 1  # a false blob apart from it
    image = np.zeros(truth.shape, dtype=np.float32)
    image[truth > 0] = 1.0
    axial = np.asarray(render_preview(image, (1.0, 1.0, 1.0), mask, 1.0, truth)).astype(int)
    found, missed, false = axial[10, 5], axial[10, 15], axial[3, 26]  # (row y, column x)
    assert found[0] > 200 and found[1] > 150 and found[2] < 150  # yellow
    assert missed[2] - missed[0] > 60  # blue
    assert false[0] - false[1] > 60 and false[0] - false[2] > 60  # red
    plain = np.asarray(render_preview(image, (1.0, 1.0, 1.0), mask, 1.0)).astype(int)
    assert plain[10, 15, 2] - plain[10, 15, 0] < 60  # without a truth no voxel is "missed"
