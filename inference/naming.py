"""File-naming rules, defined once for the container, training and evaluation.

    CASE_0000.nii.gz  ->  case "CASE": the image suffix (any letter case) and the
    nnU-Net/SHINY-ICARUS channel suffix ``_0000`` removed.

:data:`IMAGE_SUFFIXES` are the names recognised as images; :data:`SUPPORTED_SUFFIXES` those
read and written (``.mhd`` keeps its voxels in a separate file: it is recognised so that it
is refused with one line, never read).
"""

from __future__ import annotations

from pathlib import Path

SUPPORTED_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
IMAGE_SUFFIXES = (*SUPPORTED_SUFFIXES, ".mhd")
CHANNEL_SUFFIX = "_0000"  # the single input channel of nnU-Net raw data and SHINY-ICARUS


def image_suffix(path: str | Path) -> str:
    """The image suffix of ``path`` in lower case (``.nii.gz``, ``.mha``...), or ``""``."""
    name = Path(path).name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), "")


def case_name(path: str | Path) -> str | None:
    """The case an image file belongs to (see the module docstring), or ``None`` for a file
    that is not an image or is hidden."""
    name = Path(path).name
    suffix = image_suffix(name)
    if not suffix or name.startswith("."):
        return None
    return name[: -len(suffix)].removesuffix(CHANNEL_SUFFIX)
