"""A real federation on localhost: SuperLink with TLS and SuperNode authentication, three
registered SuperNodes (one killed while it trains), an unregistered one that must be refused,
`flwr run` of two rounds, and the exported fold weights loaded back. Every process is
started here through the train/deploy scripts and stopped by its process group id."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model.weights import load_fold, load_manifest
from study.__main__ import main as study_main
from train.deploy.credentials import make_certificates, make_supernode_key
from train.deploy.localhost import descendants, terminate

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "train" / "deploy"
BIN = Path(sys.executable).parent
SITES = ("site1", "site2", "site3")
# A phase (train or validate) on these tiny sites takes 10-60 s on 2 busy cores, most of it
# starting a ClientApp process per message and polling; a killed SuperNode is reported
# unavailable by the SuperLink within two missed heartbeats (<= 60 s), before this timeout.
ROUND_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Processes:
    """Processes started in their own session; stopped with their children by group id."""

    def __init__(self, logs: Path, env: dict):
        self.logs, self.env, self.started = logs, env, {}

    def start(self, name: str, *command: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed in stop)
        process = subprocess.Popen(
            [str(c) for c in command],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started[name] = (process, log)
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> None:
        """SIGTERM to the process group, SIGKILL to what is left after 15 s; reap the leader;
        then the same, by pid, for descendants that left the group (Flower starts its
        ServerApp and ClientApp processes in sessions of their own)."""
        process, log = self.started.pop(name)
        family = descendants(process.pid)
        try:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                if group_gone(process, 15):
                    break
        finally:
            process.wait(10)
            log.close()
            terminate(family)

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):
            self.stop(name)


def group_gone(process: subprocess.Popen, timeout: float) -> bool:
    """True once no process of the group led by ``process`` is left (zombies reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def processes(tmp_path):
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "FLWR_HOME": str(tmp_path / "flwr"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",  # three sites share two cores
    }
    (tmp_path / "logs").mkdir()
    started = Processes(tmp_path / "logs", env)
    yield started
    started.stop_all()


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def superlink_healthy(port: int, ca: Path) -> bool:
    try:
        return httpx.get(f"https://127.0.0.1:{port}/health", verify=str(ca), timeout=1).is_success
    except httpx.HTTPError:
        return False


def test_federation_with_tls_and_authenticated_supernodes(tmp_path, processes):
    from phantoms import write_dataset

    data = write_dataset(tmp_path / "data", 3, (32, 32, 32), 11, sites=3)
    certs = make_certificates(tmp_path / "certs", ["localhost"])
    keys = {name: make_supernode_key(tmp_path / "keys", name) for name in (*SITES, "rogue")}
    port = free_port()
    link = processes.start(
        "superlink", "bash", DEPLOY / "superlink.sh", tmp_path / "certs", tmp_path / "state", port
    )
    wait_until(
        lambda: superlink_healthy(port, certs["ca"]) or link.poll() is not None, 60, "the SuperLink"
    )
    assert link.poll() is None, processes.log("superlink")
    with pytest.raises(httpx.ConnectError):  # TLS with our CA only, no plain HTTP
        httpx.get(f"https://127.0.0.1:{port}/health", timeout=2)

    run = lambda *command: subprocess.run(  # noqa: E731
        [str(c) for c in command],
        cwd=ROOT,
        env=processes.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    done = run("bash", DEPLOY / "connection.sh", "hospitals", f"127.0.0.1:{port}", certs["ca"])
    assert done.returncode == 0, done.stderr
    for site in SITES:
        done = run(BIN / "flwr", "supernode", "register", keys[site][1], "hospitals")
        assert done.returncode == 0 and "registered" in done.stdout, done.stdout + done.stderr

    nodes = {
        site: processes.start(
            site,
            "bash",
            DEPLOY / "supernode.sh",
            f"127.0.0.1:{port}",
            certs["ca"],
            keys[site][0],
            path,
            free_port(),
        )
        for site, path in zip(SITES, data)
    }
    rogue = processes.start(
        "rogue",
        "bash",
        DEPLOY / "supernode.sh",
        f"127.0.0.1:{port}",
        certs["ca"],
        keys["rogue"][0],
        data[0],
        free_port(),
    )

    settings = (
        "num-rounds=2 patch-size=32 base-channels=4 patches-per-case=2 val-overlap=0.0 "
        f'precision="fp32" wait-for-sites=3 round-timeout={ROUND_TIMEOUT}.0'
    )
    runs, out = tmp_path / "runs", tmp_path / "weights"
    training = processes.start(
        "flwr-run", "bash", DEPLOY / "run.sh", "hospitals", "0", runs, out, settings
    )

    # Unregistered key: refused. Flower logs its exit code 305 (SUPERNODE_CONNECTION_ERROR);
    # every Flower error code leaves the process with status 1.
    assert rogue.wait(60) == 1, processes.log("rogue")
    assert "Exit Code: 305" in processes.log("rogue")

    # Kill site3 while it trains in round 1 (after all three connected): the round completes
    # with the others once the SuperLink reports it unavailable, and round 2 goes on without it.
    wait_until(
        lambda: "Receiving: train message" in processes.log("site3") or training.poll() is not None,
        240,
        "site3 to receive its first round",
    )
    assert training.poll() is None, processes.log("flwr-run")
    processes.stop("site3")
    assert training.wait(ROUND_TIMEOUT * 4) == 0, processes.log("flwr-run")
    assert all(node.poll() is None for site, node in nodes.items() if site != "site3")

    # flwr run also returns when the SuperLink gives up on a starved ServerApp: say so.
    state_file = runs / "fold0" / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"round": 0}
    assert state["round"] == 2, processes.log("flwr-run")[-4000:]
    first, second = state["history"]
    answered = set(first["train"]["sites"]) & set(first["validation"]["sites"])
    assert answered == {"site1", "site2"}
    assert first["train"]["failures"] or first["validation"]["failures"]
    assert (
        sorted(second["train"]["sites"])
        == sorted(second["validation"]["sites"])
        == ["site1", "site2"]
    )
    assert re.search(r"WARNING.*round 1: ", processes.log("flwr-run"))  # and logged

    manifest = load_manifest(out)
    provenance = manifest.provenance["folds"]["0"]
    assert provenance["rounds"] == 2 and set(provenance["sites"]) >= {"site1", "site2"}
    net = load_fold(out, manifest, 0)
    assert net.architecture.base_channels == 4


# Every Python process of the next test imports this first (PYTHONPATH): Ray is absent there,
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
