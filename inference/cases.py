"""The cases of a run: finding them, segmenting each from file to file, and the report.

Failures become one report line naming the file; a case never stops the others, except a stop
signal (:class:`~inference.io.Interrupted`), which marks the running case ``interrupted``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from inference.file_checks import InputError
from inference.io import (
    TEMPORARY_PREFIX,
    Interrupted,
    WriteError,
    write_image_atomically,
    write_text_atomically,
)
from inference.naming import CHANNEL_SUFFIX, case_name, image_suffix
from inference.preprocessing import Geometry, read_image

if TYPE_CHECKING:  # the predictor imports torch: not needed to find cases or to report
    from inference.predictor import Predictor

OUTPUT_SLUG = "cerebral-artery-segmentation"  # Grand Challenge output interface
RESULTS = "results.json"
PROBABILITIES = "probabilities"
REFUSED_SUFFIXES = {".mhd": "a MetaImage with a separate data file: convert it to .mha"}


@dataclass
class Case:
    source: Path
    target: Path
    refusal: str | None = None  # why it must not run (one line naming the file)
    keep_target: bool = False  # the target is an input: never remove it


def image_entries(folder: Path) -> list[Path]:
    """Entries of ``folder`` named like images, whatever they are (a dangling link, a pipe or a
    .mhd gets its own error line instead of being skipped silently); hidden files excepted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if image_suffix(p) and not p.name.startswith("."))


def find_cases(input_dir: Path, output_dir: Path) -> tuple[str, list[Case]]:
    """The convention and the cases, sorted by input name.

    Grand Challenge when ``images/<slug>/`` holds image files (then files beside ``images/``
    are not inputs); otherwise the flat SHINY-ICARUS layout, where an unrelated ``images``
    folder is ignored. ``CASE_0000.NII.GZ`` -> ``CASE.NII.GZ``: the suffix in any case.
    """
    slugs = [p for p in sorted((input_dir / "images").glob("*")) if p.is_dir()]
    sources = [entry for slug in slugs for entry in image_entries(slug)]
    if sources:
        target = output_dir / "images" / OUTPUT_SLUG
        cases = [Case(source, target / source.name) for source in sources]
        return "grand-challenge", refuse_conflicts(cases)
    cases = []
    for source in image_entries(input_dir):
        suffix = source.name[-len(image_suffix(source)) :]
        name = source.name[: -len(suffix)].removesuffix(CHANNEL_SUFFIX)
        cases.append(Case(source, output_dir / (name + suffix)))
    return "shiny-icarus", refuse_conflicts(cases)


def refuse_conflicts(cases: list[Case]) -> list[Case]:
    """Refuse the cases that cannot be written: a refused format, an output that would
    overwrite an input, several inputs with one output (compared case-insensitively, as on a
    macOS or Windows volume)."""
    inputs = {source_key(case.source): case.source for case in cases}
    owners: dict[str, list[Case]] = {}
    for case in cases:
        owners.setdefault(source_key(case.target), []).append(case)
    for case in cases:
        suffix = image_suffix(case.source)
        shared = owners[source_key(case.target)]
        overwritten = inputs.get(source_key(case.target))
        if suffix in REFUSED_SUFFIXES:
            case.refusal = f"{case.source}: {suffix} is not supported ({REFUSED_SUFFIXES[suffix]})"
        elif overwritten is not None:
            case.refusal = f"{case.source}: its output {case.target} would overwrite an input"
            case.keep_target = True
        elif len(shared) > 1:
            others = ", ".join(c.source.name for c in shared if c is not case)
            case.refusal = f"{case.source}: {others} would be written to the same {case.target}"
    return cases


def source_key(path: Path) -> str:
    """Where ``path`` lies, its folder resolved and the name's letter case ignored."""
    return str(path.parent.resolve() / path.name).lower()


@dataclass
class CaseResult:
    """One entry of ``results.json``."""

    input: str
    output: str | None
    status: str  # "ok", "error" or "interrupted"
    error: str | None
    seconds: float
    device: str
    backend: str
    vessel_volume_mm3: float | None = None
    probability: str | None = None
    windows: int | None = None  # sliding windows on the model grid
    passes: int | None = None  # network passes: windows x folds x mirrors
    estimated_seconds: float | None = None  # network time announced before predicting
    tta: bool | None = None  # whether mirroring TTA ran (dropped under a time limit)

    def to_dict(self) -> dict:
        return asdict(self)


def one_line(error: BaseException, source: Path) -> str:
    """The error as one line naming the file (input errors already do)."""
    if isinstance(error, InputError | WriteError):
        return " ".join(str(error).split())
    text = " ".join(str(error).split()) or "no message"
    return f"{source}: {type(error).__name__}: {text[:300]}"


