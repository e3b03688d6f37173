"""The cases of a run: finding them, segmenting each from file to file, and the report
(pacing and progress: :mod:`inference.pacing`).

Failures become one report line naming the file; a case never stops the others, except a stop
signal (:class:`~inference.io.Interrupted`), which marks the running case ``interrupted``.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.file_checks import InputError
from inference.io import (
    TEMPORARY_PREFIX,
    Interrupted,
    WriteError,
    write_image_atomically,
    write_text_atomically,
)
from inference.naming import CHANNEL_SUFFIX, case_name, image_suffix
from inference.pacing import Pacer, PassPlan, progress_reporter
from inference.preprocessing import Geometry, read_image

if TYPE_CHECKING:  # the predictor imports torch: not needed to find cases or to report
    from inference.predictor import Predictor

OUTPUT_SLUG = "cerebral-artery-segmentation"  # Grand Challenge output interface
RESULTS = "results.json"
INPUTS_JSON = "inputs.json"  # Grand Challenge: each input's interface slug and relative path
PROBABILITIES = "probabilities"
REFUSED_SUFFIXES = {".mhd": "a MetaImage with a separate data file: convert it to .mha"}


@dataclass
class Case:
    source: Path
    target: Path
    refusal: str | None = None  # why it must not run (one line naming the file)
    keep_target: bool = False  # the target is an input (or not this case's): never remove it
    interface: str | None = None  # Grand Challenge interface slug, from inputs.json


def image_entries(folder: Path) -> list[Path]:
    """Entries of ``folder`` named like images, whatever they are (a dangling link, a pipe or a
    .mhd gets its own error line instead of being skipped silently); hidden files excepted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if image_suffix(p) and not p.name.startswith("."))


class InputsError(ValueError):
    """An ``inputs.json`` that cannot be used; one line naming it."""


def find_cases(input_dir: Path, output_dir: Path) -> tuple[str, list[Case]]:
    """The convention and the cases, sorted by input name.

    Grand Challenge when ``inputs.json`` exists (:func:`cases_from_inputs_json`) or when
    ``images/<slug>/`` holds image files (then files beside ``images/`` are not inputs);
    otherwise the flat SHINY-ICARUS layout, where an unrelated ``images`` folder is ignored.
    ``CASE_0000.NII.GZ`` -> ``CASE.NII.GZ``: the suffix in any case.
    """
    if (input_dir / INPUTS_JSON).is_file():
        return "grand-challenge", refuse_conflicts(cases_from_inputs_json(input_dir, output_dir))
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


def cases_from_inputs_json(input_dir: Path, output_dir: Path) -> list[Case]:
    """The image inputs ``inputs.json`` lists: each entry's ``interface.relative_path`` (a
    folder, e.g. ``images/head-3dra``, or an image file) below ``input_dir``. Entries of other
    kinds (a JSON value: no image there) are not inputs. A path that leaves ``input_dir``
    (absolute, ``..``, a link out) or is missing becomes a refused case with one line."""
    listing = input_dir / INPUTS_JSON
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputsError(f"{listing}: not readable as JSON ({error})") from None
    if not isinstance(entries, list):
        raise InputsError(f"{listing}: expected a list of interface values")
    root, target = input_dir.resolve(), output_dir / "images" / OUTPUT_SLUG
    cases = []
    for entry in entries:
        interface = entry.get("interface") if isinstance(entry, dict) else None
        relative = interface.get("relative_path") if isinstance(interface, dict) else None
        if not isinstance(relative, str) or not relative:
            raise InputsError(f"{listing}: an entry without interface.relative_path")
        slug = str(interface.get("slug") or relative)
        path = input_dir / relative
        refusal = None
        if Path(relative).is_absolute() or not path.resolve().is_relative_to(root):
            refusal = f"{listing}: {slug}: relative_path {relative!r} leaves {input_dir}"
        elif not path.exists() and not path.is_symlink():
            refusal = f"{listing}: {slug}: {path} not found"
        if refusal:
            cases.append(Case(path, target / path.name, refusal, True, slug))
            continue
        sources = image_entries(path) if path.is_dir() else [path] if image_suffix(path) else []
        cases += [Case(source, target / source.name, interface=slug) for source in sources]
    return sorted(cases, key=lambda case: case.source.name)


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
    folds: list[int] | None = None  # the folds that ran (some dropped under a time limit)
    interface: str | None = None  # Grand Challenge interface slug, from inputs.json
    empty_mask: bool = False  # an all-zero mask written for a readable input that failed

    def to_dict(self) -> dict:
        return asdict(self)

    def record_plan(self, plan: PassPlan) -> None:
        """What the pacer decided to run for this case."""
        for name, value in asdict(plan).items():
            setattr(self, name, value)


