"""The README's tables, from trained runs and the cleaning chosen for the five folds.

Every row is scored on the held-out set (full metrics) and on the independent family
(:data:`study.scoring.INDEPENDENT_METRICS`), each with the cleaning that
:mod:`study.postprocessing` chose on the five folds' validation cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model.weights import load_manifest
from phantoms.preview import mip_panel
from postprocess import CleaningSettings
from study import postprocessing
from study.data import EVALUATION_SETS, PARTIAL_SITE
from study.paths import StudyPaths
from study.runs import COMMON, FOLDS, LR_PILOT_ROUNDS, PILOT_ROUNDS, PILOTS, RUNS, folder_of
from study.scoring import case_results, cleaned, cleaned_folder, predict, score, table
from train.checkpoint import read_state

SINGLE_RUNS = ("msfe-only", "hsca-only", "pooled", "site1-alone", "site2-alone", "site3-alone")
PARTIAL_RUNS = {
    f"{PARTIAL_SITE} major (vessels >= 1 mm), the rest ignore": "partial-major",
    f"{PARTIAL_SITE} major, the rest written as background (naive)": "partial-major-naive",
    f"{PARTIAL_SITE} left out": f"partial-without-{PARTIAL_SITE}",
    f"{PARTIAL_SITE} sparse slabs (1 in 4), the rest ignore": "partial-sparse",
    "all fully labelled, FedAvg with DP (clipping 10, noise multiplier 0.5)": "fedavg-dp",
}
TABLE4_METRICS = ("Dice", "clDice", "clRe", "smallRe")


def scores_of(
    paths: StudyPaths,
    run_folder: str,
    folds: list[int],
    label: str,
    settings: CleaningSettings | None,
) -> dict:
    """``{set label: score}`` of ``folds`` of a run folder on every evaluation set, cleaned
    with ``settings`` (None: uncleaned)."""
    weights = paths.weights(run_folder)
    result = {}
    for set_label, folder in EVALUATION_SETS.items():
        data = paths.data / folder
        out = paths.results / run_folder / f"{label}-{folder}"
        masks = predict(weights, folds, data / "input", out)
        if settings is not None:
            masks = cleaned(masks, settings)
        result[set_label] = score(masks, data / "ground_truth")
    return result


def evaluate(paths: StudyPaths) -> str:
    """Tables 1-3 and the shipped folds by test site -> ``results/results.{md,json}``, and the
    training curves."""
    settings = postprocessing.load(paths, "fold0")
    rows: dict[str, dict | None] = {}
    for run in SINGLE_RUNS:
        trained = (paths.weights(run) / "manifest.json").is_file()
        rows[run] = scores_of(paths, run, [0], "fold0", settings) if trained else None
    folds = [entry.fold for entry in load_manifest(paths.weights(FOLDS)).folds]
    shipped = {
        "five-fold ensemble, with CC": scores_of(paths, FOLDS, folds, "ensemble", settings),
        "five-fold ensemble, without CC": scores_of(paths, FOLDS, folds, "ensemble", None),
        **{
            f"fold {f} alone, with CC": scores_of(paths, FOLDS, [f], f"fold{f}", settings)
            for f in folds
        },
    }
    tables = {
        "Table 1: the network's modules (fold 0, federated)": {
            "MSFE only": rows["msfe-only"],
            "HSCA only": rows["hsca-only"],
            "HSCA + MSFE (fold 0)": shipped.get("fold 0 alone, with CC"),
        },
        "Table 2: what federation buys (full network, fold 0)": {
            "federated (3 sites)": shipped.get("fold 0 alone, with CC"),
            "centralised (pooled data)": rows["pooled"],
            **{f"site {k} alone": rows[f"site{k}-alone"] for k in (1, 2, 3)},
        },
        "Table 3: the five folds": shipped,
    }
    text = "".join(f"### {title}\n\n{_every_set(body)}\n" for title, body in tables.items())
    text += "### Five-fold ensemble by held-out test site\n\n" + _by_site(paths, settings)
    for set_label, folder in EVALUATION_SETS.items():
        ensemble = cleaned_folder(paths.results / FOLDS / f"ensemble-{folder}", settings)
        picture = paths.results / f"ensemble-worst-{folder}.png"
        worst = draw_worst_case(paths.data / folder, {"five-fold ensemble": ensemble}, picture)
        text += f"\nWorst {set_label} case of the ensemble: {worst} ({picture.name})\n"
    text += "\n" + partial_labels_table(paths, settings)
    paths.results.mkdir(parents=True, exist_ok=True)
    (paths.results / "results.md").write_text(text)
    (paths.results / "results.json").write_text(json.dumps(tables, indent=1) + "\n")
    plot_curves(paths, paths.results / "training-curves.png")
    return text


def partial_labels_table(paths: StudyPaths, settings: CleaningSettings) -> str:
    """Table 4: fold 0 of federations where one site labels partially, on the held-out set,
    beside fold 0 of the fully labelled federation."""
    truth = paths.data / "test" / "ground_truth"
    images = paths.data / "test" / "input"

    def held_out(run_folder: str, label: str) -> dict | None:
        if not (paths.weights(run_folder) / "manifest.json").is_file():
            return None
        masks = predict(paths.weights(run_folder), [0], images, paths.results / run_folder / label)
        return score(cleaned(masks, settings), truth)

    rows = {"all sites fully labelled (fold 0)": held_out(FOLDS, "fold0-test")}
    rows |= {title: held_out(run, "fold0-test") for title, run in PARTIAL_RUNS.items()}
    title = "### Table 4: partially labelled sites (fold 0, held-out set)\n\n"
    return title + table(rows, metrics=TABLE4_METRICS)


def _every_set(rows: dict[str, dict | None]) -> str:
    """The held-out set in full, the other sets' means as extra columns."""
    held_out, *others = EVALUATION_SETS
    extra = {other: {k: v and v[other] for k, v in rows.items()} for other in others}
    return table({k: v and v[held_out] for k, v in rows.items()}, extra=extra)


