"""Random training patches, biased towards vessels, with spatial and intensity augmentation.

An epoch draws ``patches_per_case`` patches from every training case (the paper's "10
random patches" per epoch), in random order, grouped into batches. A patch is centred on a
randomly chosen vessel voxel with probability ``foreground_fraction`` (nnU-Net's
``oversample_foreground_percent = 0.33``: vessels fill about 1% of a 3DRA volume, so uniform
patches would mostly show background), and placed uniformly otherwise. Volumes smaller than
a patch are padded with 0 (the normalised low percentile) and background.

Augmentation follows nnU-Net's default probabilities (Isensee et al. 2021, Nat Methods 18:203):
spatially, flips, right-angle rotations and, with p 0.2, a zoom by 0.7-1.4 (vessel calibres
the data may not hold); in intensity, Gaussian noise, Gaussian blur, brightness, contrast and
gamma, so that the network cannot rely on one scanner's look (see phantoms.randomised).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import ndimage

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


ZOOM_PROBABILITY, ZOOM_RANGE = 0.2, (0.7, 1.4)


def sample_patch(
    case: Case, patch: tuple[int, ...], rng: np.random.Generator, foreground_fraction: float,
    zoom: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image, label)`` patch of ``case`` (see module docstring).

    With ``zoom`` != 1 a region of ``zoom * patch`` voxels is cut and resampled to ``patch``
    (image linearly, label by linear interpolation and a 0.5 threshold).
    """
    centre = None
    if case.foreground.size and rng.random() < foreground_fraction:
        index = case.foreground[rng.integers(case.foreground.size)]
        centre = np.unravel_index(index, case.label.shape)
    region = tuple(max(1, round(p * zoom)) for p in patch)
    origin = patch_origin(case.image.shape, region, rng, centre)
    image, label = crop(case.image, origin, region), crop(case.label, origin, region)
    if region == tuple(patch):
        return image, label
    factors = [p / r for p, r in zip(patch, region)]
    image = ndimage.zoom(image, factors, order=1, output=np.float32, grid_mode=True,
                         mode="nearest")
    label = ndimage.zoom(label.astype(np.float32), factors, order=1, grid_mode=True,
                         mode="nearest") >= 0.5
    return image, label


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
    intensity_augmentation: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches ``(N, 1, Z, Y, X)`` float32 images and ``(N, Z, Y, X)`` float32 labels of one epoch.

    ``augmentation``: flips, rotations and zoom; ``intensity_augmentation``: see
    :func:`augment_intensity`. The last batch is smaller when the patch count is not a
    multiple of ``batch_size``.
    """
    order = rng.permutation(np.repeat(np.arange(len(cases)), patches_per_case))
    for start in range(0, order.size, batch_size):
        images, labels = [], []
        for index in order[start : start + batch_size]:
            zoom = 1.0
            if augmentation and rng.random() < ZOOM_PROBABILITY:
                zoom = rng.uniform(*ZOOM_RANGE)
            image, label = sample_patch(cases[index], patch, rng, foreground_fraction, zoom)
            if augmentation:
                image, label = augment(image, label, rng)
            if intensity_augmentation:
                image = augment_intensity(image, rng)
            images.append(image)
            labels.append(label)
        yield (
            np.stack(images)[:, None].astype(np.float32, copy=False),
            np.stack(labels).astype(np.float32),
        )
