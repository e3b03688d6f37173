"""Where the network runs: choosing the device and the backend.

A backend turns a normalised volume (already padded to at least one patch) and a
:class:`~inference.sliding_window.WindowPlan` into the folds' mean vessel probability, stitched
with Gaussian importance (the protocol: :class:`inference.backend_base.Backend`). Two
implementations:

- :class:`~inference.torch_backend.TorchBackend`: PyTorch on CUDA (bf16/fp16 autocast,
  channels-last 3D, everything on the GPU) or, as the fallback, eager fp32 on the CPU;
- :class:`~inference.openvino_backend.OpenVINOBackend`: the network compiled by OpenVINO for the
  CPU (bf16 where the CPU has it), asynchronous requests overlapping stitching with compute.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from inference.backend_base import Backend, BackendError
from inference.torch_backend import TorchBackend

DEVICES = ("auto", "cuda", "cpu")
BACKENDS = ("auto", "torch", "openvino")


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device answers, else ``cpu``."""
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose one of {DEVICES}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda: no CUDA device is available (try --device cpu)")
    return device


def resolve_backend(backend: str, device: str) -> str:
    """``auto`` -> torch on CUDA, OpenVINO on the CPU (eager torch when OpenVINO is missing)."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "openvino" if device == "cpu" and openvino_available() else "torch"
    if backend == "openvino":
        if device != "cpu":
            raise BackendError("--backend openvino runs on the CPU only (use --device cpu)")
        if not openvino_available():
            raise BackendError("--backend openvino: the openvino package is not installed")
    return backend


def create_backend(
    nets: Sequence[nn.Module],
    fold_hashes: Sequence[str],
    patch: tuple[int, int, int],
    device: str = "auto",
    backend: str = "auto",
    ir_dirs: Sequence[Path] = (),
    batch_size: int | None = None,
    deterministic: bool = False,
    precision: str = "auto",
) -> Backend:
    """The backend for ``nets`` (one per fold; ``fold_hashes`` are their weight files' sha256,
    which key the OpenVINO model cache; ``ir_dirs`` hold prepared OpenVINO models).
    ``precision``: the OpenVINO backend's (``auto``, ``bf16``, ``f32``, ``int8``); torch keeps
    its own (bf16/fp16 autocast on CUDA, fp32 on CPU)."""
    if backend == "openvino" and device == "auto":
        device = "cpu"  # asking for OpenVINO is asking for the CPU
    device = resolve_device(device)
    backend = resolve_backend(backend, device)
    if backend == "openvino":  # imported here: OpenVINO is optional (eager torch without it)
        from inference.openvino_backend import OpenVINOBackend

        return OpenVINOBackend(nets, fold_hashes, patch, ir_dirs=ir_dirs, precision=precision)
    if precision not in ("auto", None):
        warnings.warn(f"precision {precision!r} applies to the OpenVINO backend only", stacklevel=2)
    return TorchBackend(nets, device, patch, batch_size=batch_size, deterministic=deterministic)
