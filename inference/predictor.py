"""The predictor: one volume in, its vessel mask (and probability) on the input grid out.

Data flow (DESIGN.md): read -> resample to the model's spacing where it differs -> normalise
(parameters from the weights manifest) -> pad to at least one patch -> sliding windows with
Gaussian importance, every fold's network, folds averaged while stitching -> crop the padding
-> back to the input grid (linear interpolation of the probability) -> threshold at 0.5 (the
argmax of two classes) -> connected-component cleaning -> uint8 {0, 1} mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference.backend_base import IR_FOLDER, Backend, Progress
from inference.backends import create_backend
from inference.preprocessing import (
    Geometry,
    InputError,
    preprocess,
    resampled_shape,
    to_input_grid,
)
from inference.sliding_window import WindowPlan, mirror_axes, pad_to_patch
from inference.torch_backend import TorchBackend
from model.weights import Manifest, load_ensemble
from postprocess import CleaningSettings, clean_mask

THRESHOLD = 0.5
# Inputs are refused beyond these bounds (one line naming the file): a slice stack with more
# than 10:1 spacing carries too little through-plane detail for a network trained on isotropic
# 3DRA, and resampling it would multiply its size by the same factor. 2^29 voxels on the model
# grid (e.g. 812^3) bound memory: a case peaks at about 13 bytes per voxel (raw, normalised and
# stitched float32 volumes, mask, component labels), 7 GB here, within a 16 GB container.
MAX_ANISOTROPY = 10.0
MAX_MODEL_VOXELS = 2**29


@dataclass
class PredictorSettings:
    """Options of :class:`Predictor`; ``None`` means the manifest's value or the default."""

    device: str = "auto"
    backend: str = "auto"
    folds: list[int] | None = None
    overlap: float = 0.5
    tta: bool = False
    postprocess: bool = True
    postprocess_overrides: dict = field(default_factory=dict)
    batch_size: int | None = None
    deterministic: bool = False  # CUDA: deterministic algorithms, no cuDNN autotuning
    precision: str = "auto"  # OpenVINO: auto, bf16, f32, int8 (openvino_backend.resolve_precision)


@dataclass
class Segmentation:
    mask: np.ndarray  # uint8 {0, 1}, the input's shape
    probability: np.ndarray  # float32 vessel probability on the input grid
    vessel_volume_mm3: float


