"""Random training patches, biased towards vessels, with spatial and intensity augmentation.

An epoch draws ``patches_per_case`` patches from every training case (the paper's "10
random patches" per epoch), in random order, grouped into batches. A patch is centred on a
randomly chosen vessel voxel with probability ``foreground_fraction`` (nnU-Net's
``oversample_foreground_percent = 0.33``: vessels fill about 1% of a 3DRA volume, so uniform
patches would mostly show background), and placed uniformly otherwise. Volumes smaller than
a patch are padded with 0 (the normalised low percentile) and background. Only labelled
vessel voxels are centres (``case.foreground``): never the ignore label's voxels, which a
patch of a partially labelled case carries as :data:`IGNORE_TARGET` in its target.

Augmentation follows nnU-Net's default probabilities (Isensee et al. 2021, Nat Methods 18:203):
spatially, flips, right-angle rotations and, with p 0.2, a zoom by 0.7-1.4 (vessel calibres
the data may not hold); in intensity, Gaussian noise, Gaussian blur, brightness, contrast and
gamma, so that the network cannot rely on one scanner's look (see phantoms.randomised).

Every patch has its own random generator, seeded from the epoch's generator together with the
epoch's order (:func:`epoch_plan`), so that a batch is the same whoever makes it. With
``workers`` > 0, :class:`BackgroundBatches` cuts and augments patches in worker processes while
the network trains: worker ``w`` makes batches ``w, w + W, w + 2W, ...`` into its own ring of
``depth`` slots of shared memory (the bounded queue) and the training loop takes them in order,
so the batches, and therefore the training, do not depend on the number of workers. A worker
that fails, dies (an exception, a signal, the kernel's out-of-memory killer) or makes no batch
for ``STALL_SECONDS`` ends the epoch with a :class:`LoaderError` that names it, its batch and
its traceback or exit status.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.backend_base import available_cpus
from inference.preprocessing import DEFAULT_NORMALIZATION
from train.data import CachedCase, Case

IGNORE_TARGET = 2
"""Target value of the ignore label's voxels in a patch (nnU-Net's ignore is the highest
label); :func:`train.loss.vessel_loss` skips it, nothing else reads it as vessel."""

LOADER_WORKERS_ENV = "VESSEL_SEG_LOADER_WORKERS"
STALL_SECONDS = 600.0  # a batch takes under a second: a worker this slow is stuck


def patch_origin(
    shape: tuple[int, ...],
    patch: tuple[int, ...],
    rng: np.random.Generator,
    centre: tuple[int, ...] | None = None,
) -> tuple[int, ...]:
    """Corner of a patch: uniform over the volume, or centred on ``centre`` and kept inside.

    Where the volume is smaller than the patch the origin is negative (centred padding).
    """
    origin = []
    for axis, (size, length) in enumerate(zip(shape, patch)):
        if size <= length:
            origin.append((size - length) // 2)
        elif centre is None:
            origin.append(int(rng.integers(0, size - length + 1)))
        else:
            origin.append(int(np.clip(centre[axis] - length // 2, 0, size - length)))
    return tuple(origin)


def crop(volume: np.ndarray, origin: tuple[int, ...], patch: tuple[int, ...]) -> np.ndarray:
    """``volume[origin : origin + patch]`` with zero padding outside the volume."""
    inside = tuple(slice(max(o, 0), min(o + p, s)) for o, p, s in zip(origin, patch, volume.shape))
    region = volume[inside]
    if region.shape == tuple(patch):
        return region
    before = [max(-o, 0) for o in origin]
    padding = [(b, p - b - r) for b, p, r in zip(before, patch, region.shape)]
    return np.pad(region, padding)


ZOOM_PROBABILITY, ZOOM_RANGE = 0.2, (0.7, 1.4)
LEVEL_GAIN_PROBABILITY, LEVEL_MAX_GAIN = 0.5, 3.0
LEVEL_FLOOR_PROBABILITY, LEVEL_MAX_FLOOR = 0.2, 0.5


def sample_patch(
    case: Case | CachedCase,
    patch: tuple[int, ...],
    rng: np.random.Generator,
    foreground_fraction: float,
    zoom: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image, label)`` patch of ``case`` (see module docstring).

    The label is bool; for a case with ignore-label voxels it is uint8 with the vessels 1
    and the ignored voxels :data:`IGNORE_TARGET`. With ``zoom`` != 1 a region of
    ``zoom * patch`` voxels is cut and resampled to ``patch`` (image linearly, label and
    ignore mask each by linear interpolation and a 0.5 threshold).
    """
    centre = None
    if case.foreground.size and rng.random() < foreground_fraction:
        index = case.foreground[rng.integers(case.foreground.size)]
        centre = np.unravel_index(index, case.shape)
    region = tuple(max(1, round(p * zoom)) for p in patch)
    origin = patch_origin(case.shape, region, rng, centre)
    # np.array: a patch of a memory-mapped case owns its voxels, and the map is let go.
    image = np.array(crop(case.image, origin, region), dtype=np.float32)
    label = np.array(crop(case.label, origin, region), dtype=bool)
    ignore = case.ignore
    if ignore is not None:
        ignore = np.array(crop(ignore, origin, region), dtype=bool)
    if region != tuple(patch):
        factors = [p / r for p, r in zip(patch, region)]
        image = ndimage.zoom(
            image, factors, order=1, output=np.float32, grid_mode=True, mode="nearest"
        )
        label = zoom_mask(label, factors)
        ignore = None if ignore is None else zoom_mask(ignore, factors)
    return image, label if ignore is None else with_ignore(label, ignore)


