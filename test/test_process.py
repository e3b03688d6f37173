"""process.py as the challenge runs it: conventions, results.json, bad inputs, exit status."""

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import tube_array, tube_volume, write_weights

import process
from inference import cases
from inference.cases import Reading
from inference.predictor import Predictor, PredictorSettings
from inference.preprocessing import read_image

ROOT = Path(__file__).resolve().parents[1]
ROTATED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # 90 degrees about z


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ov-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VESSEL_SEG_CACHE", str(directory))
        yield directory


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    directory = tmp_path_factory.mktemp("weights")
    write_weights(directory, folds=2, base_channels=4, patch=(32, 32, 32), seed=5)
    return directory


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path), True)
    return path


def bad_inputs(folder: Path) -> dict[str, str]:
    """Write one file per kind of bad input; the part of the error line each must produce."""
    (folder / "notimage_0000.nii.gz").write_text("this is not an image\n")
    good = tube_volume(folder / "source.nii.gz", (20, 24, 28)).read_bytes()
    (folder / "source.nii.gz").unlink()
    (folder / "truncated_0000.nii.gz").write_bytes(good[: len(good) // 2])
    write(sitk.GetImageFromArray(np.ones((30, 30), np.uint16)), folder / "flat_0000.nii.gz")
    write(sitk.Image([8, 8, 8, 3], sitk.sitkUInt16), folder / "fourd_0000.nii.gz")
    vector = sitk.Image([8, 8, 8], sitk.sitkVectorUInt16, 3)
    write(vector, folder / "channels_0000.nii.gz")
    nan = tube_array((16, 16, 16)).astype(np.float32)
    nan[3, 4, 5] = np.nan
    nan[1, 1, 1] = np.inf
    write(sitk.GetImageFromArray(nan), folder / "nan_0000.mha")  # NIfTI's writer drops NaN
    constant = np.full((20, 20, 20), 7, np.int16)
    write(sitk.GetImageFromArray(constant), folder / "constant_0000.nii.gz")
    tube_volume(folder / "anisotropic_0000.nii.gz", (8, 32, 32), spacing=(12.0, 1.0, 1.0))
    return {
        "notimage": "not a readable image",
        "truncated": "truncated or corrupt gzip data",
        "flat": "expected 3D",
        "fourd": "expected 3D",
        "channels": "3 channels per voxel",
        "nan": "2 voxels are NaN or infinite",
        "constant": "constant volume",
        "anisotropic": "12.0:1 anisotropic",
    }


# Inputs whose header is read (then the voxels or the model's bounds fail): an empty mask each.
READABLE_HEADERS = ("truncated", "nan", "constant", "anisotropic")


def good_inputs(folder: Path) -> dict[str, Path]:
    return {
        "good": tube_volume(folder / "good_0000.nii.gz", (40, 48, 36), seed=1),
        "small": tube_volume(folder / "small_0000.nii.gz", (10, 20, 12), seed=2),  # < patch
        "resampled": tube_volume(folder / "resampled_0000.nii.gz", (20, 40, 36), (2.0, 1, 1), 3),
        "direction": tube_volume(
            folder / "direction_0000.nii.gz", (32, 36, 40), seed=4, direction=ROTATED
        ),
    }


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing())
        and np.allclose(a.GetOrigin(), b.GetOrigin())
        and np.allclose(a.GetDirection(), b.GetDirection())
    )


