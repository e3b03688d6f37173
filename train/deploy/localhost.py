"""Flower's runtimes on this machine, driven with ``flwr run``, and nothing left running after.

Two engines run the same Flower app (``train.server_app:app``, ``train.client_app:app``):

- **simulation** (:func:`run_simulation`): a SuperLink in simulation mode; Flower's simulation
  engine (Ray) runs ``num-supernodes`` virtual SuperNodes, and simulated node ``partition-id``
  reads the ``partition-id``-th site folder under ``sim-data-root``. Needs ``flwr[simulation]``.
- **deployment** (:func:`run_deployment`): a SuperLink and one SuperNode per site, each a
  process on localhost (optionally TLS), each SuperNode given its site's folder as
  ``data-path`` and, optionally, its own GPU through ``CUDA_VISIBLE_DEVICES``. No Ray: the
  ``flwr`` wheel and its own dependencies are enough.

Each call starts its SuperLink on a free port, names it in a Flower home of its own
(``config.toml``: ``[superlink.<engine>]``, the address and TLS settings), submits the run with
``flwr run <app> <engine> --stream`` (whose output, the ServerApp's log, goes to stderr), checks
the run's final status with ``flwr ls --run-id`` (``flwr run`` exits 0 even when the run
failed), and stops every process it started, with their descendants. Infrastructure logs (the
SuperLink's and SuperNodes' own) go to files in that home, ``<flwr-home>/<engine>-<port>/``;
their last lines are printed when something fails, and the folder is removed after a run that
completed. Concurrent calls do not share ports, homes or databases.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

APP = Path(__file__).resolve().parents[2]  # the Flower app: pyproject.toml's folder
STARTUP_SECONDS = 120.0  # a SuperLink on a loaded 2-core machine starts in 5-20 s


class FlowerRunError(RuntimeError):
    """A Flower run that failed, or a process of the runtime that died; the message says which.
    ``logs``: whether the runtime's own logs tell more (not for a run that failed in the app,
    whose log was streamed)."""

    def __init__(self, message: str, logs: bool = True):
        super().__init__(message)
        self.logs = logs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def executable(name: str) -> str:
    """A Flower command of this Python environment (beside ``sys.executable``), else PATH's."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the process tree, from /proc (empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie waits for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def terminate(pids: list[int], patience: float = 10.0) -> None:
    """SIGTERM to ``pids``, then SIGKILL to those still alive after ``patience`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + patience
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if running(pid)]
            time.sleep(0.1)
        if not alive:
            return
        pids = alive


class Services:
    """Long-running child processes (SuperLink, SuperNodes), each in a session of its own with
    its output in ``logs/<name>.log``; stopped together with their descendants (Flower starts
    its ServerApp and ClientApp processes in sessions of their own)."""

    def __init__(self, logs: Path, env: dict[str, str]):
        self.logs, self.env = logs, env
        self.started: dict[str, tuple[subprocess.Popen, object]] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed in stop_all)
        process = subprocess.Popen(
            [str(c) for c in command],
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started[name] = (process, log)

    def tail(self, name: str, lines: int = 30) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(f"  [{name}] {line}" for line in text[-lines:])

    def died(self) -> list[str]:
        """Names of the services that exited, each with its exit status."""
        return [
            f"{name} (exit status {process.returncode})"
            for name, (process, _) in self.started.items()
            if process.poll() is not None
        ]

    def describe_failure(self) -> str:
        return "\n".join(self.tail(name) for name in self.started)

    def stop_all(self) -> None:
        family = []
        for process, _ in self.started.values():
            family += [process.pid, *descendants(process.pid)]
        terminate(family)
        for process, log in self.started.values():
            process.wait(10)
            log.close()
        self.started.clear()


def wait_for_superlink(services: Services, port: int, ca: Path | None) -> None:
    """Until the SuperLink answers its health check; a SuperLink that exits is an error."""
    scheme = "https" if ca else "http"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if services.died():
            raise FlowerRunError("the SuperLink did not start:\n" + services.tail("superlink"))
        try:
            verify = str(ca) if ca else False
            if httpx.get(
                f"{scheme}://127.0.0.1:{port}/health", verify=verify, timeout=1
            ).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise FlowerRunError(
        f"the SuperLink did not answer within {STARTUP_SECONDS:.0f} s:\n"
        + services.tail("superlink")
    )


def write_connection(home: Path, name: str, port: int, ca: Path | None) -> None:
    """``home/config.toml`` naming the SuperLink ``name`` for the ``flwr`` CLI."""
    security = f"root-certificates = {json.dumps(str(ca))}" if ca else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n'
        f'[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{security}\n'
    )


def toml_value(value: object) -> str:
    """A run-config value as TOML (strings in JSON's escapes, which TOML shares)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def flwr_run(
    home: Path,
    connection: str,
    run_config: dict,
    env: dict[str, str],
    federation_config: dict | None = None,
    watch: Callable[[], str | None] | None = None,
) -> str:
    """``flwr run`` of the app against ``connection``, streaming its log to stderr; returns the
    run id once the run completed, raises :class:`FlowerRunError` when it did not, or when
    ``watch()`` names a reason to stop it (a SuperNode that died)."""
    overrides = home / "run-config.toml"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
    command = [
        executable("flwr"),
        "run",
        str(APP),
        connection,
        "--stream",
        "--run-config",
        str(overrides),
    ]
    if federation_config:
        command += [
            "--federation-config",
            " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items()),
        ]
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    run_id: list[str] = []

    def forward() -> None:
        for line in process.stdout:
            sys.stderr.write(line)
            sys.stderr.flush()
            found = re.search(r"Successfully started run (\d+)", line)
            if found:
                run_id.append(found.group(1))

    reader = threading.Thread(target=forward, daemon=True)
    reader.start()
    reason = None
    try:
        while process.poll() is None:
            reason = watch() if watch else None
            if reason:
                break
            time.sleep(0.5)
    finally:
        if process.poll() is None:  # stopped early, or interrupted (Ctrl-C)
            if run_id:
                subprocess.run(
                    [executable("flwr"), "stop", run_id[0], connection],
                    env=env,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
            terminate([process.pid, *descendants(process.pid)])
        process.wait()
        reader.join(10)
    if reason:
        raise FlowerRunError(reason)
    if not run_id:
        raise FlowerRunError(f"flwr run did not start a run (exit status {process.returncode})")
    listed = subprocess.run(
        [executable("flwr"), "ls", connection, "--run-id", run_id[0], "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        run = json.loads(listed.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        raise FlowerRunError(
            f"flwr ls cannot tell how run {run_id[0]} ended: {listed.stdout}{listed.stderr}"
        ) from None
    if run["status"] != "finished:completed":
        raise FlowerRunError(
            f"run {run_id[0]} {run['status']}: {run.get('status-details', '')}", logs=False
        )
    return run_id[0]


def flower_home(engine: str, port: int) -> Path:
    """A Flower home of this call's own, inside ``$FLWR_HOME`` (default ``~/.flwr``)."""
    base = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    home = (base / f"{engine}-{port}").resolve()
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    return home


# glibc hands every freed block over 32 MB (a 64^3 batch's widest feature maps) back to the
# kernel and page-faults it in again at the next step: a fifth of a CPU training step. Kept in
# the heap instead (never mapped apart, never trimmed); a setting of the caller's own wins.
TRAINING_ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def runtime_env(home: Path) -> dict[str, str]:
    """The environment of every process: this one's, with the call's Flower home, this Python
    environment's commands first on PATH (the SuperLink and SuperNodes start Flower's other
    commands from PATH), no runtime installs of the app's dependencies, and the allocator
    settings of :data:`TRAINING_ALLOCATOR`."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {
        **TRAINING_ALLOCATOR,
        **os.environ,
        "PATH": path,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def _run(
    engine: str,
    run_config: dict,
    start: Callable[[Services, int, Path], Path | None],
    federation_config: dict | None = None,
) -> None:
    port = free_port()
    home = flower_home(engine, port)
    env = runtime_env(home)
    services = Services(home / "logs", env)
    completed = False
    try:
        ca = start(services, port, home)
        wait_for_superlink(services, port, ca)
        write_connection(home, engine, port, ca)

        def watch() -> str | None:
            dead = services.died()
            return f"stopped the run: {', '.join(dead)} exited" if dead else None

        flwr_run(home, engine, run_config, env, federation_config, watch)
        completed = True
    except FlowerRunError as error:
        logs = f":\n{services.describe_failure()}" if error.logs else ""
        raise FlowerRunError(
            f"{error}\n(the runtime's logs are in {home / 'logs'}){logs}", error.logs
        ) from None
    finally:
        services.stop_all()
        if completed:
            shutil.rmtree(home, ignore_errors=True)


def run_simulation(
    run_config: dict,
    num_sites: int,
    cpus_per_site: int,
    gpus_per_site: float = 0.0,
    verbose: bool = False,
) -> None:
    """The run on Flower's simulation engine (see module docstring)."""
    cpus = os.cpu_count() or 1

    def start(services: Services, port: int, home: Path) -> None:
        services.start(
            "superlink",
            [
                executable("flower-superlink"),
                "--insecure",
                "--simulation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
        )

    federation = {
        "num-supernodes": num_sites,
        "client-resources-num-cpus": cpus_per_site,
        "client-resources-num-gpus": float(gpus_per_site),
        "init-args-num-cpus": cpus,
        "init-args-num-gpus": 1 if gpus_per_site else 0,
        "verbose": verbose,
    }
    _run("simulation", run_config, start, federation)


def run_deployment(
    run_config: dict,
    sites: list[Path],
    tls: bool = False,
    site_gpus: list[str] | None = None,
    site_env: dict[str, str] | None = None,
) -> None:
    """The run on Flower's deployment engine on localhost (see module docstring): site ``i``
    gets ``CUDA_VISIBLE_DEVICES=site_gpus[i % len(site_gpus)]`` when ``site_gpus`` is given
    (one GPU each, or a shared one), else this process's devices; ``site_env`` is added to
    every SuperNode's environment."""

    def start(services: Services, port: int, home: Path) -> Path | None:
        security, node_security, ca = ["--insecure"], ["--insecure"], None
        if tls:
            from train.deploy.credentials import make_certificates

            certs = make_certificates(home / "certs", ["localhost"])
            ca = certs["ca"]
            security = [
                "--ssl-ca-certfile",
                ca,
                "--ssl-certfile",
                certs["server_cert"],
                "--ssl-keyfile",
                certs["server_key"],
            ]
            node_security = ["--root-certificates", ca]
        services.start(
            "superlink",
            [
                executable("flower-superlink"),
                *security,
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
        )
        for index, site in enumerate(sites):
            node_config = (
                f"data-path={json.dumps(str(Path(site).resolve()))} "
                f"site-name={json.dumps(Path(site).name)}"
            )
            env = dict(site_env or {})
            if site_gpus:
                env["CUDA_VISIBLE_DEVICES"] = site_gpus[index % len(site_gpus)]
            services.start(
                Path(site).name,
                [
                    executable("flower-supernode"),
                    *node_security,
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--node-config",
                    node_config,
                    "--port",
                    str(free_port()),
                ],
                env,
            )
        return ca

    _run("deployment", run_config, start)
