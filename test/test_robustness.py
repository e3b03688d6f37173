"""Hostile and unlucky inputs, outputs and runs: each ends in one line naming the file, the other
cases still run, and nothing already written is lost or left half-written.

Real files on disk and real ITK behaviour throughout; the stops that need a process of their own
(a file-size limit, SIGTERM) run ``process.py`` as a subprocess.
"""

import fcntl
import gzip
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import tube_array, tube_volume, write_weights

import process
from inference.preprocessing import InputError, read_image

ROOT = Path(__file__).resolve().parents[1]
TORCH = ["--backend", "torch", "--device", "cpu"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Two narrow random folds (no head fitting: these tests need a run, not a good mask)."""
    directory = tmp_path_factory.mktemp("weights")
    write_weights(directory, folds=2, base_channels=4, patch=(32, 32, 32), seed=5, fitted=False)
    return directory


def run(inputs: Path, outputs: Path, weights: Path, *options: str) -> int:
    arguments = ["--input", str(inputs), "--output", str(outputs), "--weights", str(weights)]
    return process.main([*arguments, *TORCH, *options])


def report(outputs: Path) -> dict:
    return json.loads((outputs / "results.json").read_text())


def entries(outputs: Path) -> dict[str, dict]:
    return {Path(e["input"]).name: e for e in report(outputs)["cases"]}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def leftovers(folder: Path) -> list[str]:
    """Temporary or lock files anywhere under ``folder``."""
    return [p.name for p in folder.rglob(".*") if p.name.startswith((".tmp", ".lock"))]


def run_script(*arguments: str, limit_bytes: int | None = None, **kwargs) -> subprocess.Popen:
    """``process.py`` in a subprocess, optionally under ``ulimit -f`` (SIGXFSZ ignored, so that
    an oversized write fails with EFBIG as it does for a full disk)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "process.py"), *arguments, *TORCH],
        preexec_fn=limit if limit_bytes is not None else None,
        env=environment,
        cwd=ROOT,
        text=True,
        **kwargs,
    )


# --- files the reader must refuse, each with one line naming the file -----------------------


def nifti(path: Path, shape=(10, 11, 12), **fields) -> Path:
    """An uncompressed NIfTI-1 of a tube volume, with header ``fields`` overwritten:
    ``name=(offset, struct code, value)``."""
    sitk.WriteImage(sitk.GetImageFromArray(tube_array(shape)), str(path), False)
    data = bytearray(path.read_bytes())
    for offset, code, value in fields.values():
        struct.pack_into("<" + code, data, offset, *np.atleast_1d(value))
    path.write_bytes(data)
    return path


def metaimage(path: Path, data_file: str, raw: Path | None = None) -> Path:
    """A MetaImage header naming ``data_file``, its voxels written to ``raw`` when given."""
    shape = (8, 9, 10)
    if raw is not None:
        raw.write_bytes(tube_array(shape).tobytes())
    path.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "DimSize = 10 9 8\nElementSpacing = 1 1 1\nElementType = MET_USHORT\n"
        f"ElementDataFile = {data_file}\n"
    )
    return path


def short_nii(folder: Path) -> Path:
    path = nifti(folder / "short.nii")
    path.write_bytes(path.read_bytes()[:-1000])  # ITK fills the missing voxels with zeros
    return path


def short_gz_payload(folder: Path) -> Path:
    data = nifti(folder / "raw.nii").read_bytes()
    path = folder / "short.nii.gz"
    path.write_bytes(gzip.compress(data[:-1000]))  # a complete gzip stream of too few voxels
    return path


def short_zlib_payload(folder: Path) -> Path:
    path = folder / "short.mha"
    sitk.WriteImage(sitk.GetImageFromArray(tube_array((8, 9, 10))), str(path), True)
    data = path.read_bytes()
    end = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    voxels = zlib.compress(tube_array((8, 9, 10)).tobytes()[:-200])
    header = re.sub(
        rb"CompressedDataSize = \d+", b"CompressedDataSize = %d" % len(voxels), data[:end]
    )
    path.write_bytes(header + voxels)
    return path


