"""Preprocessing shared by training and inference: reading, resampling, intensity normalisation.

One code path for both, so that inference never guesses what training did; the parameters live
in the weights manifest (``target_spacing``, ``normalization``). Arrays are numpy ``(z, y, x)``;
SimpleITK speaks ``(x, y, z)``, and the conversion happens here only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.file_checks import (
    InputError,
    check_payload,
    check_raw_header,
    itk_name,
    regular_file,
)

SPACING_TOLERANCE = 0.01  # relative: closer spacings are not worth an interpolation
DEFAULT_NORMALIZATION = {
    "scheme": "percentile",
    "lower_percentile": 50.0,
    "upper_percentile": 99.99,
    "upper_bound_percentile": 99.5,
    "upper_bound_factor": 3.0,
    "upper_clip": 4.0,
    "exclude_fill": True,
    "exclude_air": True,
}
LEGACY_NORMALIZATION = {
    "scheme": "percentile",
    "lower_percentile": 50.0,
    "upper_percentile": 99.5,
    "exclude_fill": True,
    "exclude_air": True,
}
"""The default before the upper anchor was bounded: what older manifests and training states
without their own settings were normalised with."""
LEGACY_UPPER_CLIP = 1.0
"""``upper_clip`` of settings older than the key."""
AIR_VALLEY = 0.1
"""Air is set apart from tissue when the histogram between their two peaks falls below this
share of the smaller peak. Air and soft tissue lie about 1000 HU apart and meet only at the
skin, a surface one voxel thick, so the valley between them is nearly empty (0.000-0.055 of
the smaller peak on the study's phantoms); tissue shades into bone through marrow, cortex and
partial volume (0.135-1.0)."""
MIN_TISSUE_SHARE = 0.2
"""Air is set apart only when at least this share of the field of view remains: tissue fills
most of a head (the study's air cases keep 27-98 %), while vessels (1-4 %) are a class of their
own with an empty valley below them where the image holds little else, as in a low-noise
volume of tissue and contrast only."""
HISTOGRAM_BINS = 256
# Bounds checked on the header, before any voxel is read: a 2^29-voxel input (1024x1024x512)
# already needs 2 GB as float32 beside its stored copy; spacings outside [1 um, 10 cm] are a
# broken header (NIfTI's pixdim 0 or 1e-30), whose resampling would have no meaning.
MAX_INPUT_VOXELS = 2**29
MAX_INPUT_BYTES = 2**32
SPACING_RANGE_MM = (1e-3, 100.0)
COMPLEX = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a volume lie; everything in numpy order (z, y, x)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # x, y, z as in the file (physical point of voxel 0)
    direction: tuple[float, ...]  # 9 values, row-major, as SimpleITK gives them

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader) -> Geometry:
        """The geometry of an image, or of a reader's header (its first three axes)."""
        size, spacing = image.GetSize()[:3], image.GetSpacing()[:3]
        dimension = len(image.GetSize())
        direction = np.reshape(image.GetDirection(), (dimension, dimension))[:3, :3]
        return cls(
            shape=tuple(int(n) for n in reversed(size)),
            spacing=tuple(float(s) for s in reversed(spacing)),
            origin=tuple(float(o) for o in image.GetOrigin()[:3]),
            direction=tuple(float(d) for d in direction.ravel()),
        )

    def image_from(self, array: np.ndarray) -> sitk.Image:
        """A SimpleITK image of ``array`` carrying this geometry."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} differs from the geometry's {self.shape}")
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(reversed(self.spacing)))
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def read_image(
    path: str | Path, check_geometry: Callable[[Geometry], None] | None = None
) -> tuple[np.ndarray, Geometry]:
    """Read a 3D single-channel volume as float32 ``(z, y, x)`` with its geometry.

    Raises :class:`InputError` with one line naming the file for anything that is not a
    finite, non-constant, single-channel 3D volume read completely from its own file. The
    header is checked first (:func:`check_header`, then ``check_geometry``, e.g. the model's
    bounds), so that no voxel of an absurd or hostile header is ever allocated.
    """
    path = Path(path)
    regular_file(path)
    fields, header_length = check_raw_header(path)
    with itk_name(path) as name:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        _, failure = itk_call(path, reader.ReadImageInformation)
        if failure is not None:
            raise failure
        geometry, payload = check_header(path, reader)
        if check_geometry is not None:
            check_geometry(geometry)
        with ThreadPoolExecutor(max_workers=1) as pool:
            # Beside ITK's reader, not before it: both inflate without holding the GIL.
            complete = pool.submit(check_payload, path, payload, fields, header_length)
            image, failure = itk_call(path, reader.Execute)
            complete.result()  # a short payload is the error to report, whatever ITK did
    if failure is not None:
        raise failure
    if image.GetDimension() == 4:
        image = image[:, :, :, 0]
    stored = sitk.GetArrayViewFromImage(image)
    check_voxels(path, stored)  # on the file's own type: 16-bit integers are half the bytes
    with np.errstate(over="ignore"):  # checked below
        array = stored.astype(np.float32)
    if np.issubdtype(stored.dtype, np.floating) and stored.dtype.itemsize > 4:
        check_finite(path, array)  # float64 beyond 3.4e38 overflows float32 to inf
    return array, Geometry.of(image)


def itk_call(path: Path, call: Callable) -> tuple[object, InputError | None]:
    """``call()``'s result, or ITK's multi-line exception as one :class:`InputError` line."""
    try:
        return call(), None
    except RuntimeError as error:
        lines = str(error).strip().splitlines()
        reason = lines[-1].strip()[:160] if lines else "unreadable"
        return None, InputError(f"{path}: not a readable image ({reason})")


def check_header(path: Path, reader: sitk.ImageFileReader) -> tuple[Geometry, int]:
    """The geometry and the voxel bytes a header announces, once they are a 3D single-channel
    real volume of sane spacing within :data:`MAX_INPUT_VOXELS` and :data:`MAX_INPUT_BYTES`."""
    size, pixel = reader.GetSize(), reader.GetPixelID()
    if pixel in COMPLEX:
        raise InputError(f"{path}: complex voxels ({sitk.GetPixelIDValueAsString(pixel)})")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(
            f"{path}: {reader.GetNumberOfComponents()} channels per voxel, "
            "expected a single-channel volume"
        )
    if len(size) not in (3, 4) or (len(size) == 4 and size[3] != 1):
        raise InputError(f"{path}: {len(size)}D image of size {size}, expected 3D")
    if min(size[:3]) < 2:
        raise InputError(f"{path}: size {size[:3]} is a single slice, expected a volume")
    geometry = Geometry.of(reader)
    low, high = SPACING_RANGE_MM
    if not all(low <= s <= high for s in geometry.spacing):  # also False for NaN
        raise InputError(
            f"{path}: spacing {reader.GetSpacing()[:3]} mm in the header: each must lie in "
            f"[{low:g}, {high:g}] mm"
        )
    direction = np.reshape(geometry.direction, (3, 3))
    finite = np.isfinite(geometry.origin).all() and np.isfinite(direction).all()
    if not finite or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(f"{path}: origin or direction in the header is not finite or singular")
    voxels = math.prod(size)
    payload = voxels * sitk.Image([1] * 3, pixel).GetSizeOfPixelComponent()
    if voxels > MAX_INPUT_VOXELS or payload > MAX_INPUT_BYTES:
        raise InputError(
            f"{path}: {size[:3]} voxels ({payload / 2**30:.1f} GiB) exceed the supported "
            f"{MAX_INPUT_VOXELS:,} voxels or {MAX_INPUT_BYTES / 2**30:g} GiB"
        )
    return geometry, payload


def check_voxels(path: str | Path, array: np.ndarray) -> None:
    if min(array.shape) < 2:
        raise InputError(f"{path}: size {array.shape[::-1]} is a single slice, expected a volume")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"{path}: {int((~np.isfinite(array)).sum())} voxels are NaN or infinite")
    if array.min() == array.max():
        raise InputError(f"{path}: constant volume (every voxel is {array.flat[0]:g})")


def check_finite(path: str | Path, array: np.ndarray) -> None:
    """Refuse float32 voxels that are not finite after the conversion (overflow to inf)."""
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputError(
            f"{path}: {bad} voxels are NaN or infinite as float32 (values beyond +-3.4e38)"
        )


def needs_resampling(spacing, target_spacing) -> bool:
    spacing, target = np.asarray(spacing, float), np.asarray(target_spacing, float)
    return bool(np.any(np.abs(spacing - target) > SPACING_TOLERANCE * target))


def resampled_shape(shape, spacing, target_spacing) -> tuple[int, int, int]:
    """Voxels covering the same extent at ``target_spacing``."""
    extent = np.asarray(shape) * np.asarray(spacing, float)
    return tuple(int(max(round(e), 1)) for e in extent / np.asarray(target_spacing, float))


def resample(
    array: np.ndarray, spacing, target_spacing, shape=None, interpolator=sitk.sitkLinear
) -> np.ndarray:
    """Resample ``array`` from ``spacing`` to ``target_spacing`` with the extents aligned.

    Both grids cover the same physical box (voxel corners aligned, as nnU-Net and
    ``skimage.transform.resize`` do); ``shape`` forces the output size (the way back to an
    input grid whose extent was rounded on the way in).
    """
    shape = shape or resampled_shape(array.shape, spacing, target_spacing)
    source = sitk.GetImageFromArray(array)
    source.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    target_spacing_xyz = [n_in * s / n_out for n_in, s, n_out in zip(array.shape, spacing, shape)][
        ::-1
    ]
    origin = [(t - s) / 2 for t, s in zip(target_spacing_xyz, reversed(spacing))]
    output = sitk.Resample(
        source,
        [int(n) for n in reversed(shape)],
        sitk.Transform(),
        interpolator,
        origin,
        target_spacing_xyz,
        source.GetDirection(),
        0.0,
        source.GetPixelID(),
    )
    return sitk.GetArrayFromImage(output)


def to_model_grid(array: np.ndarray, geometry: Geometry, target_spacing) -> np.ndarray:
    """The volume on the model's grid; unchanged when its spacing already matches."""
    if not needs_resampling(geometry.spacing, target_spacing):
        return array
    return resample(array, geometry.spacing, target_spacing)


def to_input_grid(array: np.ndarray, geometry: Geometry, target_spacing) -> np.ndarray:
    """Inverse of :func:`to_model_grid` for a probability map (linear interpolation)."""
    if not needs_resampling(geometry.spacing, target_spacing):
        return array
    return resample(array, target_spacing, geometry.spacing, shape=geometry.shape)


def normalize(array: np.ndarray, parameters: dict | None = None) -> np.ndarray:
    """Map the case's ``[p_lower, p_upper]`` intensity percentiles to ``[0, 1]``, clipped to
    ``[0, upper_clip]``.

    Per-case percentile scaling needs no statistics shared between sites (each hospital's
    scanner calibration differs) and is robust to the few very bright voxels of bone and
    metal. The default lower anchor is the median, soft tissue, which fills most of a head's
    3DRA volume: the 0.5th percentile instead landed on whatever air or field-of-view edge a
    case held and moved soft tissue between 0.03 and 0.48 from case to case. Everything darker
    than tissue (air, fat) becomes 0; vessels and bone keep the range above it.

    The upper anchor must not depend on which structure is the brightest. At the 99.5th
    percentile it lay on bone in a volume with much bone but inside the vessels where opacified
    arteries outshine everything, as in intra-arterial 3DRA: their cores were flattened at 1
    and their rims lifted to where training had only seen vessels, and masks came out a voxel
    too wide. The default anchor is the 99.99th percentile, the vessels' or bone's brightest
    voxels alike, but no further above the median than ``upper_bound_factor`` (3) times the
    99.5th percentile: a coil pack or clip, up to a few tenths of a per cent of the volume,
    would otherwise become the anchor and push the vessels to the bottom of the range.
    ``upper_clip`` (4; 1 in manifests older than the key) bounds what lies above the anchor.
    Manifests without the bound keys keep the 99.5th percentile alone.

    With ``exclude_fill`` the percentiles ignore the voxels at the volume's minimum: a C-arm
    reconstructs a cylinder and fills the rest with one constant (-1024 HU), a third of a
    small field of view. With ``exclude_air`` they also ignore air (:func:`without_air`): a
    field of view reaching past the skin can hold more air than tissue, and the median then
    lies in the air. Percentiles are taken on every second voxel along each axis: the same to
    within noise, eight times faster on a 512x512x400 volume.
    """
    parameters = parameters or DEFAULT_NORMALIZATION
    low, high = intensity_anchors(array, parameters)
    clip = parameters.get("upper_clip", LEGACY_UPPER_CLIP)
    top = high if clip == LEGACY_UPPER_CLIP else low + clip * (high - low)  # as before the key
    scaled = np.clip(array, low, top, dtype=np.float32)
    scaled -= np.float32(low)
    scaled *= np.float32(1.0 / (high - low))
    return scaled


def normalization_differences(a: dict, b: dict) -> dict[str, tuple]:
    """The settings in which ``a`` and ``b`` differ, as ``{key: (a's, b's)}`` (None where one
    lacks the key; ``upper_clip`` read as :func:`normalize` reads it): empty when both give
    the same voxels."""
    a, b = ({"upper_clip": LEGACY_UPPER_CLIP, **x} for x in (a, b))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def intensity_anchors(array: np.ndarray, parameters: dict) -> tuple[float, float]:
    """The intensities :func:`normalize` maps to 0 and 1."""
    if parameters.get("scheme") != "percentile":
        raise ValueError(f"unknown normalization scheme {parameters.get('scheme')!r}")
    sample = array[::2, ::2, ::2]
    if parameters.get("exclude_fill", False):
        inside = sample[sample > sample.min()]
        sample = inside if inside.size else sample
    if parameters.get("exclude_air", False):
        sample = without_air(sample.ravel())
    percentiles = [parameters["lower_percentile"], parameters["upper_percentile"]]
    if "upper_bound_percentile" in parameters:
        percentiles.append(parameters["upper_bound_percentile"])
    low, high, *bound = (float(v) for v in np.percentile(sample, percentiles))
    if bound:
        high = min(high, low + parameters["upper_bound_factor"] * (bound[0] - low))
    return low, high if high > low else low + 1.0


def without_air(values: np.ndarray) -> np.ndarray:
    """``values`` without the dark class of Otsu's split when that class is air.

    Otsu's threshold on the histogram (between the 0.5th and 99.5th percentiles, smoothed over
    9 of 256 bins) splits either air from tissue or, without air, tissue from bone and
    vessels. The two differ in what lies between the classes' peaks: next to nothing between
    air and tissue (see :data:`AIR_VALLEY`), a continuum between tissue and bone. Only an
    empty valley removes anything, and only what lies below its emptiest bin (where Otsu
    splits air and tissue together from bone, the valley still lies between air and tissue),
    and only when :data:`MIN_TISSUE_SHARE` of the values remains (else the dark class is the
    tissue under a few bright vessels).
    """
    low, high = np.percentile(values, [0.5, 99.5])
    if high <= low:
        return values
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(low, high))
    counts = np.convolve(counts, np.ones(9) / 9, mode="same")
    split = otsu_split(counts)
    dark_peak = int(counts[:split].argmax())
    bright_peak = split + int(counts[split:].argmax())
    valley = dark_peak + int(counts[dark_peak : bright_peak + 1].argmin())
    if counts[valley] >= AIR_VALLEY * min(counts[dark_peak], counts[bright_peak]):
        return values
    kept = values[values >= edges[valley]]
    return kept if kept.size >= MIN_TISSUE_SHARE * values.size else values


def otsu_split(counts: np.ndarray) -> int:
    """The bin index ``k`` that splits a histogram into ``[:k]`` and ``[k:]`` with the largest
    between-class variance (Otsu 1979, IEEE Trans SMC 9:62)."""
    bins = np.arange(counts.size, dtype=np.float64)
    weight_dark = np.cumsum(counts)[:-1]
    weight_bright = counts.sum() - weight_dark
    moment_dark = np.cumsum(counts * bins)[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_dark = moment_dark / weight_dark
        mean_bright = (np.dot(counts, bins) - moment_dark) / weight_bright
        between = weight_dark * weight_bright * (mean_dark - mean_bright) ** 2
    return int(np.nanargmax(between)) + 1


def preprocess(array: np.ndarray, geometry: Geometry, manifest_like) -> np.ndarray:
    """Raw volume -> network input on the model's grid (``manifest_like`` has
    ``target_spacing`` and ``normalization``)."""
    resampled = to_model_grid(array, geometry, manifest_like.target_spacing)
    return normalize(resampled, manifest_like.normalization)
