"""PyTorch backend: CUDA with bf16/fp16 autocast and channels-last 3D, or eager fp32 on the CPU.

On CUDA the volume, the windows, the folds' passes and the stitched sum all stay on the GPU;
only the final probability map comes back. Windows go through the network in batches; every
fold sees the same batch before the next one is cut, so a single accumulator holds the sum of
all folds (no per-fold volume).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from inference.backends import Progress, VesselProbability, available_cpus
from inference.sliding_window import WindowPlan, normalize_in_place

# Windows per batch: 2 fills a GPU with 128^3 patches; 1 keeps CPU memory low for no loss.
DEFAULT_BATCH = {"cuda": 2, "cpu": 1}


class TorchBackend:
    name = "torch"

    def __init__(self, nets: Sequence[nn.Module], device: str, batch_size: int | None = None):
        self.torch_device = torch.device(device)
        self.batch_size = batch_size or DEFAULT_BATCH[self.torch_device.type]
        cuda = self.torch_device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True  # fixed patch shape: pick the fastest kernels
            self.autocast_dtype = (
                torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            )
            self.precision = str(self.autocast_dtype).removeprefix("torch.")
            self.device = f"{device}:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
        else:
            torch.set_num_threads(available_cpus())
            self.autocast_dtype = None
            self.precision = "float32"
            self.device = f"cpu ({torch.get_num_threads()} threads)"
        memory_format = torch.channels_last_3d if cuda else torch.contiguous_format
        self.memory_format = memory_format
        self.nets = [
            VesselProbability(net).to(self.torch_device, memory_format=memory_format).eval()
            for net in nets
        ]

    def passes(self, batch: torch.Tensor, mirrors: Sequence[tuple[int, ...]]) -> torch.Tensor:
        """Sum over folds and mirrors of the vessel probability of ``batch`` (N, 1, Z, Y, X)."""
        total = torch.zeros(batch.shape[:1] + batch.shape[2:], device=batch.device)
        for net in self.nets:
            for axes in mirrors:
                flipped = batch.flip([a + 2 for a in axes]) if axes else batch
                with torch.autocast(
                    self.torch_device.type,
                    dtype=self.autocast_dtype or torch.float32,
                    enabled=self.autocast_dtype is not None,
                ):
                    probability = net(flipped.contiguous(memory_format=self.memory_format))
                probability = probability.float()
                total += probability.flip([a + 1 for a in axes]) if axes else probability
        return total

    @torch.inference_mode()
    def predict(
        self,
        volume: np.ndarray,
        plan: WindowPlan,
        mirrors: Sequence[tuple[int, ...]],
        progress: Progress | None = None,
    ) -> np.ndarray:
        device = self.torch_device
        source = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(device)
        accumulator = torch.zeros(volume.shape, dtype=torch.float32, device=device)
        importance = torch.from_numpy(plan.importance()).to(device)
        windows = list(plan.windows())
        for first in range(0, len(windows), self.batch_size):
            batch_windows = windows[first : first + self.batch_size]
            batch = torch.stack([source[w] for w in batch_windows])[:, None]
            total = self.passes(batch, mirrors)
            total *= importance
            for window, probability in zip(batch_windows, total):
                accumulator[window] += probability
            if progress:
                progress(len(batch_windows) * len(self.nets) * len(mirrors))
        passes = len(self.nets) * len(mirrors)
        normalize_in_place(
            accumulator, plan, passes, as_array=lambda a: torch.from_numpy(a).to(device)
        )
        return accumulator.cpu().numpy()
