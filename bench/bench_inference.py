"""Inference benchmark: the project's pipeline against tuned MONAI baselines, one run.

    python bench/bench_inference.py [--size 128 | --shape Z Y X] [--cases N] [--folds 5]
        [--tune] [--int8] [--device cuda] [--phantoms DIR]

All contenders segment the same folder of phantoms (``--cases``, default 1, of ``--size``^3,
default 128^3 as the README's CPU row; or a challenge-layout folder ``--phantoms DIR`` with
``input/`` and ``ground_truth/``) with the same folds (the shipped weights in ``weights/``
when present, else full-width networks whose random features get a fitted head, see
:func:`helpers.fit_head (test/helpers.py)`), overlap 0.5, Gaussian weighting (sigma =
patch/8), threshold 0.5 and the same connected-component cleaning:

- ``monai_torch`` (baseline A, a reference row): ``monai.inferers.sliding_window_inference``
  driving the folds' mean softmax in eager fp32 torch;
- ``monai_torch_tuned`` (baseline A', CUDA): the same call as a PyTorch expert sets it up:
  cuDNN autotuning, bf16 autocast (fp16 where the GPU has no native bf16), channels-last 3D,
  the best ``sw_batch_size`` of ``--tune``'s set;
- ``monai_openvino`` (baseline B, CPU): the same call driving the folds compiled by OpenVINO as
  an expert tunes it: static input shape ``(1, 1, *patch)``, ``THROUGHPUT`` hint, explicit
  precision (bf16 where native) and threads, every window of a MONAI batch in flight for all
  folds at once (one ``AsyncInferQueue`` per fold), the best ``sw_batch_size`` of {1, 2, 4, 8}
  with ``--tune`` (timed on the first case);
- ``project``: ``process.py``'s folder path (find the cases, then per case read, preprocess,
  predict, clean, write, report) with the OpenVINO backend in the CPU's float precision (bf16
  where native) or the torch backend (CUDA);
- ``project_int8`` (``--int8``, CPU): the same with ``--precision int8``, after the image's
  build-time step (untimed); ``auto``, the image's default, runs it on CPUs with VNNI and no
  AMX (``int8_preferred`` in the JSON);
- ``project_deterministic`` and ``project_deterministic_rerun`` (``--deterministic``, CUDA):
  the same with ``--deterministic`` (deterministic cuDNN algorithms, no autotuning), in two
  processes: its cost against ``project``, and whether the two runs' masks are bit-identical;
- ``network_only``: the project's folds running the cases' windows, nothing else.

Each contender runs in its own process (peak RSS is its own). Setup (loading, converting,
compiling; ``setup_s``) is not timed, and every contender first segments the first case once,
untimed (warm-up: OpenVINO's first requests, CUDA's start-up, cuDNN's autotuning for every batch
shape); then the whole folder is timed, first read to last written mask. Each row names its
volume and case count; the ratios and mask agreements (Dice) are computed from this run only.
Prints JSON. ``--postprocess 512`` times only the connected-component cleaning of a 512^3 mask.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTENDERS = (
    "monai_torch",
    "monai_torch_tuned",
    "monai_openvino",
    "project",
    "project_int8",
    "project_deterministic",
    "project_deterministic_rerun",
    "network_only",
)
CPU_ONLY = ("monai_openvino", "project_int8")
DETERMINISTIC = ("project_deterministic", "project_deterministic_rerun")
CUDA_ONLY = ("monai_torch_tuned", *DETERMINISTIC)
TUNE_SW = {"cpu": (1, 2, 4, 8), "cuda": (16, 32, 64, 128)}
DEFAULT_SW = {"monai_torch": 4, "monai_openvino": 8, "monai_torch_tuned": 16}
SUFFIX = "_0000.nii.gz"


def peak_memory_mb(device: str) -> dict:
    """This process's peak resident memory, and its peak GPU allocation on CUDA."""
    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device == "cuda":
        import torch

        peaks["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def make_weights(workdir: Path, folds: int, patch: int | None, seed: int) -> Path:
    """The shipped weights when present, with enough folds and of the asked patch (or none was
    asked), else fitted random full-width folds in ``workdir`` of that patch (default: the
    shipped one, else 128): the same arithmetic per window as trained folds of that patch."""
    from model.weights import load_manifest

    shipped = ROOT / "weights"
    if (shipped / "manifest.json").is_file():
        manifest = load_manifest(shipped)
        if len(manifest.folds) >= folds and patch in (None, manifest.patch_size[0]):
            return shipped
        patch = patch or manifest.patch_size[0]
    patch = patch or 128
    import SimpleITK as sitk
    import torch

    sys.path.insert(0, str(ROOT / "test"))  # the test helpers fit the heads
    from helpers import fit_head, write_weights

    from model.network import VesselUNet
    from phantoms import generate_case

    nets = []
    for fold in range(folds):
        torch.manual_seed(seed + fold)
        image, label = generate_case((64, 64, 64), seed=1000 + fold)
        case = (sitk.GetArrayFromImage(image).astype(np.float32), sitk.GetArrayFromImage(label))
        nets.append(fit_head(VesselUNet().eval(), case=case))
    target = workdir / "weights"
    write_weights(target, nets=nets, patch=(patch,) * 3, target_spacing=(0.227,) * 3, seed=seed)
    return target


# --- the cases --------------------------------------------------------------------------------


def input_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{SUFFIX}"))


def output_name(source: Path) -> str:
    return source.name.removesuffix(SUFFIX) + ".nii.gz"


def write_cases(folder: Path, shape: tuple[int, int, int], count: int, seed: int) -> list:
    """``count`` phantoms as ``folder/input/case_K_0000.nii.gz``; their labels."""
    import SimpleITK as sitk

    from phantoms import generate_case

    (folder / "input").mkdir(parents=True, exist_ok=True)
    labels = []
    for k in range(count):
        image, label = generate_case(shape, seed=seed + 7 + k)
        sitk.WriteImage(image, str(folder / "input" / f"case_{k:03d}{SUFFIX}"))
        labels.append(sitk.GetArrayFromImage(label))
    return labels


def read_truth(folder: Path, sources: list[Path]) -> list:
    """The ``ground_truth/`` masks of a challenge-layout folder, in the order of ``sources``."""
    import SimpleITK as sitk

    return [
        sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "ground_truth" / output_name(s))))
        for s in sources
    ]


