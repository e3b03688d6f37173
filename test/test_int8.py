"""The OpenVINO backend's int8 option: NNCF-quantised folds, on narrow networks, small volumes."""

import itertools
import sys

import numpy as np
import pytest
from helpers import tube_case, write_weights

from inference import openvino_backend
from inference.backend_base import BackendError
from inference.predictor import Predictor, PredictorSettings
from inference.preprocessing import DEFAULT_NORMALIZATION, Geometry, normalize
from model.weights import load_ensemble

PATCH = (32, 32, 32)
needs_int8 = pytest.mark.skipif(
    not openvino_backend.int8_supported(), reason="no VNNI/AMX: int8 runs as bf16/f32 here"
)


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """A private OpenVINO model cache for this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VESSEL_SEG_CACHE", str(tmp_path_factory.mktemp("ov-cache")))
        yield


def tube_windows(count: int = 16, seed: int = 100) -> list[np.ndarray]:
    """Calibration windows of tube volumes (what these tests segment; the shipped folds are
    calibrated on phantoms by train.int8)."""
    windows = []
    for k in range(count // 8):
        volume = tube_case((64, 64, 64), seed=seed + k)[0].astype(np.float32)
        volume = normalize(volume, DEFAULT_NORMALIZATION)
        for start in itertools.product((0, 32), repeat=3):
            box = tuple(slice(a, a + p) for a, p in zip(start, PATCH))
            windows.append(np.ascontiguousarray(volume[box])[None, None])
    return windows


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("weights")
    write_weights(directory, folds=1, base_channels=4, patch=PATCH, seed=5)
    return directory


def segment(weights, precision: str):
    case, _ = tube_case((48, 40, 56), seed=21)
    geometry = Geometry(case.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    settings = PredictorSettings(backend="openvino", device="cpu", precision=precision)
    predictor = Predictor(weights, settings)
    return predictor, predictor.segment(case.astype(np.float32), geometry)


@needs_int8
def test_int8_masks_stay_close_to_bf16(weights):
    int8 = pytest.importorskip("train.int8")
    int8.prepare_int8(weights, None, tube_windows())  # no accuracy control
    quantising, quantised = segment(weights, "int8")
    _, reference = segment(weights, openvino_backend.precision_hint(openvino_backend.ov.Core()))
    assert quantising.backend.precision.startswith("int8+")
    assert 0.005 < reference.mask.mean() < 0.5  # a real mask, not an empty or full one
    # Random features have no margin: int8 moves more of these voxels across 0.5 (Dice 0.7-0.86
    # with bf16 for 4-16 channels) than on the shipped folds (bench_inference.py --int8).
    overlap = 2 * (quantised.mask & reference.mask).sum()
    assert overlap / (quantised.mask.sum() + reference.mask.sum()) > 0.6
    assert np.abs(quantised.probability - reference.probability).mean() < 0.05


@needs_int8
def test_prepared_int8_models_run_without_nncf(weights, tmp_path, monkeypatch):
    int8 = pytest.importorskip("train.int8")
    with pytest.raises(BackendError, match="python -m train.int8"):  # none prepared yet
        openvino_backend.load_int8(openvino_backend.ov.Core(), "0" * 64, PATCH, [tmp_path])
    written = int8.prepare_int8(weights, tmp_path / "ir", tube_windows())
    assert any("-int8" in path.name for path in written)
    monkeypatch.setitem(sys.modules, "nncf", None)  # as in the image: importing it fails
    monkeypatch.setenv("VESSEL_SEG_CACHE", str(tmp_path / "empty-cache"))
    manifest, nets = load_ensemble(weights)
    backend = openvino_backend.OpenVINOBackend(
        nets, [manifest.folds[0].sha256], PATCH, [tmp_path / "ir"], "int8"
    )
    assert backend.precision.startswith("int8+")


def test_int8_falls_back_to_float_without_vnni(weights, monkeypatch):
    monkeypatch.setattr(openvino_backend, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.warns(UserWarning, match="int8"):
        predictor, _ = segment(weights, "int8")
    assert predictor.backend.precision in ("bf16", "f32")


def test_int8_support_is_read_from_the_cpu_flags():
    assert openvino_backend.int8_supported({"avx512_vnni"})
    assert openvino_backend.int8_supported({"amx_int8", "avx2"})
    assert openvino_backend.int8_supported({"avx_vnni"})
    assert not openvino_backend.int8_supported({"avx2", "avx512f", "avx512_bf16"})


def test_int8_is_preferred_with_vnni_and_without_amx():
    assert openvino_backend.int8_preferred({"avx512f", "avx512_bf16", "avx512_vnni"})
    assert openvino_backend.int8_preferred({"avx2", "avx_vnni"})
    assert not openvino_backend.int8_preferred(
        {"avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
    )
    assert not openvino_backend.int8_preferred({"avx2", "fma"})


def test_auto_runs_int8_where_preferred_once_the_models_are_prepared(tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    write_weights(weights, folds=1, base_channels=4, patch=PATCH, seed=6)
    preferring, not_preferring = {"avx512_vnni"}, {"avx512_vnni", "amx_bf16", "amx_int8"}
    monkeypatch.setattr(openvino_backend, "cpu_flags", lambda: preferring)
    unprepared, _ = segment(weights, "auto")
    assert not unprepared.backend.precision.startswith("int8")  # nothing prepared: float
    pytest.importorskip("train.int8").prepare_int8(weights, None, tube_windows(8))
    prepared, _ = segment(weights, "auto")
    assert prepared.backend.precision.startswith("int8+")
    monkeypatch.setattr(openvino_backend, "cpu_flags", lambda: not_preferring)
    amx, _ = segment(weights, "auto")
    assert amx.backend.precision == openvino_backend.precision_hint(openvino_backend.ov.Core())


def test_unknown_precision_is_one_line(weights):
    with pytest.raises(BackendError, match="precision"):
        segment(weights, "fp8")


def test_mask_agreement_is_the_dice_over_all_windows():
    expected = [np.array([1, 1, 0, 0], bool), np.array([0, 0, 0, 0], bool)]
    outputs = iter([np.array([[0.9, 0.2, 0.7, 0.1]]), np.zeros((1, 4))])
    total, each = pytest.importorskip("train.int8").mask_agreement(
        lambda window: next(outputs), zip("ab", expected)
    )
    assert total == pytest.approx(2 * 1 / 4) and each == [pytest.approx(0.5), 1.0]
