"""Sliding windows, stitching, backends and the predictor, on narrow networks and small volumes."""

import itertools
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import SigmoidOfInput, tube_case, write_weights
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from scipy import ndimage

from inference import backend_base, backends, openvino_backend, torch_backend
from inference.io import write_image_atomically
from inference.openvino_backend import OpenVINOBackend, prepare
from inference.predictor import Predictor, PredictorSettings
from inference.preprocessing import DEFAULT_NORMALIZATION, Geometry, normalize
from inference.sliding_window import WindowPlan, mirror_axes, pad_to_patch, window_starts
from inference.thin_conv import BlockedConv3d, with_blocked_spatial_convs
from inference.torch_backend import TorchBackend
from model.network import Architecture, VesselUNet
from model.weights import (
    FoldEntry,
    Manifest,
    load_ensemble,
    save_fold,
    sha256_hex,
    write_manifest,
)
from phantoms import generate_case

PATCH = (32, 32, 32)


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory):
    """A private OpenVINO model cache for this module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VESSEL_SEG_CACHE", str(tmp_path_factory.mktemp("ov-cache")))
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("weights")
    write_weights(directory, folds=2, base_channels=4, patch=PATCH, seed=3)
    return directory


def geometry_of(shape, spacing=(1.0, 1.0, 1.0)) -> Geometry:
    return Geometry(tuple(shape), tuple(spacing), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def test_window_starts_cover_every_voxel_like_nnunet():
    starts = window_starts(100, 32, 0.5)
    assert len(starts) == 6  # ceil((100 - 32) / 16) + 1
    assert starts[0] == 0 and starts[-1] == 100 - 32
    assert all(0 < b - a <= 16 for a, b in itertools.pairwise(starts))
    assert window_starts(32, 32, 0.5) == [0]
    assert window_starts(40, 32, 0.0) == [0, 8]
    with pytest.raises(ValueError, match="overlap"):
        window_starts(100, 32, 1.0)
    with pytest.raises(ValueError, match="pad first"):
        window_starts(20, 32, 0.5)


def test_separable_normalizer_equals_the_sum_of_window_importances():
    plan = WindowPlan.create((40, 57, 33), PATCH, 0.5)
    total = np.zeros(plan.shape)
    for window in plan.windows():
        total[window] += plan.importance()
    nz, ny, nx = plan.axis_normalizers()
    np.testing.assert_allclose(total, nz[:, None, None] * ny[None, :, None] * nx, rtol=1e-5)
    assert plan.starts == ((0, 8), (0, 12, 25), (0, 1)) and len(plan) == 12


def test_pad_to_patch_centres_and_crops_back():
    volume = np.arange(10 * 40 * 7, dtype=np.float32).reshape(10, 40, 7)
    padded, crop = pad_to_patch(volume, PATCH)
    assert padded.shape == (32, 40, 32)
    np.testing.assert_array_equal(padded[crop], volume)
    assert padded[0].sum() == 0 and crop[0] == slice(11, 21)
    same, _ = pad_to_patch(padded, PATCH)
    assert same is padded


@pytest.mark.parametrize("backend", ["torch", "openvino", "openvino-compiled-per-case"])
def test_stitching_is_exact_for_a_known_network(backend, monkeypatch):
    rng = np.random.default_rng(0)
    volume = rng.normal(0, 2, (40, 50, 36)).astype(np.float32)
    plan = WindowPlan.create(volume.shape, PATCH, 0.5)
    nets = [SigmoidOfInput(), SigmoidOfInput()]
    if backend == "torch":
        runner = TorchBackend(nets, "cpu", PATCH, batch_size=3)
    else:  # small patches keep their folds compiled; large ones compile a fold at a time
        resident = backend == "openvino"
        monkeypatch.setattr(openvino_backend, "RESIDENT_PATCH_VOXELS", 64**3 if resident else 0)
        runner = OpenVINOBackend(nets, ["sigmoid-a", "sigmoid-b"], PATCH, precision="f32")
        assert (runner.resident is not None) == resident
    counted = []
    probability = runner.predict(volume, plan, mirror_axes(True), counted.append)
    np.testing.assert_allclose(probability, 1 / (1 + np.exp(-volume)), atol=1e-5)
    assert sum(counted) == len(plan) * 2 * 8


def test_torch_backend_leaves_the_process_settings_as_it_found_them(monkeypatch):
    """Threads and cuDNN autotuning are the backend's only while it runs (nnU-Net restores
    the thread count too): a training loop or a test in the same process keeps its own."""
    monkeypatch.setattr(torch_backend, "inference_threads", lambda: 1)
    before = torch.get_num_threads()
    runner = TorchBackend([SigmoidOfInput()], "cpu", PATCH)
    seen = []
    volume = np.zeros((32, 32, 32), np.float32)
    runner.predict(
        volume,
        WindowPlan.create(volume.shape, PATCH, 0.5),
        [()],
        lambda n: seen.append(torch.get_num_threads()),
    )
    assert runner.device == "cpu (1 threads)" and set(seen) == {1}
    assert torch.get_num_threads() == before
    assert torch.backends.cudnn.benchmark is False


def test_cuda_precision_is_chosen_by_native_support(monkeypatch):
    """A T4 (compute capability 7.5) emulates bf16: fp16 there, bf16 from Ampere on."""
    native = {"value": False}

    def is_bf16_supported(including_emulation=True):
        return True if including_emulation else native["value"]

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert torch_backend.cuda_autocast_dtype() == torch.float16
    native["value"] = True
    assert torch_backend.cuda_autocast_dtype() == torch.bfloat16


def test_torch_and_openvino_backends_agree(weights):
    case, _ = tube_case((48, 40, 56), seed=11)
    array, geometry = case.astype(np.float32), geometry_of(case.shape)
    settings = {"device": "cpu", "postprocess": False}
    torch_run = Predictor(weights, PredictorSettings(backend="torch", **settings))
    openvino_run = Predictor(weights, PredictorSettings(backend="openvino", **settings))
    expected = torch_run.segment(array, geometry)
    result = openvino_run.segment(array, geometry)
    assert openvino_run.backend.name == "openvino" and torch_run.backend.precision == "float32"
    assert 0.005 < expected.mask.mean() < 0.5  # a real mask, not an empty or full one
    difference = np.abs(result.probability - expected.probability)  # bf16 (or f32) vs fp32
    assert difference.mean() < 0.005 and difference.max() < 0.15
    overlap = 2 * (result.mask & expected.mask).sum() / (result.mask.sum() + expected.mask.sum())
    assert overlap > 0.98


def test_the_ensemble_is_the_mean_of_its_folds(weights):
    case, _ = tube_case((32, 48, 40), seed=12)
    array, geometry = case.astype(np.float32), geometry_of(case.shape)

    def probability(folds):
        settings = PredictorSettings(backend="torch", device="cpu", folds=folds)
        return Predictor(weights, settings).vessel_probability(array, geometry)

    mean = (probability([0]) + probability([1])) / 2
    np.testing.assert_allclose(probability([0, 1]), mean, atol=1e-5)


def test_small_and_resampled_volumes_come_back_on_the_input_grid(weights):
    predictor = Predictor(weights, PredictorSettings(backend="torch", device="cpu"))
    small, _ = tube_case((12, 20, 40), seed=1)
    result = predictor.segment(small.astype(np.float32), geometry_of(small.shape))
    assert result.mask.shape == small.shape and result.probability.shape == small.shape
    coarse, _ = tube_case((24, 30, 36), seed=2)  # 2 mm slices: resampled to 1 mm and back
    geometry = geometry_of(coarse.shape, spacing=(2.0, 1.0, 1.0))
    probability = predictor.vessel_probability(coarse.astype(np.float32), geometry)
    assert probability.shape == coarse.shape
    assert predictor.passes(geometry) == len(predictor.plan((48, 30, 36))) * 2


def test_tta_runs_eight_mirrored_passes_per_window(weights):
    settings = PredictorSettings(backend="torch", device="cpu", folds=[0], tta=True)
    predictor = Predictor(weights, settings)
    assert predictor.passes(geometry_of((40, 32, 32))) == 2 * 1 * 8
    case, _ = tube_case((40, 32, 32), seed=4)
    counted = []
    predictor.vessel_probability(case.astype(np.float32), geometry_of(case.shape), counted.append)
    assert sum(counted) == 16


def test_openvino_models_are_prepared_then_cached(weights, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VESSEL_SEG_CACHE", str(cache))
    manifest, nets = load_ensemble(weights, [0])
    hashes = [manifest.fold_entry(0).sha256]

    def no_conversion(*args):
        raise AssertionError("converted although a prepared or cached model exists")

    volume = normalize(tube_case((40, 32, 36), seed=8)[0].astype(np.float32), DEFAULT_NORMALIZATION)
    plan = WindowPlan.create(volume.shape, PATCH, 0.5)
    cold = OpenVINOBackend(nets, hashes, PATCH).predict(volume, plan, [()])  # converts, caches
    assert len(list(cache.glob("*.xml"))) == 1 and len(list(cache.glob("*.bin"))) == 1
    with monkeypatch.context() as patch:
        patch.setattr(openvino_backend, "convert", no_conversion)
        warm = OpenVINOBackend(nets, hashes, PATCH).predict(volume, plan, [()])  # reads the cache
    np.testing.assert_array_equal(warm, cold)  # the IR's fp16 constants in both runs
    prepared = tmp_path / "prepared"
    assert [path.parent for path in prepare(weights, prepared)] == [prepared, prepared]  # 2 folds
    for path in cache.iterdir():
        path.unlink()
    with monkeypatch.context() as patch:
        patch.setattr(openvino_backend, "convert", no_conversion)
        OpenVINOBackend(nets, hashes, PATCH, ir_dirs=[prepared])  # prepared, cache empty
    assert not list(cache.iterdir())


def test_an_unwritable_cache_still_gives_the_cached_models_result(weights, tmp_path, monkeypatch):
    manifest, nets = load_ensemble(weights, [0])
    hashes = [manifest.fold_entry(0).sha256]
    volume = normalize(tube_case((40, 32, 36), seed=8)[0].astype(np.float32), DEFAULT_NORMALIZATION)
    plan = WindowPlan.create(volume.shape, PATCH, 0.5)
    monkeypatch.setenv("VESSEL_SEG_CACHE", str(tmp_path / "cache"))
    cached = OpenVINOBackend(nets, hashes, PATCH).predict(volume, plan, [()])
    (tmp_path / "file").write_text("a file, not a folder\n")
    monkeypatch.setenv("VESSEL_SEG_CACHE", str(tmp_path / "file" / "cache"))  # even for root
    private = OpenVINOBackend(nets, hashes, PATCH).predict(volume, plan, [()])
    np.testing.assert_array_equal(private, cached)


def test_broken_weights_give_an_error_not_an_empty_mask(tmp_path):
    # save_fold refuses non-finite tensors, so the NaN goes into a written file, as a file
    # damaged or made elsewhere would carry it; the manifest then matches the damaged file.
    net = VesselUNet(Architecture(base_channels=4)).eval()
    path = tmp_path / "fold_0.safetensors"
    save_fold(net, path, 0)
    with safe_open(path, "pt") as file:
        tensors = {k: file.get_tensor(k) for k in file.keys()}  # noqa: SIM118 (not a dict)
        metadata = file.metadata()
    tensors["head.bias"][1] = float("nan")
    data = save_safetensors(tensors, metadata=metadata)
    path.write_bytes(data)
    entry = FoldEntry(0, path.name, sha256_hex(data), len(data))
    write_manifest(
        tmp_path,
        Manifest(net.architecture, PATCH, (1.0,) * 3, DEFAULT_NORMALIZATION, folds=[entry]),
    )
    predictor = Predictor(tmp_path, PredictorSettings(backend="torch", device="cpu"))
    case, _ = tube_case((32, 32, 32))
    with pytest.raises(RuntimeError, match="NaN"):
        predictor.segment(case.astype(np.float32), geometry_of(case.shape))


def test_images_are_written_atomically(tmp_path):
    image = sitk.GetImageFromArray(np.ones((4, 5, 6), np.uint8))
    for name in ("a.nii.gz", "b.mha", "c.nrrd", "d.nii"):
        write_image_atomically(image, tmp_path / name)
        assert sitk.ReadImage(str(tmp_path / name)).GetSize() == (6, 5, 4)
    with pytest.raises(ValueError, match="cannot write atomically"):
        write_image_atomically(image, tmp_path / "e.mhd")
    with pytest.raises(RuntimeError):
        write_image_atomically(image, tmp_path / "missing-folder" / "f.nii.gz")
    assert sorted(os.listdir(tmp_path)) == ["a.nii.gz", "b.mha", "c.nrrd", "d.nii"]


def test_backend_choice_falls_back_to_eager_torch_without_openvino(monkeypatch):
    assert backends.resolve_backend("auto", "cuda") == "torch"
    assert backends.resolve_backend("auto", "cpu") == "openvino"
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    assert backends.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(backends.BackendError, match="not installed"):
        backends.resolve_backend("openvino", "cpu")
    with pytest.raises(backends.BackendError, match="CPU only"):
        backends.resolve_backend("openvino", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(backends.BackendError, match="no CUDA device"):
            backends.resolve_device("cuda")
    assert backend_base.available_cpus() >= 1


def test_normalization_ignores_the_field_of_view_fill():
    """The same anatomy with and without the scanner's -1024 HU outside its reconstruction
    cylinder normalises to the same values inside it (the 0.5th-percentile anchor without the
    exclusion moved soft tissue by about 0.4, which broke the small-FOV site's training)."""
    image, label = generate_case((64, 64, 64), seed=4)
    full = sitk.GetArrayFromImage(image).astype(np.float32)
    y, x = np.mgrid[:64, :64]
    cylinder = (y - 31.5) ** 2 + (x - 31.5) ** 2 <= (0.9 * 32) ** 2
    cut = full.copy()
    cut[:, ~cylinder] = -1024
    vessels = sitk.GetArrayFromImage(label)[:, cylinder] > 0
    old = {"scheme": "percentile", "lower_percentile": 0.5, "upper_percentile": 99.5}
    for parameters, tolerance in ((DEFAULT_NORMALIZATION, 0.06), (old, None)):
        a, b = normalize(full, parameters)[:, cylinder], normalize(cut, parameters)[:, cylinder]
        difference = np.abs(a - b).max()
        if tolerance:
            assert difference < tolerance
            assert 0.3 < np.median(a[vessels]) < 0.7 and np.median(a[~vessels]) < 0.1
        else:
            assert difference > 0.3  # what the test guards against


def test_normalization_sets_air_apart_when_it_outnumbers_tissue():
    """A field of view reaching past the skin: 60 % of the volume is air (-1000 HU with noise).
    Excluding air keeps tissue at 0 and the vessels where they lie without air (the median
    anchor alone put tissue near 0.5, and the network then found no vessel); on the same case
    without air, where Otsu splits tissue from bone, the exclusion changes nothing."""
    image, label = generate_case((64, 64, 64), seed=4)
    head = sitk.GetArrayFromImage(image).astype(np.float32)
    vessels = sitk.GetArrayFromImage(label) > 0
    z, y, x = np.mgrid[:64, :64, :64]
    air = (x + y + 0.5 * z < 90) & ~vessels
    noise = np.random.default_rng(0).normal(0, 15, head.shape).astype(np.float32)
    with_air = np.where(air, np.float32(-1000) + noise, head)
    assert air.mean() > 0.5
    median_only = {k: v for k, v in DEFAULT_NORMALIZATION.items() if k != "exclude_air"}
    tissue = ~air & ~vessels
    reference = normalize(head, DEFAULT_NORMALIZATION)
    assert np.array_equal(reference, normalize(head, median_only))
    excluded = normalize(with_air, DEFAULT_NORMALIZATION)
    assert np.median(excluded[tissue]) < 0.05
    assert np.abs(excluded - reference)[~air].max() < 0.08  # air replaced 40 % of the head
    assert np.median(normalize(with_air, median_only)[tissue]) > 0.2  # what it guards against
    tubes = tube_case((40, 32, 36), seed=8)[0].astype(np.float32)  # tissue and vessels only
    assert np.array_equal(normalize(tubes, DEFAULT_NORMALIZATION), normalize(tubes, median_only))


def test_normalization_anchors_vessels_brighter_than_everything_else_and_resists_metal():
    """Opacified arteries filling 3 % of the volume, the brightest structure, as in
    intra-arterial 3DRA, put the 99.5th percentile inside them: anchored there and clipped at
    1 (manifests before the upper bound), their cores were flattened. The default keeps the
    rim's share of the core's contrast. A coil pack (0.3 % of the volume, 50 times as bright)
    would become a 99.99th-percentile anchor and squash the vessels; the bound keeps them
    within a factor of 3 of where they lie without it, and the clip cuts the metal."""
    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[:40, :40, :40]
    axis2 = (y - 20.0) ** 2 + (x - 20.0) ** 2
    tube = (axis2 <= 16).astype(np.float32)
    raw = 100 + 300 * ndimage.gaussian_filter(tube, 1.0) + rng.normal(0, 3, tube.shape)
    raw = raw.astype(np.float32)
    core, rim = axis2 <= 4, axis2 == 25
    share = lambda a, b: float(np.median(a[rim]) - b) / float(np.median(a[core]) - b)  # noqa: E731
    legacy = {"scheme": "percentile", "lower_percentile": 50.0, "upper_percentile": 99.5}
    assert np.mean(normalize(raw, legacy)[core] > 0.9999) > 0.5  # flattened
    kept = normalize(raw, DEFAULT_NORMALIZATION)
    assert share(kept, 0) == pytest.approx(share(raw, np.median(raw)), abs=0.01)
    assert np.mean(kept[core] > 0.9999) < 0.1 and 0.8 < np.median(kept[core]) < 1.0
    coiled = raw.copy()
    coiled[(z - 8) ** 2 + (y - 8) ** 2 + (x - 8) ** 2 <= 16] = 50 * raw.max()
    assert 0.002 < np.mean(coiled > raw.max()) < 0.005
    unbounded = {k: v for k, v in DEFAULT_NORMALIZATION.items() if "bound" not in k}
    assert np.median(normalize(coiled, unbounded)[core]) < 0.05  # what the bound guards against
    bounded = normalize(coiled, DEFAULT_NORMALIZATION)
    assert np.median(bounded[core]) > np.median(kept[core]) / 3 - 0.01
    assert bounded.max() == pytest.approx(DEFAULT_NORMALIZATION["upper_clip"])


@pytest.mark.parametrize(
    "channels, kernel, block, size",
    [
        ((2, 1), 7, (2, 2, 4), (24, 12, 16)),
        ((3, 2), 3, (2, 2, 2), (8, 6, 4)),
        ((2, 1), 5, (1, 2, 4), (5, 6, 8)),
    ],
)
def test_blocked_convolution_equals_the_plain_one(channels, kernel, block, size):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(*channels, kernel, padding=kernel // 2)
    x = torch.randn(2, channels[0], *size)
    with torch.no_grad():
        torch.testing.assert_close(BlockedConv3d(conv, block)(x), conv(x), atol=1e-5, rtol=1e-5)


def test_the_exported_network_keeps_its_output():
    torch.manual_seed(1)
    net = VesselUNet(Architecture(base_channels=4)).eval()
    blocked = with_blocked_spatial_convs(net, (48, 32, 48))
    kinds = [type(d.attention.spatial.conv).__name__ for d in blocked.decoders]
    assert kinds == ["Conv3d", "BlockedConv3d", "BlockedConv3d", "BlockedConv3d"]  # 6x4x6: no
    x = torch.randn(1, 1, 48, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(blocked(x), net(x), atol=1e-4, rtol=1e-4)
    assert type(net.decoders[-1].attention.spatial.conv) is torch.nn.Conv3d  # the original stays


class DoubledInput(torch.nn.Module):
    """Vessel probability sigmoid(2 x input): a second fold that differs from the first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), 2 * x], dim=1)


@pytest.mark.parametrize("backend", ["torch", "openvino", "openvino-compiled-per-case"])
def test_a_fold_subset_averages_only_those_folds(backend, monkeypatch):
    """What a time budget runs when it drops folds: ``predict(..., folds=[1])``."""
    volume = np.random.default_rng(1).normal(0, 2, (40, 36, 34)).astype(np.float32)
    plan = WindowPlan.create(volume.shape, PATCH, 0.5)
    nets = [SigmoidOfInput(), DoubledInput()]
    if backend == "torch":
        runner = TorchBackend(nets, "cpu", PATCH)
    else:
        resident = backend == "openvino"
        monkeypatch.setattr(openvino_backend, "RESIDENT_PATCH_VOXELS", 64**3 if resident else 0)
        runner = OpenVINOBackend(nets, ["subset-a", "subset-b"], PATCH, precision="f32")
    counted = []
    probability = runner.predict(volume, plan, [()], counted.append, folds=[1])
    np.testing.assert_allclose(probability, 1 / (1 + np.exp(-2 * volume)), atol=1e-5)
    assert sum(counted) == len(plan)