# --- the MONAI baselines ----------------------------------------------------------------------


def monai_case(
    source: Path, target: Path, manifest, predictor, sw_batch_size: int, device: str = "cpu"
) -> None:
    """Read, preprocess, MONAI sliding window, threshold, clean, write: only the prediction
    step differs from the project's pipeline."""
    import torch
    from monai.inferers import sliding_window_inference

    from inference.io import write_image_atomically
    from inference.preprocessing import preprocess, read_image, to_input_grid
    from postprocess import CleaningSettings, clean_mask

    array, geometry = read_image(source)
    volume = preprocess(array, geometry, manifest)
    with torch.inference_mode():
        output = sliding_window_inference(
            torch.from_numpy(volume)[None, None].to(device),
            roi_size=manifest.patch_size,
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=0.5,
            mode="gaussian",
            sigma_scale=0.125,
        )
    probability = to_input_grid(
        output[0, 1].float().cpu().numpy(), geometry, manifest.target_spacing
    )
    cleaning = CleaningSettings.from_dict(manifest.postprocess)
    mask = clean_mask(probability > 0.5, geometry.spacing, cleaning, probability)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_image_atomically(geometry.image_from(mask), target)


def monai_folder(
    sources: list[Path], out: Path, manifest, predictor, sw: int, device: str
) -> float:
    """Seconds to segment every case with :func:`monai_case`, one after the other."""
    start = time.perf_counter()
    for source in sources:
        monai_case(source, out / output_name(source), manifest, predictor, sw, device)
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - start


def eager_predictor(nets, device: str) -> Callable:
    """Baseline A: the folds' mean softmax in eager fp32."""
    import torch

    nets = [net.to(device) for net in nets]

    def predictor(x: torch.Tensor) -> torch.Tensor:
        return sum(torch.softmax(net(x), dim=1) for net in nets) / len(nets)

    return predictor


