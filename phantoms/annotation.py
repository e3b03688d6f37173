"""Partial annotation: the labels a hospital that does not trace every vessel would write.

Sites do not label alike (issue 18): one traces only the large arteries, another only a few
slabs of each volume. From a phantom's exact label:

- ``full``: every vessel (the label as generated, unchanged);
- ``major``: the vessels at least ``major_diameter_mm`` wide (local thickness, the same
  definition as the small-vessel recall metric: :mod:`metrics.thickness`) are vessel, the
  thinner ones :data:`IGNORE_LABEL`;
- ``sparse``: slabs of ``sparse_slab`` voxels along z, every ``sparse_every``-th one labelled
  in full, every voxel of the others :data:`IGNORE_LABEL`.

``naive`` writes what was not labelled as background (0) instead of ignore: what a site
that does not declare its partial labels teaches the federation (to miss those vessels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from metrics.thickness import vessels_at_least

ANNOTATIONS = ("full", "major", "sparse")
IGNORE_LABEL = 2
"""nnU-Net v2's ignore label must be the highest label value: background 0, vessel 1."""


@dataclass(frozen=True)
class Annotation:
    """How a site labels its cases (see module docstring)."""

    mode: str = "full"
    naive: bool = False
    major_diameter_mm: float = 1.0
    sparse_every: int = 4
    sparse_slab: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ANNOTATIONS:
            raise ValueError(f"annotation must be one of {ANNOTATIONS}, got {self.mode!r}")
        if self.naive and self.mode == "full":
            raise ValueError("--naive needs a partial annotation (major or sparse)")
        if self.major_diameter_mm <= 0:
            raise ValueError(f"major diameter must be > 0 mm, got {self.major_diameter_mm}")
        if self.sparse_every < 1 or self.sparse_slab < 1:
            raise ValueError(
                f"sparse slabs need --sparse-every >= 1 and --sparse-slab >= 1 voxels, got "
                f"{self.sparse_every} and {self.sparse_slab}"
            )

    @property
    def unlabelled_value(self) -> int:
        """What the voxels this site did not label are written as."""
        return 0 if self.naive else IGNORE_LABEL

    def record(self) -> dict:
        """The ``annotation`` entry of ``dataset.json``'s ``phantom`` block."""
        return asdict(self)


FULL = Annotation()
"""Every vessel labelled: the phantoms as generated."""


def labelled_slabs(depth: int, slab: int, every: int) -> np.ndarray:
    """bool (depth,): the z slices of slabs 0, every, 2 every, ... of ``slab`` slices each."""
    return (np.arange(depth) // slab) % every == 0


def annotate(label: np.ndarray, spacing: Sequence[float], annotation: Annotation) -> np.ndarray:
    """The uint8 label a site with ``annotation`` writes for the exact ``label`` (z, y, x);
    ``spacing`` (z, y, x) in mm."""
    vessel = np.asarray(label) > 0
    if annotation.mode == "full":
        return vessel.astype(np.uint8)
    if annotation.mode == "major":
        labelled = vessels_at_least(vessel, spacing, annotation.major_diameter_mm)
        unlabelled = vessel & ~labelled
    else:
        slices = labelled_slabs(vessel.shape[0], annotation.sparse_slab, annotation.sparse_every)
        unlabelled = np.broadcast_to(~slices[:, None, None], vessel.shape)
    out = vessel.astype(np.uint8)
    out[unlabelled] = annotation.unlabelled_value
    return out