def zoom_mask(mask: np.ndarray, factors: list[float]) -> np.ndarray:
    """A bool mask resampled by linear interpolation and a 0.5 threshold."""
    zoomed = ndimage.zoom(mask.astype(np.float32), factors, order=1, grid_mode=True, mode="nearest")
    return zoomed >= 0.5


def with_ignore(label: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    """uint8 target: vessel 1, background 0, the ignore label's voxels :data:`IGNORE_TARGET`
    (which wins where a resampled vessel voxel overlaps it)."""
    target = label.astype(np.uint8)
    target[ignore] = IGNORE_TARGET
    return target


def augment_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """nnU-Net's intensity transforms on a normalised patch, each with its probability:
    noise (0.1, variance 0-0.1), blur (0.2, sigma 0.5-1 voxel), brightness (0.15, x0.75-1.25),
    contrast (0.15, about the mean, x0.75-1.25), gamma (0.3, 0.7-1.5 on the patch's range;
    inverted with p 0.1)."""
    image = np.array(image, dtype=np.float32)
    if rng.random() < 0.1:
        image += rng.normal(0, np.sqrt(rng.uniform(0, 0.1)), image.shape).astype(np.float32)
    if rng.random() < 0.2:
        ndimage.gaussian_filter(image, rng.uniform(0.5, 1.0), output=image)
    if rng.random() < 0.15:
        image *= np.float32(rng.uniform(0.75, 1.25))
    if rng.random() < 0.15:
        mean = image.mean()
        image = (image - mean) * np.float32(rng.uniform(0.75, 1.25)) + mean
    if rng.random() < 0.3:
        sign = -1.0 if rng.random() < 0.1 else 1.0
        signed = image * np.float32(sign)
        low, span = signed.min(), max(float(np.ptp(signed)), 1e-6)
        gamma = rng.uniform(0.7, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 1.5)
        image = (((signed - low) / span) ** np.float32(gamma) * span + low) * np.float32(sign)
    return image.astype(np.float32, copy=False)


def augment_levels(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where tissue and vessels land after the per-case normalisation, as other volumes put them.

    The upper anchor lies on bone in a volume with much bone, but in the vessels where they
    are the brightest structure, so vessels land anywhere between barely above tissue and the
    top of the range. The lower anchor (median) lies on tissue unless air fills most of the
    field of view, which lifts tissue towards the middle. With probability
    :data:`LEVEL_GAIN_PROBABILITY` the patch is scaled by a gain of 1-3 (log-uniform) and
    clipped where the normalisation clips (its ``upper_clip``); with
    :data:`LEVEL_FLOOR_PROBABILITY` it is lifted onto a floor of 0-0.5. A network trained so
    finds a vessel's edge relative to its own contrast, not at a fixed level.
    """
    image = np.array(image, dtype=np.float32)
    if rng.random() < LEVEL_GAIN_PROBABILITY:
        image *= np.float32(np.exp(rng.uniform(0.0, np.log(LEVEL_MAX_GAIN))))
        np.minimum(image, DEFAULT_NORMALIZATION["upper_clip"], out=image)
    if rng.random() < LEVEL_FLOOR_PROBABILITY:
        floor = np.float32(rng.uniform(0.0, LEVEL_MAX_FLOOR))
        image = floor + (1 - floor) * image
    return image


def augment(
    image: np.ndarray, label: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random flips along each axis and a random right-angle rotation (cubic patches only).

    Vessels run in every direction and 3DRA volumes are isotropic, so these symmetries
    create plausible anatomy without interpolation.
    """
    for axis in range(3):
        if rng.random() < 0.5:
            image, label = np.flip(image, axis), np.flip(label, axis)
    if len(set(image.shape)) == 1:
        k = int(rng.integers(4))
        plane = [(0, 1), (0, 2), (1, 2)][int(rng.integers(3))]
        image, label = np.rot90(image, k, plane), np.rot90(label, k, plane)
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


@dataclass(frozen=True)
class PatchSettings:
    """How the patches of an epoch are cut and augmented."""

    patch: tuple[int, int, int]
    foreground_fraction: float
    augmentation: bool  # flips, rotations and zoom
    intensity_augmentation: bool  # see augment_intensity
    level_augmentation: bool = False  # see augment_levels


def epoch_plan(
    num_cases: int, patches_per_case: int, batch_size: int, rng: np.random.Generator
) -> list[list[tuple[int, int]]]:
    """The epoch's batches as ``(case index, patch seed)`` pairs: ``patches_per_case``
    patches of every case in random order, each with its own seed drawn from ``rng``."""
    order = rng.permutation(np.repeat(np.arange(num_cases), patches_per_case))
    seeds = rng.integers(0, 2**63 - 1, size=order.size, dtype=np.int64)
    pairs = list(zip(order.tolist(), seeds.tolist()))
    return [pairs[start : start + batch_size] for start in range(0, len(pairs), batch_size)]


def make_patch(
    case: Case | CachedCase, seed: int, settings: PatchSettings
) -> tuple[np.ndarray, np.ndarray]:
    """One patch of ``case`` and its augmentation, everything drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    zoom = 1.0
    if settings.augmentation and rng.random() < ZOOM_PROBABILITY:
        zoom = rng.uniform(*ZOOM_RANGE)
    image, label = sample_patch(case, settings.patch, rng, settings.foreground_fraction, zoom)
    if settings.augmentation:
        image, label = augment(image, label, rng)
    if settings.intensity_augmentation:
        image = augment_intensity(image, rng)
    if settings.level_augmentation:
        image = augment_levels(image, rng)
    return image, label


def fill_batch(
    cases: list,
    items: list[tuple[int, int]],
    settings: PatchSettings,
    images: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Write the patches ``items`` into ``images`` ``(N, 1, Z, Y, X)`` and ``labels``
    ``(N, Z, Y, X)``, both float32."""
    for row, (index, seed) in enumerate(items):
        image, label = make_patch(cases[index], seed, settings)
        images[row, 0] = image
        labels[row] = label


def make_batch(
    cases: list, items: list[tuple[int, int]], settings: PatchSettings
) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(items), 1, *settings.patch), np.float32)
    labels = np.empty((len(items), *settings.patch), np.float32)
    fill_batch(cases, items, settings, images, labels)
    return images, labels


