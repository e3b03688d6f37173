"""``python -m train.study``: the experiments behind the README's Results, one command each.

    python -m train.study data              # phantom federation, held-out test set, data views
    python -m train.study train fold0       # a run of RUNS (fold0..fold4, msfe-only, ...)
    python -m train.study evaluate          # Tables 1-3 and the training curves
    python -m train.study all               # all of it, in that order (hours on a CPU)
    python -m train.study pilot             # the data pilot: two narrow folds, then scores

Data (``work/study/data``): a federation of three non-IID sites (site profiles a, b, c; 13
cases each at 128^3, seed 700) of domain-randomised phantoms (``phantoms.randomised``), the
same sites and seeds drawn by the reference generator (``federation-reference``, for the
pilot), a held-out test set of the reference family (seed 9000, three cases from each of
sites a, b, c and three from site d, whose acquisition settings no training run sees), and
the independent family (``independent``: other code, another model of anatomy and imaging,
seed 4242, never trained or tuned on).

The pilot trains one narrow fold (width 8, 64^3 patches) on each federation with the same
settings and the same number of rounds (equal compute), and scores both on the held-out test
set and on the independent family (``work/study/results/pilot.md``), with the MIPs of each
model's mask on the independent case that the randomised-data model segments worst.

``pooled/`` puts every site's cases into one dataset (centralised training) and
``siteK-alone/`` holds site K only; both link to the federation's files.

Every run is ``python -m train`` (Flower simulation) with :data:`COMMON` settings. The
shipped fold 0 trains for :data:`SHIPPED_ROUNDS` rounds, and so do Table 1's two variants
(:data:`ABLATION_ROUNDS`), whose full-network row is that fold 0. Table 2's runs train fold 0
for :data:`COMPARISON_ROUNDS` rounds, and their federated row is fold 0's own checkpoint after
that many rounds (a resumed run continues bit for bit, so this is the same model a separate
run would give). Evaluation runs ``process.py`` (the container's entry point) on the test set
and scores with ``metrics``; each folder of masks is made again only when its weights change.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from metrics.evaluate import evaluate_folders, summarize
from model.weights import load_manifest, write_manifest
from phantoms.preview import mip_panel
from postprocess import CleaningSettings, clean_mask
from train.data import list_cases
from train.folds import split_cases

ROOT = Path("work/study")
DATA = ROOT / "data"
RUNS_DIR = ROOT / "runs"
SHIPPED = RUNS_DIR / "shipped"
RESULTS = ROOT / "results"
FEDERATION = {"cases": 13, "size": 128, "seed": 700, "sites": 3}
TEST_SET = {"cases": 3, "size": 128, "seed": 9000, "sites": 4}
INDEPENDENT_SET = {"cases": 8, "size": 128, "seed": 4242}
PILOT_ROUNDS = 10
PILOT = (("base-channels", 8), ("patch-size", 64), ("local-epochs", 1), ("patience", PILOT_ROUNDS))
COMMON = {
    "patch-size": 48,
    "base-channels": 16,
    "learning-rate": 1e-3,
    "local-epochs": 2,
    "val-overlap": 0.25,
    "patience": 5,
}
SHIPPED_ROUNDS = 9  # fold 0, from a seeded model
WARM_ROUNDS = 1  # folds 1-4, each starting from fold 0's exported model
COMPARISON_ROUNDS = 2  # Table 2's runs
ABLATION_ROUNDS = SHIPPED_ROUNDS  # Table 1: each variant as long as the shipped fold 0
CANDIDATE_FRACTIONS = (0.01, 0.1, 0.3, 1.0)  # 1.0 keeps the largest component only
TABLE_METRICS = ("Dice", "Re", "Pr", "clDice", "clRe", "clPr", "Jaccard", "VS", "bAHD")


@dataclass(frozen=True)
class Run:
    """One training: the data view it reads, its fold, rounds and setting changes."""

    data: str
    fold: int = 0
    rounds: int = COMPARISON_ROUNDS
    settings: tuple[tuple[str, object], ...] = ()

    init_from_fold0: bool = False


RUNS: dict[str, Run] = {
    "fold0": Run("federation", 0, SHIPPED_ROUNDS),
    **{f"fold{f}": Run("federation", f, WARM_ROUNDS, init_from_fold0=True) for f in (1, 2, 3, 4)},
    "msfe-only": Run("federation", rounds=ABLATION_ROUNDS, settings=(("hsca", False),)),
    "hsca-only": Run("federation", rounds=ABLATION_ROUNDS, settings=(("msfe", False),)),
    "pooled": Run("pooled"),
    "pilot-reference": Run("federation-reference", rounds=PILOT_ROUNDS, settings=PILOT),
    "pilot-randomised": Run("federation", rounds=PILOT_ROUNDS, settings=PILOT),
    **{f"site{k}-alone": Run(f"site{k}-alone") for k in (1, 2, 3)},
}


def python(*args: str) -> None:
    """Run ``python ARGS`` in this environment; a failure stops the study."""
    subprocess.run([sys.executable, *args], check=True)


# -- data ---------------------------------------------------------------------------------


def phantoms(out: Path, spec: dict, *options: str) -> None:
    """``python -m phantoms`` for ``spec`` (cases per site, cube size, seed, sites)."""
    sites = ("--sites", str(spec["sites"])) if "sites" in spec else ()
    python(
        "-m",
        "phantoms",
        "--out",
        str(out),
        "--cases",
        str(spec["cases"]),
        "--size",
        *[str(spec["size"])] * 3,
        "--seed",
        str(spec["seed"]),
        *sites,
        *options,
    )


def make_data() -> None:
    """Write the federations, the two test sets and the pooled and single-site views."""
    federation = DATA / "federation"
    if not federation.exists():
        phantoms(federation, FEDERATION, "--family", "randomised")
    if not (DATA / "federation-reference").exists():
        phantoms(DATA / "federation-reference", FEDERATION, "--family", "reference")
    test = DATA / "test"
    if not test.exists():
        staging = DATA / "test-sites"
        phantoms(staging, TEST_SET, "--layout", "challenge", "--family", "reference")
        for part in ("input", "ground_truth"):  # one flat folder of all sites' cases
            (test / part).mkdir(parents=True)
            for file in sorted(staging.glob(f"site*/{part}/*")):
                file.rename(test / part / file.name)
        shutil.rmtree(staging)
    if not (DATA / "independent").exists():
        phantoms(
            DATA / "independent",
            INDEPENDENT_SET,
            "--layout",
            "challenge",
            "--family",
            "independent",
        )
    sites = sorted(p for p in federation.iterdir() if (p / "imagesTr").is_dir())
    for site in sites:
        alone = DATA / f"{site.name}-alone"
        alone.mkdir(exist_ok=True)
        if not (alone / site.name).exists():
            (alone / site.name).symlink_to(os.path.relpath(site, alone))
    pooled = DATA / "pooled" / "pooled"
    if not pooled.exists():
        for part in ("imagesTr", "labelsTr"):
            (pooled / part).mkdir(parents=True)
            for site in sites:
                for file in sorted((site / part).iterdir()):
                    (pooled / part / file.name).symlink_to(os.path.relpath(file, pooled / part))


# -- training -----------------------------------------------------------------------------


def run_config(run: Run, rounds: int) -> str:
    settings = {**COMMON, "num-rounds": rounds, **dict(run.settings)}
    if run.init_from_fold0:
        settings["init-weights"] = str(SHIPPED / "weights" / "fold_0.safetensors")
    return " ".join(
        f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()
    )


def train_command(name: str, run: Run, rounds: int, work: Path, out: Path) -> list[str]:
    return [
        "-m",
        "train",
        "--data",
        str(DATA / run.data),
        "--fold",
        str(run.fold),
        "--work",
        str(work),
        "--out",
        str(out),
        "--run-config",
        run_config(run, rounds),
    ]


def train(name: str) -> None:
    """Train one run (resuming where it stopped). Fold 0 first stops after the comparison
    rounds, leaves a copy as the ``federated`` comparison run, then goes on."""
    run = RUNS[name]
    if name.startswith("fold"):
        work, out = SHIPPED, SHIPPED / "weights"
    else:
        work, out = RUNS_DIR / name, RUNS_DIR / name / "weights"
    if name == "fold0":
        python(*train_command(name, run, COMPARISON_ROUNDS, work, out))
        snapshot = RUNS_DIR / "federated" / "train" / "fold0"
        if not snapshot.exists():
            shutil.copytree(work / "train" / "fold0", snapshot)
        python(
            *train_command(
                "federated",
                run,
                COMPARISON_ROUNDS,
                snapshot.parent.parent,
                snapshot.parent.parent / "weights",
            )
        )
    python(*train_command(name, run, run.rounds, work, out))


# -- evaluation ---------------------------------------------------------------------------


def predict(
    weights: Path, folds: list[int], out: Path, images: Path = DATA / "test" / "input"
) -> Path:
    """Masks of ``images`` without component cleaning (``process.py --no-postprocess``), kept
    in ``out`` and made again only when the folds' weight files changed."""
    manifest = load_manifest(weights)
    made_by = json.dumps({str(f): manifest.fold_entry(f).sha256 for f in folds}, indent=1)
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
        )
        stamp.write_text(made_by)
    return out


