"""Demo: segment the bundled sample with the shipped weights, draw it, score it.

    python test/demo.py [--output work/demo]      (make demo)

Runs the container's entry point (``process.py``) on ``test/sample/input``, writes the mask and
a preview PNG (maximum-intensity projections with the mask in red, by ``phantoms.preview``) to
the output folder, and prints the Dice against the sample's ground truth. Exits non-zero, saying
so, while no trained weights ship in ``weights/``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "test" / "sample"
WEIGHTS = ROOT / "weights"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "work" / "demo")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    if not (args.weights / "manifest.json").is_file():
        print(
            f"demo: no trained weights are shipped yet ({args.weights}/manifest.json is "
            "missing); train and export them first (see README), or pass --weights DIR",
            file=sys.stderr,
        )
        return 1
    image = SAMPLE / "input" / "sample_0000.nii.gz"
    command = [
        sys.executable,
        str(ROOT / "process.py"),
        "--input",
        str(image.parent),
        "--output",
        str(args.output),
        "--weights",
        str(args.weights),
    ]
    if subprocess.run(command).returncode != 0:
        return 1
    mask, preview = args.output / "sample.nii.gz", args.output / "sample.png"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "phantoms.preview",
            str(image),
            "--label",
            str(mask),
            "--png",
            str(preview),
        ],
        check=True,
    )
    from metrics import dice

    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE / "ground_truth" / "sample.nii.gz")))
    score = dice(sitk.GetArrayFromImage(sitk.ReadImage(str(mask))), truth)
    print(f"mask:    {mask}\npreview: {preview}\nDice against the ground truth: {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
