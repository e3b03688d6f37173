"""The study's trainings, one ``python -m train`` each (Flower simulation; resumable).

Every run except the pilot trains the same way (:data:`COMMON`) until early stopping ends it
(no validation gain for ``patience`` rounds), with one cap for all (:data:`MAX_ROUNDS`), so
that the tables compare models at convergence rather than at a round count chosen per row.
The five folds are independent: each has its own seed and its own validation split, none
starts from another fold's model; they export into one weights folder (``runs/folds``).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from model.weights import MANIFEST, load_manifest
from study.data import PARTIAL_SITE, python
from study.paths import StudyPaths
from train.checkpoint import PAUSED_EXIT, STATE, compact, read_state

MAX_ROUNDS = 150
"""A safety net, not a stopping rule: early stopping should end every run before it. At 60
fold 1 would have stopped still gaining at 1e-3 (round 51, validation Dice 0.823); at 100 it
stopped still gaining at 1e-4 (0.004 over rounds 89-96). A run that reached a smaller cap goes
on from its checkpoint (:func:`trains_further`)."""
COMMON = {
    "patch-size": 64,
    "base-channels": 16,
    "learning-rate": 1e-3,
    "local-epochs": 1,
    "val-overlap": 0.25,
    "patience": 10,
    "lr-drops": 1,
}
"""``patience``: the pilot's validation Dice swings by up to 0.2 between rounds (9 cases);
with 5 it would have stopped at round 13 (best 0.597, round 8) and missed 0.669 at round 18.
The paper waits 20 epochs; 10 rounds of one epoch halves that to fit the CPU.

``lr-drops``: at the first plateau a run goes on from its best model at a tenth of the
learning rate (ReduceLROnPlateau), and stops at the second. Fold 0 (version 2) had gained
nothing in 10 rounds at 1e-3 after round 18 (validation Dice 0.662); from round 18's model at
1e-4 it reached 0.675 within 3 rounds (README, Learning rate)."""
DP_ROW = (("dp-clipping-norm", 10.0), ("dp-noise-multiplier", 0.5))
"""Table 4's private row: noise of std 0.5 x 10 / 3 sites on the averaged update."""
PILOT_ROUNDS = 20
PILOT = (("base-channels", 8), ("patience", PILOT_ROUNDS))
PAPER_LEARNING_RATE = 1e-4
LR_PILOT_ROUNDS = 10
"""The randomised pilot again at the paper's learning rate for its first half: the measurement
behind the study's 1e-3 (README, Pilot)."""
FOLDS = "folds"
"""The run folder the five folds share (their weights merge into one manifest)."""


@dataclass(frozen=True)
class Run:
    """One training: the data view it reads, its fold, its round cap and setting changes."""

    data: str
    fold: int = 0
    rounds: int = MAX_ROUNDS
    settings: tuple[tuple[str, object], ...] = ()
    folder: str = ""
    """Run folder under ``runs/``; empty: the run's own name."""


RUNS: dict[str, Run] = {
    **{
        f"fold{f}": Run("federation", f, settings=(("seed", 100 + f),), folder=FOLDS)
        for f in range(5)
    },
    "msfe-only": Run("federation", settings=(("hsca", False),)),
    "hsca-only": Run("federation", settings=(("msfe", False),)),
    "pooled": Run("pooled"),
    **{f"site{k}-alone": Run(f"site{k}-alone") for k in (1, 2, 3)},
    **{
        f"partial-{view}": Run(f"federation-{view}")
        for view in ("major", "major-naive", "sparse", f"without-{PARTIAL_SITE}")
    },
    "fedavg-dp": Run("federation", settings=DP_ROW),
    "pilot-reference": Run("federation-reference", rounds=PILOT_ROUNDS, settings=PILOT),
    "pilot-randomised": Run("federation", rounds=PILOT_ROUNDS, settings=PILOT),
    "pilot-randomised-levels": Run(
        "federation", rounds=PILOT_ROUNDS, settings=(*PILOT, ("augment-levels", True))
    ),
    "pilot-randomised-lr1e-4": Run(
        "federation",
        rounds=LR_PILOT_ROUNDS,
        settings=(*PILOT, ("learning-rate", PAPER_LEARNING_RATE)),
    ),
}


