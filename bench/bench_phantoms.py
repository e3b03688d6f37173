"""Time one benchmark-size phantom and report seconds and peak memory as JSON.

    python bench/bench_phantoms.py [--size Z Y X] [--seed S] [--write DIR]

The default size is numpy (400, 512, 512), i.e. a 512x512x400 NIfTI (x, y, z), the size of
a full 3DRA reconstruction. Peak RSS is the process's maximum resident set size
(resource.getrusage, kilobytes on Linux), so it includes the interpreter and libraries.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from phantoms import generate_case  # noqa: E402


def peak_rss_gib() -> float:
    """Peak resident set size of this process in GiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size", type=int, nargs=3, default=(400, 512, 512), metavar=("Z", "Y", "X")
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, help="also write the case here, timing the write")
    args = parser.parse_args(argv)
    rss_before = peak_rss_gib()
    start = time.perf_counter()
    image, label = generate_case(tuple(args.size), seed=args.seed)
    seconds = time.perf_counter() - start
    report = {
        "size_zyx": list(args.size),
        "voxels": int(np.prod(args.size)),
        "generate_s": round(seconds, 2),
        "mvox_per_s": round(np.prod(args.size) / seconds / 1e6, 2),
        "peak_rss_gib": round(peak_rss_gib(), 3),
        "rss_after_imports_gib": round(rss_before, 3),
        "vessel_fraction": round(float(sitk.GetArrayViewFromImage(label).mean()), 5),
    }
    if args.write is not None:
        args.write.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        sitk.WriteImage(image, str(args.write / "bench_0000.nii.gz"), useCompression=True)
        sitk.WriteImage(label, str(args.write / "bench.nii.gz"), useCompression=True)
        report["write_s"] = round(time.perf_counter() - start, 2)
        report["peak_rss_gib"] = round(peak_rss_gib(), 3)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