def one_line(error: BaseException, source: Path) -> str:
    """The error as one line naming the file (input errors already do)."""
    if isinstance(error, InputError | WriteError):
        return " ".join(str(error).split())
    text = " ".join(str(error).split()) or "no message"
    return f"{source}: {type(error).__name__}: {text[:300]}"


class Reading:
    """A case's volume read into the model's input, here or in a background thread (the next
    case's, while this one runs); ``headers`` receives the geometry once the reader accepted it
    (what an empty mask for a failed case needs). The header is checked against the model's
    bounds before any voxel is read."""

    def __init__(self, predictor: Predictor, source: Path, reader: Executor | None = None):
        self.predictor, self.source, self.headers = predictor, source, []
        self.future = reader.submit(self.read) if reader is not None else None

    def read(self) -> tuple[np.ndarray, Geometry]:
        def check(header: Geometry) -> None:
            self.headers.append(header)
            self.predictor.check(header, self.source)

        array, geometry = read_image(self.source, check)
        return self.predictor.model_input(array, geometry), geometry

    def result(self) -> tuple[np.ndarray, Geometry]:
        return self.future.result() if self.future is not None else self.read()


def segment_file(
    predictor: Predictor,
    source: Path,
    target: Path,
    probability_target: Path | None = None,
    pacer: Pacer | None = None,
    result: CaseResult | None = None,
    reading: Reading | None = None,
) -> float:
    """Segment ``source`` into ``target`` (and its probability map into ``probability_target``);
    the vessel volume in mm^3. Raises on any failure, leaving no file behind."""
    result = result or CaseResult(str(source), None, "ok", None, 0.0, "", "")
    reading = reading or Reading(predictor, source)
    probability, geometry = predict_file(
        predictor, source, pacer or Pacer(predictor), result, reading
    )
    return write_outputs(predictor, probability, geometry, target, probability_target)


def predict_file(
    predictor: Predictor, source: Path, pacer: Pacer, result: CaseResult, reading: Reading
) -> tuple[np.ndarray, Geometry]:
    """The first half of :func:`segment_file`: the read volume's probability map."""
    volume, geometry = reading.result()
    with pacer as pace:
        result.record_plan(pace.plan(geometry, source))
        start = time.perf_counter()
        with progress_reporter(case_name(source), result.passes) as progress:
            probability = predictor.probability_of_input(volume, geometry, progress)
        pace.record(result.passes, time.perf_counter() - start)
    return probability, geometry


def write_outputs(
    predictor: Predictor,
    probability: np.ndarray,
    geometry: Geometry,
    target: Path,
    probability_target: Path | None,
) -> float:
    """The second half of :func:`segment_file`: the cleaned mask and the probability map
    written; the vessel volume in mm^3."""
    mask, volume_mm3 = predictor.mask_of(probability, geometry)
    if probability_target is not None:  # before the mask: a mask exists only on success
        probability_target.parent.mkdir(parents=True, exist_ok=True)
        write_image_atomically(geometry.image_from(probability), probability_target)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_image_atomically(geometry.image_from(mask), target)
    return volume_mm3


def run_cases(
    predictor: Predictor,
    cases: list[Case],
    probability_of: Callable[[Case], Path | None],
    pacer: Pacer,
    pipeline: bool,
) -> Iterator[CaseResult]:
    """:func:`run_case` for each case, its report entry in order. With ``pipeline`` the next
    case is read and preprocessed, and the last one cleaned and written, in background threads
    while this one runs, so that a GPU waits neither for a file to be inflated nor for one to
    be compressed (on a CPU the network already keeps every core busy). A stop signal still
    reports every case whose outputs were being written, once they are."""
    reader = ThreadPoolExecutor(1, thread_name_prefix="read-next") if pipeline else None
    writer = ThreadPoolExecutor(1, thread_name_prefix="write-last") if pipeline else None
    behind = 1 if pipeline else 0  # cases whose writes may still run while the next one runs
    in_flight: deque[Finishing] = deque()

    def start(case: Case) -> Reading | None:
        return None if case.refusal else Reading(predictor, case.source, reader)

    def finished(keep: int) -> Iterator[CaseResult]:
        """The oldest entries, each once its writes are done, until ``keep`` are left."""
        while len(in_flight) > keep:
            yield in_flight[0].result()
            in_flight.popleft()

    try:
        upcoming = start(cases[0]) if cases else None
        for index, case in enumerate(cases):
            reading = upcoming
            upcoming = start(cases[index + 1]) if index + 1 < len(cases) else None
            in_flight.append(
                run_case(predictor, case, probability_of(case), pacer, reading, writer)
            )
            yield from finished(behind)
        yield from finished(0)
    except Interrupted:  # the first stop makes the handler ignore any later one
        yield from finished(0)
        raise
    finally:  # the case being read is not waited for; a mask being written is finished
        if reader is not None:
            reader.shutdown(wait=False, cancel_futures=True)
        if writer is not None:
            writer.shutdown(wait=True)


