"""Random training patches, biased towards vessels, with flips and right-angle rotations.

An epoch draws ``patches_per_case`` patches from every training case (the paper's "10
random patches" per epoch), in random order, grouped into batches. A patch is centred on a
randomly chosen vessel voxel with probability ``foreground_fraction`` (nnU-Net's
``oversample_foreground_percent = 0.33``: vessels fill about 1% of a 3DRA volume, so uniform
patches would mostly show background), and placed uniformly otherwise. Volumes smaller than
a patch are padded with 0 (the normalised low percentile) and background.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from train.data import Case


def patch_origin(
    shape: tuple[int, ...], patch: tuple[int, ...], rng: np.random.Generator,
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
    inside = tuple(
        slice(max(o, 0), min(o + p, s)) for o, p, s in zip(origin, patch, volume.shape)
    )
    region = volume[inside]
    if region.shape == tuple(patch):
        return region
    before = [max(-o, 0) for o in origin]
    padding = [(b, p - b - r) for b, p, r in zip(before, patch, region.shape)]
    return np.pad(region, padding)


def sample_patch(
    case: Case, patch: tuple[int, ...], rng: np.random.Generator, foreground_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image, label)`` patch of ``case`` (see module docstring)."""
    centre = None
    if case.foreground.size and rng.random() < foreground_fraction:
        index = case.foreground[rng.integers(case.foreground.size)]
        centre = np.unravel_index(index, case.label.shape)
    origin = patch_origin(case.image.shape, patch, rng, centre)
    return crop(case.image, origin, patch), crop(case.label, origin, patch)


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


def epoch_batches(
    cases: list[Case], patch: tuple[int, ...], patches_per_case: int, batch_size: int,
    rng: np.random.Generator, foreground_fraction: float, augmentation: bool,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``(N, 1, Z, Y, X)`` float32 images and ``(N, Z, Y, X)`` float32 labels of one epoch.

    The last batch is smaller when the patch count is not a multiple of ``batch_size``.
    """
    order = rng.permutation(np.repeat(np.arange(len(cases)), patches_per_case))
    for start in range(0, order.size, batch_size):
        images, labels = [], []
        for index in order[start : start + batch_size]:
            image, label = sample_patch(cases[index], patch, rng, foreground_fraction)
            if augmentation:
                image, label = augment(image, label, rng)
            images.append(image)
            labels.append(label)
        yield (
            np.stack(images)[:, None].astype(np.float32, copy=False),
            np.stack(labels).astype(np.float32),
        )