def _by_site(paths: StudyPaths, settings: CleaningSettings) -> str:
    masks = cleaned_folder(paths.results / FOLDS / "ensemble-test", settings)
    truth = paths.data / "test" / "ground_truth"
    rows = {
        f"test site {k}{' (unseen acquisition)' if k == 4 else ''}": score(
            masks, truth, f"site{k}_"
        )
        for k in (1, 2, 3, 4)
    }
    return table(rows)


def evaluate_pilot(paths: StudyPaths) -> str:
    """Table of the pilots' folds on both sets (with the default cleaning), and the MIPs
    of the independent case that the randomised-data fold segments worst."""
    rows, masks = {}, {}
    for run in (name for name in PILOTS if RUNS[name].rounds == PILOT_ROUNDS):
        weights = paths.weights(folder_of(run))
        if not (weights / "manifest.json").is_file():
            continue
        for set_label, folder in EVALUATION_SETS.items():
            data = paths.data / folder
            raw = predict(weights, [0], data / "input", paths.results / f"{run}-{folder}")
            masks[run, folder] = cleaned(raw, CleaningSettings())
            rows[f"{run}, {set_label}"] = score(masks[run, folder], data / "ground_truth")
    text = f"### Pilot: one narrow fold, {PILOT_ROUNDS} rounds, each data family\n\n{table(rows)}"
    if ("pilot-randomised", "independent") in masks:
        pilots = {run: folder for (run, family), folder in masks.items() if family == "independent"}
        picture = paths.results / "pilot-worst-independent.png"
        worst = draw_worst_case(paths.data / "independent", pilots, picture, "pilot-randomised")
        text += f"\nWorst independent case of the randomised-data fold: {worst}\n"
    paths.results.mkdir(parents=True, exist_ok=True)
    (paths.results / "pilot.md").write_text(text)
    return text


def learning_rates(paths: StudyPaths) -> str:
    """Validation Dice per round of the randomised pilot at 1e-3 and at the paper's 1e-4, over
    the rounds both ran -> ``results/learning-rate.md``."""
    curves = {}
    for run in ("pilot-randomised", "pilot-randomised-lr1e-4"):
        history = training_history(paths, folder_of(run), RUNS[run].fold)
        if history is not None:
            curves[run] = [record["validation"]["dice"] for record in history[:LR_PILOT_ROUNDS]]
    rounds = min((len(curve) for curve in curves.values()), default=0)
    header = " | ".join(f"r{r}" for r in range(1, rounds + 1))
    lines = [
        f"### Learning rate: validation Dice per round, width-8 pilot, first {rounds} rounds",
        "",
        f"| Adam | {header} | best | mean of last 3 |",
        "|---" * (rounds + 3) + "|",
    ]
    for run, curve in curves.items():
        curve = curve[:rounds]
        rate = dict(RUNS[run].settings).get("learning-rate", COMMON["learning-rate"])
        cells = " | ".join(f"{d:.3f}" for d in curve)
        best, last = (max(curve), np.mean(curve[-3:])) if curve else (np.nan, np.nan)
        lines.append(f"| {rate:g} | {cells} | {best:.3f} | {last:.3f} |")
    text = "\n".join(lines) + "\n"
    paths.results.mkdir(parents=True, exist_ok=True)
    (paths.results / "learning-rate.md").write_text(text)
    return text


def training_history(paths: StudyPaths, run_folder: str, fold: int) -> list[dict] | None:
    """The per-round records of one fold of a run folder (``state.json``), None if untrained."""
    state = read_state(paths.runs / run_folder / "train" / f"fold{fold}")
    return None if state is None else state.history


def draw_worst_case(
    data: Path, masks: dict[str, Path], picture: Path, ranked_by: str | None = None
) -> str:
    """MIPs of the case of the evaluation set ``data`` that ``masks[ranked_by]`` (default: the
    first) segments worst (Dice): its truth, then each folder's mask of it drawn against the
    truth (found, false and missed voxels) -> ``picture``; returns the case."""
    ranked = masks[ranked_by] if ranked_by else next(iter(masks.values()))
    results = case_results(ranked, data / "ground_truth")
    worst = min(results, key=lambda r: r.metrics["Dice"]).case
    truth = data / "ground_truth" / f"{worst}.nii.gz"
    panels = [(f"{worst}: truth", truth)]
    panels += [(name, folder / f"{worst}.nii.gz") for name, folder in masks.items()]
    mip_panel(data / "input" / f"{worst}_0000.nii.gz", panels, picture, truth)
    return worst


def plot_curves(paths: StudyPaths, path: Path) -> None:
    """Train loss and validation Dice per round of the five folds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for fold in range(5):
        history = training_history(paths, FOLDS, fold)
        if history is None:
            continue
        rounds = np.array([record["round"] for record in history])
        loss_axis.plot(rounds, [r["train"]["loss"] for r in history], "o-", label=f"fold {fold}")
        dice_axis.plot(
            rounds, [r["validation"]["dice"] for r in history], "o-", label=f"fold {fold}"
        )
    loss_axis.set(xlabel="round", ylabel="train loss (BCE + 0.6 WBCE + 0.4 Dice)")
    dice_axis.set(xlabel="round", ylabel="validation Dice (cases-weighted over sites)")
    for axis in (loss_axis, dice_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
