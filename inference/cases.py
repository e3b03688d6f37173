"""One case from file to file: read, check, segment, write; failures become a report line."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from inference.io import write_image_atomically
from inference.predictor import Predictor
from inference.preprocessing import InputError, case_name, read_image


@dataclass
class CaseResult:
    """One entry of ``results.json``."""

    input: str
    output: str | None
    status: str  # "ok" or "error"
    error: str | None
    seconds: float
    device: str
    backend: str
    vessel_volume_mm3: float | None = None
    probability: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def one_line(error: BaseException, source: Path) -> str:
    """The error as one line naming the file (input errors already do)."""
    if isinstance(error, InputError):
        return str(error)
    text = " ".join(str(error).split()) or "no message"
    return f"{source}: {type(error).__name__}: {text[:300]}"


def segment_file(
    predictor: Predictor, source: Path, target: Path, probability_target: Path | None = None
) -> float:
    """Segment ``source`` into ``target`` (and its probability map into ``probability_target``);
    the vessel volume in mm^3. Raises on any failure, leaving no file behind."""
    array, geometry = read_image(source)
    predictor.check(geometry, source)
    volume = predictor.model_input(array, geometry)
    del array  # the raw volume is no longer needed: keep the peak memory down
    bar = tqdm(
        total=predictor.passes(geometry), desc=case_name(source), unit="pass", file=sys.stderr
    )
    with bar:
        probability = predictor.probability_of_input(volume, geometry, bar.update)
    del volume
    mask, volume_mm3 = predictor.mask_of(probability, geometry)
    if probability_target is not None:  # before the mask: a mask exists only on success
        probability_target.parent.mkdir(parents=True, exist_ok=True)
        write_image_atomically(geometry.image_from(probability), probability_target)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_image_atomically(geometry.image_from(mask), target)
    return volume_mm3


def run_case(
    predictor: Predictor, source: Path, target: Path, probability_target: Path | None = None
) -> CaseResult:
    """:func:`segment_file` with the outcome as a report entry; never raises for a bad case."""
    start = time.perf_counter()
    backend = predictor.backend
    result = CaseResult(str(source), None, "ok", None, 0.0, backend.device, backend.name)
    try:
        result.vessel_volume_mm3 = segment_file(predictor, source, target, probability_target)
        result.output = str(target)
        if probability_target is not None:
            result.probability = str(probability_target)
    except Exception as error:  # one bad case must not stop the others
        result.status, result.error = "error", one_line(error, source)
    result.seconds = round(time.perf_counter() - start, 3)
    return result
