"""Cerebral-artery segmentation container: every input volume -> a binary vessel mask.

Contract (the convention is detected from what the input folder holds):

  Grand Challenge   INPUT/images/<input-slug>/<name>{.mha,.nii.gz,.nii,.nrrd}
                 -> OUTPUT/images/cerebral-artery-segmentation/<name>  (same name and format)
  SHINY-ICARUS      INPUT/<CASE>_0000.nii.gz  (flat, read-only; nnU-Net channel suffix)
                 -> OUTPUT/<CASE>.nii.gz
  always            OUTPUT/results.json: per case input, output, status (ok/error), error,
                    seconds, device, backend, vessel volume in mm^3
  --save-probabilities   OUTPUT/probabilities/<output name>  (float32 vessel probability)

Masks are uint8 {0, 1} with the input's size, spacing, origin and direction, written to a
temporary file and renamed into place. A case that fails gets one line on stderr and in
results.json; the others are still segmented. Exit status: 0 every case ok, 1 a case failed,
2 nothing could run (no input volume, unusable weights or options).
Defaults: INPUT /input, OUTPUT /output, weights the weights/ folder beside this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUTPUT_SLUG = "cerebral-artery-segmentation"  # Grand Challenge output interface
INPUT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")  # .mhd is refused: its voxels are apart
CHANNEL_SUFFIX = "_0000"  # SHINY-ICARUS/nnU-Net single-channel inputs
RESULTS = "results.json"
PROBABILITIES = "probabilities"
WEIGHTS = Path(__file__).resolve().parent / "weights"


def is_image(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(INPUT_SUFFIXES)


def find_cases(input_dir: Path, output_dir: Path) -> tuple[str, list[tuple[Path, Path]]]:
    """The convention and the (input, output) pairs, sorted by input name."""
    if (input_dir / "images").is_dir():
        sources = sorted(p for p in (input_dir / "images").glob("*/*") if is_image(p))
        target = output_dir / "images" / OUTPUT_SLUG
        return "grand-challenge", [(source, target / source.name) for source in sources]
    pairs = []
    for source in sorted(p for p in input_dir.glob("*") if is_image(p)):
        name = source.name[: -len(".nii.gz")] if source.name.endswith(".nii.gz") else source.stem
        suffix = source.name[len(name) :]
        pairs.append((source, output_dir / (name.removesuffix(CHANNEL_SUFFIX) + suffix)))
    return "shiny-icarus", pairs


def write_results(output_dir: Path, report: dict) -> None:
    """results.json, replaced atomically after every case (a crash keeps the cases so far)."""
    path = output_dir / RESULTS
    temporary = output_dir / f".{RESULTS}.tmp"
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=Path("/input"))
    parser.add_argument("--output", type=Path, default=Path("/output"))
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--folds", type=int, nargs="+", help="folds to ensemble (default all)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--backend", choices=("auto", "torch", "openvino"), default="auto")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1)")
    parser.add_argument("--tta", action="store_true", help="mirroring TTA (8 passes per window)")
    parser.add_argument("--no-postprocess", action="store_true", help="keep every component")
    parser.add_argument("--save-probabilities", action="store_true")
    return parser.parse_args(argv)


def fail(report: dict, output_dir: Path, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    report["error"] = message
    write_results(output_dir, report)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    convention, cases = find_cases(args.input, args.output)
    report = {"input": str(args.input), "convention": convention, "error": None, "cases": []}
    if not args.input.is_dir():
        return fail(report, args.output, f"{args.input}: input folder not found")
    if not cases:
        expected = f"*{CHANNEL_SUFFIX}.nii.gz or images/<slug>/*{{{','.join(INPUT_SUFFIXES)}}}"
        return fail(report, args.output, f"{args.input}: no input volume found ({expected})")

    from inference.cases import run_case  # heavy imports after the cheap checks
    from inference.predictor import Predictor, PredictorSettings

    settings = PredictorSettings(
        device=args.device,
        backend=args.backend,
        folds=args.folds,
        overlap=args.overlap,
        tta=args.tta,
        postprocess=not args.no_postprocess,
    )
    try:
        predictor = Predictor(args.weights, settings)
    except (ValueError, RuntimeError, OSError) as error:  # WeightError, BackendError, ...
        return fail(report, args.output, " ".join(str(error).split()))
    report.update(device=predictor.backend.device, backend=predictor.backend.name)
    report["folds"] = predictor.folds
    failed = 0
    for source, target in cases:
        probability = args.output / PROBABILITIES / target.name if args.save_probabilities else None
        result = run_case(predictor, source, target, probability)
        report["cases"].append(result.to_dict())
        write_results(args.output, report)
        if result.status != "ok":
            failed += 1
            print(f"error: {result.error}", file=sys.stderr)
        else:
            print(f"{source.name} -> {target} ({result.seconds:.1f} s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
