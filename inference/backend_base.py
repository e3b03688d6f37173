"""What every backend shares: the protocol, the vessel-probability head, the CPU count.

Kept apart from :mod:`inference.backends` (which chooses and builds a backend) so that the
backends import these types without importing the module that imports them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from inference.sliding_window import WindowPlan

IR_FOLDER = "openvino"  # prepared OpenVINO models inside a weights folder

Progress = Callable[[int], None]
THREADS_ENV = "VESSEL_SEG_THREADS"  # CPU threads for the network (default: every available CPU)


class BackendError(RuntimeError):
    """A device or backend that cannot be used here; one line saying why."""


class Backend(Protocol):
    name: str  # "torch" or "openvino"
    device: str  # e.g. "cpu (2 threads)" or "cuda:0 (NVIDIA H100)"
    precision: str  # arithmetic of the network passes, e.g. "bf16"

    def predict(
        self,
        volume: np.ndarray,
        plan: WindowPlan,
        mirrors: Sequence[tuple[int, ...]],
        progress: Progress | None = None,
        folds: Sequence[int] | None = None,
    ) -> np.ndarray:
        """Mean vessel probability of the folds (indices into those the backend was built with;
        default all) and mirrors, float32, ``volume``'s shape."""
        ...


class VesselProbability(nn.Module):
    """The network followed by its vessel probability ``softmax(logits)[:, 1]``, computed as
    ``sigmoid(l_1 - l_0)`` (equal for two classes): output ``(N, Z, Y, X)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x).float()  # under autocast: the difference in fp32, not bf16
        return torch.sigmoid(logits[:, 1] - logits[:, 0])


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 quota (``docker --cpus``)."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return count
    if quota != "max":
        count = min(count, max(1, math.floor(int(quota) / int(period))))
    return count


def inference_threads() -> int:
    """CPU threads for the network: ``$VESSEL_SEG_THREADS`` when set (at most the available
    CPUs), else :func:`available_cpus`. The mask does not depend on it (test_determinism.py)."""
    count = available_cpus()
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return count
    try:
        asked = int(value)
    except ValueError:
        raise BackendError(f"{THREADS_ENV}={value!r}: expected a positive integer") from None
    if asked < 1:
        raise BackendError(f"{THREADS_ENV}={value!r}: expected a positive integer")
    return min(asked, count)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def memory_bytes() -> int | None:
    """The memory this process may use: the machine's, capped by a cgroup v2 limit."""
    total = None
    with contextlib.suppress(OSError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    if limit.isdigit():
        total = min(total, int(limit)) if total else int(limit)
    return total


def runtime_environment(device: str) -> dict:
    """What ran, for ``results.json``: the device's name and memory, and the versions of torch,
    CUDA, cuDNN and OpenVINO (``None`` where absent)."""
    try:
        import openvino

        openvino_version = openvino.get_version()
    except ImportError:
        openvino_version = None
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "openvino": openvino_version,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(device_name=properties.name, device_memory_bytes=properties.total_memory)
    else:
        info.update(device_name=cpu_name(), device_memory_bytes=memory_bytes())
    return info