def test_flat_folder_with_bad_inputs_as_a_subprocess(tmp_path, weights, cache):
    """SHINY-ICARUS layout, read-only input: good cases segmented, each bad one reported."""
    inputs, outputs = tmp_path / "input", tmp_path / "output"
    inputs.mkdir()
    errors = bad_inputs(inputs)
    goods = good_inputs(inputs)
    (inputs / "notes.txt").write_text("ignored: not an image suffix\n")
    for path in inputs.iterdir():
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    inputs.chmod(0o555)
    command = [
        sys.executable,
        str(ROOT / "process.py"),
        "--input",
        str(inputs),
        "--output",
        str(outputs),
        "--weights",
        str(weights),
        "--pipeline",  # every bad case is then read and written in the background threads
        "on",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "VESSEL_SEG_CACHE": str(cache)},
        timeout=300,
    )
    inputs.chmod(0o755)
    assert done.returncode == 1, done.stderr
    report = json.loads((outputs / "results.json").read_text())
    assert report["pipeline"] is True
    entries = {Path(e["input"]).name.split("_0000")[0]: e for e in report["cases"]}
    assert set(entries) == set(errors) | set(goods)
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == len(errors)
    for name, fragment in errors.items():
        entry = entries[name]
        assert entry["status"] == "error" and fragment in entry["error"], entry
        assert f"{name}_0000." in entry["error"] and "\n" not in entry["error"]
        assert any(entry["error"] in line for line in error_lines)
        if name in READABLE_HEADERS:  # an all-zero mask with the input's geometry
            written = outputs / Path(entry["output"]).name
            assert entry["empty_mask"] and written.name.startswith(f"{name}.")
            empty = sitk.ReadImage(str(written))
            assert not sitk.GetArrayFromImage(empty).any()
            if name == "truncated":  # its voxels cannot be read, its header can
                assert sitk.GetArrayFromImage(empty).shape == (20, 24, 28)
            else:
                assert same_geometry(empty, sitk.ReadImage(entry["input"]))
        else:
            assert entry["output"] is None and not list(outputs.glob(f"{name}.*"))
    for name, source in goods.items():
        entry = entries[name]
        assert entry["status"] == "ok" and entry["backend"] == "openvino", entry
        mask = sitk.ReadImage(str(outputs / f"{name}.nii.gz"))
        assert entry["output"] == str(outputs / f"{name}.nii.gz")
        assert same_geometry(mask, sitk.ReadImage(str(source)))
        assert mask.GetPixelID() == sitk.sitkUInt8
        values = sitk.GetArrayFromImage(mask)
        assert set(np.unique(values)) <= {0, 1}
        spacing = np.prod(mask.GetSpacing())
        assert entry["vessel_volume_mm3"] == pytest.approx(values.sum() * spacing)
    assert entries["good"]["vessel_volume_mm3"] > 0
    # no temporary or partial files, nothing but masks and the report
    empty = [Path(entries[name]["output"]).name for name in READABLE_HEADERS]
    assert sorted(p.name for p in outputs.iterdir()) == sorted(
        [f"{name}.nii.gz" for name in goods] + empty + ["results.json"]
    )
    # the subprocess's mask is the in-process predictor's
    predictor = Predictor(weights, PredictorSettings(device="cpu", backend="openvino"))
    expected = predictor.segment(*read_image(goods["good"])).mask
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs / "good.nii.gz")))
    overlap = 2 * (expected & written).sum() / (expected.sum() + written.sum())
    assert overlap > 0.99


def test_grand_challenge_layout_keeps_name_and_format(tmp_path, weights, cache):
    inputs, outputs = tmp_path / "input" / "images" / "head-3dra", tmp_path / "output"
    inputs.mkdir(parents=True)
    image = sitk.ReadImage(str(tube_volume(tmp_path / "a.nii.gz", (36, 32, 40), seed=7)))
    write(image, inputs / "1f3a-case.mha")
    write(image, inputs / "other.nrrd")
    status = process.main(
        [
            "--input",
            str(tmp_path / "input"),
            "--output",
            str(outputs),
            "--weights",
            str(weights),
            "--folds",
            "1",
            "--no-postprocess",
            "--save-probabilities",
            "--backend",
            "torch",
        ]
    )
    assert status == 0
    report = json.loads((outputs / "results.json").read_text())
    assert report["convention"] == "grand-challenge" and report["folds"] == [1]
    assert [c["status"] for c in report["cases"]] == ["ok", "ok"]
    target = outputs / "images" / process.OUTPUT_SLUG
    assert sorted(p.name for p in target.iterdir()) == ["1f3a-case.mha", "other.nrrd"]
    mask = sitk.ReadImage(str(target / "1f3a-case.mha"))
    assert same_geometry(mask, image)
    probability = sitk.ReadImage(str(outputs / process.PROBABILITIES / "1f3a-case.mha"))
    assert probability.GetPixelID() == sitk.sitkFloat32 and same_geometry(probability, image)
    values = sitk.GetArrayFromImage(probability)
    assert values.min() >= 0 and values.max() <= 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), values > 0.5)


