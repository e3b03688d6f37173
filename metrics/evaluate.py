"""Score predicted masks against ground truth and print the seed paper's Table 1 per case.

    python -m metrics.evaluate --pred DIR --gt DIR [--csv FILE] [--json FILE] [--workers N]

Contract:

- Both folders are flat; files ending in .nii.gz, .nii, .mha or .nrrd are masks, anything
  else is ignored. A file's case name is its name without the extension and without an
  nnU-Net channel suffix ``_0000``, so ``CASE_0000.nii.gz`` pairs with ``CASE.mha``.
- Foreground is the value 1 (SimpleITK reads the files; other labels count as background).
- A pair whose sizes differ, or whose spacings differ by more than 1e-4 relative, is refused
  with one line on stderr naming both files; an unreadable or non-3D file likewise. The other
  cases are still scored.
- A ground-truth case without a prediction is scored as an empty prediction (its Dice is 0,
  its distances the image diagonal) and flagged ``missing``, as challenges do.
- Predictions without ground truth are listed on stderr and ignored.
- The table's summary rows are the mean and the sample standard deviation (n - 1) over the
  scored cases, missing ones included; with one case the deviation is 0.
- Exit status: 0 when every ground-truth case was scored from its prediction, 1 when any
  pair was refused or missing, 2 for a usage error (no such folder, no ground truth, two
  files of one case in one folder).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.naming import SUPPORTED_SUFFIXES, case_name
from metrics.case import DISTANCE_METRICS, METRIC_NAMES, score_case

SPACING_RTOL = 1e-4


class UsageError(Exception):
    """The folders cannot be evaluated at all."""


class PairError(Exception):
    """One case cannot be scored; the message is one line naming the files."""


@dataclass
class CaseScore:
    case: str
    gt: str
    pred: str | None
    status: str  # "ok", "missing" (scored as an empty prediction) or "refused"
    metrics: dict[str, float] | None = None
    message: str = ""


@dataclass
class Summary:
    n: int
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)


def list_cases(folder: Path) -> dict[str, Path]:
    """Mask files of a flat folder by case name; two files of one case are a usage error."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        name = case_name(path.name)
        if name is None or not path.is_file():
            continue
        if name in cases:
            raise UsageError(f"{cases[name]} and {path}: two files for case '{name}'")
        cases[name] = path
    return cases


