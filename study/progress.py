"""``python -m study progress``: where each run stands, read from its checkpoint state.

A study spans days and sessions; this is the table its compute plan is checked against.
Each run's ``state.json`` (committed for finished folds) gives its rounds, its best
validation round and its training time; its lock tells whether a process trains it now.
"""

from __future__ import annotations

import statistics

from study.paths import StudyPaths
from study.runs import PILOTS, RUNS, checkpoint_folder, exported_folds, folder_of
from train.checkpoint import PAUSED, RunState, is_training, read_state

RECENT_ROUNDS = 10
"""Rounds whose median duration is shown: the pace now, not the first rounds' warm-up."""
COLUMNS = (
    "run",
    "status",
    "rounds",
    "best round",
    "validation Dice",
    "clDice",
    "clRe",
    "LR drops",
    "training h",
    f"s/round (median of last {RECENT_ROUNDS})",
)


def status(paths: StudyPaths, name: str, state: RunState | None) -> str:
    """training (a process holds its lock), done (its fold exported), paused, interrupted
    (a state but no process and no pause: ``python -m study train`` resumes it), not started."""
    if is_training(checkpoint_folder(paths, name)):  # also a done fold trained further
        return "training"
    if RUNS[name].fold in exported_folds(paths.weights(folder_of(name))):
        return "done"
    if state is None:
        return "not started"
    return "paused" if state.stop_reason == PAUSED else "interrupted"


def row(paths: StudyPaths, name: str, state: RunState | None) -> list[str]:
    cells = [name, status(paths, name, state)]
    if state is None or not state.history:
        return cells + ["0"] + ["-"] * (len(COLUMNS) - 3)
    best = state.best_metrics
    recent = [record["seconds"] for record in state.history[-RECENT_ROUNDS:]]
    return cells + [
        str(state.round),
        str(state.best_round),
        f"{state.best_dice:.3f}",
        f"{best['cldice']:.3f}" if "cldice" in best else "-",
        f"{best['clre']:.3f}" if "clre" in best else "-",
        str(state.lr_drops_done),
        f"{state.training_seconds / 3600:.1f}",
        f"{statistics.median(recent):.0f}",
    ]


def progress(paths: StudyPaths, pilots: bool = False) -> str:
    """A Markdown table of the study's runs (``pilots``: theirs too) and the hours so far."""
    names = [n for n in RUNS if pilots or n not in PILOTS]
    states = {name: read_state(checkpoint_folder(paths, name)) for name in names}
    rows = [row(paths, name, state) for name, state in states.items()]
    hours = sum(s.training_seconds for s in states.values() if s is not None) / 3600
    done = sum(r[1] == "done" for r in rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append(f"\n{done} of {len(rows)} runs done; {hours:.1f} h of training so far.")
    return "\n".join(lines)
