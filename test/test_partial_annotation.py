"""Partially labelled phantom sites (``python -m phantoms --annotation full|major|sparse``):
the labels a site that traces only large vessels, or only some slabs, would write, with the
rest as the declared ignore label or, ``--naive``, as background. Written to disk, read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from metrics import small_vessels
from phantoms import write_dataset
from phantoms.__main__ import main
from phantoms.annotation import IGNORE_LABEL, Annotation, labelled_slabs

SHAPE, SPACING = (48, 40, 40), 0.227
PHANTOMS = {"shape": SHAPE, "seed": 3, "family": "reference", "spacing": SPACING}


def read(root: Path, folder: str = "labelsTr", name: str = "case_000") -> np.ndarray:
    suffix = "_0000" if folder == "imagesTr" else ""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(root / folder / f"{name}{suffix}.nii.gz")))


def meta(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("full"), 1, **PHANTOMS)[0]


def test_full_annotation_writes_the_labels_as_before(full):
    label = read(full)
    assert set(np.unique(label)) == {0, 1}
    assert meta(full)["labels"] == {"background": 0, "vessel": 1}
    assert meta(full)["phantom"]["annotation"]["mode"] == "full"


def test_major_ignores_exactly_the_vessels_under_the_diameter(full, tmp_path):
    root = write_dataset(tmp_path / "major", 1, annotation=Annotation("major"), **PHANTOMS)[0]
    truth, label = read(full) > 0, read(root)
    assert np.array_equal(read(root, "imagesTr"), read(full, "imagesTr"))  # images untouched
    assert np.array_equal(label > 0, truth)  # every vessel is vessel or ignore, nothing else
    small = small_vessels(truth, (SPACING,) * 3)  # the definition smallRe scores
    assert np.array_equal(label == IGNORE_LABEL, small) and (label == 1).any() and small.any()
    assert meta(root)["labels"] == {"background": 0, "vessel": 1, "ignore": IGNORE_LABEL}
    record = meta(root)["phantom"]["annotation"]
    assert record["mode"] == "major" and record["major_diameter_mm"] == 1.0
    finer = Annotation("major", major_diameter_mm=0.6)
    fewer = read(write_dataset(tmp_path / "finer", 1, annotation=finer, **PHANTOMS)[0])
    assert 0 < np.count_nonzero(fewer == IGNORE_LABEL) < np.count_nonzero(small)


def test_sparse_labels_every_kth_slab_and_ignores_the_rest(full, tmp_path):
    annotation = Annotation("sparse", sparse_every=3, sparse_slab=4)
    root = write_dataset(tmp_path, 1, annotation=annotation, **PHANTOMS)[0]
    truth, label = read(full), read(root)
    slabs = labelled_slabs(SHAPE[0], 4, 3)
    assert slabs[:4].all() and not slabs[4:12].any() and slabs[12:16].all()
    assert np.array_equal(label[slabs], truth[slabs])
    assert (label[~slabs] == IGNORE_LABEL).all()
    assert meta(root)["labels"]["ignore"] == IGNORE_LABEL
    assert meta(root)["phantom"]["annotation"]["sparse_every"] == 3


def test_naive_writes_the_unlabelled_vessels_as_background(full, tmp_path):
    for mode in ("major", "sparse"):
        honest = read(write_dataset(tmp_path / mode, 1, annotation=Annotation(mode), **PHANTOMS)[0])
        naive_root = write_dataset(
            tmp_path / f"naive-{mode}", 1, annotation=Annotation(mode, naive=True), **PHANTOMS
        )[0]
        naive = read(naive_root)
        assert np.array_equal(naive, np.where(honest == IGNORE_LABEL, 0, honest))
        assert (read(full)[honest == IGNORE_LABEL] == 1).any()  # vessels lost to background
        assert "ignore" not in meta(naive_root)["labels"]
        assert meta(naive_root)["phantom"]["annotation"]["naive"] is True


def test_command_line_sets_the_annotation_per_site(tmp_path, capsys):
    out = tmp_path / "fed"
    args = ["--out", str(out), "--cases", "1", "--size", "40", "40", "40", "--sites", "2"]
    assert main([*args, "--family", "reference", "--annotation", "full", "major"]) == 0
    assert "ignore" not in meta(out / "site1")["labels"]
    assert meta(out / "site2")["labels"]["ignore"] == IGNORE_LABEL
    assert set(np.unique(read(out / "site2", name="site2_000"))) == {0, 1, IGNORE_LABEL}
    naive = tmp_path / "naive"
    sparse = ["--annotation", "sparse", "--naive", "--sparse-every", "2", "--sparse-slab", "5"]
    assert main(["--out", str(naive), "--cases", "1", "--size", "40", "40", "40", *sparse]) == 0
    record = meta(naive)["phantom"]["annotation"]
    assert record == {
        **record,
        "mode": "sparse",
        "naive": True,
        "sparse_every": 2,
        "sparse_slab": 5,
    }
    assert main([*args, "--annotation", "full", "major", "sparse"]) == 2
    assert "one per site (2)" in capsys.readouterr().err


def test_challenge_layout_and_naive_full_are_refused_clearly(tmp_path, capsys):
    args = ["--out", str(tmp_path / "c"), "--cases", "1", "--size", "40", "40", "40"]
    assert main([*args, "--layout", "challenge", "--annotation", "major"]) == 2
    assert "challenge layout" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert main([*args, "--naive"]) == 2
    assert "--naive needs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fully labelled"):
        write_dataset(tmp_path / "w", 1, layout="challenge", annotation=Annotation("sparse"))
    with pytest.raises(ValueError, match="sparse slabs"):
        Annotation("sparse", sparse_every=0)
