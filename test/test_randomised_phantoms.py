"""The domain-randomised training phantoms and the family switch of the dataset writer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from phantoms import write_dataset
from phantoms.randomised import (
    MAX_VESSEL_FRACTION,
    OUTSIDE_HEAD_SHARE,
    _add_psf_tail,
    _blobs,
    _clearance,
    _marrow_spaces,
    _ramp,
    _scalp,
    _shading,
    _skin_depth,
    _truncation_rim,
    generate_randomised,
)

REPO = Path(__file__).resolve().parents[1]
SEEDS = range(10)


def best_threshold_dice(image: np.ndarray, label: np.ndarray) -> float:
    """Highest Dice of ``image >= t`` over all thresholds t, chosen knowing the label."""
    values = image.ravel().astype(np.int64)
    values -= values.min()
    counts = np.bincount(values)
    hits = np.bincount(values[label.ravel() > 0], minlength=counts.size)
    return float((2 * np.cumsum(hits[::-1]) / (np.cumsum(counts[::-1]) + label.sum())).max())


@pytest.fixture(scope="module")
def cases():
    return [generate_randomised((64, 64, 64), seed=s) for s in SEEDS]


def test_same_seed_same_case_other_seed_differs(cases) -> None:
    again = generate_randomised((64, 64, 64), seed=3)
    assert np.array_equal(again.image, cases[3].image)
    assert np.array_equal(again.label, cases[3].label)
    assert (again.origin, again.direction) == (cases[3].origin, cases[3].direction)
    assert not np.array_equal(cases[3].image, cases[4].image)


def test_labels_are_vessels_in_every_case(cases) -> None:
    for case in cases:
        fraction = case.label.mean()
        assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
        assert 0.001 < fraction < MAX_VESSEL_FRACTION * 2.5, fraction
        inside = case.image[case.label > 0].astype(float)
        # vessels stand out from the tissue around them, however faintly
        assert np.median(inside) > np.median(case.image)
    pieces = [cc3d.connected_components(c.label, connectivity=26, return_N=True)[1] for c in cases]
    assert max(pieces) > 1  # several trees, or trees cut by the field of view: all kept
    assert min(pieces) >= 1


def test_looks_vary_so_that_only_shape_is_constant(cases) -> None:
    """How bright the brightest structures away from the vessels (bone) are, relative to the
    vessels, varies from case to case, so do the vessel contrast and the value range, and no
    global threshold segments the vessels in most cases."""
    ratios, contrasts, ranges, best = [], [], [], []
    for case in cases:
        image, label = case.image.astype(float), case.label > 0
        far = ~ndimage.binary_dilation(label, iterations=2)
        tissue = np.median(image[far])
        vessel = np.percentile(image[label], 90) - tissue
        ratios.append((np.percentile(image[far], 99.5) - tissue) / vessel)
        contrasts.append(vessel)
        ranges.append(image.max() - image.min())
        best.append(best_threshold_dice(case.image, case.label))
    assert max(ratios) > 1.5 * min(ratios), ratios
    assert max(contrasts) > 3 * min(contrasts)
    assert max(ranges) > 1.5 * min(ranges)
    assert np.median(best) < 0.6, best


def test_family_is_recorded_and_chosen_on_the_command_line(tmp_path: Path) -> None:
    randomised = write_dataset(tmp_path / "r", 1, (32, 32, 32), seed=1)[0]
    reference = write_dataset(tmp_path / "f", 1, (32, 32, 32), seed=1, family="reference")[0]
    for root, family in ((randomised, "randomised"), (reference, "reference")):
        assert json.loads((root / "dataset.json").read_text())["phantom"]["family"] == family
    name = "imagesTr/case_000_0000.nii.gz"
    assert (randomised / name).read_bytes() != (reference / name).read_bytes()
    cone = write_dataset(tmp_path / "c", 1, (32, 32, 32), seed=1, family="randomised-cone")[0]
    assert json.loads((cone / "dataset.json").read_text())["phantom"]["family"] == "randomised-cone"
    label = "labelsTr/case_000.nii.gz"
    labels = [
        sitk.GetArrayFromImage(sitk.ReadImage(str(root / label))) for root in (cone, randomised)
    ]
    assert np.array_equal(*labels)
    with pytest.raises(ValueError, match="family"):
        write_dataset(tmp_path / "x", 1, (32, 32, 32), family="other")
    out = tmp_path / "independent"
    command = [
        sys.executable,
        "-m",
        "phantoms",
        "--out",
        str(out),
        "--cases",
        "2",
        "--size",
        "32",
        "32",
        "32",
        "--layout",
        "challenge",
        "--family",
        "independent",
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    images = sorted((out / "input").iterdir())
    assert [p.name for p in images] == ["case_000_0000.nii.gz", "case_001_0000.nii.gz"]
    label = sitk.ReadImage(str(out / "ground_truth" / "case_000.nii.gz"))
    assert label.GetSize() == (32, 32, 32) and label.GetPixelID() == sitk.sitkUInt8


def test_bone_stays_out_of_the_lumen_and_skull_base_lumps_on_one_side() -> None:
    """A vessel inside bone of its own brightness would be a label the image does not show:
    the clearance is zero in the lumen and full a few voxels away. Skull-base lumps fill at
    most a tenth of the volume, on one side of a plane, not the whole field of view."""
    label = np.zeros((32, 32, 32), dtype=bool)
    label[14:18, 14:18, :] = True
    for seed in range(8):
        clearance = _clearance(label, np.random.default_rng(seed))
        assert clearance[label].max() == 0
        assert clearance[~ndimage.binary_dilation(label, iterations=4)].min() == 1
    for seed in range(4):
        lumps = _blobs((48, 48, 48), np.random.default_rng(seed))
        assert (lumps > 0.5).mean() <= 0.1


def test_a_heavy_tailed_point_spread_lifts_the_first_ring_outside_a_vessel() -> None:
    """The tail moves signal from the lumen to the tissue around it, conserving it, so that
    the first voxels outside a vessel are brighter than a Gaussian point-spread leaves them."""
    image = np.zeros((32, 32, 32), dtype=np.float32)
    image[14:18, 14:18, :] = 1.0
    lumen = image > 0
    first_ring = ndimage.binary_dilation(lumen) & ~lumen
    lifts = []
    for seed in range(6):
        tailed = image.copy()
        _add_psf_tail(tailed, 0.227, np.random.default_rng(seed))
        assert tailed.sum() == pytest.approx(image.sum(), rel=2e-3)  # less what leaves the volume
        assert tailed[lumen].mean() < 1.0
        lifts.append(tailed[first_ring].mean())
    assert min(lifts) > 0.005 and max(lifts) > 2 * min(lifts), lifts  # each case its own tail


def test_a_field_of_view_past_the_skin_holds_air_and_no_vessel_there() -> None:
    heads = [_ramp(_skin_depth((48, 48, 48), 0.227, np.random.default_rng(s))) for s in range(12)]
    shares = [(head < 0.5).mean() for head in heads]
    assert min(shares) > 0.05 and max(shares) < 0.7 and max(shares) - min(shares) > 0.2, shares
    seed = 2  # a randomised case whose field of view reaches past the skin
    outer = np.random.default_rng([seed, 0xA1E])
    assert outer.random() < OUTSIDE_HEAD_SHARE
    head = _ramp(_skin_depth((64, 64, 64), 0.227, outer)) >= 0.5
    case = generate_randomised((64, 64, 64), seed=seed)
    image, label = case.image.astype(float), case.label > 0
    assert not label[~head].any() and label.any()
    assert np.median(image[~head]) < np.median(image[head]) < np.median(image[label])


def test_cancellous_bone_has_marrow_spaces_inside_a_solid_cortex() -> None:
    slab = np.zeros((40, 40, 40), dtype=np.float32)
    slab[8:32] = 1.0  # 24 voxels thick
    depth = ndimage.distance_transform_edt(slab >= 0.5)
    for seed in range(4):
        holes = _marrow_spaces(slab, np.random.default_rng(seed))
        assert holes[depth <= 1].max() <= 0.5  # the cortex stays at least half bone
        assert 0.2 < (holes[depth > 3] > 0.5).mean() < 0.8
        # spaces between trabeculae, not one cavity: a line through the marrow crosses several
        line = holes[12:28, 12:28, 4:36] > 0.5
        assert np.abs(np.diff(line.astype(int), axis=-1)).sum(-1).mean() >= 2


def test_shading_raises_regions_of_tissue_by_a_share_of_the_vessel_contrast() -> None:
    """Low-frequency and additive: across the volume it moves tissue by a sizeable share of
    the contrast (so no global level separates vessel from tissue), between neighbouring
    voxels by almost nothing (so each vessel stays above the tissue around it)."""
    contrast = 0.5
    for seed in range(6):
        shading = _shading((48, 48, 48), contrast, np.random.default_rng(seed))
        spread = np.percentile(shading, 95) - np.percentile(shading, 5)
        assert 0.1 * contrast < spread < 1.5 * contrast, spread
        assert np.abs(np.diff(shading, axis=0)).max() < 0.05 * contrast


def test_a_truncation_rim_is_brightest_at_the_edge_and_fades_inwards() -> None:
    g = np.ogrid[:1, :48, :48]
    fov = ((g[1] - 23.5) ** 2 + (g[2] - 23.5) ** 2) <= 22.0**2  # a cylinder along z
    depth = ndimage.distance_transform_edt(fov)
    for seed in range(6):
        rim = np.broadcast_to(_truncation_rim(fov, 0.5, np.random.default_rng(seed)), fov.shape)
        assert rim[~fov].max() == 0
        edge, deep = rim[depth == 1], rim[depth >= 12]
        assert edge.min() >= 0.1 and edge.max() <= 0.5
        assert deep.max() < 0.5 * edge.min()


def test_a_scalp_band_lies_under_the_skin_at_a_tissue_level() -> None:
    depth = _skin_depth((48, 48, 48), 0.227, np.random.default_rng(1))
    for seed in range(6):
        band, level = _scalp(depth, 0.227, 0.3, 0.5, np.random.default_rng(seed))
        assert band[depth < -1].max() == 0 and band[depth > 8 / 0.227 + 1].max() == 0
        assert band[(depth > 1) & (depth < 2 / 0.227 - 1)].min() == 1
        assert 0.3 - 0.1 <= level <= 0.3 + 0.3


def test_cone_beam_artefacts_are_drawn_only_when_asked_and_keep_the_label(monkeypatch) -> None:
    """``cone_beam`` draws each artefact in some cases, from a stream of its own: without it
    the family is what it was; with it the label is the same."""
    artefacts = {"_shading": _shading, "_truncation_rim": _truncation_rim, "_scalp": _scalp}
    drawn = dict.fromkeys(artefacts, 0)
    for name, original in artefacts.items():

        def counted(*args, _original=original, _name=name, **kwargs):
            drawn[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(f"phantoms.randomised.{name}", counted)
    plain = [generate_randomised((48, 48, 48), seed=s) for s in range(24)]
    assert not any(drawn.values()), drawn
    cone = [generate_randomised((48, 48, 48), seed=s, cone_beam=True) for s in range(24)]
    assert min(drawn.values()) > 0, drawn
    assert all(np.array_equal(a.label, b.label) for a, b in zip(plain, cone))
    assert sum(not np.array_equal(a.image, b.image) for a, b in zip(plain, cone)) >= 6