class Pacer:
    """Announces each case's network time before it runs and keeps it under ``time_limit``.

    Seconds per pass (one window through one fold and mirror) start as a conservative constant
    for the backend, scaled by the patch's voxels and the squared width of the network (the
    shipped 48^3, 16-channel folds: 0.04 s measured with OpenVINO bf16 on 2 cores, 0.12 s in
    eager torch, under 1 ms on an H200), and become the rate measured on the cases so far.
    Over the limit, mirroring TTA is dropped for the case. Folds are not: the backends run all
    the folds they were built with.
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

    def plan(self, geometry: Geometry, source: Path, result: CaseResult) -> None:
        """Print the case's windows and estimated time; drop TTA when it would not fit."""
        predictor = self.predictor
        folds, mirrors = len(predictor.folds), len(predictor.mirrors)
        result.passes = predictor.passes(geometry)
        result.windows = result.passes // (folds * mirrors)
        result.estimated_seconds = round(result.passes * self.seconds_per_pass, 3)
        result.tta = mirrors > 1
        limit = self.time_limit
        if limit and result.estimated_seconds > limit and mirrors > 1:
            print(
                f"warning: {source.name}: about {duration(result.estimated_seconds)} with TTA "
                f"exceeds the time limit of {limit:g} s: TTA dropped for this case",
                file=sys.stderr,
            )
            predictor.mirrors, mirrors, result.tta = predictor.mirrors[:1], 1, False
            result.passes = result.windows * folds
            result.estimated_seconds = round(result.passes * self.seconds_per_pass, 3)
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
                "even without TTA; all folds still run",
                file=sys.stderr,
            )

    def record(self, passes: int, seconds: float) -> None:
        if passes and seconds > 0:
            self.seconds_per_pass, self.measured = seconds / passes, True

    def __enter__(self) -> Pacer:
        self.mirrors = self.predictor.mirrors
        return self

    def __exit__(self, *exc) -> None:
        self.predictor.mirrors = self.mirrors  # TTA dropped for one case only


def duration(seconds: float) -> str:
    return f"{seconds:.2g} s" if seconds < 100 else f"{seconds / 60:.0f} min"


def segment_file(
    predictor: Predictor,
    source: Path,
    target: Path,
    probability_target: Path | None = None,
    pacer: Pacer | None = None,
    result: CaseResult | None = None,
) -> float:
    """Segment ``source`` into ``target`` (and its probability map into ``probability_target``);
    the vessel volume in mm^3. Raises on any failure, leaving no file behind. The header is
    checked against the model's bounds before any voxel is read."""
    array, geometry = read_image(source, lambda header: predictor.check(header, source))
    result = result or CaseResult(str(source), None, "ok", None, 0.0, "", "")
    with pacer or Pacer(predictor) as pace:
        pace.plan(geometry, source, result)
        volume = predictor.model_input(array, geometry)
        del array  # the raw volume is no longer needed: keep the peak memory down
        start = time.perf_counter()
        bar = tqdm(total=result.passes, desc=case_name(source), unit="pass", file=sys.stderr)
        with bar:
            probability = predictor.probability_of_input(volume, geometry, bar.update)
        pace.record(result.passes, time.perf_counter() - start)
    del volume
    mask, volume_mm3 = predictor.mask_of(probability, geometry)
    if probability_target is not None:  # before the mask: a mask exists only on success
        probability_target.parent.mkdir(parents=True, exist_ok=True)
        write_image_atomically(geometry.image_from(probability), probability_target)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_image_atomically(geometry.image_from(mask), target)
    return volume_mm3


def run_case(
    predictor: Predictor,
    case: Case,
    probability_target: Path | None = None,
    pacer: Pacer | None = None,
) -> CaseResult:
    """:func:`segment_file` with the outcome as a report entry; never raises for a bad case.
    A case that fails loses the mask (and probability map) an earlier run left for it."""
    start = time.perf_counter()
    backend = predictor.backend
    result = CaseResult(str(case.source), None, "ok", None, 0.0, backend.device, backend.name)
    try:
        if case.refusal:
            raise InputError(case.refusal)
        result.vessel_volume_mm3 = segment_file(
            predictor, case.source, case.target, probability_target, pacer, result
        )
        result.output = str(case.target)
        if probability_target is not None:
            result.probability = str(probability_target)
    except Exception as error:  # one bad case must not stop the others
        result.status, result.error = "error", one_line(error, case.source)
    except Interrupted as stop:
        result.status, result.error = "interrupted", f"{case.source}: {stop}"
        stop.result = result
        raise
    finally:
        result.seconds = round(time.perf_counter() - start, 3)
        if result.status != "ok" and not case.keep_target:
            remove_stale(case.target, probability_target)
    return result


def remove_leftovers(output_dir: Path) -> None:
    """Remove the temporary files a killed run left (SIGKILL, the out-of-memory killer): safe
    while this run holds the folder's lock, since only a run writes them."""
    for folder in (output_dir, output_dir / "images" / OUTPUT_SLUG, output_dir / PROBABILITIES):
        remove_stale(*folder.glob(TEMPORARY_PREFIX + "*"))


def remove_stale(*paths: Path | None) -> None:
    """Remove outputs a previous run left for a case that has none now."""
    for path in paths:
        if path is not None and (path.is_file() or path.is_symlink()):
            try:
                path.unlink()
            except OSError as error:
                print(f"warning: {path}: stale output not removed ({error})", file=sys.stderr)


class Report:
    """``results.json``, started afresh with the run and replaced atomically after every case
    (a crash keeps the cases so far). A write that fails mid-run is one line on stderr and exit
    status 1, never a traceback; at the start it raises (:class:`WriteError`): nothing runs."""

    def __init__(self, output_dir: Path, input_dir: Path):
        self.path = output_dir / RESULTS
        self.data = {
            "input": str(input_dir),
            "output": str(output_dir),
            "status": "running",
            "convention": None,
            "error": None,
            "cases": [],
        }
        self.failed = False
        write_text_atomically(self.text(), self.path)

    def text(self) -> str:
        return json.dumps(self.data, indent=2) + "\n"

    def write(self) -> None:
        try:
            write_text_atomically(self.text(), self.path)
        except WriteError as error:
            if not self.failed:
                print(f"error: {error}", file=sys.stderr)
            self.failed = True

    def add(self, result: CaseResult) -> None:
        self.data["cases"].append(result.to_dict())
        self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data.update(status=status, error=error)
        self.write()
