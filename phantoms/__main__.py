"""Command line: write synthetic 3DRA datasets in the nnU-Net raw layout.

    python -m phantoms --out DIR --cases N --size Z Y X --seed S [--sites K]

Without --sites: DIR/imagesTr/case_000_0000.nii.gz, DIR/labelsTr/case_000.nii.gz, ...,
DIR/dataset.json. With --sites K: one such dataset per site in DIR/site1 ... DIR/siteK,
N cases each, every site with its own acquisition profile (noise, blur, contrast, bone,
field of view, vessel density), so that the federation is non-IID. With
--layout challenge: DIR/input/NAME_0000.nii.gz and DIR/ground_truth/NAME.nii.gz, the
container's input and the reference masks; --name renames a single case.

--family randomised (default; training data: every structure's look drawn at random per
case), reference (one fixed 3DRA-like look per site: the held-out test set, the sample) or
independent (another generator, for evaluation only); see phantoms.dataset.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from phantoms.dataset import FAMILIES, write_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m phantoms",
        description="Write synthetic 3D rotational angiography phantoms with exact vessel "
        "labels as nnU-Net raw dataset(s).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cases", type=int, required=True, help="cases (per site with --sites)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=3,
        default=(128, 128, 128),
        metavar=("Z", "Y", "X"),
        help="volume size in numpy order (the NIfTI size is X Y Z); default 128 128 128",
    )
    parser.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    parser.add_argument(
        "--sites", type=int, help="write OUT/site1 ... OUT/siteK, one dataset per site"
    )
    parser.add_argument(
        "--spacing", type=float, default=0.227, help="isotropic voxel size, mm (default 0.227)"
    )
    parser.add_argument(
        "--layout",
        choices=("nnunet", "challenge"),
        default="nnunet",
        help="nnunet: imagesTr/labelsTr/dataset.json (default); "
        "challenge: input/NAME_0000.nii.gz and ground_truth/NAME.nii.gz",
    )
    parser.add_argument("--name", help="name of the single case (with --cases 1)")
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="randomised",
        help="randomised: domain-randomised training data (default); reference: the fixed "
        "3DRA-like look; independent: another generator, for evaluation only",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        roots = write_dataset(
            args.out,
            args.cases,
            tuple(args.size),
            args.seed,
            args.sites,
            spacing=args.spacing,
            layout=args.layout,
            name=args.name,
            family=args.family,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for root in roots:
        print(f"wrote {args.cases} case(s) to {root}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
