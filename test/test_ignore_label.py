"""The ignore label (nnU-Net v2): voxels a site did not label count as neither vessel nor
background in the loss, the WBCE weight, the patch sampling and the validation scores; a
site without one trains exactly as before. Sites are phantom datasets written to disk."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from phantoms import write_dataset
from phantoms.annotation import Annotation
from train.config import TrainConfig
from train.data import SiteDataError, has_ignore, load_site, vessel_fraction
from train.loss import positive_weight, soft_dice_loss, vessel_loss
from train.sampling import IGNORE_TARGET, epoch_batches, sample_patch
from train.task import validate, validation_predictor

SPACING = (0.227, 0.227, 0.227)
PHANTOMS = {"shape": (48, 48, 48), "seed": 2, "family": "reference", "spacing": 0.227}


@pytest.fixture(scope="module")
def major_site(tmp_path_factory) -> Path:
    """A site that labels vessels of 1 mm and more; the thinner ones are ignore (2)."""
    root = tmp_path_factory.mktemp("major")
    return write_dataset(root, 2, annotation=Annotation("major"), **PHANTOMS)[0]


def copy_site(site: Path, destination: Path) -> Path:
    return Path(shutil.copytree(site, destination / "site"))


def read_labels(site: Path) -> dict[str, np.ndarray]:
    return {
        path.name.removesuffix(".nii.gz"): sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        for path in sorted((site / "labelsTr").glob("*.nii.gz"))
    }


def set_labels(site: Path, labels: dict) -> None:
    description = json.loads((site / "dataset.json").read_text())
    description["labels"] = labels
    (site / "dataset.json").write_text(json.dumps(description))


# --- loss -------------------------------------------------------------------------------------


def loss_before_the_ignore_label(logits, target, pos_weight, alpha=0.6):
    """train.loss.vessel_loss as it was before the ignore label, line for line."""
    z = (logits[:, 1] - logits[:, 0]).float()
    target = target.to(z.dtype)
    bce = F.binary_cross_entropy_with_logits(z, target)
    weight = torch.tensor(pos_weight, dtype=z.dtype, device=z.device)
    wbce = F.binary_cross_entropy_with_logits(z, target, pos_weight=weight)
    dice = soft_dice_loss(torch.sigmoid(z), target)
    return bce + alpha * wbce + (1.0 - alpha) * dice


def test_a_site_without_ignore_label_gets_the_same_loss_bit_for_bit():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16, 16)
    target = (torch.rand(2, 16, 16, 16) > 0.9).float()
    assert torch.equal(
        vessel_loss(logits, target, 7.0, 0.6), loss_before_the_ignore_label(logits, target, 7.0)
    )
    # A patch of a partially labelled site that happens to hold no ignored voxel: same value.
    masked = vessel_loss(logits, target, 7.0, 0.6, IGNORE_TARGET)
    assert float(masked) == pytest.approx(
        float(loss_before_the_ignore_label(logits, target, 7.0)), 1e-6
    )


def test_ignored_voxels_count_for_nothing_in_the_loss():
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 12, 12, 12)
    target = (torch.rand(2, 12, 12, 12) > 0.85).float()
    ignore = torch.zeros(2, 12, 12, 12, dtype=torch.bool)
    ignore[:, 3:7] = True  # an unlabelled slab, where the network sees vessels
    logits[:, 1][ignore], logits[:, 0][ignore] = 8.0, -8.0
    target[ignore] = 0.0  # what a naive site writes there
    logits.requires_grad_(True)
    with_ignore = target.clone()
    with_ignore[ignore] = IGNORE_TARGET
    masked = vessel_loss(logits, with_ignore, 5.0, 0.6, IGNORE_TARGET)
    # The same loss as with the ignored voxels cut out: the labelled voxels as one batch.
    valid = ~ignore
    kept_logits = logits.permute(1, 0, 2, 3, 4)[:, valid].reshape(1, 2, -1, 1, 1)
    kept = vessel_loss(kept_logits, target[valid].reshape(1, -1, 1, 1), 5.0, 0.6)
    assert float(masked.detach()) == pytest.approx(float(kept.detach()), rel=1e-5)
    masked.backward()
    assert not logits.grad[:, :, 3:7].any() and logits.grad[:, :, 7:].abs().sum() > 0
    # Without the switch these vessel-looking voxels would be punished as background.
    naive = vessel_loss(logits.detach(), target, 5.0, 0.6)
    assert float(naive) > float(masked.detach()) + 1.0
    # Nothing labelled at all: no loss, no gradient, no NaN.
    nothing = torch.full_like(target, IGNORE_TARGET)
    assert float(vessel_loss(logits.detach(), nothing, 5.0, 0.6, IGNORE_TARGET)) == 0.0


# --- reading a site ----------------------------------------------------------------------------


def test_the_declared_ignore_label_is_never_vessel_in_memory_or_cached(major_site, tmp_path):
    files = read_labels(major_site)
    held = load_site(major_site, SPACING, in_memory=True)
    cached = load_site(major_site, SPACING, cache_dir=tmp_path / "cache")
    again = load_site(major_site, SPACING, cache_dir=tmp_path / "cache")
    assert has_ignore(list(held.cases.values()))
    for name, label in files.items():
        assert (label == 2).any() and (label == 1).any()
        for case in (held.cases[name], cached.cases[name], again.cases[name]):
            assert np.array_equal(case.label, label == 1)
            assert np.array_equal(case.ignore, label == 2)
            assert case.ignored_voxels == np.count_nonzero(label == 2)
            assert (label.ravel()[case.foreground] == 1).all()  # centres: vessels only
    assert again.cases[name].folder == cached.cases[name].folder  # read back, not redone


def test_wbce_weight_counts_labelled_voxels_only(major_site):
    cases = list(load_site(major_site, SPACING, in_memory=True).cases.values())
    labels = read_labels(major_site).values()
    vessels = sum(np.count_nonzero(label == 1) for label in labels)
    labelled = sum(np.count_nonzero(label != 2) for label in labels)
    assert vessel_fraction(cases) == pytest.approx(vessels / labelled)
    everywhere = vessels / sum(label.size for label in labels)
    assert positive_weight(vessel_fraction(cases)) < positive_weight(everywhere)


def test_ignore_label_is_resampled_with_the_case(tmp_path):
    """On another grid the ignore mask follows, and wins over vessels where both land."""
    annotation = Annotation("sparse", sparse_every=2, sparse_slab=8)
    site = write_dataset(tmp_path, 1, **{**PHANTOMS, "spacing": 0.3}, annotation=annotation)[0]
    case = load_site(site, SPACING, in_memory=True).cases["case_000"]
    assert case.shape == (63, 63, 63) and case.ignored_voxels > 0
    assert not (case.label & case.ignore).any()
    slab_fraction = case.ignore.any(axis=(1, 2)).mean()
    assert 0.4 < slab_fraction < 0.6  # half the slabs unlabelled


def test_values_the_dataset_does_not_declare_are_refused(major_site, tmp_path):
    site = copy_site(major_site, tmp_path)
    cache = tmp_path / "cache"
    load_site(site, SPACING, cache_dir=cache)  # cached with the ignore label declared
    set_labels(site, {"background": 0, "vessel": 1})  # the declaration forgotten
    for options in ({"in_memory": True}, {"cache_dir": cache}):  # the cache must not hide it
        with pytest.raises(SiteDataError, match=r"values \[2\] are not declared.*ignore"):
            load_site(site, SPACING, **options)
    set_labels(site, {"background": 0, "vessel": 1, "ignore": 2, "aneurysm": 3})
    with pytest.raises(SiteDataError, match="must be the highest"):
        load_site(site, SPACING, in_memory=True)
    set_labels(site, {"background": 0, "vessel": 1, "ignore": 3})
    with pytest.raises(SiteDataError, match=r"values \[2\] are not declared"):
        load_site(site, SPACING, in_memory=True)


def test_a_fully_labelled_site_has_no_ignore_anywhere(tmp_path):
    site = write_dataset(tmp_path, 2, **PHANTOMS)[0]
    for options in ({"in_memory": True}, {"cache_dir": tmp_path / "cache"}):
        cases = list(load_site(site, SPACING, **options).cases.values())
        assert not has_ignore(cases) and all(c.ignore is None for c in cases)
        labels = read_labels(site).values()
        voxels = sum(label.size for label in labels)
        assert vessel_fraction(cases) == sum(np.count_nonzero(x) for x in labels) / voxels
        image, label = sample_patch(cases[0], (16, 16, 16), np.random.default_rng(0), 1.0)
        assert label.dtype == bool  # patches exactly as before


# --- sampling -----------------------------------------------------------------------------------


def test_patches_carry_the_ignore_label_and_centre_on_vessels_only(major_site):
    case = load_site(major_site, SPACING, in_memory=True).cases["case_000"]
    rng = np.random.default_rng(0)
    seen_ignore = 0
    for _ in range(100):
        _, target = sample_patch(case, (8, 8, 8), rng, foreground_fraction=1.0)
        assert set(np.unique(target)) <= {0, 1, IGNORE_TARGET}
        assert (target == 1).any()  # centred on a labelled vessel, never on an ignored one
        seen_ignore += bool((target == IGNORE_TARGET).any())
    assert seen_ignore > 0  # small vessels branch off the labelled ones
    for workers in (0, 1):  # through the batches, in this process and in a worker's memory
        batches = epoch_batches(
            [case], (16, 16, 16), 4, 2, np.random.default_rng(1), 1.0, True, workers=workers
        )
        with batches:
            labels = np.concatenate([y for _, y in batches])
        assert set(np.unique(labels)) == {0.0, 1.0, float(IGNORE_TARGET)}


# --- validation ---------------------------------------------------------------------------------


class Threshold(torch.nn.Module):
    """Logits whose vessel probability is sigmoid(image - 0.5), voxel by voxel."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), x - 0.5], dim=1)


def test_validation_scores_the_labelled_voxels_only(major_site, tmp_path):
    case = load_site(major_site, SPACING, in_memory=True).cases["case_000"]
    # An image the stand-in network segments into every vessel, the ignored ones included.
    image = (case.label | case.ignore).astype(np.float32)
    seen = dataclasses.replace(case, image=image)
    config = TrainConfig.from_run_config(
        {"patch-size": 32, "val-overlap": 0.0, "precision": "fp32", "run-dir": str(tmp_path)}
    )
    predictor = validation_predictor(Threshold(), config, torch.device("cpu"))
    assert validate(predictor, [seen])["dice"] == pytest.approx(1.0)
    # Scored as background (the switch off), the small vessels count as false positives.
    unmasked = dataclasses.replace(seen, ignore=None)
    assert validate(predictor, [unmasked])["dice"] < 0.9
