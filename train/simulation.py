"""Run the Flower app on one machine: one simulated SuperNode per site folder.

Flower's simulation engine (``flwr.simulation.run_simulation``, Ray actors) runs the same
ServerApp and ClientApp as a real federation, in this process: nothing is left running when
it returns (the Ray cluster it starts is shut down). Each simulated site gets
``cpus_per_site`` CPUs from Ray; with all CPUs per site the sites train one after the other,
each on every core, which is fastest for PyTorch on a small machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from train.config import TrainConfig


def prepare_environment(work: Path) -> None:
    """Flower's home inside the working folder; no dependency installs; quiet Ray."""
    work.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_HOME"] = str((work / "flwr").resolve())
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def site_folders(root: Path) -> list[Path]:
    """The nnU-Net datasets directly under ``root``, sorted (simulated node i reads the i-th)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "imagesTr").is_dir())


def ensure_phantom_federation(
    root: Path, sites: int, cases: int, size: tuple[int, int, int], seed: int
) -> list[Path]:
    """The site folders under ``root``, generated with ``python -m phantoms`` when absent."""
    existing = site_folders(root)
    if not existing:
        command = [
            sys.executable, "-m", "phantoms", "--out", str(root), "--cases", str(cases),
            "--size", *map(str, size), "--seed", str(seed), "--sites", str(sites),
        ]
        subprocess.run(command, check=True)
        existing = site_folders(root)
    if len(existing) != sites:
        raise ValueError(
            f"{root}: holds {len(existing)} site datasets, {sites} were asked for: "
            "choose another folder or delete it"
        )
    return existing


def simulate(
    config: TrainConfig, num_sites: int, cpus_per_site: float | None = None,
    gpus_per_site: float = 0.0, verbose: bool = False,
) -> None:
    """Train ``config`` on ``num_sites`` simulated sites reading ``config.sim_data_root``."""
    import ray
    from flwr.simulation import run_simulation

    from train.client_app import build_client_app
    from train.server_app import build_server_app

    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": cpus_per_site or cpus, "num_gpus": gpus_per_site},
        "init_args": {"num_cpus": cpus, "num_gpus": 1 if gpus_per_site else 0},
    }
    try:
        run_simulation(
            server_app=build_server_app(config.to_run_config()),
            client_app=build_client_app(config.sim_data_root),
            num_supernodes=num_sites,
            backend_config=backend,
            verbose_logging=verbose,
        )
    finally:
        ray.shutdown()
