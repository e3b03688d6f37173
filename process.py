"""Cerebral-artery segmentation container: every input volume -> a binary vessel mask.

Contract (the convention is detected from what the input folder holds):

  Grand Challenge   INPUT/images/<input-slug>/<name>{.mha,.nii.gz,.nii,.nrrd}, or the image
                    inputs INPUT/inputs.json lists (slug, relative path; none leaving INPUT)
                 -> OUTPUT/images/cerebral-artery-segmentation/<name>  (same name and format)
  SHINY-ICARUS      INPUT/<CASE>_0000.nii.gz  (flat, read-only; nnU-Net channel suffix)
                 -> OUTPUT/<CASE>.nii.gz  (any image suffix, in any letter case)
  always            OUTPUT/results.json: started afresh with the run ("status": "running"),
                    per case input, output, status (ok/error/interrupted), error, seconds,
                    device, backend, vessel volume in mm^3, windows, estimated seconds, TTA,
                    folds; the weights, device name and memory, library versions
  --save-probabilities   OUTPUT/probabilities/<output name>  (float32 vessel probability)

Masks are uint8 {0, 1} with the input's size, spacing, origin and direction, written to a
temporary file, read back and compared, then renamed into place. A case that fails gets one
line on stderr and in results.json and loses the mask an earlier run left; if its header could
be read it gets an all-zero mask with its geometry instead (still an error: SHINY-ICARUS pairs
outputs by sorted position). The others are still segmented. A run holds OUTPUT/.lock.
Exit status: 0 every case ok, 1 a case failed, 2 nothing could run (no input volume, unusable
weights, options or output folder), 128 + signal when stopped (143: SIGTERM, docker stop).
Defaults: INPUT /input, OUTPUT /output, weights /opt/ml/model when it holds a manifest.json
(Grand Challenge's model tarball; env VESSEL_SEG_MODEL_DIR), else weights/ beside this file.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from inference.cases import (  # noqa: F401 (OUTPUT_SLUG, RESULTS: the contract's names)
    OUTPUT_SLUG,
    PROBABILITIES,
    RESULTS,
    Case,
    InputsError,
    Report,
    find_cases,
    remove_leftovers,
    run_cases,
)
from inference.io import (
    Interrupted,
    WriteError,
    claim_folder,
    interrupt_on_signals,
    quiet_itk,
)
from inference.naming import CHANNEL_SUFFIX, SUPPORTED_SUFFIXES
from inference.pacing import Pacer

WEIGHTS = Path(__file__).resolve().parent / "weights"
MODEL_DIR = Path(os.environ.get("VESSEL_SEG_MODEL_DIR", "/opt/ml/model"))  # Grand Challenge


def default_weights() -> tuple[Path, str]:
    """The uploaded model when it holds a manifest, else the built-in weights."""
    if (MODEL_DIR / "manifest.json").is_file():
        return MODEL_DIR, "model folder"
    return WEIGHTS, "built-in"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=Path("/input"))
    parser.add_argument("--output", type=Path, default=Path("/output"))
    parser.add_argument("--weights", type=Path, help=f"default {MODEL_DIR} or {WEIGHTS}")
    parser.add_argument("--folds", type=int, nargs="+", help="folds to ensemble (default all)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--backend", choices=("auto", "torch", "openvino"), default="auto")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap in [0, 1)")
    parser.add_argument("--tta", action="store_true", help="mirroring TTA (8 passes per window)")
    parser.add_argument("--no-postprocess", action="store_true", help="keep every component")
    parser.add_argument("--save-probabilities", action="store_true")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=os.environ.get("VESSEL_SEG_TIME_LIMIT"),
        metavar="SECONDS",
        help="per case: TTA, then folds, are dropped when the estimated network time exceeds "
        "it (env VESSEL_SEG_TIME_LIMIT)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        default=os.environ.get("VESSEL_SEG_DETERMINISTIC", "") not in ("", "0"),
        help="CUDA: deterministic algorithms, no cuDNN autotuning (env VESSEL_SEG_DETERMINISTIC);"
        " the CPU path is deterministic always",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "f32", "int8"),
        default=os.environ.get("VESSEL_SEG_PRECISION", "auto"),
        help="OpenVINO (CPU) arithmetic; auto: int8 on CPUs with VNNI and no AMX when the image "
        "holds int8 models, else bf16 where native, else f32; int8 needs VNNI/AMX and prepared "
        "int8 models (env VESSEL_SEG_PRECISION)",
    )
    parser.add_argument(
        "--pipeline",
        choices=("auto", "on", "off"),
        default="auto",
        help="read the next case and write the last one while this one runs (auto: on a GPU)",
    )
    args = parser.parse_args(argv)
    args.weights_source = "option" if args.weights else None
    if args.weights is None:
        args.weights, args.weights_source = default_weights()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_itk()
    try:
        with claim_folder(args.output), interrupt_on_signals():
            report = Report(args.output, args.input)  # replaces the last run's report at once
            remove_leftovers(args.output)
            try:
                return segment_all(args, report)
            except Interrupted as stop:
                if stop.result is not None:
                    report.add(stop.result)
                report.finish("interrupted", str(stop))
                print(f"error: {stop}", file=sys.stderr)
                return 128 + stop.signum
    except WriteError as error:  # the output folder is not ours, or not writable
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        return 128 + stop.signum


def fail(report: Report, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    report.finish("error", message)
    return 2


def load_predictor(args: argparse.Namespace):
    from inference.predictor import Predictor, PredictorSettings  # torch: after the cheap checks

    settings = PredictorSettings(
        device=args.device,
        backend=args.backend,
        folds=args.folds,
        overlap=args.overlap,
        tta=args.tta,
        postprocess=not args.no_postprocess,
        deterministic=args.deterministic,
        precision=args.precision,
    )
    return Predictor(args.weights, settings)


def segment_all(args: argparse.Namespace, report: Report) -> int:
    if not args.input.is_dir():
        return fail(report, f"{args.input}: input folder not found")
    try:
        convention, cases = find_cases(args.input, args.output)
    except OSError as error:
        return fail(report, f"{args.input}: cannot list the input folder ({error.strerror})")
    except InputsError as error:
        return fail(report, str(error))
    report.data["convention"] = convention
    if not cases:
        expected = f"*{CHANNEL_SUFFIX}.nii.gz or images/<slug>/*{{{','.join(SUPPORTED_SUFFIXES)}}}"
        return fail(report, f"{args.input}: no input volume found ({expected})")
    try:
        predictor = load_predictor(args)
    except Exception as error:  # WeightError, BackendError, a bad option: one line, exit 2
        return fail(report, " ".join(str(error).split()) or type(error).__name__)
    from inference.backend_base import runtime_environment

    pipeline = args.pipeline == "on" or (
        args.pipeline == "auto" and predictor.backend.device.startswith("cuda")
    )
    report.data.update(
        device=predictor.backend.device,
        backend=predictor.backend.name,
        precision=predictor.backend.precision,
        folds=predictor.folds,
        weights={"path": str(args.weights), "source": args.weights_source},
        deterministic=args.deterministic,
        pipeline=pipeline,
        environment=runtime_environment(predictor.backend.device),
    )
    report.write()
    pacer = Pacer(predictor, args.time_limit)

    def probability_of(case: Case) -> Path | None:
        return args.output / PROBABILITIES / case.target.name if args.save_probabilities else None

    failed = 0
    with contextlib.closing(
        run_cases(predictor, cases, probability_of, pacer, pipeline)
    ) as results:
        for case, result in zip(cases, results, strict=True):
            report.add(result)
            if result.status != "ok":
                failed += 1
                print(f"error: {result.error}", file=sys.stderr)
            else:
                print(
                    f"{case.source.name} -> {case.target} ({result.seconds:.1f} s)", file=sys.stderr
                )
    report.finish("done" if not failed else "failed")
    return 1 if failed or report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