def cleaned(raw: Path, settings: CleaningSettings) -> Path:
    """The same masks after connected-component cleaning with ``settings``."""
    out = raw.with_name(f"{raw.name}-cc{settings.min_fraction_of_largest:g}")
    out.mkdir(exist_ok=True)
    for file in sorted(raw.glob("*.nii.gz")):
        image = sitk.ReadImage(str(file))
        mask = clean_mask(sitk.GetArrayViewFromImage(image), image.GetSpacing(), settings)
        result = sitk.GetImageFromArray(mask)
        result.CopyInformation(image)
        sitk.WriteImage(result, str(out / file.name), useCompression=True)
    return out


def tune_postprocess(weights: Path) -> float:
    """Choose the cleaning's ``min_fraction_of_largest`` by fold 0's mean Dice on its own
    validation cases (never the test set) and write it into ``weights``' manifest."""
    cases = RESULTS / "fold0-validation"
    for site in sorted(p for p in (DATA / "federation").iterdir() if (p / "imagesTr").is_dir()):
        site_cases = list_cases(site)
        for name in split_cases(sorted(site_cases), 0)[1]:
            for part, file in zip(("input", "ground_truth"), site_cases[name]):
                link = cases / part / file.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(file.resolve())
    raw = predict(weights, [0], RESULTS / "fold0-validation-masks", cases / "input")
    dice_by_fraction = {}
    for fraction in CANDIDATE_FRACTIONS:
        settings = CleaningSettings(min_fraction_of_largest=fraction)
        result = score(cleaned(raw, settings), truth=cases / "ground_truth")
        dice_by_fraction[fraction] = result["mean"]["Dice"]
    best = max(dice_by_fraction, key=dice_by_fraction.get)
    manifest = load_manifest(weights)
    manifest.postprocess = CleaningSettings(min_fraction_of_largest=best).to_dict()
    manifest.provenance["postprocess"] = {
        "chosen_by": "fold 0's mean Dice on its validation cases",
        "dice_by_min_fraction_of_largest": {
            f"{k:g}": round(v, 4) for k, v in dice_by_fraction.items()
        },
    }
    write_manifest(weights, manifest)
    return best