def tuned_cuda_predictor(nets) -> Callable:
    """Baseline A': cuDNN autotuning, bf16 autocast (fp16 without native bf16), channels-last
    3D; the softmax in fp32."""
    import torch

    from inference.torch_backend import cuda_autocast_dtype

    torch.backends.cudnn.benchmark = True
    dtype = cuda_autocast_dtype()
    layout = torch.channels_last_3d
    nets = [net.to("cuda", memory_format=layout) for net in nets]

    def predictor(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=layout)
        total = 0
        with torch.autocast("cuda", dtype=dtype):
            for net in nets:
                total = total + torch.softmax(net(x).float(), dim=1)
        return total / len(nets)

    return predictor


def openvino_predictor(nets, patch, threads: int) -> tuple[Callable, str]:
    """Baseline B: each fold converted with a static input shape and compiled for throughput;
    the predictor starts every window of MONAI's batch on every fold, then waits for all."""
    import openvino as ov
    import torch

    from inference.openvino_backend import precision_hint

    core = ov.Core()
    config = {
        "PERFORMANCE_HINT": "THROUGHPUT",
        "INFERENCE_PRECISION_HINT": precision_hint(core),
        "INFERENCE_NUM_THREADS": threads,
    }
    example = torch.zeros(1, 1, *patch)
    compiled = []
    for net in nets:
        model = ov.convert_model(
            torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval(),
            example_input=example,
            input=[(1, 1, *patch)],
        )
        compiled.append(core.compile_model(model, "CPU", config))
    queues: dict[int, list] = {}

    def predictor(x: torch.Tensor) -> torch.Tensor:
        windows = x.numpy()
        if len(windows) not in queues:  # as many requests as windows: all in flight
            queues[len(windows)] = [ov.AsyncInferQueue(c, len(windows)) for c in compiled]
        results = np.zeros((len(compiled), len(windows), 2, *patch), np.float32)

        def keep(request, where) -> None:
            results[where] = request.get_output_tensor(0).data[0]

        for fold, queue in enumerate(queues[len(windows)]):
            queue.set_callback(keep)
            for k, window in enumerate(windows):
                queue.start_async({0: window[None]}, (fold, k))
        for queue in queues[len(windows)]:
            queue.wait_all()
        return torch.from_numpy(results.mean(axis=0))

    return predictor, config["INFERENCE_PRECISION_HINT"]


def run_monai(name: str, sources: list[Path], out: Path, weights: Path, args) -> dict:
    """Set up the MONAI contender ``name`` and warm it up on the first case; with ``--tune``
    time each ``sw_batch_size`` of :data:`TUNE_SW` on the first case (as an expert tunes);
    then time the folder at the best."""
    from model.weights import load_ensemble

    start = time.perf_counter()
    manifest, nets = load_ensemble(weights, list(range(args.folds)))
    info: dict = {}
    if name == "monai_torch":
        predictor = eager_predictor(nets, args.device)
        info["precision"] = "float32"
    elif name == "monai_torch_tuned":
        from inference.torch_backend import cuda_autocast_dtype

        predictor = tuned_cuda_predictor(nets)
        info["precision"] = str(cuda_autocast_dtype()).removeprefix("torch.")
    else:
        predictor, info["precision"] = openvino_predictor(nets, manifest.patch_size, args.threads)
    info["setup_s"] = time.perf_counter() - start
    sizes = TUNE_SW[args.device] if args.tune and name != "monai_torch" else [sw_of(name, args)]
    warm = out.parent / "warm-up"
    timings = {}
    for sw in sizes:
        if sw == sizes[0] or name == "monai_torch_tuned":  # cuDNN tunes each batch shape
            monai_folder(sources[:1], warm, manifest, predictor, sw, args.device)
        if len(sizes) > 1:
            timings[sw] = monai_folder(sources[:1], out, manifest, predictor, sw, args.device)
            print(f"{name}: sw_batch_size {sw}: {timings[sw]:.2f} s", file=sys.stderr)
    best = min(timings, key=timings.get) if timings else sizes[0]
    if len(sources) == 1 and timings:  # the masks (of the last size) do not depend on it
        seconds = timings[best]
    else:
        seconds = monai_folder(sources, out, manifest, predictor, best, args.device)
    return {**info, "seconds": seconds, "sw_batch_size": best, "sw_seconds_first_case": timings}


def sw_of(name: str, args) -> int:
    return args.sw_batch_size or DEFAULT_SW[name]


