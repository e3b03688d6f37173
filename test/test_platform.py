"""The platforms' rules (issue 15): an output for every readable input and SHINY-ICARUS's pairing
by sorted position, Grand Challenge's inputs.json and /opt/ml/model, no file under /tmp,
bit-identical masks on the CPU, a time budget that drops folds, what ran recorded, progress in
lines, and the export commands without a Docker engine."""

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import tube_volume, write_weights

import process
from inference.pacing import TenthLines

ROOT = Path(__file__).resolve().parents[1]
TORCH = ["--backend", "torch", "--device", "cpu"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("weights")
    write_weights(directory, folds=3, base_channels=4, patch=(32, 32, 32), seed=5)
    return directory


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VESSEL_SEG_CACHE", str(tmp_path_factory.mktemp("ov-cache")))
        yield


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    monkeypatch.delenv("VESSEL_SEG_THREADS", raising=False)
    monkeypatch.delenv("VESSEL_SEG_TIME_LIMIT", raising=False)


def run(inputs: Path, outputs: Path, weights: Path | None, *options: str) -> int:
    arguments = ["--input", str(inputs), "--output", str(outputs)]
    if weights is not None:
        arguments += ["--weights", str(weights)]
    return process.main([*arguments, *options])


def report(outputs: Path) -> dict:
    return json.loads((outputs / "results.json").read_text())


def mask(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --- 1. every readable input gets an output of its name ------------------------------------


def test_a_bad_case_in_the_middle_keeps_every_later_pair_by_sorted_position(tmp_path, weights):
    """SHINY-ICARUS's scorer zips sorted predictions with sorted truths and requires the truth's
    shape: a constant volume in the middle gets an all-zero mask with its geometry, so the
    later case is still scored against its own truth."""
    inputs, outputs, truths = tmp_path / "in", tmp_path / "out", tmp_path / "truth"
    inputs.mkdir()
    truths.mkdir()
    shapes = {"a": (20, 24, 28), "b": (16, 18, 22), "c": (24, 20, 16)}
    for name, shape in shapes.items():
        source = tube_volume(inputs / f"{name}_0000.nii.gz", shape, seed=len(name))
        sitk.WriteImage(sitk.ReadImage(str(source)) > 0, str(truths / f"{name}.nii.gz"))
    constant = sitk.GetImageFromArray(np.full(shapes["b"], 7, np.int16))
    constant.SetSpacing((0.5, 0.6, 0.7))
    constant.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(constant, str(inputs / "b_0000.nii.gz"))
    (inputs / "z_0000.nii.gz").write_text("no header at all\n")  # no mask: nothing to pair
    assert run(inputs, outputs, weights, *TORCH, "--folds", "0") == 1

    predictions = sorted(outputs.glob("*.nii.gz"))
    ground_truths = sorted(truths.glob("*.nii.gz"))
    assert [p.name for p in predictions] == [t.name for t in ground_truths]
    for prediction, truth in zip(predictions, ground_truths):  # the scorer's pairing
        assert mask(prediction).shape == mask(truth).shape, (prediction.name, truth.name)
    empty = sitk.ReadImage(str(outputs / "b.nii.gz"))
    assert empty.GetPixelID() == sitk.sitkUInt8 and not sitk.GetArrayFromImage(empty).any()
    assert np.allclose(empty.GetSpacing(), (0.5, 0.6, 0.7))
    assert np.allclose(empty.GetOrigin(), (1.0, 2.0, 3.0))
    cases = {Path(c["input"]).name[0]: c for c in report(outputs)["cases"]}
    assert cases["b"]["status"] == "error" and "constant" in cases["b"]["error"]
    assert cases["b"]["empty_mask"] and cases["b"]["output"] == str(outputs / "b.nii.gz")
    assert cases["z"]["status"] == "error" and cases["z"]["output"] is None
    assert not cases["a"]["empty_mask"] and cases["c"]["status"] == "ok"


# --- 2. Grand Challenge: inputs.json, /opt/ml/model, nothing under /tmp ---------------------


def test_inputs_json_lists_the_inputs_and_a_path_leaving_input_is_refused(tmp_path, weights):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    tube_volume(inputs / "images" / "head-3dra" / "case.mha", (20, 24, 28))
    tube_volume(inputs / "images" / "unlisted" / "other.mha", (20, 24, 28))
    tube_volume(tmp_path / "outside" / "secret.mha", (20, 24, 28))
    (inputs / "images" / "escape").symlink_to(tmp_path / "outside")
    listing = [
        {
            "interface": {
                "slug": "head-3dra",
                "relative_path": "images/head-3dra",
                "super_kind": "Image",
            },
            "image": {"name": "case.mha"},
        },
        {"interface": {"slug": "age", "relative_path": "age.json"}, "value": 61},
        {"interface": {"slug": "up", "relative_path": "../outside"}},
        {"interface": {"slug": "link", "relative_path": "images/escape"}},
    ]
    (inputs / "age.json").write_text("61")
    (inputs / "inputs.json").write_text(json.dumps(listing))
    assert run(inputs, outputs, weights, *TORCH, "--folds", "0") == 1
    data = report(outputs)
    assert data["convention"] == "grand-challenge"
    cases = {c["interface"]: c for c in data["cases"]}
    assert set(cases) == {"head-3dra", "up", "link"}  # not the unlisted one, not the JSON value
    assert cases["head-3dra"]["status"] == "ok"
    for slug in ("up", "link"):
        assert cases[slug]["status"] == "error" and "leaves" in cases[slug]["error"]
    written = outputs / "images" / process.OUTPUT_SLUG
    assert sorted(p.name for p in written.iterdir()) == ["case.mha"]


def test_weights_come_from_the_model_folder_when_it_holds_a_manifest(
    tmp_path, weights, monkeypatch
):
    inputs = tmp_path / "in"
    tube_volume(inputs / "case_0000.nii.gz", (20, 24, 28))
    monkeypatch.setattr(process, "MODEL_DIR", tmp_path / "opt-ml-model")
    assert process.parse_args([]).weights == process.WEIGHTS  # no model folder: built in
    (tmp_path / "opt-ml-model").mkdir()
    assert process.parse_args([]).weights_source == "built-in"  # a folder without a manifest
    (tmp_path / "opt-ml-model").rmdir()
    (tmp_path / "opt-ml-model").symlink_to(weights)
    assert run(inputs, tmp_path / "out", None, *TORCH, "--folds", "0") == 0
    used = report(tmp_path / "out")["weights"]
    assert used == {"path": str(tmp_path / "opt-ml-model"), "source": "model folder"}
    assert process.parse_args(["--weights", "w"]).weights_source == "option"


def test_no_writable_temporary_folder_or_cache_is_needed(tmp_path, weights, monkeypatch):
    """Grand Challenge's /tmp is empty (and may be unusable): the OpenVINO conversion falls back
    to the model in memory, with the cached model's fp16 weights: the same mask."""
    inputs = tmp_path / "in"
    tube_volume(inputs / "case_0000.nii.gz", (40, 36, 32), seed=3)
    options = ["--backend", "openvino", "--folds", "2"]
    monkeypatch.setenv("VESSEL_SEG_CACHE", str(tmp_path / "cache"))
    assert run(inputs, tmp_path / "cached", weights, *options) == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VESSEL_SEG_CACHE", str(blocker / "cache"))  # never a folder, even for root
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "tmp"))
    assert run(inputs, tmp_path / "memory", weights, *options) == 0
    np.testing.assert_array_equal(
        mask(tmp_path / "memory" / "case.nii.gz"), mask(tmp_path / "cached" / "case.nii.gz")
    )