@functools.cache
def case_results(pred: Path, truth: Path) -> tuple:
    """Every case of ``pred`` scored once, however many subsets are summarised from it."""
    return tuple(evaluate_folders(pred, truth, workers=2)[0])


def score(pred: Path, cases: str = "", truth: Path = DATA / "test" / "ground_truth") -> dict:
    """Mean and standard deviation of each metric over the cases whose name starts with
    ``cases``."""
    summary = summarize(r for r in case_results(pred, truth) if r.case.startswith(cases))
    return {"n": summary.n, "mean": summary.mean, "std": summary.std}


def table(rows: dict[str, dict | None]) -> str:
    names = [m + (" (mm)" if m == "bAHD" else "") for m in TABLE_METRICS]
    header = "| | " + " | ".join(names) + " |\n|---" + "|---" * len(names) + "|\n"
    lines = []
    for label, result in rows.items():
        if result is None:  # not trained (yet)
            lines.append(f"| {label} | " + " | ".join("n/a" for _ in names) + " |")
            continue
        cells = [f"{result['mean'][m]:.3f} ± {result['std'][m]:.3f}" for m in TABLE_METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return header + "\n".join(lines) + "\n"


def evaluate() -> None:
    """Score every run on the held-out test set; write ``results.md``, ``results.json`` and
    the training curves."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    single = {
        name: RUNS_DIR / name / "weights"
        for name in (
            "federated",
            "msfe-only",
            "hsca-only",
            "pooled",
            "site1-alone",
            "site2-alone",
            "site3-alone",
        )
    }
    shipped = SHIPPED / "weights"
    tune_postprocess(shipped)
    settings = CleaningSettings.from_dict(load_manifest(shipped).postprocess)
    rows = {
        name: score(cleaned(predict(weights, [0], RESULTS / name), settings))
        for name, weights in single.items()
        if (weights / "manifest.json").is_file()
    }
    ensemble = predict(shipped, [0, 1, 2, 3, 4], RESULTS / "ensemble")
    fold0 = predict(shipped, [0], RESULTS / "shipped-fold0")
    ensemble_cc = cleaned(ensemble, settings)
    shipped_rows = {
        "five-fold ensemble, with CC": score(ensemble_cc),
        "five-fold ensemble, without CC": score(ensemble),
        "fold 0 alone, with CC": score(cleaned(fold0, settings)),
        "fold 0 alone, without CC": score(fold0),
    }
    per_site = {
        f"test site {k}{' (unseen acquisition)' if k == 4 else ''}": score(ensemble_cc, f"site{k}_")
        for k in (1, 2, 3, 4)
    }
    tables = {
        f"Table 1: the network's modules (fold 0, federated, up to {ABLATION_ROUNDS} rounds)": {
            "MSFE only": rows.get("msfe-only"),
            "HSCA only": rows.get("hsca-only"),
            "HSCA + MSFE (shipped fold 0)": shipped_rows["fold 0 alone, with CC"],
        },
        f"Table 2: what federation buys (full network, fold 0, {COMPARISON_ROUNDS} rounds)": {
            "federated (3 sites)": rows.get("federated"),
            "centralised (pooled data)": rows.get("pooled"),
            **{f"site {k} alone": rows.get(f"site{k}-alone") for k in (1, 2, 3)},
        },
        "Table 3: the shipped folds": shipped_rows,
        "Shipped ensemble by test site": per_site,
    }
    text = "".join(f"### {title}\n\n{table(body)}\n" for title, body in tables.items())
    (RESULTS / "results.md").write_text(text)
    (RESULTS / "results.json").write_text(json.dumps(tables, indent=1) + "\n")
    plot_curves(RESULTS / "training-curves.png")
    print(text)


def evaluate_pilot() -> str:
    """Table of the pilot's two folds on both test sets (with the default cleaning), and the
    MIPs of the independent case that the randomised-data fold segments worst."""
    sets = {
        "held-out (reference family)": DATA / "test",
        "independent family": DATA / "independent",
    }
    rows, masks = {}, {}
    for name in ("pilot-reference", "pilot-randomised"):
        weights = RUNS_DIR / name / "weights"
        if not (weights / "manifest.json").is_file():
            continue
        for label, folder in sets.items():
            raw = predict(weights, [0], RESULTS / f"{name}-{folder.name}", folder / "input")
            mask = masks[name, folder.name] = cleaned(raw, CleaningSettings())
            rows[f"{name}, {label}"] = score(mask, truth=folder / "ground_truth")
    text = f"### Pilot: one narrow fold, {PILOT_ROUNDS} rounds, each data family\n\n{table(rows)}"
    if ("pilot-randomised", "independent") in masks:
        results = case_results(
            masks["pilot-randomised", "independent"], DATA / "independent" / "ground_truth"
        )
        worst = min(results, key=lambda r: r.metrics["Dice"]).case
        image = DATA / "independent" / "input" / f"{worst}_0000.nii.gz"
        truth = DATA / "independent" / "ground_truth" / f"{worst}.nii.gz"
        panels = [(f"{worst}: truth", truth)] + [
            (f"{name}", masks[name, "independent"] / f"{worst}.nii.gz")
            for name in ("pilot-reference", "pilot-randomised")
            if (name, "independent") in masks
        ]
        mip_panel(image, panels, RESULTS / "pilot-worst-independent.png")
        text += f"\nWorst independent case of the randomised-data fold: {worst}\n"
    (RESULTS / "pilot.md").write_text(text)
    return text


def plot_curves(path: Path) -> None:
    """Train loss and validation Dice per round of the shipped folds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    start = 0  # a warm-started fold's rounds continue those of fold 0's exported model
    for fold in range(5):
        state = SHIPPED / "train" / f"fold{fold}" / "state.json"
        if not state.exists():
            continue
        saved = json.loads(state.read_text())
        history = saved["history"]
        offset = start if saved["config"].get("init-weights") else 0
        start = start or saved["best_round"]
        rounds = np.array([record["round"] for record in history]) + offset
        loss_axis.plot(rounds, [r["train"]["loss"] for r in history], "o-", label=f"fold {fold}")
        dice_axis.plot(
            rounds, [r["validation"]["dice"] for r in history], "o-", label=f"fold {fold}"
        )
    loss_axis.set(xlabel="round", ylabel="train loss (BCE + 0.6 WBCE + 0.4 Dice)")
    dice_axis.set(
        xlabel="round (folds 1-4 continue from fold 0's model)",
        ylabel="validation Dice (cases-weighted over sites)",
    )
    for axis in (loss_axis, dice_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("data")
    commands.add_parser("train").add_argument("run", choices=sorted(RUNS))
    commands.add_parser("evaluate")
    commands.add_parser("all")
    commands.add_parser("pilot")
    args = parser.parse_args(argv)
    if args.command in ("data", "all"):
        make_data()
    if args.command == "train":
        train(args.run)
    if args.command == "all":
        for name in RUNS:
            train(name)
    if args.command in ("evaluate", "all"):
        evaluate()
    if args.command == "pilot":
        make_data()
        for name in ("pilot-reference", "pilot-randomised"):
            train(name)
        print(evaluate_pilot())
    return 0


if __name__ == "__main__":
    sys.exit(main())
