"""What every backend shares: the protocol, the vessel-probability head, the CPU count.

Kept apart from :mod:`inference.backends` (which chooses and builds a backend) so that the
backends import these types without importing the module that imports them.
"""

from __future__ import annotations

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
    ) -> np.ndarray:
        """Mean vessel probability of all folds (and mirrors), float32, ``volume``'s shape."""
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
