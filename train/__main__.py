"""``python -m train``: federated training of one fold, on this machine.

Generates a phantom federation (``python -m phantoms``, non-IID sites) under the working
folder unless ``--data`` names existing site datasets, trains the fold, and exports the best
model into ``--out``. ``--engine simulation`` (the default) runs the sites on Flower's
simulation engine (Ray); ``--engine deployment`` runs Flower's deployment engine instead, a
SuperLink and one SuperNode process per site on localhost (TLS with ``--tls``), which needs no
Ray and gives each site its own GPU with ``--site-gpus 0,1,2`` (or one shared GPU with
``--site-gpus 0``). Both are submitted with ``flwr run`` (see :mod:`train.deploy.localhost`).
Each site's cases are preprocessed once into an on-disk cache shared by every run
(``--cache``, default ``$VESSEL_SEG_TRAIN_CACHE``, else ``~/.cache/vessel-seg/train``; see
:mod:`train.data`). A run interrupted for any reason resumes from its last round when the
same command is repeated (``--fresh`` starts over). The defaults are a small CPU
configuration that finishes in minutes; every setting of ``[tool.flwr.app.config]`` can be
changed with ``--run-config 'key=value ...'``. The summary is printed as JSON on stdout,
Flower's log on stderr.

    python -m train --sites 3 --fold 0
    python -m train --data /data/federation --fold 2 --out weights \\
        --run-config 'patch-size=64 base-channels=16 num-rounds=200'
    python -m train --engine deployment --data /data/federation --site-gpus 0,1,2 \\
        --run-config 'patch-size=160 base-channels=16 learning-rate=0.0001'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import tomllib
from pathlib import Path

from train.checkpoint import PAUSED, PAUSED_EXIT
from train.config import TrainConfig
from train.data import CACHE_ENV
from train.sampling import LOADER_WORKERS_ENV
from train.simulation import (
    ensure_phantom_federation,
    prepare_environment,
    simulate,
    site_folders,
)

# Small enough for a 2-core CPU: a few minutes for the whole run.
SMOKE = {
    "num-rounds": 8,
    "patience": 4,
    "patch-size": 32,
    "base-channels": 8,
    "local-epochs": 1,
}


def parse_run_config(text: str) -> dict:
    """``'a=1 b=true c="x"'`` -> ``{"a": 1, "b": True, "c": "x"}`` (TOML values or bare words)."""
    values = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--run-config item {item!r} is not key=value")
        try:
            values[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = value
    return values


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("work"),
        help="working folder: data, checkpoints, Flower home (default: work)",
    )
    parser.add_argument(
        "--data", type=Path, help="folder of site datasets (nnU-Net raw layout); default: phantoms"
    )
    parser.add_argument("--sites", type=int, default=3, help="phantom sites (default 3)")
    parser.add_argument("--cases", type=int, default=6, help="phantom cases per site (default 6)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=3,
        default=(64, 64, 64),
        metavar=("Z", "Y", "X"),
        help="phantom volume size (default 64 64 64)",
    )
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="weights folder (default: WORK/weights)")
    parser.add_argument("--run-config", default="", help="'key=value ...' training settings")
    parser.add_argument(
        "--engine",
        choices=("simulation", "deployment"),
        default="simulation",
        help="Flower's simulation engine (Ray), or its deployment engine: a "
        "SuperLink and one SuperNode per site on localhost (default: simulation)",
    )
    parser.add_argument(
        "--cpus-per-site",
        type=float,
        help="simulation: Ray CPUs per site (default: all, sites one at a time)",
    )
    parser.add_argument(
        "--gpus-per-site",
        type=float,
        default=0.0,
        help="simulation: Ray GPUs per site (0.5: two sites share a GPU)",
    )
    parser.add_argument(
        "--site-gpus",
        type=lambda text: text.split(","),
        metavar="IDS",
        help="deployment: CUDA_VISIBLE_DEVICES of the sites, one entry per "
        "site, reused in turn: '0,1,2' one GPU each, '0' one shared GPU",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="deployment: TLS between the SuperNodes and the SuperLink",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help=f"preprocessed cases (default: ${CACHE_ENV}, else ~/.cache/vessel-seg/train)",
    )
    parser.add_argument(
        "--loader-workers",
        type=int,
        help=f"patch worker processes per site (default: ${LOADER_WORKERS_ENV}, "
        "else half the CPUs, at most 4; 0: in the training loop)",
    )
    parser.add_argument("--fresh", action="store_true", help="discard this fold's checkpoints")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (``kill``, ``timeout``) raises KeyboardInterrupt, as Ctrl-C does, so that the
    Flower processes of the run are stopped on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(args: argparse.Namespace, config: TrainConfig, sites: list[Path]) -> None:
    """The fold on the chosen engine; a failed run exits with its reason and the logs."""
    from train.deploy.localhost import FlowerRunError, run_deployment

    try:
        if args.engine == "deployment":  # the sites' folders reach them as node config
            run_deployment(
                config.replace(sim_data_root="").to_run_config(), sites, args.tls, args.site_gpus
            )
        else:
            simulate(config, len(sites), args.cpus_per_site, args.gpus_per_site, args.verbose)
    except FlowerRunError as error:
        raise SystemExit(f"python -m train: {error}") from None


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    if args.cache is not None:
        os.environ[CACHE_ENV] = str(args.cache.resolve())
    if args.loader_workers is not None:
        os.environ[LOADER_WORKERS_ENV] = str(args.loader_workers)
    prepare_environment(args.work)
    if args.data is None:
        z, y, x = args.size
        name = f"phantoms-randomised-{args.sites}sites-{args.cases}cases-{z}x{y}x{x}-s{args.seed}"
        root = args.work / name
        sites = ensure_phantom_federation(root, args.sites, args.cases, tuple(args.size), args.seed)
    else:
        root, sites = args.data, site_folders(args.data)
        if not sites:
            raise SystemExit(f"{root}: no site datasets (folders with imagesTr/) found")
    settings = {
        **TrainConfig().to_run_config(),
        **SMOKE,
        "fold": args.fold,
        "seed": args.seed,
        "wait-for-sites": len(sites),
        "run-dir": str(args.work / "train"),
        "out-dir": str(args.out or args.work / "weights"),
        "sim-data-root": str(root.resolve()),
        **parse_run_config(args.run_config),
    }
    config = TrainConfig.from_run_config(settings)
    run = Path(config.run_dir) / f"fold{config.fold}"
    if args.fresh and run.exists():
        shutil.rmtree(run)
    try:
        with terminate_as_interrupt():
            train(args, config, sites)
    except KeyboardInterrupt as interruption:
        print(
            f"python -m train: interrupted ({interruption or 'Ctrl-C'}); the same command "
            "resumes after the last completed round",
            file=sys.stderr,
        )
        return 130
    state = json.loads((run / "state.json").read_text())
    if state["stop_reason"] == PAUSED:
        print(
            f"python -m train: paused after round {state['round']}; the same command resumes",
            file=sys.stderr,
        )
        return PAUSED_EXIT
    print(
        json.dumps(
            {
                "engine": args.engine,
                "fold": config.fold,
                "sites": state["sites"],
                "rounds": state["round"],
                "best_round": state["best_round"],
                "validation": state["best_metrics"],
                "training_seconds": round(state["training_seconds"], 1),
                "weights": config.out_dir,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
