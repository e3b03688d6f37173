"""Command line: write synthetic 3DRA datasets in the nnU-Net raw layout.

    python -m phantoms --out DIR --cases N --size Z Y X --seed S [--sites K]

Without --sites: DIR/imagesTr/case_000_0000.nii.gz, DIR/labelsTr/case_000.nii.gz, ...,
DIR/dataset.json. With --sites K: one such dataset per site in DIR/site1 ... DIR/siteK,
N cases each, every site with its own acquisition profile (noise, blur, contrast, bone,
field of view, vessel density), so that the federation is non-IID. With
--layout challenge: DIR/input/NAME_0000.nii.gz and DIR/ground_truth/NAME.nii.gz, the
container's input and the reference masks; --name renames a single case.

--family randomised (default; training data: every structure's look drawn at random per
case), randomised-cone (the same cases with the cone beam's shading, truncation rim and scalp
band: a candidate for the next version), reference (one fixed 3DRA-like look per site: the
held-out test set, the sample) or independent (another generator, for evaluation only); see
phantoms.dataset.

--annotation full (default) | major | sparse, one mode for every site or one per site
(e.g. ``--sites 3 --annotation full full major``): major labels the vessels at least
--major-diameter-mm wide and marks the thinner ones ignore (label 2, declared in
dataset.json); sparse labels slabs of --sparse-slab voxels along z, every --sparse-every-th
one, and marks the rest ignore. --naive writes what was not labelled as background instead.
The challenge layout always keeps full labels. See phantoms.annotation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from phantoms.annotation import ANNOTATIONS, Annotation
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
    add_annotation_arguments(parser)
    return parser


def add_annotation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--annotation",
        choices=ANNOTATIONS,
        nargs="+",
        default=["full"],
        help="how a site labels its cases, one mode for all sites or one per site: full "
        "(default), major (vessels >= --major-diameter-mm, the thinner ones ignore) or "
        "sparse (every --sparse-every-th slab, the rest ignore)",
    )
    parser.add_argument(
        "--naive",
        action="store_true",
        help="write what a partial annotation did not label as background, not as ignore",
    )
    defaults = Annotation()
    parser.add_argument(
        "--major-diameter-mm",
        type=float,
        default=defaults.major_diameter_mm,
        help=f"smallest labelled vessel diameter with major, mm (default "
        f"{defaults.major_diameter_mm})",
    )
    parser.add_argument(
        "--sparse-every",
        type=int,
        default=defaults.sparse_every,
        help=f"sparse: label one slab in this many (default {defaults.sparse_every})",
    )
    parser.add_argument(
        "--sparse-slab",
        type=int,
        default=defaults.sparse_slab,
        help=f"sparse: slab thickness along z in voxels (default {defaults.sparse_slab})",
    )


def annotations(args: argparse.Namespace) -> list[Annotation]:
    """One :class:`Annotation` per ``--annotation`` mode given (ValueError when invalid)."""
    return [
        Annotation(
            mode,
            args.naive and mode != "full",
            args.major_diameter_mm,
            args.sparse_every,
            args.sparse_slab,
        )
        for mode in args.annotation
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.naive and set(args.annotation) == {"full"}:
            raise ValueError("--naive needs --annotation major or sparse")
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
            annotation=annotations(args),
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