def test_pipeline_reads_the_next_case_and_writes_the_last_while_this_one_runs(
    tmp_path, weights, cache, monkeypatch
):
    inputs = tmp_path / "input"
    inputs.mkdir()
    names = [path.name for path in good_inputs(inputs).values()]
    events: list[tuple[str, str, str]] = []  # what, case, thread
    read, predict, write = Reading.read, Predictor.probability_of_input, cases.write_outputs

    def logged_read(self):
        events.append(("read", self.source.name, threading.current_thread().name))
        return read(self)

    def logged_predict(self, volume, geometry, progress=None):
        events.append(("predicting", "", ""))
        probability = predict(self, volume, geometry, progress)
        events.append(("predicted", "", ""))
        return probability

    def logged_write(predictor, probability, geometry, target, probability_target):
        events.append(("writing", target.name, threading.current_thread().name))
        case = sum(event[0] == "writing" for event in events)
        deadline = time.monotonic() + 30
        while pipeline == "on" and case < len(names) and time.monotonic() < deadline:
            if sum(event[0] == "predicting" for event in events) > case:
                break  # the next case's network runs while this one is written
            time.sleep(0.01)
        volume_mm3 = write(predictor, probability, geometry, target, probability_target)
        events.append(("written", target.name, ""))
        return volume_mm3

    monkeypatch.setattr(Reading, "read", logged_read)
    monkeypatch.setattr(Predictor, "probability_of_input", logged_predict)
    monkeypatch.setattr(cases, "write_outputs", logged_write)
    masks = {}
    for pipeline in ("on", "off"):
        outputs = tmp_path / pipeline
        events.clear()
        arguments = ["--input", str(inputs), "--output", str(outputs), "--weights", str(weights)]
        assert process.main([*arguments, "--pipeline", pipeline]) == 0
        masks[pipeline] = {p.name: sitk.ReadImage(str(p)) for p in outputs.glob("*.nii.gz")}
        report = json.loads((outputs / "results.json").read_text())
        assert [Path(entry["input"]).name for entry in report["cases"]] == sorted(names)
        assert all(entry["status"] == "ok" and entry["output"] for entry in report["cases"])
        reads = [event for event in events if event[0] == "read"]
        writes = [event for event in events if event[0] == "writing"]
        assert sorted(case for _, case, _ in reads) == sorted(names)
        # pipelined, each next case is read and each last one written in the background
        assert [e[2].startswith("read-next") for e in reads] == [pipeline == "on"] * len(names)
        assert [e[2].startswith("write-last") for e in writes] == [pipeline == "on"] * len(names)
        if pipeline == "on":
            order = [event[:2] for event in events]
            started = [i for i, event in enumerate(order) if event[0] == "predicting"]
            ended = [i for i, event in enumerate(order) if event[0] == "predicted"]
            for k, (_, case, _) in enumerate(reads[1:]):  # case k+1 read before k's network ends
                assert order.index(("read", case)) < ended[k], order
            for k, (_, target, _) in enumerate(writes[:-1]):  # case k written after k+1 started
                assert order.index(("written", target)) > started[k + 1], order
    assert masks["on"].keys() == masks["off"].keys() and len(masks["on"]) == len(names)
    for name, mask in masks["on"].items():
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(mask), sitk.GetArrayFromImage(masks["off"][name])
        )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([], "no input volume found"),
        (["--weights", "/nonexistent"], "manifest not found"),
        (["--device", "cuda"], "no CUDA device"),
    ],
)
def test_runs_that_cannot_start_exit_2_with_one_line(tmp_path, weights, capsys, arguments, message):
    inputs, outputs = tmp_path / "input", tmp_path / "output"
    inputs.mkdir()
    if arguments:
        tube_volume(inputs / "case_0000.nii.gz", (32, 32, 32))
    if "--weights" not in arguments:
        arguments = [*arguments, "--weights", str(weights)]
    if "--device" in arguments and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    status = process.main(["--input", str(inputs), "--output", str(outputs), *arguments])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    report = json.loads((outputs / "results.json").read_text())
    assert message in report["error"] and report["cases"] == []