def pixdim(value: float):
    return lambda folder: nifti(folder / "spacing.nii", pixdim=(80, "f", value))


def huge_header(folder: Path) -> Path:
    """A 400-byte file whose header announces 30000^3 voxels (54 TB)."""
    path = nifti(folder / "huge.nii", dims=(42, "3h", (30000, 30000, 30000)))
    path.write_bytes(path.read_bytes()[:400])
    return path


def complex_voxels(folder: Path) -> Path:
    path = folder / "complex.nii"
    real = tube_array((8, 9, 10)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray((real + 1j * real).astype(np.complex64)), str(path))
    return path  # read as its real part until now


def float64_beyond_float32(folder: Path) -> Path:
    array = tube_array((8, 9, 10)).astype(np.float64)
    array[2, 3, 4] = 1e300  # finite in float64, inf in float32
    path = folder / "huge-values.mha"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def mha_naming(name: str):
    def make(folder: Path) -> Path:
        outside = folder.parent / f"{folder.name}-outside"
        outside.mkdir()
        metaimage(folder / "x.mha", "unused", raw=outside / "voxels.raw")
        return metaimage(folder / "x.mha", name.format(outside=outside))

    return make


def mha_link_leaving(folder: Path) -> Path:
    outside = folder.parent / f"{folder.name}-outside"
    outside.mkdir()
    metaimage(folder / "x.mha", "unused", raw=outside / "voxels.raw")
    (folder / "voxels.raw").symlink_to(outside / "voxels.raw")
    return metaimage(folder / "x.mha", "voxels.raw")


def mha_fifo(folder: Path) -> Path:
    os.mkfifo(folder / "voxels.raw")  # reading it would block forever
    return metaimage(folder / "x.mha", "voxels.raw")


def nrrd_naming(name: str):
    def make(folder: Path) -> Path:
        path = folder / "x.nrrd"
        path.write_text(
            "NRRD0004\ntype: unsigned short\ndimension: 3\nsizes: 10 9 8\nencoding: raw\n"
            f"endian: little\ndata file: {name}\n\n"
        )
        return path

    return make


def dangling(folder: Path) -> Path:
    path = folder / "gone.nii.gz"
    path.symlink_to(folder / "nowhere.nii.gz")
    return path


def fifo(folder: Path) -> Path:
    path = folder / "pipe.nii.gz"
    os.mkfifo(path)
    return path


