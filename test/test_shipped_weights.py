"""The shipped fold weights: intact, as their manifest describes them, and good on the sample."""

from pathlib import Path

import SimpleITK as sitk
from safetensors import safe_open

from inference.predictor import Predictor, PredictorSettings
from inference.preprocessing import read_image
from metrics.overlap import dice
from model import load_ensemble, load_manifest
from model.weights import sha256_hex

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"
SAMPLE = ROOT / "test" / "sample"
MAX_BYTES = 80 * 2**20


def tensor_dtypes(path: Path) -> set[str]:
    """The dtypes of a safetensors file's tensors, read without loading them."""
    with safe_open(path, "pt") as file:
        return {file.get_slice(name).get_dtype() for name in file.keys()}  # noqa: SIM118


def test_the_shipped_folds_match_their_manifest():
    manifest = load_manifest(WEIGHTS)
    folds = [entry.fold for entry in manifest.folds]
    assert folds and folds == sorted(set(folds)) and set(folds) <= set(range(5))
    assert sum(entry.bytes for entry in manifest.folds) <= MAX_BYTES
    for entry in manifest.folds:
        data = (WEIGHTS / entry.file).read_bytes()
        assert len(data) == entry.bytes and sha256_hex(data) == entry.sha256
        assert tensor_dtypes(WEIGHTS / entry.file) <= {"F16", "I64"}  # fp16, BN counters
    architecture = manifest.architecture
    assert (architecture.base_channels, architecture.hsca, architecture.msfe) == (16, True, True)
    for fold, record in manifest.provenance["folds"].items():
        assert len(record["sites"]) >= 3, fold
        assert sum(site["training_cases"] for site in record["sites"].values()) >= 30, fold
        assert 0.0 < record["validation"]["dice"] <= 1.0 and record["training_seconds"] > 0
    assert len(load_ensemble(WEIGHTS)[1]) == len(folds)  # verifies each file against the manifest


def test_each_shipped_fold_is_a_cross_validation_model_of_its_own():
    """Independent folds, not copies fine-tuned from one (what an ensemble needs to gain): each
    from its own seed, trained to early stopping on patches of 64^3 or more (MSFE's dilated
    branches then see past the bottleneck's centre), its cleaning chosen on validation cases."""
    manifest = load_manifest(WEIGHTS)
    records = manifest.provenance["folds"]
    assert sorted(int(fold) for fold in records) == [entry.fold for entry in manifest.folds]
    seeds = [record["seed"] for record in records.values()]
    assert len(set(seeds)) == len(seeds)
    for fold, record in records.items():
        assert record["initialised_from"] == "seed", fold
        assert min(record["patch_size"]) >= 64, fold
        assert record["stop_reason"].startswith("no better validation Dice"), fold
    assert manifest.provenance["postprocess"]["cases_with_several_true_components"] > 0


def test_the_shipped_ensemble_segments_the_sample():
    predictor = Predictor(WEIGHTS, PredictorSettings(device="cpu"))
    array, geometry = read_image(SAMPLE / "input" / "sample_0000.nii.gz")
    mask = predictor.segment(array, geometry).mask
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE / "ground_truth" / "sample.nii.gz")))
    assert dice(mask, truth == 1) >= 0.85
