"""PyTorch backend: CUDA with bf16/fp16 autocast and channels-last 3D, or eager fp32 on the CPU.

On CUDA the volume, the windows, the folds' passes and the stitched sum all stay on the GPU;
only the final probability map comes back. Windows go through the network in batches; every
fold sees the same batch before the next one is cut, so a single accumulator holds the sum of
all folds (no per-fold volume). On CUDA every batch has one shape (the last one padded), and
cuDNN times its kernels for it once, when the backend is created. On the CPU each window runs
on one thread and the windows run in parallel, stitched in window order: the result does not
depend on the thread count (a multi-threaded convolution sums in another order: 1e-8 apart).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from inference.backend_base import Progress, VesselProbability, inference_threads
from inference.sliding_window import WindowPlan, normalize_in_place

# Voxels per batch on CUDA: two 128^3 windows, or 37 of the shipped 48^3. On an H200 the five
# folds' passes over a 256^3 volume took 7.2 s in batches of 4 windows, 3.4 s of 16, 3.0 s of
# 37 and 3.7 s of 64 (bench/gpu_checks.sh). On the CPU one window at a time keeps memory low.
CUDA_BATCH_VOXELS = 2 * 128**3


def cuda_autocast_dtype() -> torch.dtype:
    """bf16 where the GPU computes it natively (compute capability 8.0+), else fp16: torch's
    ``is_bf16_supported()`` also says yes on a T4 (7.5), through slow emulation."""
    return (
        torch.bfloat16
        if torch.cuda.is_bf16_supported(including_emulation=False)
        else (torch.float16)
    )


def in_order(pool: ThreadPoolExecutor, function: Callable, items: Sequence, ahead: int) -> Iterator:
    """``map(function, items)`` on ``pool``, results in order, at most ``ahead`` pending (memory
    stays bounded whatever the consumer's pace); pending work is cancelled on an exception."""
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def default_batch_size(device_type: str, patch: Sequence[int]) -> int:
    """Windows per network call when none is asked for."""
    if device_type != "cuda":
        return 1
    return max(1, CUDA_BATCH_VOXELS // math.prod(patch))


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        nets: Sequence[nn.Module],
        device: str,
        patch: Sequence[int],
        batch_size: int | None = None,
        cpu_autocast: torch.dtype | None = None,
        deterministic: bool = False,
    ):
        """``cpu_autocast``: bf16 autocast on the CPU (training validation uses the training's
        precision); the container's CPU path is OpenVINO, and this backend's CPU fallback fp32.
        ``deterministic``: on CUDA, deterministic algorithms
        (``torch.use_deterministic_algorithms``, ``cudnn.deterministic``) and no cuDNN
        autotuning, whose kernel choice may differ between
        runs; the CPU path is deterministic either way."""
        self.deterministic = deterministic
        if deterministic:  # cuBLAS is deterministic only with a fixed workspace (before its use)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.torch_device = torch.device(device)
        self.patch = tuple(patch)
        self.batch_size = batch_size or default_batch_size(self.torch_device.type, patch)
        cuda = self.torch_device.type == "cuda"
        self.threads = None if cuda else inference_threads()
        if cuda:
            self.autocast_dtype = cuda_autocast_dtype()
            self.precision = str(self.autocast_dtype).removeprefix("torch.")
            self.device = f"{device}:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
        else:
            self.autocast_dtype = cpu_autocast
            self.precision = str(cpu_autocast or torch.float32).removeprefix("torch.")
            self.device = f"cpu ({self.threads} threads)"
        memory_format = torch.channels_last_3d if cuda else torch.contiguous_format
        self.memory_format = memory_format
        self.nets = [
            VesselProbability(net).to(self.torch_device, memory_format=memory_format).eval()
            for net in nets
        ]
        if cuda:
            self.warm_up()

    @contextmanager
    def torch_settings(self) -> Iterator[None]:
        """This backend's thread count and cuDNN autotuning (a fixed patch shape: the fastest
        kernels) or deterministic algorithms, restored afterwards so that the caller's process
        is left as it was."""
        cudnn = torch.backends.cudnn
        saved = (
            torch.get_num_threads(),
            cudnn.benchmark,
            cudnn.deterministic,
            torch.are_deterministic_algorithms_enabled(),
        )
        if self.threads:  # on the CPU: one thread per window, windows in parallel
            torch.set_num_threads(1)
        cuda = self.torch_device.type == "cuda"
        cudnn.benchmark = cuda and not self.deterministic
        if self.deterministic:
            cudnn.deterministic = True
            torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.set_num_threads(saved[0])
            cudnn.benchmark, cudnn.deterministic = saved[1], saved[2]
            torch.use_deterministic_algorithms(saved[3])

    def warm_up(self) -> None:
        """One batch of zeros through every fold: cuDNN times its kernels for the one batch shape
        :meth:`predict` uses (seconds, once per process) while the models load, not in a case."""
        batch = torch.zeros(self.batch_size, 1, *self.patch, device=self.torch_device)
        with torch.inference_mode(), self.torch_settings():
            self.passes(batch, [()])

    def passes(
        self,
        batch: torch.Tensor,
        mirrors: Sequence[tuple[int, ...]],
        folds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Sum over folds and mirrors of the vessel probability of ``batch`` (N, 1, Z, Y, X)."""
        total = torch.zeros(batch.shape[:1] + batch.shape[2:], device=batch.device)
        nets = self.nets if folds is None else [self.nets[k] for k in folds]
        for net in nets:
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

    def predict(
        self,
        volume: np.ndarray,
        plan: WindowPlan,
        mirrors: Sequence[tuple[int, ...]],
        progress: Progress | None = None,
        folds: Sequence[int] | None = None,
    ) -> np.ndarray:
        with torch.inference_mode(), self.torch_settings():
            return self._stitch(volume, plan, mirrors, progress, folds)

    def _stitch(
        self,
        volume: np.ndarray,
        plan: WindowPlan,
        mirrors: Sequence[tuple[int, ...]],
        progress: Progress | None,
        folds: Sequence[int] | None,
    ) -> np.ndarray:
        count = len(self.nets) if folds is None else len(folds)
        device = self.torch_device
        source = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).to(device)
        accumulator = torch.zeros(volume.shape, dtype=torch.float32, device=device)
        importance = torch.from_numpy(plan.importance()).to(device)
        windows, size = list(plan.windows()), self.batch_size
        batches = [windows[first : first + size] for first in range(0, len(windows), size)]

        def weighted(batch_windows: list) -> torch.Tensor:
            with torch.inference_mode():  # thread-local: also in a worker thread
                batch = torch.stack([source[w] for w in batch_windows])[:, None]
                if device.type == "cuda" and len(batch_windows) < size:  # one shape: tuned
                    batch = torch.cat(
                        [batch, batch.new_zeros(size - len(batch_windows), *batch.shape[1:])]
                    )
                total = self.passes(batch, mirrors, folds)[: len(batch_windows)]
                return total * importance

        workers = self.threads or 1  # CUDA: this thread only
        with ThreadPoolExecutor(workers) as pool:
            results = (
                in_order(pool, weighted, batches, ahead=2 * workers)
                if workers > 1
                else map(weighted, batches)
            )
            for batch_windows, total in zip(batches, results):  # stitched in window order
                for window, probability in zip(batch_windows, total):
                    accumulator[window] += probability
                if progress:
                    progress(len(batch_windows) * count * len(mirrors))
        passes = count * len(mirrors)
        normalize_in_place(
            accumulator, plan, passes, as_array=lambda a: torch.from_numpy(a).to(device)
        )
        return accumulator.cpu().numpy()
