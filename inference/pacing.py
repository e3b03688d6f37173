"""Pacing a run: each case's network time announced and kept under a time limit, and progress
that suits a terminal (tqdm) or a platform's log (a line every tenth)."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tqdm import tqdm

from inference.preprocessing import Geometry

if TYPE_CHECKING:  # the predictor imports torch: not needed to pace
    from inference.predictor import Predictor


@dataclass(frozen=True)
class PassPlan:
    """What a case will run, as the report records it."""

    windows: int  # sliding windows on the model grid
    passes: int  # network passes: windows x folds x mirrors
    estimated_seconds: float  # network time announced before predicting
    tta: bool  # whether mirroring TTA runs (dropped under a time limit)
    folds: list[int]  # the folds that run (some dropped under a time limit)


class Pacer:
    """Announces each case's network time before it runs and keeps it under ``time_limit``.

    Seconds per pass (one window through one fold and mirror) start as a conservative constant
    for the backend, scaled by the patch's voxels and the squared width of the network (the
    shipped 48^3, 16-channel folds: 0.04 s measured with OpenVINO bf16 on 2 cores, 0.12 s in
    eager torch, under 1 ms on an H200), and become the rate measured on the cases so far.
    Over the limit, mirroring TTA is dropped for the case first, then folds (the first ``k``
    that fit, at least one), each with a warning; the report records what ran.
    """

    SECONDS_PER_PASS = {"cuda": 0.01, "openvino": 0.15, "torch": 0.5}  # 48^3, 16 channels

    def __init__(self, predictor: Predictor, time_limit: float | None = None):
        backend = predictor.backend
        kind = "cuda" if backend.device.startswith("cuda") else backend.name
        scale = math.prod(predictor.manifest.patch_size) / 48**3
        scale *= (predictor.manifest.architecture.base_channels / 16) ** 2
        self.predictor, self.time_limit = predictor, time_limit
        self.seconds_per_pass = self.SECONDS_PER_PASS.get(kind, 0.5) * scale
        self.measured = False

    def plan(self, geometry: Geometry, source: Path) -> PassPlan:
        """Print the case's windows and estimated time; drop TTA, then folds, when it would not
        fit."""
        predictor, limit = self.predictor, self.time_limit
        folds, mirrors = len(predictor.active_folds), len(predictor.mirrors)
        windows = predictor.passes(geometry) // (folds * mirrors)
        cost = windows * self.seconds_per_pass  # seconds of one fold, one mirror
        if limit and cost * folds * mirrors > limit and mirrors > 1:
            print(
                f"warning: {source.name}: about {duration(cost * folds * mirrors)} with TTA "
                f"exceeds the time limit of {limit:g} s: TTA dropped for this case",
                file=sys.stderr,
            )
            predictor.mirrors, mirrors = predictor.mirrors[:1], 1
        if limit and cost * folds > limit and folds > 1:
            keep = max(1, min(folds - 1, math.floor(limit / cost)))
            print(
                f"warning: {source.name}: about {duration(cost * folds)} with {folds} folds "
                f"exceeds the time limit of {limit:g} s: {keep} of {folds} folds run",
                file=sys.stderr,
            )
            predictor.active = (
                list(range(keep)) if predictor.active is None else (predictor.active[:keep])
            )
            folds = keep
        passes = windows * folds * mirrors
        result = PassPlan(
            windows=windows,
            passes=passes,
            estimated_seconds=round(passes * self.seconds_per_pass, 3),
            tta=mirrors > 1,
            folds=list(predictor.active_folds),
        )
        basis = "measured" if self.measured else "a conservative guess until a case is measured"
        print(
            f"{source.name}: {result.windows} windows x {folds} folds x {mirrors} mirrors = "
            f"{result.passes} passes, about {duration(result.estimated_seconds)} of network time "
            f"({self.seconds_per_pass:.3f} s a pass, {basis})",
            file=sys.stderr,
        )
        if limit and result.estimated_seconds > limit:
            print(
                f"warning: {source.name}: the estimate exceeds the time limit of {limit:g} s "
                "even with one fold and no TTA",
                file=sys.stderr,
            )
        return result

    def record(self, passes: int, seconds: float) -> None:
        if passes and seconds > 0:
            self.seconds_per_pass, self.measured = seconds / passes, True

    def __enter__(self) -> Pacer:
        self.saved = self.predictor.mirrors, self.predictor.active
        return self

    def __exit__(self, *exc) -> None:
        self.predictor.mirrors, self.predictor.active = self.saved  # for one case only


class TenthLines:
    """Progress for a log (stderr not a terminal): one line at every tenth of ``total`` passes,
    instead of tqdm's carriage-return redraws (about 150 KB for twelve 128^3 cases)."""

    def __init__(self, name: str, total: int, stream: TextIO):
        self.name, self.total, self.stream = name, max(total, 1), stream
        self.done, self.tenths, self.start = 0, 0, time.perf_counter()

    def __call__(self, passes: int) -> None:
        self.done += passes
        tenths = min(10, self.done * 10 // self.total)
        if tenths > self.tenths:
            self.tenths = tenths
            print(
                f"{self.name}: {tenths * 10}% ({self.done}/{self.total} passes, "
                f"{time.perf_counter() - self.start:.1f} s)",
                file=self.stream,
                flush=True,
            )


@contextlib.contextmanager
def progress_reporter(
    name: str, total: int, stream: TextIO | None = None
) -> Iterator[Callable[[int], None]]:
    """A progress callback: tqdm's bar on a terminal, :class:`TenthLines` in a log."""
    stream = stream or sys.stderr
    if stream.isatty():
        with tqdm(total=total, desc=name, unit="pass", file=stream) as bar:
            yield bar.update
    else:
        yield TenthLines(name, total, stream)


def duration(seconds: float) -> str:
    return f"{seconds:.2g} s" if seconds < 100 else f"{seconds / 60:.0f} min"