# --- the project ------------------------------------------------------------------------------


def float_precision(device: str) -> str:
    """The CPU's float arithmetic, what ``auto`` runs without int8 models (CUDA: ``auto``)."""
    if device != "cpu":
        return "auto"
    from inference.openvino_backend import ov, precision_hint

    return precision_hint(ov.Core())


def project_predictor(weights: Path, args, precision: str = "auto", deterministic=False):
    from inference.predictor import Predictor, PredictorSettings

    settings = PredictorSettings(
        backend="openvino" if args.device == "cpu" else "torch",
        device=args.device,
        folds=list(range(args.folds)),
        batch_size=args.batch_size,
        precision=precision,
        deterministic=deterministic,
    )
    return Predictor(weights, settings)


def project_folder(predictor, inputs: Path, out: Path) -> float:
    """Seconds of ``process.py``'s folder path (cases found and segmented in order, pipelined
    on a GPU, ``results.json`` written) with ``predictor`` already loaded (its
    setup is not timed)."""
    import contextlib
    import io

    import process

    args = process.parse_args(["--input", str(inputs), "--output", str(out)])
    process.load_predictor = lambda _: predictor  # the folder path as is, the models loaded
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # one line and a progress bar per case
        status = process.segment_all(args, process.Report(out, inputs))
    seconds = time.perf_counter() - start
    if status:
        raise RuntimeError(f"process.py's folder path failed: {(out / 'results.json').read_text()}")
    return seconds


def run_project(name: str, sources: list[Path], out: Path, weights: Path, args) -> dict:
    from inference.cases import segment_file

    start = time.perf_counter()
    if name == "project_int8":  # the build-time step: int8 models into the model cache
        from inference.openvino_backend import cache_dir
        from train import int8

        int8.main([str(weights), "--output", str(cache_dir())])
    precision = "int8" if name == "project_int8" else float_precision(args.device)
    predictor = project_predictor(weights, args, precision, name in DETERMINISTIC)
    info = {"setup_s": time.perf_counter() - start, "precision": predictor.backend.precision}
    segment_file(predictor, sources[0], out.parent / "warm-up" / output_name(sources[0]))
    if name == "network_only":
        windows = [model_windows(predictor, source) for source in sources]
        return {**info, "seconds": network_seconds(predictor, windows, args.device)}
    return {**info, "seconds": project_folder(predictor, sources[0].parent, out)}


def model_windows(predictor, source: Path) -> list[np.ndarray]:
    """The case's windows as the network sees them, (1, 1, *patch) each."""
    from inference.preprocessing import read_image
    from inference.sliding_window import pad_to_patch

    array, geometry = read_image(source)
    volume, _ = pad_to_patch(predictor.model_input(array, geometry), predictor.manifest.patch_size)
    plan = predictor.plan(volume.shape)
    return [np.ascontiguousarray(volume[w])[None, None] for w in plan.windows()]


def network_seconds(predictor, cases: list[list[np.ndarray]], device: str) -> float:
    timer = network_only_cuda if device == "cuda" else network_only
    return sum(timer(predictor, windows) for windows in cases)


