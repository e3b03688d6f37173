"""``python -m study COMMAND``: the experiments behind the README's Results, one step each.

    python -m study data                    # phantom federations and the two test sets
    python -m study train fold0             # one run of study.runs.RUNS (resumes)
    python -m study park [fold0 ...]        # pause after the round, fp16 checkpoints to commit
    python -m study progress [--pilots]     # each run's rounds, best validation, hours
    python -m study levels                  # where each normalisation puts the vessels
    python -m study postprocess fold0       # choose the folds' cleaning -> postprocessing.json
    python -m study evaluate                # Tables 1-3 -> results/results.md, curves
    python -m study pilot                   # the pilots: data family and learning rate
    python -m study all                     # data, every run, postprocess, evaluate (days)
    python -m study ship fold0 --to weights # copy the folds and their cleaning to a folder
    python -m study --engine deployment --site-gpus 0 train fold1   # no Ray; the sites on GPU 0
    python -m study restore DIR [DIR ...]   # runs trained elsewhere (bench/gpu_study.sh)

Everything lives under ``--root`` (default ``$VESSEL_SEG_STUDY_DIR``, else the repository's
``work/study``), whatever the current directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from study import levels, postprocessing, progress, restore, ship, tables
from study.data import EVALUATION_SETS, make_data
from study.paths import StudyPaths
from study.runs import PILOTS, RUNS, park, train, unfinished


def run_name(name: str) -> str:
    """A run of :data:`study.runs.RUNS` (argparse's ``choices`` refuses an empty ``*`` list)."""
    if name not in RUNS:
        raise argparse.ArgumentTypeError(f"{name!r} is not a run: {', '.join(sorted(RUNS))}")
    return name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", type=Path, help="the study folder (data, runs, results)")
    parser.add_argument(
        "--engine",
        choices=("simulation", "deployment"),
        help="python -m train's Flower engine (default: simulation, Ray); deployment: a "
        "SuperLink and a SuperNode per site as processes",
    )
    parser.add_argument("--site-gpus", metavar="IDS", help="deployment: the sites' GPUs ('0')")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("data")
    commands.add_parser("train").add_argument("run", choices=sorted(RUNS))
    parking = commands.add_parser("park", help="default: every unfinished run with a checkpoint")
    parking.add_argument("runs", nargs="*", type=run_name, metavar="RUN")
    commands.add_parser("progress").add_argument(
        "--pilots", action="store_true", help="the pilots' runs too"
    )
    commands.add_parser("levels")
    commands.add_parser("postprocess").add_argument("run", choices=sorted(RUNS))
    commands.add_parser("evaluate")
    commands.add_parser("pilot")
    commands.add_parser("all")
    commands.add_parser("restore").add_argument(
        "returned",
        type=Path,
        nargs="+",
        help="the returns of bench/gpu_study.sh's calls (study.tar.gz and files), in order",
    )
    shipping = commands.add_parser("ship")
    shipping.add_argument("run", choices=sorted(RUNS))
    shipping.add_argument("--to", type=Path, required=True, help="weights folder to write")
    return parser.parse_args(argv)


def engine_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The options that choose ``python -m train``'s engine, as given."""
    engine = ("--engine", args.engine) if args.engine else ()
    return engine + (("--site-gpus", args.site_gpus) if args.site_gpus else ())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    paths, engine = StudyPaths.at(args.root), engine_options(args)
    if args.command in ("data", "pilot", "all"):
        make_data(paths)
    if args.command == "train":
        train(paths, args.run, engine)
    if args.command == "pilot":
        for run in PILOTS:
            train(paths, run, engine)
        print(tables.evaluate_pilot(paths))
        print(tables.learning_rates(paths))
    if args.command == "all":
        for run in RUNS:
            if run not in PILOTS:
                train(paths, run, engine)
    if args.command == "park":
        for run in args.runs or unfinished(paths):
            print(" ".join(str(path) for path in park(paths, run)))
    if args.command == "progress":
        print(progress.progress(paths, args.pilots))
    if args.command == "levels":
        sites = sorted((paths.data / "federation").glob("site*"))
        sets = {f"training {site.name}": site for site in sites}
        sets |= {label: paths.data / folder for label, folder in EVALUATION_SETS.items()}
        print(levels.levels(sets))
    if args.command in ("postprocess", "all"):
        print(postprocessing.determine(paths, getattr(args, "run", "fold0")))
    if args.command in ("evaluate", "all"):
        print(tables.evaluate(paths))
    if args.command == "restore":
        print("\n".join(restore.restore(paths, args.returned)))
    if args.command == "ship":
        print(ship.ship(paths, args.run, args.to))
    return 0


if __name__ == "__main__":
    sys.exit(main())
