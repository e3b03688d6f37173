"""Masks of a weights folder on an evaluation set, their cleaning, and their scores.

Masks come from ``process.py`` (the container's entry point) without cleaning, with their
probability maps (``probabilities/``, which the confidence criterion of the cleaning reads),
and are made again only when the folds' weight files change; cleaning is applied afterwards,
so that one prediction serves every cleaning setting compared.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import SimpleITK as sitk

from inference.cases import PROBABILITIES
from metrics.evaluate import evaluate_folders, summarize
from model.weights import load_manifest
from postprocess import CleaningSettings, clean_mask
from study.data import python

TABLE_METRICS = ("Dice", "Re", "Pr", "clDice", "clRe", "clPr", "Jaccard", "VS", "bAHD")
INDEPENDENT_METRICS = ("Dice", "clDice", "clRe", "VS")
"""The independent family's columns beside the held-out set's full row."""


def predict(weights: Path, folds: list[int], images: Path, out: Path) -> Path:
    """Uncleaned masks of ``images`` by ``folds`` of ``weights`` (``process.py
    --no-postprocess --save-probabilities``), kept in ``out`` with a stamp of the weight files'
    hashes and of the probability maps being there."""
    manifest = load_manifest(weights)
    made_by = json.dumps(
        {"folds": {str(f): manifest.fold_entry(f).sha256 for f in folds}, PROBABILITIES: True},
        indent=1,
    )
    stamp = out / "weights.json"
    if not (stamp.is_file() and stamp.read_text() == made_by):
        shutil.rmtree(out, ignore_errors=True)
        python(
            "process.py",
            "--input",
            str(images),
            "--output",
            str(out),
            "--weights",
            str(weights),
            "--folds",
            *map(str, folds),
            "--no-postprocess",
            "--save-probabilities",
        )
        stamp.write_text(made_by)
    return out


def cleaned(raw: Path, settings: CleaningSettings) -> Path:
    """The masks of ``raw`` after connected-component cleaning with ``settings`` (a sibling
    folder named after the settings; rewritten each time)."""
    out = cleaned_folder(raw, settings)
    out.mkdir(exist_ok=True)
    for file in sorted(raw.glob("*.nii.gz")):
        image = sitk.ReadImage(str(file))
        probability = None
        if settings.min_peak_probability > 0:
            probability = sitk.GetArrayFromImage(sitk.ReadImage(raw / PROBABILITIES / file.name))
        spacing = image.GetSpacing()
        mask = clean_mask(sitk.GetArrayViewFromImage(image), spacing, settings, probability)
        result = sitk.GetImageFromArray(mask)
        result.CopyInformation(image)
        sitk.WriteImage(result, str(out / file.name), useCompression=True)
    case_results.cache_clear()
    return out


def cleaned_folder(raw: Path, settings: CleaningSettings) -> Path:
    """Where :func:`cleaned` writes the masks of ``raw`` cleaned with ``settings``."""
    tag = f"v{settings.min_volume_mm3:g}-f{settings.min_fraction_of_largest:g}"
    if settings.min_peak_probability > 0:
        tag += f"-p{settings.min_peak_probability:g}"
    return raw.with_name(f"{raw.name}-cc-{tag}")


@functools.cache
def case_results(pred: Path, truth: Path) -> tuple:
    """Every case of ``pred`` scored once, however many subsets are summarised from it."""
    return tuple(evaluate_folders(pred, truth, workers=2)[0])


def score(pred: Path, truth: Path, cases: str = "") -> dict:
    """Mean and standard deviation of each metric over the cases whose name starts with
    ``cases``."""
    summary = summarize(r for r in case_results(pred, truth) if r.case.startswith(cases))
    return {"n": summary.n, "mean": summary.mean, "std": summary.std}


def table(rows: dict[str, dict | None], metrics=TABLE_METRICS, extra: dict | None = None) -> str:
    """A Markdown table: one row per run (``n/a`` where not trained yet), ``metrics`` as
    mean ± std, and ``extra`` columns (label -> rows) of other sets' means."""
    extra = extra or {}
    names = [m + (" (mm)" if m == "bAHD" else "") for m in metrics]
    names += [f"{label} {m}" for label in extra for m in INDEPENDENT_METRICS]
    lines = ["| | " + " | ".join(names) + " |", "|---" + "|---" * len(names) + "|"]
    for label, result in rows.items():
        if result is None:
            lines.append(f"| {label} | " + " | ".join("n/a" for _ in names) + " |")
            continue
        cells = [f"{result['mean'][m]:.3f} ± {result['std'][m]:.3f}" for m in metrics]
        for other in extra.values():
            found = other.get(label)
            cells += [f"{found['mean'][m]:.3f}" if found else "n/a" for m in INDEPENDENT_METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