BAD_FILES = {
    "short .nii": (short_nii, "truncated"),
    "short payload in a complete gzip stream": (short_gz_payload, "truncated"),
    "short payload in a complete zlib stream (.mha)": (short_zlib_payload, "truncated"),
    "pixdim 0": (pixdim(0.0), "spacing"),
    "pixdim NaN": (pixdim(float("nan")), "spacing"),
    "pixdim 1e-30": (pixdim(1e-30), "spacing"),
    "30000^3 voxels announced": (huge_header, "exceed"),
    "complex voxels": (complex_voxels, "complex"),
    "float64 overflowing float32": (float64_beyond_float32, "NaN or infinite"),
    "MetaImage data file /dev/zero": (mha_naming("/dev/zero"), "data file"),
    "MetaImage data file ../": (mha_naming("../{outside.name}/voxels.raw"), "data file"),
    "MetaImage data file absolute": (mha_naming("{outside}/voxels.raw"), "data file"),
    "MetaImage data file LIST": (mha_naming("LIST"), "data file"),
    "MetaImage data file a link leaving": (mha_link_leaving, "leaving"),
    "MetaImage data file a FIFO": (mha_fifo, "not a regular file"),
    "NRRD data file /dev/zero": (nrrd_naming("/dev/zero"), "data file"),
    "dangling symbolic link": (dangling, "dangling symbolic link"),
    "FIFO named like an image": (fifo, "not a regular file"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_file_is_refused_with_one_line_naming_it(tmp_path, kind):
    make, fragment = BAD_FILES[kind]
    path = make(tmp_path)
    start = time.perf_counter()
    with pytest.raises(InputError) as caught:
        read_image(path)
    message = str(caught.value)
    assert fragment in message and str(path) in message and "\n" not in message, message
    assert time.perf_counter() - start < 5  # nothing of an announced 54 TB was read


def test_a_nii_gz_is_read_from_itself_not_from_the_nii_beside_it(tmp_path):
    """niftilib loads the voxels of NAME.nii.gz from NAME.nii when that exists."""
    compressed = tube_volume(tmp_path / "case_0000.nii.gz", (10, 11, 12), seed=1)
    tube_volume(tmp_path / "other.nii.gz", (10, 11, 12), seed=2)
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "other.nii.gz")), str(tmp_path / "case_0000.nii"))
    array, _ = read_image(compressed)
    np.testing.assert_array_equal(array, tube_array((10, 11, 12), seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "case_0000.nii",
        "case_0000.nii.gz",
        "other.nii.gz",
    ]


# --- runs: inputs, outputs, weights --------------------------------------------------------


def test_mhd_and_dangling_links_each_get_one_line_instead_of_silence(tmp_path, weights, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    tube_volume(inputs / "good_0000.nii.gz", (20, 24, 28))
    metaimage(inputs / "apart_0000.mhd", "apart_0000.raw", raw=inputs / "apart_0000.raw")
    (inputs / "gone_0000.nii.gz").symlink_to(inputs / "deleted.nii.gz")
    assert run(inputs, outputs, weights) == 1
    found = entries(outputs)
    assert found["good_0000.nii.gz"]["status"] == "ok"
    assert ".mhd is not supported" in found["apart_0000.mhd"]["error"]
    assert "dangling symbolic link" in found["gone_0000.nii.gz"]["error"]
    assert len(error_lines(capsys.readouterr().err)) == 2


def test_two_inputs_for_one_output_are_both_refused_and_the_others_run(tmp_path, weights):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    tube_volume(inputs / "a_0000.nii.gz", (20, 24, 28), seed=1)
    tube_volume(inputs / "a.nii.gz", (20, 24, 28), seed=2)  # also -> a.nii.gz
    tube_volume(inputs / "b_0000.nii.gz", (20, 24, 28), seed=3)
    assert run(inputs, outputs, weights) == 1
    found = entries(outputs)
    for name, other in (("a_0000.nii.gz", "a.nii.gz"), ("a.nii.gz", "a_0000.nii.gz")):
        assert found[name]["status"] == "error" and other in found[name]["error"]
        assert "same" in found[name]["error"] and "\n" not in found[name]["error"]
    assert found["b_0000.nii.gz"]["status"] == "ok"
    assert sorted(p.name for p in outputs.iterdir()) == ["b.nii.gz", "results.json"]


def test_an_output_folder_equal_to_the_input_never_overwrites_an_input(tmp_path, weights):
    folder = tmp_path / "both"
    folder.mkdir()
    tube_volume(folder / "x_0000.nii.gz", (20, 24, 28), seed=1)
    assert run(folder, folder, weights) == 0  # x.nii.gz written beside its input
    mask = (folder / "x.nii.gz").read_bytes()
    assert run(folder, folder, weights) == 1  # now x.nii.gz is an input too
    found = entries(folder)
    assert {e["status"] for e in found.values()} == {"error"}
    assert all("would overwrite an input" in e["error"] for e in found.values())
    assert (folder / "x.nii.gz").read_bytes() == mask  # the input is untouched


def test_a_failed_case_loses_the_mask_of_an_earlier_run(tmp_path, weights):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    source = tube_volume(inputs / "case_0000.nii.gz", (20, 24, 28))
    assert run(inputs, outputs, weights) == 0 and (outputs / "case.nii.gz").is_file()
    source.write_bytes(source.read_bytes()[:300])  # the input is replaced by a broken one
    assert run(inputs, outputs, weights) == 1
    assert entries(outputs)["case_0000.nii.gz"]["status"] == "error"
    assert not (outputs / "case.nii.gz").exists()


def test_flat_inputs_beside_an_unrelated_images_folder_are_segmented(tmp_path, weights):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    (inputs / "images" / "thumbnails").mkdir(parents=True)
    (inputs / "images" / "thumbnails" / "case.png").write_bytes(b"\x89PNG")
    tube_volume(inputs / "case_0000.nii.gz", (20, 24, 28))
    assert run(inputs, outputs, weights) == 0
    assert report(outputs)["convention"] == "shiny-icarus"
    assert (outputs / "case.nii.gz").is_file()


def test_an_upper_case_suffix_drops_the_channel_suffix(tmp_path, weights):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    tube_volume(inputs / "source.nii.gz", (20, 24, 28)).rename(inputs / "CASE_0000.NII.GZ")
    assert run(inputs, outputs, weights) == 0
    assert sorted(p.name for p in outputs.iterdir()) == ["CASE.NII.GZ", "results.json"]
    assert sitk.ReadImage(str(outputs / "CASE.NII.GZ")).GetPixelID() == sitk.sitkUInt8


def test_a_251_character_grand_challenge_name_is_written(tmp_path, weights):
    name = "a" * 247 + ".mha"  # 251 bytes: the old temporary name had 256
    inputs, outputs = tmp_path / "in" / "images" / "head-3dra", tmp_path / "out"
    inputs.mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(tube_array((20, 24, 28))), str(inputs / name))
    assert run(tmp_path / "in", outputs, weights) == 0
    assert (outputs / "images" / process.OUTPUT_SLUG / name).is_file()


def test_an_output_path_that_is_a_file_exits_2_with_one_line(tmp_path, weights, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    tube_volume(inputs / "case_0000.nii.gz", (20, 24, 28))
    (tmp_path / "out").write_text("a file\n")
    assert run(inputs, tmp_path / "out", weights) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not a folder" in lines[0] and str(tmp_path / "out") in lines[0]


def test_a_second_run_on_the_same_output_exits_2_and_leaves_it_alone(tmp_path, weights, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    tube_volume(inputs / "case_0000.nii.gz", (20, 24, 28))
    (outputs / "results.json").write_text('{"the first run": "still writing"}\n')
    with open(outputs / ".lock", "w") as held:  # the first run, as another process holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run(inputs, outputs, weights) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "another run" in lines[0]
    assert report(outputs) == {"the first run": "still writing"}
    assert not (outputs / "case.nii.gz").exists()


MANIFEST_DEFECTS = {
    "bytes as a string": lambda m: m["folds"][0].update(bytes=str(m["folds"][0]["bytes"])),
    "file as a number": lambda m: m["folds"][0].update(file=7),
    "file leaving the folder": lambda m: m["folds"][0].update(file="../fold_0.safetensors"),
    "patch size as a string": lambda m: m.update(patch_size="32"),
    "zero target spacing": lambda m: m.update(target_spacing=[0, 1, 1]),
    "channels as a string": lambda m: m["architecture"].update(base_channels="4"),
}


@pytest.mark.parametrize("defect", list(MANIFEST_DEFECTS))
def test_a_manifest_with_wrong_types_exits_2_with_one_line(tmp_path, weights, capsys, defect):
    broken = tmp_path / "weights"
    shutil.copytree(weights, broken)
    shutil.copy(weights / "fold_0.safetensors", tmp_path)  # what "../fold_0..." would reach
    manifest = json.loads((broken / "manifest.json").read_text())
    MANIFEST_DEFECTS[defect](manifest)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    inputs = tmp_path / "in"
    inputs.mkdir()
    tube_volume(inputs / "case_0000.nii.gz", (20, 24, 28))
    assert run(inputs, tmp_path / "out", broken) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "invalid manifest" in lines[0], lines


def fold_as_dev_zero(folder: Path) -> None:
    (folder / "fold_0.safetensors").unlink()
    (folder / "fold_0.safetensors").symlink_to("/dev/zero")


def fold_as_fifo(folder: Path) -> None:
    (folder / "fold_0.safetensors").unlink()
    os.mkfifo(folder / "fold_0.safetensors")


def fold_linked_outside(folder: Path) -> None:
    outside = folder.parent / "elsewhere.safetensors"
    (folder / "fold_0.safetensors").rename(outside)
    (folder / "fold_0.safetensors").symlink_to(outside)


def manifest_as_dev_zero(folder: Path) -> None:
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").symlink_to("/dev/zero")


WEIGHT_FILE_DEFECTS = {
    "fold file is /dev/zero": (fold_as_dev_zero, "link leaving"),
    "fold file is a FIFO": (fold_as_fifo, "not a regular file"),
    "fold file links outside": (fold_linked_outside, "link leaving"),
    "manifest is /dev/zero": (manifest_as_dev_zero, "link leaving"),
}


@pytest.mark.parametrize("defect", list(WEIGHT_FILE_DEFECTS))
def test_weight_files_must_be_regular_files_inside_the_folder(tmp_path, weights, defect):
    from model.weights import WeightError, load_ensemble

    broken = tmp_path / "weights"
    shutil.copytree(weights, broken)
    make, fragment = WEIGHT_FILE_DEFECTS[defect]
    make(broken)
    with pytest.raises(WeightError) as caught:
        load_ensemble(broken, [0])
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


# --- announcing the cost, and keeping within a time limit ------------------------------------


def test_each_case_announces_its_windows_and_estimated_time(tmp_path, weights, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    tube_volume(inputs / "a_0000.nii.gz", (48, 24, 20), seed=1)
    tube_volume(inputs / "b_0000.nii.gz", (48, 24, 20), seed=2)
    assert run(inputs, outputs, weights) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "windows x" in line]
    case = entries(outputs)["a_0000.nii.gz"]
    assert case["windows"] == 2 and case["passes"] == 4 and case["estimated_seconds"] > 0
    assert len(lines) == 2 and "a_0000.nii.gz: 2 windows x 2 folds x 1 mirrors" in lines[0]
    assert "conservative" in lines[0] and "measured" in lines[1]


def test_a_time_limit_drops_tta_and_the_report_says_so(tmp_path, weights, capsys, monkeypatch):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    tube_volume(inputs / "case_0000.nii.gz", (20, 24, 28))
    monkeypatch.setenv("VESSEL_SEG_TIME_LIMIT", "0.001")
    assert run(inputs, outputs, weights, "--tta") == 0
    case = entries(outputs)["case_0000.nii.gz"]
    assert case["tta"] is False and case["passes"] == 1  # one window, then folds dropped too
    assert case["folds"] == [0] and "TTA dropped" in capsys.readouterr().err


def test_an_mra_is_bounded_from_its_header_and_estimated_before_it_runs(tmp_path, capsys):
    """A contrast MRA (0.88 x 0.88 x 1.5 mm) at the shipped 0.227 mm: a whole head exceeds the
    voxel bound before a voxel is read; a smaller field of view announces its cost."""
    from inference.pacing import Pacer
    from inference.predictor import Predictor, PredictorSettings
    from inference.preprocessing import Geometry

    write_weights(
        tmp_path / "w", folds=1, base_channels=4, target_spacing=(0.227,) * 3, fitted=False
    )
    predictor = Predictor(tmp_path / "w", PredictorSettings(device="cpu", backend="torch"))
    head = nifti(
        tmp_path / "mra.nii", dims=(42, "3h", (512, 512, 150)), pixdim=(80, "3f", (0.88, 0.88, 1.5))
    )
    with pytest.raises(InputError, match="exceed"):
        read_image(head, lambda header: predictor.check(header, head))
    geometry = Geometry((40, 96, 96), (1.5, 0.88, 0.88), (0.0,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    with Pacer(predictor) as pacer:
        result = pacer.plan(geometry, Path("mra.nii"))
    line = capsys.readouterr().err.strip()
    assert re.match(r"mra.nii: \d+ windows x 1 folds x 1 mirrors = \d+ passes, about \d+", line)
    assert result.windows > 1000 and result.estimated_seconds > 10


# --- stops: a full disk, a file-size limit, docker stop --------------------------------------


def test_a_write_cut_short_by_a_file_size_limit_leaves_no_mask(tmp_path, weights):
    """ITK's NIfTI writer only prints ``** ERROR: NWAD`` on a short write: the read-back must
    catch it, and the truncated file must never take the mask's name."""
    inputs, outputs = tmp_path / "in" / "images" / "head-3dra", tmp_path / "out"
    inputs.mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(tube_array((64, 32, 32))), str(inputs / "big.nii"))
    command = ["--input", str(tmp_path / "in"), "--output", str(outputs), "--weights", str(weights)]
    command += ["--folds", "0"]
    child = run_script(*command, limit_bytes=20_000, stderr=subprocess.PIPE)  # mask: 65,888
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 1, stderr
    case = entries(outputs)["big.nii"]
    assert case["status"] == "error" and "big.nii" in case["error"], case
    assert "incomplete" in case["error"] and "\n" not in case["error"]
    assert not list((outputs / "images").rglob("*.nii")) and not leftovers(outputs)


def test_a_full_disk_at_the_start_is_one_line_and_exit_2_before_any_inference(tmp_path, weights):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    tube_volume(inputs / "case_0000.nii.gz", (20, 24, 28))
    command = ["--input", str(inputs), "--output", str(outputs), "--weights", str(weights)]
    child = run_script(*command, limit_bytes=64, stderr=subprocess.PIPE)  # results.json: more
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "results.json" in lines[0]
    assert not (outputs / "case.nii.gz").exists() and not leftovers(outputs)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_one_line_and_exit_2(tmp_path, weights, capsys):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir(mode=0o555)
    tube_volume(inputs / "case_0000.nii.gz", (20, 24, 28))
    assert run(inputs, outputs, weights) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not writable" in lines[0]


@pytest.mark.parametrize("pipeline", ["off", "on"])
def test_sigterm_mid_case_marks_it_interrupted_and_keeps_what_was_written(
    tmp_path, weights, pipeline
):
    """``docker stop``: the running case is marked ``interrupted``, the finished one keeps its
    mask (pipelined: written in the background while the next case runs, and reported), no
    temporary file stays (nor one a killed run left), exit status 143. The report of an
    earlier run is replaced by this run's as soon as it starts."""
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outputs.mkdir()
    tube_volume(inputs / "a_0000.nii.gz", (20, 24, 28), seed=1)
    tube_volume(inputs / "b_0000.nii.gz", (64, 64, 64), seed=2)  # 27 windows x 8 mirrors
    stale = {"cases": [{"input": "from an earlier run", "status": "ok"}]}
    (outputs / "results.json").write_text(json.dumps(stale))
    (outputs / ".tmp-k1ll3d.nii.gz").write_bytes(b"left by a run killed with SIGKILL")
    command = ["--input", str(inputs), "--output", str(outputs), "--weights", str(weights)]
    log = tmp_path / "stderr"

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 120
        while text not in log.read_text() and child.poll() is None:
            assert time.monotonic() < deadline, f"{text} never started"
            time.sleep(0.02)

    with open(log, "w") as sink:
        child = run_script(*command, "--tta", "--folds", "0", "--pipeline", pipeline, stderr=sink)
        wait_for("a_0000")
        running = report(outputs)  # during the first case
        wait_for("b_0000")
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
    assert running["status"] == "running" and "from an earlier run" not in json.dumps(running)
    assert child.returncode == 143, log.read_text()
    found = entries(outputs)
    assert found["a_0000.nii.gz"]["status"] == "ok" and (outputs / "a.nii.gz").is_file()
    assert found["b_0000.nii.gz"]["status"] == "interrupted"
    assert report(outputs)["status"] == "interrupted"
    assert sorted(p.name for p in outputs.iterdir()) == ["a.nii.gz", "results.json"]
