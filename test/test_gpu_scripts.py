"""The GPU machine's scripts at a CPU size: bench/gpu_train.sh trains on Flower's deployment
engine with no Ray anywhere, and bench/gpu_study.sh trains runs at once, parks the unfinished
ones and returns them in calls that `python -m study restore` merges. Both run as a user runs
them, through bash, with real Flower processes and phantom data written to disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from model.weights import load_fold, load_manifest
from study.__main__ import main as study_main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# Every Python process of the first test imports this first (PYTHONPATH): Ray is absent there,
# as in an environment without flwr[simulation] (import fails, find_spec finds nothing).
RAY_BLOCKER = """
import os, sys
from importlib.machinery import PathFinder


class NoRayPathFinder(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] == "ray":
            with open(os.path.join(os.environ["NO_RAY_LOG"], "ray-imports"), "a") as log:
                log.write(f"{os.getpid()} {name} {sys.argv[0]}\\n")
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [NoRayPathFinder if f is PathFinder else f for f in sys.meta_path]
with open(os.path.join(os.environ["NO_RAY_LOG"], f"process-{os.getpid()}"), "w") as log:
    log.write(" ".join(sys.argv))
"""


def test_gpu_train_script_trains_on_the_deployment_engine_without_ray(tmp_path):
    """bench/gpu_train.sh at a CPU size: phantoms, a SuperLink (TLS) and two SuperNodes on
    localhost, one round, the throughput report; no process can import Ray."""
    (tmp_path / "no-ray").mkdir()
    (tmp_path / "no-ray" / "sitecustomize.py").write_text(RAY_BLOCKER)
    imports = tmp_path / "imports"
    imports.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(tmp_path / "no-ray"),
        "NO_RAY_LOG": str(imports),
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "WORK": str(tmp_path / "work"),
        "SITES": "2",
        "CASES": "3",
        "SIZE": "32",
        "PATCH": "32",
        "BASE_CHANNELS": "4",
        "PATCHES_PER_CASE": "2",
        "ROUNDS": "1",
        "SITE_GPUS": "",
        "RUN_CONFIG": 'val-overlap=0.0 precision="fp32"',
        "OMP_NUM_THREADS": "1",
        "VESSEL_SEG_LOADER_WORKERS": "1",
        "VESSEL_SEG_TRAIN_CACHE": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_train.sh")],
        env=env,
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "ray installed: False" in done.stdout
    report = json.loads((tmp_path / "out" / "gpu-train.json").read_text())
    assert report["exit_status"] == 0 and report["rounds"] == 1
    assert sorted(report["history"][0]["sites"]) == ["site1", "site2"]
    assert report["steady_state"]["voxels_per_second"] > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["engine"] == "deployment" and summary["rounds"] == 1
    commands = [p.read_text() for p in imports.glob("process-*")]
    for role in ("flower-superlink", "flower-supernode", "flwr-serverapp", "flwr-clientapp"):
        assert any(role in command for command in commands), (role, commands)
    assert not list(tmp_path.glob("work/flwr/deployment-*")), "the run's Flower home is left"
    # Nothing but the script's own check ("ray installed: False", python -c) looked for Ray.
    attempts = (imports / "ray-imports").read_text().splitlines()
    assert all(line.split()[2] == "-c" for line in attempts), attempts


STUDY_AT_CPU_SIZE = """
import dataclasses

import study.data as data
import study.runs as runs

data.FEDERATION = {"cases": 3, "size": 32, "seed": 5, "sites": 3}
data.TEST_SET = {"cases": 1, "size": 32, "seed": 6, "sites": 4}
data.INDEPENDENT_SET = {"cases": 1, "size": 32, "seed": 7}
runs.COMMON.update({"patch-size": 32, "base-channels": 4, "patches-per-case": 2,
                    "val-overlap": 0.0, "precision": "fp32"})
runs.RUNS["fold0"] = dataclasses.replace(runs.RUNS["fold0"], rounds=1)  # fold 1 keeps 60
"""


def test_gpu_study_script_trains_runs_at_once_parks_the_unfinished_and_returns_them(tmp_path):
    """bench/gpu_study.sh at a CPU size: fold 0 finishes (one round), fold 1 is paused after its
    first round at the time limit; the return comes in two calls and restores elsewhere."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STUDY_AT_CPU_SIZE)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(hook),
        "PYTHON": sys.executable,
        "STUDY": str(tmp_path / "device"),
        "RUNS": "fold0 fold1",
        "MAX_SECONDS": "1",
        "RETURN_FILES": "2",
        "OMP_NUM_THREADS": "1",
    }
    script = ["bash", str(ROOT / "bench" / "gpu_study.sh")]

    def call(*options: str, out: str) -> list[str]:
        done = subprocess.run(
            [*script, *options],
            env={**env, "OUT": str(tmp_path / out)},
            text=True,
            capture_output=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        return sorted(p.name for p in (tmp_path / out).iterdir())

    first = call(out="first")
    assert first == [
        "folds--train--fold1--best-r0001.safetensors",
        "folds--weights--fold_0.safetensors",
        "study.tar.gz",
    ]
    assert call("--collect", out="second") == [
        "folds--train--fold1--global-r0001.safetensors",
        "study.tar.gz",
    ]
    here = tmp_path / "here"
    study_main(["--root", str(here), "restore", str(tmp_path / "first"), str(tmp_path / "second")])
    manifest = load_manifest(here / "runs/folds/weights")
    assert [entry.fold for entry in manifest.folds] == [0]
    load_fold(here / "runs/folds/weights", manifest, 0)  # its size and sha256 verified
    state = json.loads((here / "runs/folds/train/fold1/state.json").read_text())
    assert state["round"] == 1 and state["stop_reason"] == "paused"
    for name in (state["global_file"], state["best_file"]):
        assert (here / "runs/folds/train/fold1" / name).is_file()  # fold 1 resumes here