def network_only_cuda(predictor, windows: list[np.ndarray]) -> float:
    """Seconds the folds take on the GPU for the case's windows, batched as in predict, with
    the windows already on the device and nothing stitched."""
    import torch

    backend = predictor.backend
    size = backend.batch_size
    batches = -(-len(windows) // size)  # the last batch padded with zeros, as in predict
    on_device = torch.zeros(batches * size, 1, *windows[0].shape[2:], device=backend.torch_device)
    on_device[: len(windows)] = torch.from_numpy(np.concatenate(windows)).to(backend.torch_device)
    with torch.inference_mode(), backend.torch_settings():
        torch.cuda.synchronize()  # cuDNN chose its kernels when the backend warmed up
        start = time.perf_counter()
        for first in range(0, len(on_device), size):
            backend.passes(on_device[first : first + size], [()])
        torch.cuda.synchronize()
    return time.perf_counter() - start


def network_only(predictor, windows: list[np.ndarray]) -> float:
    """Seconds the compiled folds take for the case's windows, without any other work."""
    import openvino as ov

    backend = predictor.backend
    start = time.perf_counter()
    for compiled, requests in backend.compiled_folds():  # as in predict
        queue = ov.AsyncInferQueue(compiled, requests)
        for window in windows:
            queue.start_async({0: window})
        queue.wait_all()
        del queue, compiled
    return time.perf_counter() - start


# --- other measurements -----------------------------------------------------------------------


def bench_postprocess(size: int, repeats: int = 3) -> dict:
    """Seconds of :func:`postprocess.clean_mask` on a ``size``^3 mask: a vessel-like bar plus
    0.1 % speckle (over 100,000 components at 512^3), best of ``repeats``."""
    from postprocess import clean_mask

    rng = np.random.default_rng(0)
    mask = (rng.random((size,) * 3, dtype=np.float32) > 0.999).view(np.uint8)
    mask[size // 5 : 4 * size // 5, size // 2 : size // 2 + 6, size // 2 : size // 2 + 6] = 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        clean_mask(mask, (0.227,) * 3)
        times.append(time.perf_counter() - start)
    return {"postprocess_size": size, "postprocess_seconds": min(times)}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    from metrics import dice as metric

    return float(metric(a, b))


# --- the command ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="phantom side in voxels")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("Z", "Y", "X"), help="not cubic")
    parser.add_argument("--cases", type=int, default=1, help="phantoms in the folder")
    parser.add_argument(
        "--phantoms", type=Path, help="a challenge-layout folder (input/, ground_truth/) instead"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, help="the project's windows per call (CUDA)")
    parser.add_argument(
        "--patch",
        type=int,
        help="patch side; random folds unless the shipped ones have it (default: shipped)",
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--sw-batch-size", type=int, help=f"MONAI windows per call (default {DEFAULT_SW})"
    )
    parser.add_argument("--tune", action="store_true", help=f"the best sw_batch_size of {TUNE_SW}")
    parser.add_argument("--int8", action="store_true", help="also the project with int8 (CPU)")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="also the project with --deterministic, in two processes (CUDA): its cost, and "
        "whether the two runs' masks are bit-identical",
    )
    parser.add_argument("--threads", type=int, default=None, help="default: all available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=CONTENDERS)
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp folder)")
    parser.add_argument(
        "--postprocess", type=int, metavar="SIZE", help="only time the cleaning of a SIZE^3 mask"
    )
    parser.add_argument("--run", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--weights", type=Path, help="weights folder (default: shipped, else fitted random folds)"
    )
    return parser.parse_args()


def chosen_contenders(args) -> list[str]:
    if args.only:
        names = list(args.only)
    else:
        names = [n for n in CONTENDERS if n != "project_int8" or args.int8]
        names = [n for n in names if n not in DETERMINISTIC or args.deterministic]
    excluded = CPU_ONLY if args.device == "cuda" else CUDA_ONLY
    return [name for name in names if name not in excluded]


def main() -> int:
    args = parse_args()
    from inference.backend_base import available_cpus

    args.threads = args.threads or available_cpus()
    args.shape = tuple(args.shape or (args.size,) * 3)
    if args.postprocess:
        print(json.dumps(bench_postprocess(args.postprocess)))
        return 0
    if args.run:  # child: one contender
        import torch

        torch.set_num_threads(args.threads)
        sources, out = input_files(args.inputs), args.workdir / "out" / args.run
        run = run_monai if args.run.startswith("monai") else run_project
        result = run(args.run, sources, out, args.weights, args)
        print(json.dumps({**result, **peak_memory_mb(args.device)}))
        return 0
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        return orchestrate(args, workdir)


def child_command(name: str, args, workdir: Path, inputs: Path, weights: Path) -> list[str]:
    command = [sys.executable, __file__, "--run", name, "--workdir", str(workdir)]
    command += ["--inputs", str(inputs), "--weights", str(weights), "--folds", str(args.folds)]
    command += ["--threads", str(args.threads), "--device", args.device]
    if args.sw_batch_size:
        command += ["--sw-batch-size", str(args.sw_batch_size)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    return command + (["--tune"] if args.tune else [])


def orchestrate(args, workdir: Path) -> int:
    if args.phantoms:
        inputs = args.phantoms / "input"
        truth = read_truth(args.phantoms, input_files(inputs))
    else:
        inputs = workdir / "cases" / "input"
        truth = write_cases(inputs.parent, args.shape, args.cases, args.seed)
    sources = input_files(inputs)
    weights = args.weights or make_weights(workdir, args.folds, args.patch, args.seed)
    volume = "x".join(str(s) for s in truth[0].shape)
    results: dict = {
        "volume": volume,
        "cases": len(sources),
        "device": args.device,
        "folds": args.folds,
        "overlap": 0.5,
        "threads": args.threads,
        "weights": str(weights),
    }
    if args.device == "cpu":
        from inference.openvino_backend import int8_preferred

        results["int8_preferred"] = int8_preferred()  # what auto runs once int8 is prepared
    env = {**os.environ, "VESSEL_SEG_CACHE": str(workdir / "cache")}
    for name in chosen_contenders(args):
        command = child_command(name, args, workdir, inputs, weights)
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        results[name] = {"volume": volume, "cases": len(sources), **row}
        print(f"{name}: {results[name]}", file=sys.stderr)
    summarize(results, workdir / "out", sources, truth)
    print(json.dumps(results, indent=2))
    return 0


def summarize(results: dict, out: Path, sources: list[Path], truth: list) -> None:
    """Throughputs, speed-ups and mask agreement (mean Dice over the cases)."""
    voxels = sum(math.prod(t.shape) for t in truth)
    for name in CONTENDERS:
        if name in results:
            row = results[name]
            row["seconds_per_case"] = row["seconds"] / len(sources)
            row["mvox_per_s"] = voxels / row["seconds"] / 1e6
    masks = {name: read_masks(out / name, sources) for name in CONTENDERS if (out / name).is_dir()}
    masks = {name: m for name, m in masks.items() if m}
    results["dice_vs_ground_truth"] = {name: mean_dice(m, truth) for name, m in masks.items()}
    results["ratios"] = ratios(results)
    for contender, reference, key in (
        ("project", "monai_torch", "dice_project_vs_a"),
        ("project", "monai_openvino", "dice_project_vs_b"),
        ("project", "monai_torch_tuned", "dice_project_vs_a_tuned"),
        ("project_int8", "monai_torch", "dice_int8_vs_a"),
        ("project_int8", "project", "dice_int8_vs_project"),
        ("project_deterministic", "project", "dice_deterministic_vs_project"),
    ):
        if contender in masks and reference in masks:
            results[key] = mean_dice(masks[contender], masks[reference])
    if all(name in masks for name in DETERMINISTIC):
        runs = [masks[name] for name in DETERMINISTIC]
        results["deterministic_runs_bit_identical"] = all(
            np.array_equal(a, b) for a, b in zip(*runs, strict=True)
        )


def read_masks(folder: Path, sources: list[Path]) -> list:
    import SimpleITK as sitk

    paths = [folder / output_name(source) for source in sources]
    if not all(path.is_file() for path in paths):
        return []
    return [sitk.GetArrayFromImage(sitk.ReadImage(str(path))) for path in paths]


def mean_dice(masks: list, references: list) -> float:
    return float(np.mean([dice(m, r) for m, r in zip(masks, references, strict=True)]))


def ratios(results: dict) -> dict:
    """``x_over_y``: y's seconds / x's seconds (a speed-up), except end_to_end_over_network_only
    (the project's seconds / the network's alone: 1 means no overhead)."""
    pairs = (
        ("project", "monai_torch", "project_over_a"),
        ("project", "monai_torch_tuned", "project_over_a_tuned"),
        ("project", "monai_openvino", "project_over_b"),
        ("project_int8", "monai_openvino", "project_int8_over_b"),
        ("project_int8", "project", "project_int8_over_project"),
        ("project_deterministic", "project", "deterministic_over_project"),
        ("monai_torch_tuned", "monai_torch", "a_tuned_over_a"),
        ("monai_openvino", "monai_torch", "b_over_a"),
    )
    found = {}
    for faster, slower, key in pairs:
        if faster in results and slower in results:
            found[key] = results[slower]["seconds"] / results[faster]["seconds"]
    if "project" in results and "network_only" in results:
        found["end_to_end_over_network_only"] = (
            results["project"]["seconds"] / results["network_only"]["seconds"]
        )
    return found


if __name__ == "__main__":
    sys.exit(main())
