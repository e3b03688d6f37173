"""Writing images: atomically, in the format the file name asks for."""

from __future__ import annotations

import os
from pathlib import Path

import SimpleITK as sitk

from inference.preprocessing import IMAGE_SUFFIXES


def image_suffix(path: str | Path) -> str:
    """The image suffix of ``path`` (``.nii.gz``, ``.mha``...), or ``""``."""
    name = Path(path).name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), "")


def write_image_atomically(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """Write ``image`` to a hidden temporary file beside ``path``, then rename it into place.

    SimpleITK chooses the format from the extension, so the temporary name keeps the suffix
    (``CASE.nii.gz`` -> ``.CASE.tmp.nii.gz``). A crash or a full disk leaves no partial file
    under the final name; the temporary file is removed on any error.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if not suffix or suffix == ".mhd":
        raise ValueError(f"{path}: cannot write atomically; use .nii.gz, .nii, .mha or .nrrd")
    stem = path.name[: -len(suffix)]
    temporary = path.with_name(f".{stem}.tmp{suffix}")
    try:
        sitk.WriteImage(image, str(temporary), compress)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
