"""The CUDA path, where a GPU answers (skipped elsewhere; `bench/gpu_checks.sh` runs it on a
GPU machine): exact stitching on the device, bf16 masks that agree with the CPU's fp32 ones, and
process.py end to end with --device cuda."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import SigmoidOfInput, tube_case, tube_volume, write_weights

from inference.predictor import Predictor, PredictorSettings
from inference.preprocessing import Geometry
from inference.sliding_window import WindowPlan, mirror_axes
from inference.torch_backend import TorchBackend

ROOT = Path(__file__).resolve().parents[1]
PATCH = (32, 32, 32)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("weights")
    write_weights(directory, folds=2, base_channels=4, patch=PATCH, seed=3)
    return directory


def test_stitching_on_the_gpu_is_exact_for_a_known_network():
    volume = np.random.default_rng(0).normal(0, 2, (40, 50, 36)).astype(np.float32)
    plan = WindowPlan.create(volume.shape, PATCH, 0.5)
    runner = TorchBackend([SigmoidOfInput(), SigmoidOfInput()], "cuda", PATCH, batch_size=3)
    counted = []
    probability = runner.predict(volume, plan, mirror_axes(True), counted.append)
    np.testing.assert_allclose(probability, 1 / (1 + np.exp(-volume)), atol=1e-5)
    assert sum(counted) == len(plan) * 2 * 8
    assert runner.precision in ("bfloat16", "float16") and runner.device.startswith("cuda")


def test_gpu_and_cpu_masks_agree(weights):
    case, _ = tube_case((48, 40, 56), seed=11)
    array = case.astype(np.float32)
    geometry = Geometry(case.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))

    def segment(device):
        settings = PredictorSettings(backend="torch", device=device, postprocess=False)
        return Predictor(weights, settings).segment(array, geometry)

    expected, result = segment("cpu"), segment("cuda")
    assert 0.005 < expected.mask.mean() < 0.5  # a real mask, not an empty or full one
    difference = np.abs(result.probability - expected.probability)  # bf16 on the GPU vs fp32
    assert difference.mean() < 0.01
    overlap = 2 * (result.mask & expected.mask).sum() / (result.mask.sum() + expected.mask.sum())
    assert overlap > 0.97


def test_process_segments_on_the_gpu(tmp_path, weights):
    source = tube_volume(tmp_path / "in" / "case_0000.nii.gz", (40, 48, 56), seed=4)
    command = [
        sys.executable,
        str(ROOT / "process.py"),
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--weights",
        str(weights),
        "--device",
        "cuda",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    (entry,) = json.loads((tmp_path / "out" / "results.json").read_text())["cases"]
    assert entry["status"] == "ok" and entry["backend"] == "torch"
    assert entry["device"].startswith("cuda")
    mask = sitk.ReadImage(str(tmp_path / "out" / "case.nii.gz"))
    image = sitk.ReadImage(str(source))
    assert mask.GetSize() == image.GetSize() and mask.GetSpacing() == image.GetSpacing()
    assert 0 < sitk.GetArrayViewFromImage(mask).mean() < 0.5
