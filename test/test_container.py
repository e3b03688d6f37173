"""The container: Dockerfile lint, and the local test script in its Docker-free emulation."""

import ast
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import write_weights

from inference import openvino_backend
from inference.io import write_image_atomically
from inference.predictor import Predictor, PredictorSettings
from inference.preprocessing import Geometry, read_image
from model import load_manifest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "test" / "run_local_test.sh"
SAMPLE = ROOT / "test" / "sample" / "input" / "sample_0000.nii.gz"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def test_dockerfile_is_clean_under_hadolint():
    done = subprocess.run([HADOLINT, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def stages() -> dict[str, list[str]]:
    """The Dockerfile's lines per stage ("" the final one, the image)."""
    found, name = {}, None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            words = line.split()
            name = words[-1] if words[-2] == "AS" else ""
        if name is not None:
            found.setdefault(name, []).append(line)
    return found


def copied(lines: list[str]) -> list[str]:
    """The build-context sources of a stage's COPY lines."""
    return [line.split()[1] for line in lines if line.startswith("COPY ") and "--from" not in line]


def test_dockerfile_copies_what_the_container_needs_and_runs_unprivileged():
    image = stages()[""]
    assert {"process.py", "model/", "inference/", "postprocess/", "weights/"} <= set(copied(image))
    assert "COPY --from=int8 /opt/int8/ weights/openvino/" in image  # the int8 stage's models
    assert any(line.startswith("USER ") and "root" not in line for line in image)
    assert image[-1] == 'ENTRYPOINT ["python", "process.py"]'
    ignored = (ROOT / ".dockerignore").read_text().split()
    sources = {path for lines in stages().values() for path in copied(lines)}
    assert "*" in ignored and all(f"!{path}" in ignored for path in sources)


def test_the_image_holds_no_test_or_demo_code():
    """Every module the image's stage copies imports only the image's own packages and its
    requirements: no test helper, demo, metrics, phantoms or training code ships (the int8
    stage holds the calibration code; only its models reach the image)."""
    copies = [ROOT / path for path in copied(stages()[""])]
    files = [
        f for c in copies for f in ([c] if c.is_file() else c.rglob("*.py")) if f.suffix == ".py"
    ]
    assert len(files) > 10
    shipped = {"model", "inference", "postprocess", "process"}
    forbidden = {"helpers", "demo", "metrics", "phantoms", "train", "test", "bench"}
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            tops = {name.split(".")[0] for name in names}
            assert not tops & forbidden, f"{file.relative_to(ROOT)} imports {tops & forbidden}"
    assert not {f.stem for f in files} & {"testing", "demo", "helpers"}
    assert shipped >= {f.relative_to(ROOT).parts[0].removesuffix(".py") for f in files} - {
        "weights"
    }


def shared_venv() -> Path:
    """The emulation's virtual environment, reused across test runs while requirements.txt is
    unchanged (its hash names it): creating one costs a minute or more. Under /tmp, where the
    script's unprivileged user can reach it."""
    digest = hashlib.sha256((ROOT / "requirements.txt").read_bytes()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"vessel-seg-local-test-venv-{digest}"


@pytest.fixture(scope="module")
def workspace():
    """Outside pytest's private temp folder: the script's unprivileged user must reach it."""
    directory = Path(tempfile.mkdtemp(prefix="vessel-seg-container-test."))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), "--emulate", *arguments], capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(not SAMPLE.is_file(), reason="the bundled sample is not there")
def test_local_test_script_builds_the_int8_stage_and_matches_the_in_process_predictor(workspace):
    weights = workspace / "weights"
    write_weights(
        weights,
        folds=1,
        base_channels=4,
        patch=(32, 32, 32),
        target_spacing=(0.454, 0.454, 0.454),
        seed=9,
    )
    expected = workspace / "expected"
    run = [
        "--weights",
        str(weights),
        "--expected",
        str(expected),
        "--workdir",
        str(workspace / "run"),
    ]
    done = run_script(*run, "--venv", str(shared_venv()), "--regenerate")
    assert done.returncode == 0, done.stdout + done.stderr
    prepared = workspace / "run" / "app" / "weights" / "openvino"
    models = sorted(path.name for path in prepared.glob("*.xml"))
    assert len(models) == 2 and sum("-int8" in name for name in models) == 1  # float and int8

    # in process, with the models the build prepared: the same precision, the same mask
    predictor = Predictor(prepared.parent, PredictorSettings(device="cpu", backend="openvino"))
    array, geometry = read_image(SAMPLE)
    mask = predictor.segment(array, geometry).mask
    assert 0 < mask.sum() < mask.size // 4
    produced = sitk.ReadImage(str(expected / "sample.nii.gz"))
    assert produced.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(produced), mask)
    report = json.loads((workspace / "run" / "output" / "results.json").read_text())
    assert report["precision"] == predictor.backend.precision
    assert report["precision"].startswith("int8") == openvino_backend.int8_preferred()

    # a wrong expectation fails (the environment is reused; the float path suffices here)
    shifted = np.roll(mask, 3, axis=2)
    write_image_atomically(Geometry.image_from(geometry, shifted), expected / "sample.nii.gz")
    done = run_script(*run, "--venv", str(shared_venv()), "--no-int8")
    assert done.returncode == 1
    assert "FAIL sample.nii.gz: Dice" in done.stderr


def test_local_test_script_passes_with_the_shipped_weights(workspace):
    """What a challenge participant runs before submitting: the shipped folds, the committed
    expected output."""
    done = run_script(
        "--workdir", str(workspace / "shipped"), "--venv", str(shared_venv()), "--no-int8"
    )  # the int8 stage takes minutes a fold here; the test above runs the stage
    assert done.returncode == 0, done.stdout + done.stderr
    assert "local test passed: 1 mask(s)" in done.stdout
    prepared = list((workspace / "shipped" / "app" / "weights" / "openvino").glob("*.xml"))
    assert len(prepared) == len(load_manifest(ROOT / "weights").folds)


def test_local_test_script_says_when_no_weights_are_shipped(workspace):
    empty = workspace / "no-weights"
    empty.mkdir()
    done = run_script("--weights", str(empty))
    assert done.returncode == 2
    assert "no trained weights are shipped yet" in done.stderr