PILOTS = tuple(name for name in RUNS if name.startswith("pilot"))
"""The pilots (data family, learning rate): trained by ``python -m study pilot``, not ``all``."""


def folder_of(name: str) -> str:
    """The folder under ``runs/`` that run ``name`` trains and exports into."""
    return RUNS[name].folder or name


def run_config(run: Run) -> str:
    """The ``--run-config`` string: common settings, the round cap, the run's changes."""
    settings = {**COMMON, "num-rounds": run.rounds, **dict(run.settings)}
    return " ".join(
        f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()
    )


def train(paths: StudyPaths, name: str, engine: tuple[str, ...] = ()) -> None:
    """Train run ``name``, resuming from its last checkpoint if it was interrupted; a run
    whose fold its weights folder already holds is done (a fresh clone keeps only that).
    ``engine``: ``python -m train``'s engine options (default: the simulation engine)."""
    run, weights = RUNS[name], paths.weights(folder_of(name))
    if run.fold in exported_folds(weights) and not trains_further(paths, name):
        print(f"python -m study: {name} is trained (fold {run.fold} in {weights})")
        return
    try:
        _train(paths.data / run.data, run, weights.parent, engine)
    except subprocess.CalledProcessError as error:
        if error.returncode != PAUSED_EXIT:
            raise
        message = f"python -m study: {name} paused; `python -m study train {name}` resumes"
        raise SystemExit(message) from None


def exported_folds(weights: Path) -> set[int]:
    """The folds a weights folder holds (none when it has no manifest yet)."""
    if not (weights / MANIFEST).is_file():
        return set()
    return {entry.fold for entry in load_manifest(weights).folds}


def checkpoint_folder(paths: StudyPaths, name: str) -> Path:
    return paths.runs / folder_of(name) / "train" / f"fold{RUNS[name].fold}"


def unfinished(paths: StudyPaths) -> list[str]:
    """The runs that have a checkpoint but no exported fold (started, not done), and those
    whose checkpoint trains further (:func:`trains_further`)."""
    return [
        name
        for name, run in RUNS.items()
        if (checkpoint_folder(paths, name) / STATE).is_file()
        and (
            run.fold not in exported_folds(paths.weights(folder_of(name)))
            or trains_further(paths, name)
        )
    ]


def trains_further(paths: StudyPaths, name: str) -> bool:
    """Whether run ``name`` stopped short of what the study now asks and its checkpoint is
    here to go on from: at a plateau with fewer learning-rate drops than ``lr-drops`` (it
    finished before the setting existed), or at a round cap smaller than the run's now. It
    then resumes and its export replaces the fold."""
    folder = checkpoint_folder(paths, name)
    state = read_state(folder)
    if state is None:
        return False
    if not all((folder / f).is_file() for f in (state.global_file, state.best_file) if f):
        return False
    run = RUNS[name]
    if state.rounds_without_improvement < state.config["patience"]:
        return state.round >= state.config["num-rounds"] and state.round < run.rounds
    drops = dict(run.settings).get("lr-drops", COMMON["lr-drops"])
    return state.lr_drops_done < drops


def park(paths: StudyPaths, name: str) -> list[Path]:
    """Pause run ``name`` after its current round (at once if it is not training) and write
    its checkpoint in fp16: the files to commit so that another session resumes it."""
    return compact(checkpoint_folder(paths, name))


def _train(data: Path, run: Run, work: Path, engine: tuple[str, ...] = ()) -> None:
    python(
        "-m",
        "train",
        *engine,
        "--data",
        str(data),
        "--fold",
        str(run.fold),
        "--work",
        str(work),
        "--out",
        str(work / "weights"),
        "--run-config",
        run_config(run),
    )