# --- 4. determinism on the CPU --------------------------------------------------------------


@pytest.mark.parametrize("backend", ["openvino", "torch"])
def test_masks_are_bit_identical_across_runs_and_thread_counts(
    tmp_path, weights, monkeypatch, backend
):
    inputs = tmp_path / "in"
    tube_volume(inputs / "case_0000.nii.gz", (44, 40, 32), seed=8)  # 4 windows
    options = [
        "--backend",
        backend,
        "--device",
        "cpu",
        "--no-postprocess",
        "--save-probabilities",
        "--folds",
        "0",
        "1",
    ]
    runs = {}
    for label, threads in (("all", ""), ("again", ""), ("one", "1")):
        monkeypatch.setenv("VESSEL_SEG_THREADS", threads)
        assert run(inputs, tmp_path / label, weights, *options) == 0
        runs[label] = tmp_path / label
    assert "(1 threads" in report(runs["one"])["device"]
    reference = mask(runs["all"] / "case.nii.gz")
    assert 0 < reference.sum() < reference.size
    for label in ("again", "one"):
        np.testing.assert_array_equal(mask(runs[label] / "case.nii.gz"), reference)
        np.testing.assert_array_equal(  # the probabilities too, not only their threshold
            mask(runs[label] / "probabilities" / "case.nii.gz"),
            mask(runs["all"] / "probabilities" / "case.nii.gz"),
        )