class Predictor:
    """The fold ensemble of a weights folder on one backend.

    :meth:`from_networks` builds one around networks in memory (as nnU-Net's
    ``manual_initialization``), so that training validation segments exactly as the
    container does.
    """

    def __init__(self, weights: str | Path, settings: PredictorSettings | None = None):
        settings = settings or PredictorSettings()
        weights = Path(weights)
        manifest, nets = load_ensemble(weights, settings.folds)
        folds = settings.folds or [entry.fold for entry in manifest.folds]
        backend = create_backend(
            nets,
            [manifest.fold_entry(fold).sha256 for fold in folds],
            manifest.patch_size,
            device=settings.device,
            backend=settings.backend,
            ir_dirs=[weights / IR_FOLDER],
            batch_size=settings.batch_size,
            deterministic=settings.deterministic,
            precision=settings.precision,
        )
        self._set_up(manifest, folds, backend, settings)

    @classmethod
    def from_networks(
        cls,
        nets: Sequence[nn.Module],
        manifest: Manifest,
        settings: PredictorSettings,
        device: str,
        autocast: torch.dtype | None = None,
    ) -> Predictor:
        """A predictor for networks in memory on the torch backend (``autocast``: e.g. bf16
        where the CPU has it, as training uses)."""
        backend = TorchBackend(nets, device, manifest.patch_size, settings.batch_size, autocast)
        predictor = cls.__new__(cls)
        predictor._set_up(manifest, list(range(len(nets))), backend, settings)
        return predictor

    def _set_up(
        self, manifest: Manifest, folds: list[int], backend: Backend, settings: PredictorSettings
    ) -> None:
        if not 0 <= settings.overlap < 1:
            raise ValueError(f"overlap must be in [0, 1), got {settings.overlap}")
        self.settings, self.manifest, self.folds, self.backend = settings, manifest, folds, backend
        self.cleaning = CleaningSettings.from_dict(
            manifest.postprocess, **settings.postprocess_overrides
        )
        self.mirrors = mirror_axes(settings.tta)
        self.active: list[int] | None = None  # indices into ``folds`` to run; None: all

    @property
    def active_folds(self) -> list[int]:
        """The folds the next prediction runs (all, unless a time budget dropped some)."""
        return self.folds if self.active is None else [self.folds[k] for k in self.active]

    def check(self, geometry: Geometry, source: str | Path) -> None:
        """Refuse volumes beyond the documented bounds (:data:`MAX_ANISOTROPY`,
        :data:`MAX_MODEL_VOXELS`) with one line naming ``source``."""
        ratio = max(geometry.spacing) / min(geometry.spacing)
        if ratio > MAX_ANISOTROPY:
            raise InputError(
                f"{source}: spacing {tuple(round(s, 4) for s in geometry.spacing[::-1])} mm "
                f"is {ratio:.1f}:1 anisotropic; at most {MAX_ANISOTROPY:g}:1 is supported"
            )
        shape = resampled_shape(geometry.shape, geometry.spacing, self.manifest.target_spacing)
        if math.prod(shape) > MAX_MODEL_VOXELS:
            raise InputError(
                f"{source}: {shape[::-1]} voxels at the model's spacing "
                f"{self.manifest.target_spacing[::-1]} mm exceed {MAX_MODEL_VOXELS:,}"
            )

    def plan(self, shape: Sequence[int]) -> WindowPlan:
        padded = [max(s, p) for s, p in zip(shape, self.manifest.patch_size)]
        return WindowPlan.create(padded, self.manifest.patch_size, self.settings.overlap)

    def passes(self, geometry: Geometry) -> int:
        """Network passes one volume costs (windows x folds x mirrors), for progress bars."""
        shape = resampled_shape(geometry.shape, geometry.spacing, self.manifest.target_spacing)
        return len(self.plan(shape)) * len(self.active_folds) * len(self.mirrors)

    def model_input(self, array: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Raw volume -> normalised volume on the model's grid (shared preprocessing)."""
        return preprocess(array, geometry, self.manifest)

    def probability_of_input(
        self, volume: np.ndarray, geometry: Geometry, progress: Progress | None = None
    ) -> np.ndarray:
        """The ensemble's vessel probability of a model input, float32 on the input grid."""
        padded, crop = pad_to_patch(volume, self.manifest.patch_size)
        probability = self.backend.predict(
            padded, self.plan(padded.shape), self.mirrors, progress, self.active
        )
        probability = probability[crop]
        probability = to_input_grid(
            np.ascontiguousarray(probability), geometry, self.manifest.target_spacing
        )
        return np.clip(probability, 0.0, 1.0, out=probability)  # rounding of the weighted mean

    def vessel_probability(
        self, array: np.ndarray, geometry: Geometry, progress: Progress | None = None
    ) -> np.ndarray:
        """The ensemble's vessel probability of a raw volume, float32 on the input grid."""
        return self.probability_of_input(self.model_input(array, geometry), geometry, progress)

    def mask_of(self, probability: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, float]:
        """Threshold and clean a probability map; the mask (uint8 {0, 1}) and its volume in mm^3.

        Raises when the probability is not finite: broken weights must not pass for an empty mask.
        """
        if not np.isfinite(probability).all():
            raise RuntimeError("the network produced NaN or infinite probabilities (weights?)")
        mask = (probability > THRESHOLD).view(np.uint8)
        if self.settings.postprocess:
            mask = clean_mask(mask, geometry.spacing, self.cleaning, probability)
        return mask, float(np.count_nonzero(mask)) * float(np.prod(geometry.spacing))

    def segment(
        self, array: np.ndarray, geometry: Geometry, progress: Progress | None = None
    ) -> Segmentation:
        """Mask, probability and vessel volume of a raw volume (see the module's data flow)."""
        volume = self.model_input(array, geometry)
        del array
        probability = self.probability_of_input(volume, geometry, progress)
        del volume
        mask, volume_mm3 = self.mask_of(probability, geometry)
        return Segmentation(mask=mask, probability=probability, vessel_volume_mm3=volume_mm3)
