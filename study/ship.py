"""Ship a run's folds: copy them and their chosen cleaning into a weights folder.

An explicit step of its own (``python -m study ship fold0 --to weights``): nothing else in
the study writes a manifest it did not train. The folds are the run folder's fp16 files,
checked against their manifest's hashes by loading them; the manifest gains the cleaning
from ``postprocessing.json`` and how it was chosen. The folder is replaced file by file
(each write atomic), its README kept; afterwards the container's expected output is stale
and ``test/run_local_test.sh --regenerate`` remakes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from model.weights import MANIFEST, load_ensemble, load_manifest, write_manifest
from study import postprocessing
from study.paths import StudyPaths
from study.runs import folder_of

MAX_SHIPPED_BYTES = 80 * 10**6
"""All folds together: the container image stays small and the model tarball uploads fast."""


def ship(paths: StudyPaths, run: str, destination: Path) -> str:
    """Copy ``run``'s folds and chosen cleaning into ``destination``; a summary line."""
    source = paths.weights(folder_of(run))
    manifest = load_manifest(source)
    load_ensemble(source)  # every fold loads and matches its hash, or this raises
    total = sum(entry.bytes for entry in manifest.folds)
    if total > MAX_SHIPPED_BYTES:
        raise ValueError(f"{source}: the folds take {total:,} bytes, over {MAX_SHIPPED_BYTES:,}")
    postprocessing.load(paths, run)  # a clear error if no cleaning was chosen yet
    choice = postprocessing.record(paths, run)
    manifest.postprocess = choice["postprocess"]
    manifest.provenance = {
        **manifest.provenance,
        "postprocess": {
            k: choice[k]
            for k in (
                "rule",
                "validation_cases",
                "cases_with_several_true_components",
                "candidates",
            )
        },
    }
    destination.mkdir(parents=True, exist_ok=True)
    for stale in destination.glob("fold_*.safetensors"):
        if stale.name not in {entry.file for entry in manifest.folds}:
            stale.unlink()
    for entry in manifest.folds:
        temporary = destination / f".{entry.file}.tmp"
        shutil.copyfile(source / entry.file, temporary)
        temporary.replace(destination / entry.file)
    write_manifest(destination, manifest)
    load_ensemble(destination)
    folds = ", ".join(str(entry.fold) for entry in manifest.folds)
    return (
        f"shipped folds {folds} of {source} ({total / 1e6:.1f} MB) to "
        f"{destination / MANIFEST}, cleaning {choice['postprocess']}"
    )
