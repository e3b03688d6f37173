"""The container: Dockerfile lint, and the local test script in its Docker-free emulation."""

import ast
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import write_weights

from inference.io import write_image_atomically
from inference.predictor import Predictor, PredictorSettings
from inference.preprocessing import Geometry, read_image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "test" / "run_local_test.sh"
SAMPLE = ROOT / "test" / "sample" / "input" / "sample_0000.nii.gz"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def test_dockerfile_is_clean_under_hadolint():
    done = subprocess.run([HADOLINT, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_copies_what_the_container_needs_and_runs_unprivileged():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    copied = {line.split()[1] for line in lines if line.startswith("COPY ")}
    assert {"process.py", "model/", "inference/", "postprocess/", "weights/"} <= copied
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert lines[-1] == 'ENTRYPOINT ["python", "process.py"]'
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignored and all(f"!{path}" in ignored for path in copied)


def test_the_image_holds_no_test_or_demo_code():
    """Every module the Dockerfile copies imports only the image's own packages and its
    requirements: no test helper, demo, metrics, phantoms or training code ships."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    copied = [ROOT / line.split()[1] for line in lines if line.startswith("COPY ")]
    files = [
        f for c in copied for f in ([c] if c.is_file() else c.rglob("*.py")) if f.suffix == ".py"
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
def test_local_test_script_matches_the_in_process_predictor(workspace):
    weights = workspace / "weights"
    write_weights(
        weights,
        folds=2,
        base_channels=4,
        patch=(32, 32, 32),
        target_spacing=(0.454, 0.454, 0.454),
        seed=9,
    )
    expected = workspace / "expected"
    expected.mkdir()
    predictor = Predictor(weights, PredictorSettings(device="cpu", backend="openvino"))
    array, geometry = read_image(SAMPLE)
    mask = predictor.segment(array, geometry).mask
    assert 0 < mask.sum() < mask.size // 4
    write_image_atomically(geometry.image_from(mask), expected / "sample.nii.gz")

    arguments = [
        "--weights",
        str(weights),
        "--expected",
        str(expected),
        "--workdir",
        str(workspace / "run"),
        "--venv",
        str(shared_venv()),
    ]
    done = run_script(*arguments)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "local test passed: 1 mask(s)" in done.stdout
    output = workspace / "run" / "output" / "sample.nii.gz"
    assert sitk.ReadImage(str(output)).GetPixelID() == sitk.sitkUInt8
    prepared = list((workspace / "run" / "app" / "weights" / "openvino").glob("*.xml"))
    assert len(prepared) == 2  # the build's conversion step ran

    # the same run against a wrong expectation fails (the environment is reused)
    shifted = np.roll(mask, 3, axis=2)
    write_image_atomically(Geometry.image_from(geometry, shifted), expected / "sample.nii.gz")
    done = run_script(*arguments)
    assert done.returncode == 1
    assert "FAIL sample.nii.gz: Dice" in done.stderr


def test_local_test_script_passes_with_the_shipped_weights(workspace):
    """What a challenge participant runs before submitting: the shipped folds, the committed
    expected output."""
    done = run_script("--workdir", str(workspace / "shipped"), "--venv", str(shared_venv()))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "local test passed: 1 mask(s)" in done.stdout
    prepared = list((workspace / "shipped" / "app" / "weights" / "openvino").glob("*.xml"))
    assert len(prepared) == 5


def test_local_test_script_says_when_no_weights_are_shipped(workspace):
    empty = workspace / "no-weights"
    empty.mkdir()
    done = run_script("--weights", str(empty))
    assert done.returncode == 2
    assert "no trained weights are shipped yet" in done.stderr
