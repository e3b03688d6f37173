"""OpenVINO backend: the folds compiled for the CPU, fed by asynchronous inference requests.

Each fold becomes an OpenVINO model whose output is the vessel probability (the softmax is
inside the compiled graph). Converting a network (``torch.export`` then ``ov.convert_model``)
takes seconds per fold, so converted models are cached as OpenVINO IR (``.xml`` + ``.bin``)
under a key made of the weight file's sha256, the patch size and the OpenVINO version: first in
prepared folders (the container bakes ``weights/openvino`` at build time, see
``python -m inference.openvino_backend``), then in a writable cache folder
(``$VESSEL_SEG_CACHE``, default ``<tmp>/vessel-seg-cache``).

Compilation uses every available core (``INFERENCE_NUM_THREADS``), bf16 where the CPU reports
it in ``OPTIMIZATION_CAPABILITIES`` (AVX-512 BF16, AMX) and f32 elsewhere, and the
``THROUGHPUT`` hint: several streams each run a window while finished windows are stitched
in request callbacks, so the cores never wait for Python.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from torch import nn

from inference.backends import IR_FOLDER, Progress, VesselProbability, available_cpus
from inference.sliding_window import WindowPlan, normalize_in_place

IR_FORMAT = "vp1"  # bump when VesselProbability or the conversion changes
CACHE_ENV = "VESSEL_SEG_CACHE"
MAX_STREAMS = 4  # each stream holds a window's activations: bound the memory on many-core CPUs


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "vessel-seg-cache")


def ir_name(fold_hash: str, patch: Sequence[int]) -> str:
    version = ov.get_version().split("-")[0]
    shape = "x".join(str(p) for p in patch)
    return f"{fold_hash[:24]}-{shape}-ov{version}-{IR_FORMAT}.xml"


def convert(net: nn.Module, patch: Sequence[int]) -> ov.Model:
    """The fold as an OpenVINO model of static shape ``(1, 1, *patch)`` -> ``(1, *patch)``."""
    module = VesselProbability(net).eval()
    example = torch.zeros(1, 1, *patch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations, not ours
        program = torch.export.export(module, (example,))
        model = ov.convert_model(program)
    model.reshape([1, 1, *patch])
    return model


def save_ir(model: ov.Model, path: Path) -> None:
    """Write the IR beside temporary names, then rename (.bin first): readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{os.getpid()}.{threading.get_ident()}.{path.name}")
    try:
        ov.save_model(model, temporary, compress_to_fp16=True)  # weights ship in fp16: lossless
        os.replace(temporary.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        temporary.with_suffix(".bin").unlink(missing_ok=True)


def load_or_convert(
    core: ov.Core, net: nn.Module, fold_hash: str, patch: Sequence[int], ir_dirs: Sequence[Path]
) -> ov.Model:
    """The fold's OpenVINO model from a prepared folder or the cache, else converted (and cached
    when the cache folder is writable)."""
    name = ir_name(fold_hash, patch)
    for folder in [*ir_dirs, cache_dir()]:
        if (Path(folder) / name).is_file():
            model = core.read_model(Path(folder) / name)
            model.reshape([1, 1, *patch])
            return model
    model = convert(net, patch)
    with contextlib.suppress(OSError):  # a read-only file system only costs time next run
        save_ir(model, cache_dir() / name)
    return model


def precision_hint(core: ov.Core) -> str:
    """bf16 where the CPU computes it natively, else f32."""
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"


class OpenVINOBackend:
    name = "openvino"

    def __init__(
        self,
        nets: Sequence[nn.Module],
        fold_hashes: Sequence[str],
        patch: Sequence[int],
        ir_dirs: Sequence[Path] = (),
        precision: str | None = None,
        threads: int | None = None,
    ):
        self.core = ov.Core()
        threads = threads or available_cpus()
        self.precision = precision or precision_hint(self.core)
        self.config = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "THROUGHPUT",
            "NUM_STREAMS": min(threads, MAX_STREAMS),
        }
        self.models = [
            load_or_convert(self.core, net, fold_hash, patch, ir_dirs)
            for net, fold_hash in zip(nets, fold_hashes, strict=True)
        ]
        self.device = f"cpu ({threads} threads, {self.config['NUM_STREAMS']} streams)"

    def compiled_folds(self) -> Iterator[tuple[ov.CompiledModel, int]]:
        """Each fold compiled in turn, with its optimal number of requests.

        One compiled fold at a time: a compiled model keeps its streams' activation memory
        (about 300 MB per stream for the full network on 128^3 patches), so five resident
        folds would cost gigabytes; compiling one takes about 0.2 s.
        """
        for model in self.models:
            compiled = self.core.compile_model(model, "CPU", self.config)
            yield compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
            del compiled

    def predict(
        self,
        volume: np.ndarray,
        plan: WindowPlan,
        mirrors: Sequence[tuple[int, ...]],
        progress: Progress | None = None,
    ) -> np.ndarray:
        accumulator = np.zeros(volume.shape, dtype=np.float32)
        importance = plan.importance()
        lock = threading.Lock()
        errors: list[BaseException] = []

        def stitch(request: ov.InferRequest, userdata) -> None:
            window, axes = userdata
            try:
                probability = request.get_output_tensor(0).data[0]
                if axes:
                    probability = np.flip(probability, axes)
                weighted = probability * importance  # a copy: the request's buffer is reused
                with lock:
                    accumulator[window] += weighted
                    if progress:
                        progress(1)
            except BaseException as error:  # re-raised in the calling thread below
                errors.append(error)

        for compiled, requests in self.compiled_folds():
            queue = ov.AsyncInferQueue(compiled, requests)
            queue.set_callback(stitch)
            for window in plan.windows():
                block = volume[window]
                for axes in mirrors:
                    data = np.flip(block, axes) if axes else block
                    queue.start_async({0: np.ascontiguousarray(data)[None, None]}, (window, axes))
                if errors:
                    break
            queue.wait_all()
            del queue, compiled  # this fold's memory goes before the next fold compiles
            if errors:
                raise errors[0]
        return normalize_in_place(accumulator, plan, len(self.models) * len(mirrors))


def prepare(weights: Path, output: Path | None = None) -> list[Path]:
    """Convert every fold of a weights folder to OpenVINO IR (``weights/openvino`` by default),
    so that the container starts without conversions."""
    from model.weights import load_ensemble

    manifest, nets = load_ensemble(weights)
    output = output or weights / IR_FOLDER
    written = []
    for entry, net in zip(manifest.folds, nets):
        path = output / ir_name(entry.sha256, manifest.patch_size)
        save_ir(convert(net, manifest.patch_size), path)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=prepare.__doc__)
    parser.add_argument("weights", type=Path, help="weights folder with manifest.json")
    parser.add_argument("--output", type=Path, help="where the IR goes (default WEIGHTS/openvino)")
    parser.add_argument(
        "--if-present", action="store_true", help="do nothing when the folder has no manifest"
    )
    args = parser.parse_args(argv)
    if args.if_present and not (args.weights / "manifest.json").is_file():
        print(f"{args.weights}: no manifest.json, nothing to prepare")
        return 0
    for path in prepare(args.weights, args.output):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