class Finishing:
    """A case's report entry, complete once its outputs are written (maybe in another
    thread). :func:`run_case`'s failure rules apply to each half: a case that fails loses the
    mask (and probability map) an earlier run left for it; when its header could be read (NaN
    or constant voxels, beyond the model's bounds, a network failure) it gets an all-zero mask
    with the input's geometry instead, so that every input has an output of its name
    (SHINY-ICARUS's scorer pairs files by sorted position)."""

    def __init__(
        self, result: CaseResult, case: Case, probability_target: Path | None, reading: Reading
    ):
        self.entry, self.case, self.probability_target = result, case, probability_target
        self.reading, self.started, self.writing = reading, time.perf_counter(), None

    def attempt(self, step: Callable[[], object]) -> object | None:
        """``step()``, or None with the entry marked failed (or interrupted, re-raised)."""
        case, result, failure = self.case, self.entry, None
        try:
            return step()
        except Exception as error:  # one bad case must not stop the others
            result.status, result.error = "error", one_line(error, case.source)
            failure = error
        except Interrupted as stop:
            result.status, result.error = "interrupted", f"{case.source}: {stop}"
            stop.result = result
            raise
        finally:
            result.seconds = round(time.perf_counter() - self.started, 3)
            if result.status != "ok" and not case.keep_target:
                remove_stale(case.target, self.probability_target)
        headers = self.reading.headers
        if headers and not case.keep_target and not isinstance(failure, WriteError):
            write_empty_mask(headers[0], case.target, result)  # a failed write would fail again
        return None

    def written(self, volume_mm3: float) -> None:
        self.entry.vessel_volume_mm3, self.entry.output = volume_mm3, str(self.case.target)
        if self.probability_target is not None:
            self.entry.probability = str(self.probability_target)

    def result(self) -> CaseResult:
        """The entry, once the background writes are done (a stop signal may end the wait:
        call again to finish it)."""
        if self.writing is not None:
            wait([self.writing])
            writing, self.writing = self.writing, None
            self.attempt(lambda: self.written(writing.result()))
        return self.entry


def run_case(
    predictor: Predictor,
    case: Case,
    probability_target: Path | None = None,
    pacer: Pacer | None = None,
    reading: Reading | None = None,
    writer: Executor | None = None,
) -> Finishing:
    """:func:`segment_file` with the outcome as a report entry (:class:`Finishing`); never
    raises for a bad case. The outputs are cleaned and written here, or by ``writer``."""
    backend = predictor.backend
    result = CaseResult(str(case.source), None, "ok", None, 0.0, backend.device, backend.name)
    result.interface = case.interface
    reading = reading or Reading(predictor, case.source)
    finishing = Finishing(result, case, probability_target, reading)
    pacer = pacer or Pacer(predictor)

    def predict() -> tuple[np.ndarray, Geometry]:
        if case.refusal:
            raise InputError(case.refusal)
        return predict_file(predictor, case.source, pacer, result, reading)

    predicted = finishing.attempt(predict)
    if predicted is None:
        return finishing
    write = functools.partial(write_outputs, predictor, *predicted, case.target, probability_target)
    del predicted  # the writer holds the probability map only until it is written
    if writer is None:
        finishing.attempt(lambda: finishing.written(write()))
    else:
        finishing.writing = writer.submit(write)
    return finishing


def write_empty_mask(geometry: Geometry, target: Path, result: CaseResult) -> None:
    """An all-zero uint8 mask with ``geometry`` at ``target``, recorded in ``result`` (which
    stays ``error``); a write that fails is a warning line."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_image_atomically(geometry.image_from(np.zeros(geometry.shape, np.uint8)), target)
    except (OSError, WriteError) as error:
        print(f"warning: {target}: no empty mask written ({error})", file=sys.stderr)
        return
    result.output, result.empty_mask = str(target), True


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
