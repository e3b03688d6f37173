"""Crash-safe checkpoints of the server: safetensors parameters and a JSON state, no pickle.

After every round the server writes, in ``RUN_DIR/fold<f>/``:

- ``global-r<round>.safetensors``: the global model after the round (fp32, as averaged);
- ``best-r<round>.safetensors``: the model of the best validation Dice so far;
- ``state.json``: the round, the best round and its metrics, the patience counter, the
  accumulated training seconds, the sites and the per-round history, naming both files.

Each file is written to a temporary name and renamed, and ``state.json`` is written last:
a crash at any point leaves the previous state and the files it names intact, and resuming
repeats at most the interrupted round. Because every round's randomness is seeded by
(seed, fold, round, site), the resumed run computes what the uninterrupted one would have.

A training process holds ``training.lock`` (an advisory ``flock``, released by the kernel
even when the process dies), so a second process cannot train the same fold at once. A file
``PAUSE`` in the folder stops the run after its current round, without export; the same
command resumes it. :func:`pause` asks for that and waits; :func:`compact` then halves the
parameter files to fp16 so that a paused run can be carried to another machine or committed
(resuming casts them back to fp32: a relative rounding of 5e-4, far below one optimiser step).
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from inference.preprocessing import (
    DEFAULT_NORMALIZATION,
    LEGACY_NORMALIZATION,
    normalization_differences,
)
from model.weights import write_atomically
from train.config import TrainConfig

STATE = "state.json"
LOCK = "training.lock"
PAUSE = "PAUSE"
PAUSED = "paused"  # the stop reason of a paused run
PAUSED_EXIT = 75  # the exit status of python -m train for a paused run (EX_TEMPFAIL)
FORMAT = "vessel-train-state/1"
# Settings that may differ when a run is resumed; any other difference is a different run.
RESUMABLE = {
    "num-rounds",
    "patience",
    "lr-drops",
    "round-timeout",
    "min-sites",
    "wait-for-sites",
    "out-dir",
    "run-dir",
    "sim-data-root",
    "val-overlap",
}


@dataclass
class RunState:
    """Where a fold's training stands; everything JSON."""

    config: dict
    round: int = 0
    best_round: int = 0
    best_dice: float = -1.0
    best_metrics: dict = field(default_factory=dict)
    rounds_without_improvement: int = 0
    lr_drops_done: int = 0  # plateaus after which training went on at a lower learning rate
    training_seconds: float = 0.0
    sites: dict = field(default_factory=dict)  # name -> what the site reported
    history: list = field(default_factory=list)
    global_file: str = ""
    best_file: str = ""
    stop_reason: str = ""
    # How the sites normalised the images the run trained on (states written before the field
    # existed normalised with the default of that time, which clipped at 1)
    normalization: dict = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))


def fold_dir(config: TrainConfig) -> Path:
    return Path(config.run_dir) / f"fold{config.fold}"


def contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    array = np.asarray(array)
    return array if array.flags.c_contiguous else array.copy(order="C")


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    data = save_safetensors({k: contiguous(v) for k, v in arrays.items()})
    write_atomically(path, data)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The parameters of a checkpoint file, floating ones in fp32 (compacted files are fp16)."""
    try:
        arrays = load_safetensors(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{path}: checkpoint named by {STATE} is missing") from None
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in arrays.items()}


def save_checkpoint(
    directory: Path,
    state: RunState,
    global_arrays: dict[str, np.ndarray],
    best_arrays: dict[str, np.ndarray] | None,
) -> None:
    """Write the round's parameters, then the state naming them, then drop older files."""
    state.global_file = f"global-r{state.round:04d}.safetensors"
    save_arrays(directory / state.global_file, global_arrays)
    if best_arrays is not None:
        state.best_file = f"best-r{state.best_round:04d}.safetensors"
        save_arrays(directory / state.best_file, best_arrays)
    write_state(directory, state)
    for stale in directory.glob("*-r*.safetensors"):
        if stale.name not in (state.global_file, state.best_file):
            stale.unlink(missing_ok=True)


def load_checkpoint(
    directory: Path, config: TrainConfig
) -> tuple[RunState, dict[str, np.ndarray], dict[str, np.ndarray] | None] | None:
    """The saved state and parameters of this run, or None when it has not started.

    Raises ValueError when the folder holds a run with a different configuration.
    """
    state = read_state(directory)
    if state is None:
        return None
    current = config.to_run_config()
    # A setting added after the run started takes its default, which is how the run behaved.
    saved = {**TrainConfig().to_run_config(), **state.config}
    differing = sorted(
        key
        for key in set(current) | set(saved)
        if key not in RESUMABLE and current.get(key) != saved.get(key)
    )
    if normalization_differences(state.normalization, DEFAULT_NORMALIZATION):
        differing.append("normalization")
    if differing:
        settings = {**saved, "normalization": state.normalization}
        now = {**current, "normalization": DEFAULT_NORMALIZATION}
        details = ", ".join(f"{k} {settings.get(k)!r} -> {now.get(k)!r}" for k in differing)
        raise ValueError(
            f"{directory}: holds a run with other settings ({details}); "
            "choose another run-dir or delete this one to start afresh"
        )
    state.config = current
    global_arrays = load_arrays(directory / state.global_file)
    best_arrays = load_arrays(directory / state.best_file) if state.best_file else None
    return state, global_arrays, best_arrays


def write_state(directory: Path, state: RunState) -> None:
    """``state.json``, atomically; :func:`read_state` reads it back."""
    state_bytes = json.dumps({"format": FORMAT, **asdict(state)}, indent=1).encode()
    write_atomically(directory / STATE, state_bytes)


def read_state(directory: Path) -> RunState | None:
    """The saved state of the run in ``directory``, None when it has not started."""
    path = directory / STATE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if data.pop("format", None) != FORMAT:
        raise ValueError(f"{path}: not a training state of format {FORMAT}")
    data.setdefault("normalization", LEGACY_NORMALIZATION)
    return RunState(**data)


@contextmanager
def training_lock(directory: Path) -> Iterator[None]:
    """Held while this process trains the fold of ``directory``; a second process fails."""
    with open(directory / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{directory}: another process is training this fold") from None
        yield


def is_training(directory: Path) -> bool:
    """Whether a process holds the training lock of ``directory`` now."""
    if not (directory / LOCK).is_file():
        return False
    try:
        with training_lock(directory):
            return False
    except ValueError:  # training_lock's refusal: another process holds it
        return True


def pause_requested(directory: Path) -> bool:
    """True once, when a ``PAUSE`` file asks the run to stop after this round."""
    try:
        (directory / PAUSE).unlink()
    except FileNotFoundError:
        return False
    return True


def pause(directory: Path) -> RunState | None:
    """Stop the fold training in ``directory`` after its current round and wait until it has;
    at once when nothing trains it. Returns its saved state (None when it never started)."""
    if not directory.is_dir():
        return None
    (directory / PAUSE).touch()
    with open(directory / LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the training process lets go
    (directory / PAUSE).unlink(missing_ok=True)
    return read_state(directory)


def compact(directory: Path) -> list[Path]:
    """Rewrite a paused run's parameter files in fp16; returns the files that hold the run."""
    state = pause(directory)
    if state is None:
        raise ValueError(f"{directory}: no checkpoint to compact")
    names = {state.global_file, state.best_file} - {""}
    for name in sorted(names):
        arrays = load_arrays(directory / name)
        half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in arrays.items()}
        save_arrays(directory / name, half)
    return [directory / STATE, *(directory / name for name in sorted(names))]
