"""Preprocessing shared by training and inference: reading, resampling, intensity normalisation.

One code path for both, so that inference never guesses what training did; the parameters live
in the weights manifest (``target_spacing``, ``normalization``). Arrays are numpy ``(z, y, x)``;
SimpleITK speaks ``(x, y, z)``, and the conversion happens here only.
"""

from __future__ import annotations

import gzip
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd")
SPACING_TOLERANCE = 0.01  # relative: closer spacings are not worth an interpolation
GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_NORMALIZATION = {
    "scheme": "percentile", "lower_percentile": 50.0, "upper_percentile": 99.5,
    "exclude_fill": True,
}


class InputError(ValueError):
    """An input volume that cannot be segmented; the message is one line naming the file."""


@dataclass(frozen=True)
class Geometry:
    """Where the voxels of a volume lie; everything in numpy order (z, y, x)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]  # x, y, z as in the file (physical point of voxel 0)
    direction: tuple[float, ...]  # 9 values, row-major, as SimpleITK gives them

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            shape=tuple(reversed(image.GetSize())),
            spacing=tuple(reversed(image.GetSpacing())),
            origin=tuple(image.GetOrigin()),
            direction=tuple(image.GetDirection()),
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


def case_name(path: str | Path) -> str:
    """File name without its image suffix (``CASE_0000.nii.gz`` -> ``CASE_0000``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def read_image(path: str | Path) -> tuple[np.ndarray, Geometry]:
    """Read a 3D single-channel volume as float32 ``(z, y, x)`` with its geometry.

    Raises :class:`InputError` with one line naming the file for anything that is not a
    finite, non-constant, single-channel 3D volume.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Beside ITK's reader, not before it: both inflate without holding the GIL, so the
        # check costs no time (it doubled the reading of a 512x512x400 volume).
        stream_check = pool.submit(check_gzip_stream, path)
        try:
            image, failure = sitk.ReadImage(str(path)), None
        except RuntimeError as error:
            image, failure = None, error
        stream_check.result()  # a truncated stream is the error to report, whatever ITK did
    if failure is not None:
        reason = str(failure).strip().splitlines()[-1] if str(failure).strip() else "unreadable"
        raise InputError(f"{path}: not a readable image ({reason[:160]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: {image.GetNumberOfComponentsPerPixel()} channels per voxel, "
            "expected a single-channel volume"
        )
    size = image.GetSize()
    if image.GetDimension() == 4 and size[3] == 1:
        image = image[:, :, :, 0]
    elif image.GetDimension() != 3:
        raise InputError(f"{path}: {image.GetDimension()}D image of size {size}, expected 3D")
    stored = sitk.GetArrayViewFromImage(image)
    check_voxels(path, stored)  # on the file's own type: 16-bit integers are half the bytes
    return stored.astype(np.float32), Geometry.of(image)


def check_gzip_stream(path: str | Path, chunk: int = 1 << 22) -> None:
    """Raise :class:`InputError` for a ``.gz`` file whose stream is truncated or corrupt.

    ITK's gzip reader fills whatever a truncated ``.nii.gz`` lacks with zeros and reports no
    error, so the whole stream is decompressed once here (about a second for a 512^3 int16
    volume, in bounded memory).
    """
    if not str(path).lower().endswith(".gz"):
        return
    try:
        with open(path, "rb") as raw:
            if raw.read(2) != GZIP_MAGIC:
                return  # not gzip at all: SimpleITK says what it is or is not
        with gzip.open(path, "rb") as stream:
            while stream.read(chunk):
                pass
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"{path}: truncated or corrupt gzip data ({error})") from None


def check_voxels(path: str | Path, array: np.ndarray) -> None:
    if min(array.shape) < 2:
        raise InputError(f"{path}: size {array.shape[::-1]} is a single slice, expected a volume")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"{path}: {int((~np.isfinite(array)).sum())} voxels are NaN or infinite")
    if array.min() == array.max():
        raise InputError(f"{path}: constant volume (every voxel is {array.flat[0]:g})")


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
    """Map the case's ``[p_lower, p_upper]`` intensity percentiles to ``[0, 1]``, clipped.

    Per-case percentile scaling needs no statistics shared between sites (each hospital's
    scanner calibration differs) and is robust to the few very bright voxels of bone and
    metal. The default lower anchor is the median, soft tissue, which fills most of a head's
    3DRA volume: the 0.5th percentile instead landed on whatever air or field-of-view edge a
    case held and moved soft tissue between 0.03 and 0.48 from case to case. Everything darker
    than tissue (air, fat) becomes 0; vessels and bone keep the range above it.

    With ``exclude_fill`` the percentiles ignore the voxels at the volume's minimum: a C-arm
    reconstructs a cylinder and fills the rest with one constant (-1024 HU), a third of a
    small field of view. Percentiles are taken on every second voxel along each axis: the same
    to within noise, eight times faster on a 512x512x400 volume.
    """
    parameters = parameters or DEFAULT_NORMALIZATION
    if parameters.get("scheme") != "percentile":
        raise ValueError(f"unknown normalization scheme {parameters.get('scheme')!r}")
    sample = array[::2, ::2, ::2]
    if parameters.get("exclude_fill", False):
        inside = sample[sample > sample.min()]
        sample = inside if inside.size else sample
    percentiles = [parameters["lower_percentile"], parameters["upper_percentile"]]
    low, high = np.percentile(sample, percentiles)
    if high <= low:
        high = low + 1.0
    scaled = np.clip(array, low, high, dtype=np.float32)
    scaled -= np.float32(low)
    scaled *= np.float32(1.0 / (high - low))
    return scaled


def preprocess(array: np.ndarray, geometry: Geometry, manifest_like) -> np.ndarray:
    """Raw volume -> network input on the model's grid (``manifest_like`` has
    ``target_spacing`` and ``normalization``)."""
    resampled = to_model_grid(array, geometry, manifest_like.target_spacing)
    return normalize(resampled, manifest_like.normalization)