class LoaderError(RuntimeError):
    """A background patch worker failed or died; the message says which, where and why."""


class Batches:
    """An epoch's batches made here, one at a time, as the training loop asks for them."""

    def __init__(self, cases: list, plan: list, settings: PatchSettings):
        self.cases, self.plan, self.settings = cases, plan, settings

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for items in self.plan:
            yield make_batch(self.cases, items, self.settings)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def loader_workers() -> int:
    """Background patch workers per site: ``$VESSEL_SEG_LOADER_WORKERS``, else half the CPUs
    this process may use, its cgroup quota included (at most 4, at least 1)."""
    value = os.environ.get(LOADER_WORKERS_ENV, "").strip()
    if value:
        try:
            workers = int(value)
        except ValueError:
            raise ValueError(f"{LOADER_WORKERS_ENV}={value!r} is not a number of workers") from None
        if workers < 0:
            raise ValueError(f"{LOADER_WORKERS_ENV} must be 0 (no workers) or more")
        return workers
    return max(1, min(4, available_cpus() // 2))


def _worker(
    worker: int,
    workers: int,
    depth: int,
    cases: list,
    plan: list,
    settings: PatchSettings,
    buffer,
    slot_floats: int,
    free,
    stop,
    sender,
    parent: int,
) -> None:
    """Make batches ``worker, worker + workers, ...`` into this worker's ring of slots."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the training loop handles Ctrl-C
    batch_size, patch_voxels = len(plan[0]), int(np.prod(settings.patch))
    index = worker
    try:
        for turn, index in enumerate(range(worker, len(plan), workers)):
            while not free.acquire(timeout=1.0):
                if os.getppid() != parent:  # the training process is gone
                    return
            if stop.is_set():  # the training loop is closing the loader
                return
            start = (worker * depth + turn % depth) * slot_floats
            slot = np.frombuffer(buffer, np.float32, slot_floats, start * 4)
            images = slot[: batch_size * patch_voxels].reshape(batch_size, 1, *settings.patch)
            labels = slot[batch_size * patch_voxels :].reshape(batch_size, *settings.patch)
            items = plan[index]
            fill_batch(cases, items, settings, images[: len(items)], labels[: len(items)])
            sender.send(("batch", index))
    except BaseException:
        sender.send(("error", index, traceback.format_exc()))
    finally:
        sender.close()


class BackgroundBatches(Batches):
    """An epoch's batches made ahead by ``workers`` processes (see module docstring).

    At most ``depth`` batches per worker wait in shared memory. A batch's arrays are views of
    its slot: valid until the next batch is asked for (``copy=True`` hands out copies).
    """

    def __init__(
        self,
        cases: list,
        plan: list,
        settings: PatchSettings,
        workers: int,
        depth: int = 2,
        copy: bool = False,
    ):
        super().__init__(cases, plan, settings)
        self.workers, self.depth, self.copy = max(1, min(workers, len(plan))), depth, copy
        batch_size = len(plan[0]) if plan else 1
        self.slot_floats = 2 * batch_size * int(np.prod(settings.patch))
        methods = multiprocessing.get_all_start_methods()
        # fork: the cases (memory maps, or arrays in memory) need no pickling, and a worker
        # starts in milliseconds; the workers use numpy and scipy only, never torch or CUDA.
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.context, self.stop = context, context.Event()
        self.processes, self.receivers, self.free = [], [], []
        self.buffer, self.started = None, False

    def _start(self) -> None:
        context, workers = self.context, self.workers
        self.buffer = context.RawArray(ctypes.c_float, workers * self.depth * self.slot_floats)
        for worker in range(workers):
            receiver, sender = context.Pipe(duplex=False)
            free = context.Semaphore(self.depth)
            process = context.Process(
                target=_worker,
                name=f"patch-worker-{worker}",
                daemon=True,
                args=(
                    worker,
                    workers,
                    self.depth,
                    self.cases,
                    self.plan,
                    self.settings,
                    self.buffer,
                    self.slot_floats,
                    free,
                    self.stop,
                    sender,
                    os.getpid(),
                ),
            )
            process.start()
            sender.close()  # the worker holds the only sending end: its death reads as EOF
            self.processes.append(process)
            self.receivers.append(receiver)
            self.free.append(free)
        self.started = True

    def _receive(self, index: int) -> None:
        """Wait for batch ``index`` from its worker; a failure or death is a LoaderError."""
        worker = index % self.workers
        process, receiver = self.processes[worker], self.receivers[worker]
        waited = 0.0
        while not receiver.poll(1.0):  # a message, or the end of file of a dead worker
            waited += 1.0
            if waited >= STALL_SECONDS:
                raise LoaderError(
                    f"patch worker {worker} (pid {process.pid}) made no batch in "
                    f"{STALL_SECONDS:.0f} s (batch {index} of {len(self.plan)})"
                )
        try:
            message = receiver.recv()
        except EOFError:
            process.join(5)
            raise LoaderError(
                f"patch worker {worker} (pid {process.pid}) died before batch {index} of "
                f"{len(self.plan)}: {describe_exit(process.exitcode)}"
            ) from None
        if message[0] == "error":
            raise LoaderError(
                f"patch worker {worker} failed on batch {message[1]} of {len(self.plan)}:\n"
                f"{message[2]}"
            )
        if message[1] != index:
            raise LoaderError(f"patch worker {worker} made batch {message[1]}, not {index}")

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if not self.plan:
            return
        if not self.started:
            self._start()
        batch_size = len(self.plan[0])
        voxels = batch_size * int(np.prod(self.settings.patch))
        try:
            for index, items in enumerate(self.plan):
                self._receive(index)
                worker, turn = index % self.workers, index // self.workers
                start = (worker * self.depth + turn % self.depth) * self.slot_floats
                slot = np.frombuffer(self.buffer, np.float32, self.slot_floats, start * 4)
                images = slot[:voxels].reshape(batch_size, 1, *self.settings.patch)
                labels = slot[voxels:].reshape(batch_size, *self.settings.patch)
                images, labels = images[: len(items)], labels[: len(items)]
                if self.copy:
                    images, labels = images.copy(), labels.copy()
                yield images, labels
                self.free[worker].release()  # the training loop is done with the slot
        finally:
            self.close()

    def close(self) -> None:
        """Stop the workers (each within seconds) and release the shared memory."""
        if not self.started:
            return
        self.started = False
        self.stop.set()
        for free in self.free:
            for _ in range(self.depth):
                free.release()
        for process in self.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        for receiver in self.receivers:
            receiver.close()
        self.processes, self.receivers, self.free, self.buffer = [], [], [], None


def describe_exit(code: int | None) -> str:
    """A process's exit status in words (a negative code is the signal that ended it)."""
    if code is None:
        return "still running"
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exit status {code}"


def epoch_batches(
    cases: list,
    patch: tuple[int, ...],
    patches_per_case: int,
    batch_size: int,
    rng: np.random.Generator,
    foreground_fraction: float,
    augmentation: bool,
    intensity_augmentation: bool = False,
    level_augmentation: bool = False,
    workers: int = 0,
    copy: bool = True,
) -> Batches:
    """Batches ``(N, 1, Z, Y, X)`` float32 images and ``(N, Z, Y, X)`` float32 labels of one
    epoch, made here (``workers`` 0) or ahead by worker processes (:class:`BackgroundBatches`;
    with ``copy`` False each batch is valid until the next one is asked for).

    ``augmentation``: flips, rotations and zoom; ``intensity_augmentation``: see
    :func:`augment_intensity`; ``level_augmentation``: see :func:`augment_levels`. The last
    batch is smaller when the patch count is not a multiple of ``batch_size``. The epoch's plan
    is drawn from ``rng`` at once, here.
    """
    plan = epoch_plan(len(cases), patches_per_case, batch_size, rng)
    settings = PatchSettings(
        tuple(patch), foreground_fraction, augmentation, intensity_augmentation, level_augmentation
    )
    if workers > 0 and plan:
        return BackgroundBatches(cases, plan, settings, workers, copy=copy)
    return Batches(cases, plan, settings)
