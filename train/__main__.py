"""``python -m train``: federated training of one fold, simulated on this machine.

Generates a phantom federation (``python -m phantoms``, non-IID sites) under the working
folder unless ``--data`` names existing site datasets, trains the fold with Flower's
simulation engine, and exports the best model into ``--out``. A run interrupted for any
reason resumes from its last round when the same command is repeated (``--fresh`` starts
over). The defaults are a small CPU configuration that finishes in minutes; every setting of
``[tool.flwr.app.config]`` can be changed with ``--run-config 'key=value ...'``.

    python -m train --sites 3 --fold 0
    python -m train --data /data/federation --fold 2 --out weights \\
        --run-config 'patch-size=64 base-channels=16 num-rounds=200'
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tomllib
from pathlib import Path

from train.config import TrainConfig
from train.simulation import (
    ensure_phantom_federation,
    prepare_environment,
    simulate,
    site_folders,
)

# Small enough for a 2-core CPU: a few minutes for the whole run.
SMOKE = {
    "num-rounds": 8, "patience": 4, "patch-size": 32, "base-channels": 8, "local-epochs": 1,
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
        prog="python -m train", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--work", type=Path, default=Path("work"),
                        help="working folder: data, checkpoints, Flower home (default: work)")
    parser.add_argument("--data", type=Path,
                        help="folder of site datasets (nnU-Net raw layout); default: phantoms")
    parser.add_argument("--sites", type=int, default=3, help="phantom sites (default 3)")
    parser.add_argument("--cases", type=int, default=6, help="phantom cases per site (default 6)")
    parser.add_argument("--size", type=int, nargs=3, default=(64, 64, 64), metavar=("Z", "Y", "X"),
                        help="phantom volume size (default 64 64 64)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="weights folder (default: WORK/weights)")
    parser.add_argument("--run-config", default="", help="'key=value ...' training settings")
    parser.add_argument("--cpus-per-site", type=float,
                        help="Ray CPUs per simulated site (default: all, sites one at a time)")
    parser.add_argument("--gpus-per-site", type=float, default=0.0)
    parser.add_argument("--fresh", action="store_true", help="discard this fold's checkpoints")
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
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
        **TrainConfig().to_run_config(), **SMOKE,
        "fold": args.fold, "seed": args.seed, "wait-for-sites": len(sites),
        "run-dir": str(args.work / "train"), "out-dir": str(args.out or args.work / "weights"),
        "sim-data-root": str(root.resolve()),
        **parse_run_config(args.run_config),
    }
    config = TrainConfig.from_run_config(settings)
    run = Path(config.run_dir) / f"fold{config.fold}"
    if args.fresh and run.exists():
        shutil.rmtree(run)
    simulate(config, len(sites), args.cpus_per_site, args.gpus_per_site, args.verbose)
    state = json.loads((run / "state.json").read_text())
    print(json.dumps({
        "fold": config.fold, "sites": state["sites"], "rounds": state["round"],
        "best_round": state["best_round"], "validation": state["best_metrics"],
        "training_seconds": round(state["training_seconds"], 1), "weights": config.out_dir,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
