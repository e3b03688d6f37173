"""Choose a run's component cleaning on its own validation cases; write it to its own file.

As nnU-Net's ``determine_postprocessing``: each fold predicts the validation cases it never
trained on, without cleaning; every candidate cleaning is scored on all of them together;
the choice goes to ``results/<run>/postprocessing.json``. Applying it (the tables) and
shipping it (into a manifest) are separate steps that read that file.

The rule guards topology: a candidate is eligible only if its mean clRe is within
:data:`CLRE_TOLERANCE` of no cleaning at all, so that a true branch (a vessel the field of view
cut off, a second tree) is never traded for a few false voxels; of the eligible ones, the
highest mean Dice wins, the gentlest on ties. The randomised federation's truths hold several
components (cut trees, second trees, rings), and the file records how many.
"""

from __future__ import annotations

import json
from pathlib import Path

import cc3d
import SimpleITK as sitk

from inference.cases import PROBABILITIES
from model.weights import load_manifest
from postprocess import CleaningSettings
from study.paths import StudyPaths
from study.runs import RUNS, folder_of
from study.scoring import cleaned, predict, score
from train.data import list_cases
from train.folds import split_cases

CLRE_TOLERANCE = 0.001
CANDIDATES = tuple(
    CleaningSettings(min_volume_mm3=volume, min_fraction_of_largest=fraction)
    for volume in (0.0, 0.25, 1.0, 4.0)
    for fraction in (0.0, 0.01, 0.1, 0.3, 1.0)
) + tuple(
    CleaningSettings(min_volume_mm3=0.0, min_fraction_of_largest=0.0, min_peak_probability=peak)
    for peak in (0.7, 0.9, 0.95, 0.99)
)
"""By size, gentlest first, (0, 0) being no cleaning and fraction 1.0 the largest component
only; then by confidence: a component stays when its peak probability reaches the value."""
FILE = "postprocessing.json"


def choice_file(paths: StudyPaths, run: str) -> Path:
    return paths.results / folder_of(run) / FILE


def validation_predictions(paths: StudyPaths, run: str) -> tuple[Path, Path]:
    """Folders of every fold's uncleaned masks of its own validation cases (with their
    probability maps), and their truths (links), for the folds that ``run``'s weights folder
    holds."""
    folder = folder_of(run)
    weights, out = paths.weights(folder), paths.results / folder
    data = paths.data / RUNS[run].data
    merged_masks, merged_truth = out / "cv-masks", out / "cv-truth"
    for directory in (merged_masks, merged_truth):
        directory.mkdir(parents=True, exist_ok=True)
    for entry in load_manifest(weights).folds:
        images = out / f"validation-fold{entry.fold}"
        for site in sorted(p for p in data.iterdir() if (p / "imagesTr").is_dir()):
            cases = list_cases(site)
            for name in split_cases(sorted(cases), entry.fold)[1]:
                image, truth = cases[name]
                _link(images / image.name, image)
                _link(merged_truth / truth.name, truth)
        masks = predict(weights, [entry.fold], images, out / f"validation-fold{entry.fold}-masks")
        for mask in masks.glob("*.nii.gz"):
            _link(merged_masks / mask.name, mask)
            _link(merged_masks / PROBABILITIES / mask.name, masks / PROBABILITIES / mask.name)
    return merged_masks, merged_truth


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def choose(scores: dict[CleaningSettings, dict]) -> CleaningSettings:
    """The rule of the module docstring on ``{candidate: {"Dice": mean, "clRe": mean}}``;
    the candidates in order, the first being no cleaning."""
    baseline = scores[CANDIDATES[0]]["clRe"]
    eligible = [c for c in scores if scores[c]["clRe"] >= baseline - CLRE_TOLERANCE]
    return max(eligible, key=lambda c: (scores[c]["Dice"], -list(scores).index(c)))


def true_components(truth: Path) -> dict[str, int]:
    """26-connected components of each truth mask in ``truth``."""
    counts = {}
    for file in sorted(truth.glob("*.nii.gz")):
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(file))) == 1
        counts[file.name[: -len(".nii.gz")]] = int(
            cc3d.connected_components(array, connectivity=26, return_N=True)[1]
        )
    return counts


def determine(paths: StudyPaths, run: str) -> CleaningSettings:
    """Score every candidate on ``run``'s validation predictions, write the choice file."""
    masks, truth = validation_predictions(paths, run)
    scores = {}
    for candidate in CANDIDATES:
        result = score(cleaned(masks, candidate), truth)["mean"]
        scores[candidate] = {"Dice": result["Dice"], "clRe": result["clRe"]}
    chosen = choose(scores)
    components = true_components(truth)
    record = {
        "postprocess": chosen.to_dict(),
        "rule": f"highest mean Dice among candidates whose mean clRe is within "
        f"{CLRE_TOLERANCE} of no cleaning (gentlest on ties)",
        "validation_cases": len(components),
        "cases_with_several_true_components": sum(n > 1 for n in components.values()),
        "true_components": components,
        "candidates": [
            {**c.to_dict(), **{k: round(v, 4) for k, v in s.items()}} for c, s in scores.items()
        ],
    }
    file = choice_file(paths, run)
    file.write_text(json.dumps(record, indent=1) + "\n")
    return chosen


def load(paths: StudyPaths, run: str) -> CleaningSettings:
    """The cleaning chosen for ``run``; a clear error naming the command when not chosen yet."""
    file = choice_file(paths, run)
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: no cleaning chosen yet; run python -m study postprocess {run}"
        )
    return CleaningSettings.from_dict(json.loads(file.read_text())["postprocess"])


def record(paths: StudyPaths, run: str) -> dict:
    return json.loads(choice_file(paths, run).read_text())
