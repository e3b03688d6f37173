"""Bring runs trained elsewhere (``bench/gpu_study.sh`` on a GPU machine) into this study.

A return is a folder holding ``study.tar.gz`` (the runs' ``state.json`` files and weights
manifests) and files named by their path under ``runs/`` with ``--`` for ``/`` (exported folds,
parked checkpoints); a call may bring only some of them and the next calls the rest, so the
returns of one run are merged together, in call order. Nothing here
is lost to a return: an exported fold joins its weights folder only where that folder lacks
the fold (its entry and provenance merged into the manifest under the export's lock), and a
checkpoint replaces this study's only when it has trained more rounds, its files are all
there, and no process trains that fold here.
"""

from __future__ import annotations

import dataclasses
import shutil
import tarfile
import tempfile
from pathlib import Path

from model.weights import MANIFEST, load_fold, load_manifest, write_manifest
from study.paths import StudyPaths
from train.checkpoint import STATE, read_state, training_lock
from train.export import add_folds, folder_manifest


def restore(paths: StudyPaths, returns: list[Path]) -> list[str]:
    """Merge the returns (folders, in call order) into the study; one line per run considered."""
    with tempfile.TemporaryDirectory() as temporary:
        runs = Path(temporary) / "runs"
        for returned in returns:
            unpack(returned, runs)
        lines = [
            merge_folds(weights, paths.runs / weights.relative_to(runs))
            for weights in sorted(runs.glob("*/weights"))
            if (weights / MANIFEST).is_file()
        ]
        lines += [
            merge_checkpoint(fold, paths.runs / fold.relative_to(runs))
            for fold in sorted(runs.glob("*/train/fold*"))
            if (fold / STATE).is_file()
        ]
    return lines


def unpack(returned: Path, runs: Path) -> None:
    """Add the return in ``returned`` to the ``runs/`` tree ``runs``."""
    with tarfile.open(returned / "study.tar.gz") as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("runs/") and m.isfile()]
        archive.extractall(runs.parent, members=members, filter="data")
    for file in returned.glob("*--*"):
        target = runs / file.name.replace("--", "/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)


def merge_folds(source: Path, target: Path) -> str:
    """Add the folds ``source`` holds and ``target`` lacks; the folds ``target`` has stay."""
    new = load_manifest(source)
    plans = dataclasses.replace(new, folds=[], provenance={**new.provenance, "folds": {}})
    with folder_manifest(target, plans) as manifest:
        have = {entry.fold for entry in manifest.folds}
        added = [e for e in new.folds if e.fold not in have and (source / e.file).is_file()]
        missing = [e.fold for e in new.folds if e.fold not in have and e not in added]
        for entry in added:
            load_fold(source, new, entry.fold)  # its size and sha256 match, or this raises
            shutil.copyfile(source / entry.file, target / entry.file)
        if added:
            returned = new.provenance.get("folds", {})
            provenance = {
                str(e.fold): returned[str(e.fold)] for e in added if str(e.fold) in returned
            }
            add_folds(manifest, added, provenance)
            write_manifest(target, manifest)
    line = f"{target}: folds {[e.fold for e in added]} added, {sorted(have)} kept"
    return line + (f", {missing} not returned yet (--collect)" if missing else "")


def merge_checkpoint(source: Path, target: Path) -> str:
    """Replace ``target``'s checkpoint by ``source``'s when that one trained further; the
    fold's training lock is held meanwhile (it fails at once while a training runs there)."""
    state, local = read_state(source), read_state(target)
    mine = local.round if local else 0
    if state.round <= mine:
        return f"{target}: kept (round {mine}; the return has round {state.round})"
    files = [name for name in (state.global_file, state.best_file) if name]
    absent = [name for name in files if not (source / name).is_file()]
    if absent:
        return f"{target}: not yet ({', '.join(absent)} not returned yet: --collect)"
    target.mkdir(parents=True, exist_ok=True)
    with training_lock(target):
        for name in files:
            shutil.copyfile(source / name, target / name)
        shutil.copyfile(source / STATE, target / STATE)  # last: it names the files above
    return f"{target}: restored at round {state.round} (it had {mine})"
