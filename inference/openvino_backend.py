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
``THROUGHPUT`` hint: several streams each run a window while a finished one is stitched, so
the cores never wait for Python.

int8: each fold post-training quantised by NNCF, calibrated on phantom windows; its head, its
attention gates and the layers NNCF's accuracy control finds costly stay in bf16/f32. The int8
IR is made at build time (``python -m train.int8 WEIGHTS``, which needs ``nncf`` and
``phantoms``: :func:`train.int8.quantize`; the Dockerfile's ``int8`` stage) and read at run time
by OpenVINO alone. ``precision="auto"`` runs it where it is the faster arithmetic
(:func:`int8_preferred`: VNNI without AMX) and the folds' int8 models are prepared;
``precision="int8"`` wherever the CPU has int8 dot products (:func:`int8_supported`), else
bf16/f32 with a warning.
"""

from __future__ import annotations

import argparse
import math
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

from inference.backend_base import (
    IR_FOLDER,
    BackendError,
    Progress,
    VesselProbability,
    cpu_flags,
    inference_threads,
)
from inference.sliding_window import WindowPlan, normalize_in_place
from inference.thin_conv import with_blocked_spatial_convs

IR_FORMAT = "vp2"  # bump when VesselProbability or the conversion changes
INT8_FORMAT = "q1"  # bump when the calibration or the ignored layers change
INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # int8 dot products in hardware
AMX_CPU_FLAGS = ("amx_bf16", "amx_int8")  # tile units: bf16 as fast as int8 there
PRECISIONS = ("auto", "bf16", "f32", "int8")
CACHE_ENV = "VESSEL_SEG_CACHE"
MAX_STREAMS = 4  # each stream holds a window's activations: bound the memory on many-core CPUs
# Patches up to this many voxels keep every fold compiled for the backend's lifetime: a compiled
# fold holds its streams' activations, about 300 MB per stream at 128^3 but 20 MB at 48^3.
RESIDENT_PATCH_VOXELS = 64**3


def cache_dir() -> Path | None:
    """``$VESSEL_SEG_CACHE``, else ``<tmp>/vessel-seg-cache``; ``None`` when there is no usable
    temporary folder at all (then nothing is cached)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    try:
        return Path(tempfile.gettempdir()) / "vessel-seg-cache"
    except FileNotFoundError:  # no writable TMPDIR, /tmp, /var/tmp or working folder
        return None


def ir_name(fold_hash: str, patch: Sequence[int]) -> str:
    version = ov.get_version().split("-")[0]
    shape = "x".join(str(p) for p in patch)
    return f"{fold_hash[:24]}-{shape}-ov{version}-{IR_FORMAT}.xml"


def int8_ir_name(fold_hash: str, patch: Sequence[int]) -> str:
    return ir_name(fold_hash, patch).replace(".xml", f"-int8{INT8_FORMAT}.xml")


def int8_supported(flags: set[str] | None = None) -> bool:
    """Whether the CPU multiplies int8 natively (VNNI or AMX): elsewhere int8 emulation loses
    to bf16/f32."""
    return bool(set(INT8_CPU_FLAGS) & (cpu_flags() if flags is None else flags))


def int8_preferred(flags: set[str] | None = None) -> bool:
    """Whether int8 is this CPU's fastest arithmetic for the folds: VNNI units but no AMX.
    Measured end to end with the shipped folds (``bench/bench_inference.py --int8``): 1.17x bf16
    on an AVX-512 BF16 + VNNI CPU, 0.91x bf16 on an AMX CPU (its tiles run bf16 as fast, and
    the layers kept in bf16 then cost conversions); CPUs with VNNI but no bf16 compare int8
    with f32."""
    flags = cpu_flags() if flags is None else flags
    return int8_supported(flags) and not set(AMX_CPU_FLAGS) & flags


def convert(net: nn.Module, patch: Sequence[int]) -> ov.Model:
    """The fold as an OpenVINO model of static shape ``(1, 1, *patch)`` -> ``(1, *patch)``, its
    spatial-attention convolutions in the CPU-friendly blocked form (same result)."""
    module = VesselProbability(with_blocked_spatial_convs(net, patch)).eval()
    example = torch.zeros(1, 1, *patch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch-internal deprecations, not ours
        program = torch.export.export(module, (example,))
        model = ov.convert_model(program)
    model.reshape([1, 1, *patch])
    return model


def save_ir(model: ov.Model, path: Path, compress: bool = True) -> None:
    """Write the IR beside temporary names, then rename (.bin first): readers never see half.
    ``compress``: fp16 weights (lossless for fp16 weights; an int8 model's are int8 already)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{os.getpid()}.{threading.get_ident()}.{path.name}")
    try:
        ov.save_model(model, temporary, compress_to_fp16=compress)
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
    name, cache = ir_name(fold_hash, patch), cache_dir()
    if path := find_ir(name, ir_dirs):
        return read_ir(core, path, patch)
    # Always the model as read back from an IR file: the file stores fp16 constants, so a
    # freshly converted model would compute slightly differently from every later, cached run.
    model = convert(net, patch)
    try:
        if cache is None:
            raise OSError("no cache folder")
        save_ir(model, cache / name)
        return read_ir(core, cache / name, patch)
    except OSError:  # a missing or read-only cache: a private folder for this once
        pass
    try:
        with tempfile.TemporaryDirectory() as folder:
            save_ir(model, Path(folder) / name)
            return read_ir(core, Path(folder) / name, patch)
    except OSError:  # no writable temporary folder either (FileNotFoundError included)
        return fp16_constants(model)


def fp16_constants(model: ov.Model) -> ov.Model:
    """The freshly converted model with its weights rounded to fp16 as an IR file stores them,
    for when no folder can be written (the same arithmetic as the cached model: checked in
    test_inference.py)."""
    from openvino._offline_transformations import compress_model_transformation

    compress_model_transformation(model)
    return model


def find_ir(name: str, ir_dirs: Sequence[Path]) -> Path | None:
    """The IR file ``name`` in a prepared folder, else in the cache; ``None`` if in neither."""
    cache = cache_dir()
    for folder in [*ir_dirs, *([cache] if cache else [])]:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def load_int8(core: ov.Core, fold_hash: str, patch: Sequence[int], ir_dirs: Sequence[Path]):
    """The fold's int8 model, prepared at build time (``python -m train.int8 WEIGHTS``: its
    calibration needs phantoms and nncf, which the image does not hold) into a weights'
    ``openvino`` folder or the cache; a one-line error naming the command otherwise."""
    name = int8_ir_name(fold_hash, patch)
    path = find_ir(name, ir_dirs)
    if path is None:
        raise BackendError(
            f"--precision int8: no int8 model {name} prepared; run python -m train.int8 WEIGHTS"
        )
    return read_ir(core, path, patch)


def read_ir(core: ov.Core, path: Path, patch: Sequence[int]) -> ov.Model:
    model = core.read_model(path)
    model.reshape([1, 1, *patch])
    return model


def precision_hint(core: ov.Core) -> str:
    """bf16 where the CPU computes it natively, else f32."""
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f32"


def resolve_precision(
    core: ov.Core, precision: str | None, int8_prepared: bool
) -> tuple[bool, str]:
    """(int8 or not, the floating-point hint) for a requested precision: ``auto`` int8 where
    :func:`int8_preferred` and the folds' int8 models are prepared, else the CPU's best float;
    ``int8`` only where :func:`int8_supported`, else that float with a warning."""
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision in ("bf16", "f32"):
        return False, precision
    if precision == "auto":
        return int8_prepared and int8_preferred(), precision_hint(core)
    if not int8_supported():
        warnings.warn(
            f"--precision int8: this CPU has none of {', '.join(INT8_CPU_FLAGS)}; "
            f"running {precision_hint(core)} instead",
            stacklevel=3,
        )
        return False, precision_hint(core)
    return True, precision_hint(core)


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
        """``precision``: one of :data:`PRECISIONS` (see :func:`resolve_precision`; default
        ``auto``); int8 reads the folds' int8 models prepared at build time (:func:`load_int8`)."""
        self.core = ov.Core()
        threads = threads or inference_threads()
        prepared = all(find_ir(int8_ir_name(h, patch), ir_dirs) for h in fold_hashes)
        int8, hint = resolve_precision(self.core, precision, prepared)
        self.precision = f"int8+{hint}" if int8 else hint
        self.config = {
            "INFERENCE_PRECISION_HINT": hint,  # int8 models: the layers left unquantised
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "THROUGHPUT",
            "NUM_STREAMS": min(threads, MAX_STREAMS),
        }
        self.models = [
            load_int8(self.core, fold_hash, patch, ir_dirs)
            if int8
            else load_or_convert(self.core, net, fold_hash, patch, ir_dirs)
            for net, fold_hash in zip(nets, fold_hashes, strict=True)
        ]
        self.device = f"cpu ({threads} threads, {self.config['NUM_STREAMS']} streams)"
        small = math.prod(patch) <= RESIDENT_PATCH_VOXELS
        self.resident = [self.compile(model) for model in self.models] if small else None

    def compile(self, model: ov.Model) -> ov.CompiledModel:
        return self.core.compile_model(model, "CPU", self.config)

    def compiled_folds(
        self, folds: Sequence[int] | None = None
    ) -> Iterator[tuple[ov.CompiledModel, int]]:
        """Each fold compiled (``folds``: indices, default all), with its optimal number of
        requests.

        Small patches: the folds compiled once, with the backend. Large ones: one fold compiled
        at a time (about 0.2 s each), since five resident folds would cost gigabytes.
        """
        folds = range(len(self.models)) if folds is None else folds
        if self.resident:
            chosen = [self.resident[k] for k in folds]
        else:
            chosen = (self.compile(self.models[k]) for k in folds)
        for compiled in chosen:
            yield compiled, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
            del compiled

    def predict(
        self,
        volume: np.ndarray,
        plan: WindowPlan,
        mirrors: Sequence[tuple[int, ...]],
        progress: Progress | None = None,
        folds: Sequence[int] | None = None,
    ) -> np.ndarray:
        accumulator = np.zeros(volume.shape, dtype=np.float32)
        count_folds = len(self.models) if folds is None else len(folds)
        importance = plan.importance()

        def stitch(request: ov.InferRequest, window, axes) -> None:
            request.wait()
            probability = request.get_output_tensor(0).data[0]
            if axes:
                probability = np.flip(probability, axes)
            accumulator[window] += probability * importance
            if progress:
                progress(1)

        jobs = [(window, axes) for window in plan.windows() for axes in mirrors]
        for compiled, count in self.compiled_folds(folds):
            # Requests taken in turn, each result stitched here while the others compute: no
            # Python callback runs on OpenVINO's threads, which would need the GIL and could
            # deadlock with a compiled model freed on this thread.
            requests = [compiled.create_infer_request() for _ in range(count)]
            running: list[tuple | None] = [None] * count
            for index, (window, axes) in enumerate(jobs):
                slot = index % count
                if running[slot] is not None:
                    stitch(requests[slot], *running[slot])
                data = np.flip(volume[window], axes) if axes else volume[window]
                requests[slot].start_async({0: np.ascontiguousarray(data)[None, None]})
                running[slot] = (window, axes)
            for request, job in zip(requests, running):
                if job is not None:
                    stitch(request, *job)
            del requests, compiled  # a fold compiled here frees its memory before the next one
        return normalize_in_place(accumulator, plan, count_folds * len(mirrors))


def prepare(weights: Path, output: Path | None = None) -> list[Path]:
    """Convert every fold of a weights folder to OpenVINO IR (``weights/openvino`` by default),
    so that the container starts without conversions (the int8 models: ``python -m
    train.int8``)."""
    from model.weights import load_ensemble

    manifest, nets = load_ensemble(weights)
    output = output or weights / IR_FOLDER
    written = []
    for entry, net in zip(manifest.folds, nets):
        written.append(output / ir_name(entry.sha256, manifest.patch_size))
        save_ir(convert(net, manifest.patch_size), written[-1])
    return written


def main(argv: Sequence[str] | None = None) -> int:
    from model.weights import MANIFEST

    parser = argparse.ArgumentParser(description=prepare.__doc__)
    parser.add_argument("weights", type=Path, help="weights folder with manifest.json")
    parser.add_argument("--output", type=Path, help="where the IR goes (default WEIGHTS/openvino)")
    parser.add_argument(
        "--if-present", action="store_true", help="do nothing when the folder has no manifest"
    )
    args = parser.parse_args(argv)
    if args.if_present and not (args.weights / MANIFEST).is_file():
        print(f"{args.weights}: no manifest.json, nothing to prepare")
        return 0
    for path in prepare(args.weights, args.output):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
