"""Run the Flower app on one machine: one simulated SuperNode per site folder.

:func:`simulate` runs the same ServerApp and ClientApp as a real federation on Flower's
simulation engine, submitted with ``flwr run`` to a SuperLink in simulation mode that it starts
on a free port and stops afterwards (:mod:`train.deploy.localhost`): nothing is left running
when it returns. Each simulated site gets ``cpus_per_site`` CPUs from Ray; with all CPUs per
site the sites train one after the other, each on every core, which is fastest for PyTorch on a
small machine. Flower's own way, with its managed local SuperLink, is the same app:
``flwr run . local --federation-config "num-supernodes=3" --run-config 'sim-data-root="DIR"
wait-for-sites=3'``.
"""

from __future__ import annotations

import math
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
            sys.executable,
            "-m",
            "phantoms",
            "--out",
            str(root),
            "--cases",
            str(cases),
            "--size",
            *map(str, size),
            "--seed",
            str(seed),
            "--sites",
            str(sites),
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
    config: TrainConfig,
    num_sites: int,
    cpus_per_site: float | None = None,
    gpus_per_site: float = 0.0,
    verbose: bool = False,
) -> None:
    """Train ``config`` on ``num_sites`` simulated sites reading ``config.sim_data_root``."""
    from train.deploy.localhost import run_simulation

    cpus = os.cpu_count() or 1
    per_site = max(1, math.ceil(cpus_per_site)) if cpus_per_site else cpus
    run_simulation(config.to_run_config(), num_sites, per_site, gpus_per_site, verbose)