def test_a_bad_thread_count_is_one_line_and_exit_2(tmp_path, weights, monkeypatch, capsys):
    tube_volume(tmp_path / "in" / "case_0000.nii.gz", (20, 24, 28))
    monkeypatch.setenv("VESSEL_SEG_THREADS", "many")
    assert run(tmp_path / "in", tmp_path / "out", weights, *TORCH) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "VESSEL_SEG_THREADS" in lines[0]


# --- 5. the time budget drops TTA, then folds ------------------------------------------------


def test_a_time_budget_drops_folds_after_tta_and_the_report_says_which(tmp_path, weights, capsys):
    """One window: 3 folds x 8 mirrors at the torch guess (about 0.0093 s a pass for these
    folds) exceed 0.02 s; without TTA, 3 folds still do, 2 fit. The mask is that of --folds 0 1."""
    inputs = tmp_path / "in"
    tube_volume(inputs / "case_0000.nii.gz", (20, 24, 28))
    assert run(inputs, tmp_path / "budget", weights, *TORCH, "--tta", "--time-limit", "0.02") == 0
    case = report(tmp_path / "budget")["cases"][0]
    assert case["tta"] is False and case["folds"] == [0, 1] and case["passes"] == 2
    err = capsys.readouterr().err
    assert "TTA dropped" in err and "2 of 3 folds run" in err
    assert run(inputs, tmp_path / "two", weights, *TORCH, "--folds", "0", "1") == 0
    assert report(tmp_path / "two")["cases"][0]["folds"] == [0, 1]
    np.testing.assert_array_equal(
        mask(tmp_path / "budget" / "case.nii.gz"), mask(tmp_path / "two" / "case.nii.gz")
    )


# --- 6. what ran ----------------------------------------------------------------------------


def test_results_record_the_device_and_library_versions(tmp_path, weights):
    import torch

    tube_volume(tmp_path / "in" / "case_0000.nii.gz", (20, 24, 28))
    assert run(tmp_path / "in", tmp_path / "out", weights, *TORCH, "--folds", "0") == 0
    data = report(tmp_path / "out")
    environment = data["environment"]
    assert environment["torch"] == torch.__version__
    assert {"cuda", "cudnn", "openvino"} <= set(environment)
    assert environment["device_name"] and environment["device_memory_bytes"] > 2**28
    assert data["deterministic"] is False


# --- 7. progress that fits a log ------------------------------------------------------------


def test_progress_in_a_log_is_a_line_per_tenth_without_carriage_returns(tmp_path, weights, capsys):
    inputs = tmp_path / "in"
    tube_volume(inputs / "a_0000.nii.gz", (64, 64, 64), seed=1)  # 27 windows x 3 folds
    tube_volume(inputs / "b_0000.nii.gz", (20, 24, 28), seed=2)  # 1 window x 3 folds: 1 call
    assert run(inputs, tmp_path / "out", weights, *TORCH) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and len(err.encode()) < 3000
    lines = err.splitlines()
    for name, passes in (("a", 81), ("b", 3)):
        tenths = [line for line in lines if line.startswith(f"{name}: ") and "% (" in line]
        assert tenths[-1].startswith(f"{name}: 100% ({passes}/{passes} passes")
        assert 1 <= len(tenths) <= 10 and len(tenths) == (10 if name == "a" else 1)
        assert sum(f"{name}_0000.nii.gz -> " in line for line in lines) == 1
    assert len(lines) <= 2 * 2 + 10 + 3  # announce + done per case, the tenths


def test_tenth_lines_count(capsys):
    import sys

    progress = TenthLines("x", 1000, sys.stderr)
    for _ in range(1000):
        progress(1)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[1] for line in lines] == [f"{10 * k}%" for k in range(1, 11)]


# --- 3. export without a Docker engine ------------------------------------------------------


@pytest.mark.parametrize(
    "target", [["export"], ["push-shiny", "REGISTRY=docker.synapse.org/syn1/vessel-seg:1"]]
)
def test_export_without_a_docker_engine_is_one_line_and_non_zero(tmp_path, target):
    environment = {
        **os.environ,
        "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
        "DIST": str(tmp_path / "dist"),
    }
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), *target],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if not line.startswith("make")]
    assert len(ours) == 1 and "no Docker engine answers" in ours[0], done.stderr
    assert not (tmp_path / "dist").exists()
    script = ROOT / "submit" / "submit.sh"
    bare = subprocess.run(
        ["/bin/bash", str(script), target[0], "docker.synapse.org/syn1/x:1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, "PATH": "/nonexistent"},
    )
    assert bare.returncode == 3 and "no docker command" in bare.stderr
    assert len(bare.stderr.strip().splitlines()) == 1