def read_mask(path: Path) -> tuple[np.ndarray, tuple[int, ...], tuple[float, ...]]:
    """(bool mask ``== 1`` in (z, y, x), SimpleITK size (x, y, z), spacing (x, y, z))."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        # SimpleITK's message ends with the reason after a line naming its source file.
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or ["unreadable"]
        reason = lines[-1].removeprefix("sitk::ERROR:").strip()
        raise PairError(f"{path}: cannot read: {reason}") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise PairError(f"{path}: not a single-channel 3D image")
    mask = sitk.GetArrayViewFromImage(image) == 1
    return mask, image.GetSize(), image.GetSpacing()


def check_geometry(pred: Path, pred_geometry: tuple, gt: Path, gt_geometry: tuple) -> None:
    """Refuse a pair whose size differs or whose spacing differs by more than 1e-4 relative."""
    (pred_size, pred_spacing), (gt_size, gt_spacing) = pred_geometry, gt_geometry
    if tuple(pred_size) != tuple(gt_size):
        size, reference = "x".join(map(str, pred_size)), "x".join(map(str, gt_size))
        raise PairError(f"{pred}: size {size} differs from size {reference} of {gt}")
    if not np.allclose(pred_spacing, gt_spacing, rtol=SPACING_RTOL, atol=0.0):
        raise PairError(
            f"{pred}: spacing {_mm(pred_spacing)} differs from spacing {_mm(gt_spacing)} of {gt}"
        )


def _mm(spacing: Sequence[float]) -> str:
    return "x".join(f"{s:.6g}" for s in spacing) + " mm"


def evaluate_case(case: str, gt_path: Path, pred_path: Path | None) -> CaseScore:
    """Read, check and score one case; never raises for a bad pair."""
    pred_name = None if pred_path is None else str(pred_path)
    result = CaseScore(case=case, gt=str(gt_path), pred=pred_name, status="ok")
    try:
        gt, gt_size, gt_spacing = read_mask(gt_path)
        if pred_path is None:
            pred = np.zeros_like(gt)
            result.status = "missing"
            result.message = f"{gt_path}: no prediction for case '{case}', scored as empty"
        else:
            pred, pred_size, pred_spacing = read_mask(pred_path)
            check_geometry(pred_path, (pred_size, pred_spacing), gt_path, (gt_size, gt_spacing))
        result.metrics = score_case(pred, gt, tuple(reversed(gt_spacing)))
    except PairError as err:
        result.status, result.message, result.metrics = "refused", str(err), None
    return result


def _evaluate_args(args: tuple[str, Path, Path | None]) -> CaseScore:
    return evaluate_case(*args)


def evaluate_folders(
    pred_dir: Path, gt_dir: Path, workers: int = 1
) -> tuple[list[CaseScore], list[Path]]:
    """Score every ground-truth case; returns the results and the unmatched predictions."""
    gt_cases, pred_cases = list_cases(gt_dir), list_cases(pred_dir)
    if not gt_cases:
        raise UsageError(f"{gt_dir}: no mask files ({', '.join(SUPPORTED_SUFFIXES)})")
    jobs = [(case, path, pred_cases.get(case)) for case, path in sorted(gt_cases.items())]
    extra = [path for case, path in sorted(pred_cases.items()) if case not in gt_cases]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            results = list(pool.map(_evaluate_args, jobs))
    else:
        results = [evaluate_case(*job) for job in jobs]
    return results, extra


def summarize(results: Iterable[CaseScore]) -> Summary:
    """Mean and sample standard deviation of each metric over the scored cases."""
    scored = [r.metrics for r in results if r.metrics is not None]
    summary = Summary(n=len(scored))
    for name in METRIC_NAMES if scored else ():
        values = np.array([m[name] for m in scored])
        summary.mean[name] = float(values.mean())
        summary.std[name] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return summary


def _cell(name: str, value: float, count_decimals: int = 0) -> str:
    """Ratios with 4 decimals, mm with 3, the Betti-0 error as a count."""
    if name == "Betti0err":
        return f"{value:.{count_decimals}f}"
    return f"{value:.3f}" if name in DISTANCE_METRICS else f"{value:.4f}"


def format_table(results: Sequence[CaseScore], summary: Summary) -> str:
    """Per-case rows with Table 1's columns and more, then mean and std rows."""
    width = max([len("case"), len("mean")] + [len(r.case) for r in results])
    header = f"{'case':<{width}}  " + "  ".join(f"{n:>9}" for n in METRIC_NAMES) + "  note"
    lines = [header, "-" * len(header)]
    for r in results:
        if r.metrics is None:
            cells = ["-".rjust(9)] * len(METRIC_NAMES)
        else:
            cells = [f"{_cell(n, r.metrics[n]):>9}" for n in METRIC_NAMES]
        note = "" if r.status == "ok" else r.status
        lines.append(f"{r.case:<{width}}  " + "  ".join(cells) + f"  {note}".rstrip())
    lines.append("-" * len(header))
    if summary.n:
        for label, row in (("mean", summary.mean), ("std", summary.std)):
            cells = [f"{_cell(n, row[n], count_decimals=1):>9}" for n in METRIC_NAMES]
            lines.append(f"{label:<{width}}  " + "  ".join(cells))
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "missing", "refused")}
    lines.append(
        f"{summary.n} cases scored ({counts['missing']} missing, scored as empty); "
        f"{counts['refused']} refused. Distances in mm."
    )
    return "\n".join(lines)


def write_csv(path: Path, results: Sequence[CaseScore]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "status", *METRIC_NAMES, "pred", "gt", "message"])
        for r in results:
            values = (
                [repr(r.metrics[n]) for n in METRIC_NAMES]
                if r.metrics
                else [""] * len(METRIC_NAMES)
            )
            writer.writerow([r.case, r.status, *values, r.pred or "", r.gt, r.message])


def write_json(
    path: Path, results: Sequence[CaseScore], summary: Summary, extra: Sequence[Path]
) -> None:
    document = {
        "metrics": list(METRIC_NAMES),
        "distance_unit": "mm",
        "cases": [asdict(r) for r in results],
        "summary": asdict(summary),
        "missing": [r.case for r in results if r.status == "missing"],
        "refused": [r.case for r in results if r.status == "refused"],
        "unmatched_predictions": [str(p) for p in extra],
    }
    path.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m metrics.evaluate",
        description="Score predicted vessel masks against ground truth (Dice, clDice, ...).",
    )
    parser.add_argument("--pred", type=Path, required=True, help="folder of predicted masks")
    parser.add_argument("--gt", type=Path, required=True, help="folder of ground-truth masks")
    parser.add_argument("--csv", type=Path, help="write per-case rows to this CSV file")
    parser.add_argument("--json", type=Path, help="write per-case results and summary as JSON")
    parser.add_argument("--workers", type=int, default=1, help="cases scored in parallel (1)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results, extra = evaluate_folders(args.pred, args.gt, args.workers)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in extra:
        print(f"warning: {path}: no ground truth for this prediction, ignored", file=sys.stderr)
    for r in results:
        if r.status != "ok":
            print(
                f"{'error' if r.status == 'refused' else 'missing'}: {r.message}", file=sys.stderr
            )
    summary = summarize(results)
    print(format_table(results, summary))
    if args.csv:
        write_csv(args.csv, results)
    if args.json:
        write_json(args.json, results, summary, extra)
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
