"""Inference benchmark: the project's pipeline against MONAI baselines, one run.

    python bench/bench_inference.py [--size 256 | --shape Z Y X] [--folds 5] [--device cuda]

All contenders segment the same phantom with the same five folds (the shipped weights in
``weights/`` when present, else full-width networks whose random features get a fitted head,
see :func:`helpers.fit_head (test/helpers.py)`, so that the masks mean something), overlap 0.5,
Gaussian weighting (sigma = patch/8), threshold 0.5 and the same connected-component cleaning:

- ``monai_torch`` (baseline A): ``monai.inferers.sliding_window_inference`` driving the folds'
  mean softmax in eager fp32 torch;
- ``monai_openvino`` (baseline B): the same call driving the folds compiled by OpenVINO as an
  expert would by hand (``ov.convert_model`` + ``core.compile_model(model, "CPU")``);
- ``project``: ``inference.cases.segment_file`` end to end (read, preprocess, predict,
  postprocess, write) with the OpenVINO backend;
- ``network_only``: the project's compiled folds running the same windows, nothing else.

With ``--device cuda`` the same contenders run on the GPU, less B (OpenVINO is the CPU's): A is
the MONAI call in eager fp32 torch on the GPU (``--sw-batch-size`` windows per call), the
project is its PyTorch backend (bf16 autocast, channels-last, ``--batch-size`` windows per call,
default :func:`inference.torch_backend.default_batch_size`), and each reports its peak GPU
memory.

Each contender runs in its own process (peak RSS is its own). Times exclude loading and
compiling the models (reported as ``setup_s``: for ``project`` with an empty OpenVINO model
cache, i.e. converting every fold; for ``network_only`` from that cache); every case is timed
from reading the file to the written mask. Prints JSON. ``--postprocess 512`` times only the
connected-component cleaning of a 512^3 mask.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTENDERS = ("monai_torch", "monai_openvino", "project", "network_only")
CPU_ONLY = ("monai_openvino",)


def peak_memory_mb(device: str) -> dict:
    """This process's peak resident memory, and its peak GPU allocation on CUDA."""
    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device == "cuda":
        import torch

        peaks["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def make_weights(workdir: Path, folds: int, patch: int, seed: int) -> Path:
    """The shipped weights when present, else fitted random full-width folds in ``workdir``."""
    from model.weights import load_manifest

    shipped = ROOT / "weights"
    if (shipped / "manifest.json").is_file() and len(load_manifest(shipped).folds) >= folds:
        return shipped
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


def monai_case(
    source: Path, target: Path, weights: Path, predictor, sw_batch_size: int, device: str = "cpu"
) -> None:
    """Read, preprocess, MONAI sliding window, threshold, clean, write: only the prediction
    step differs from the project's pipeline."""
    import torch
    from monai.inferers import sliding_window_inference

    from inference.io import write_image_atomically
    from inference.preprocessing import preprocess, read_image, to_input_grid
    from model.weights import load_manifest
    from postprocess import CleaningSettings, clean_mask

    manifest = load_manifest(weights)
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
    probability = to_input_grid(output[0, 1].cpu().numpy(), geometry, manifest.target_spacing)
    mask = clean_mask(
        probability > 0.5, geometry.spacing, CleaningSettings.from_dict(manifest.postprocess)
    )
    write_image_atomically(geometry.image_from(mask), target)


def run_contender(name: str, source: Path, target: Path, weights: Path, args) -> dict:
    """Set up and run one contender in this process; its timings."""
    import torch

    from model.weights import load_ensemble

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    manifest, nets = load_ensemble(weights, list(range(args.folds)))
    if name == "monai_torch":
        nets = [net.to(args.device) for net in nets]

        def predictor(x: torch.Tensor) -> torch.Tensor:
            return sum(torch.softmax(net(x), dim=1) for net in nets) / len(nets)

        setup = time.perf_counter() - start
        start = time.perf_counter()
        monai_case(source, target, weights, predictor, args.sw_batch_size, args.device)
        return {"setup_s": setup, "seconds": time.perf_counter() - start}
    if name == "monai_openvino":
        import openvino as ov

        core = ov.Core()
        example = torch.zeros(1, 1, *manifest.patch_size)
        compiled = [
            core.compile_model(
                ov.convert_model(
                    torch.nn.Sequential(net, torch.nn.Softmax(dim=1)), example_input=example
                ),
                "CPU",
            )
            for net in nets
        ]

        def predictor(x: torch.Tensor) -> torch.Tensor:
            data = x.numpy()
            return torch.from_numpy(sum(c(data)[0] for c in compiled) / len(compiled))

        setup = time.perf_counter() - start
        start = time.perf_counter()
        monai_case(source, target, weights, predictor, args.sw_batch_size)
        precision = str(compiled[0].get_property("INFERENCE_PRECISION_HINT"))
        return {"setup_s": setup, "seconds": time.perf_counter() - start, "precision": precision}

    from inference.cases import segment_file
    from inference.predictor import Predictor, PredictorSettings

    settings = PredictorSettings(
        backend="openvino" if args.device == "cpu" else "torch",
        device=args.device,
        folds=list(range(args.folds)),
        batch_size=args.batch_size,
    )
    predictor = Predictor(weights, settings)
    setup = time.perf_counter() - start
    info = {"setup_s": setup, "precision": predictor.backend.precision}
    if name == "project":
        start = time.perf_counter()
        segment_file(predictor, source, target)
        return {**info, "seconds": time.perf_counter() - start}
    windows = model_windows(predictor, source)
    if args.device == "cuda":
        return {**info, "seconds": network_only_cuda(predictor, windows)}
    return {**info, "seconds": network_only(predictor, windows)}


def model_windows(predictor, source: Path) -> list[np.ndarray]:
    """The case's windows as the network sees them, (1, 1, *patch) each."""
    from inference.preprocessing import read_image
    from inference.sliding_window import pad_to_patch

    array, geometry = read_image(source)
    volume, _ = pad_to_patch(predictor.model_input(array, geometry), predictor.manifest.patch_size)
    plan = predictor.plan(volume.shape)
    return [np.ascontiguousarray(volume[w])[None, None] for w in plan.windows()]


def network_only_cuda(predictor, windows: list[np.ndarray]) -> float:
    """Seconds the folds take on the GPU for the case's windows, batched as in predict, with
    the windows already on the device and nothing stitched."""
    import torch

    backend = predictor.backend
    size = backend.batch_size
    batches = -(-len(windows) // size)  # the last batch padded with zeros, as in predict
    on_device = torch.zeros(batches * size, 1, *windows[0].shape[2:], device=backend.torch_device)
    on_device[: len(windows)] = torch.from_numpy(np.concatenate(windows)).to(backend.torch_device)
    with torch.inference_mode():
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="phantom side in voxels")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        help="phantom shape (instead of --size)",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, help="the project's windows per call (CUDA)")
    parser.add_argument("--patch", type=int, default=128, help="patch side (random weights)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--sw-batch-size", type=int, default=1, help="MONAI windows per call")
    parser.add_argument("--threads", type=int, default=None, help="default: all available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--workdir", type=Path, help="keep files here (default: a temp folder)")
    parser.add_argument(
        "--postprocess", type=int, metavar="SIZE", help="only time the cleaning of a SIZE^3 mask"
    )
    parser.add_argument("--run", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--weights", type=Path, help="weights folder (default: shipped, else fitted random folds)"
    )
    args = parser.parse_args()
    from inference.backend_base import available_cpus

    args.threads = args.threads or available_cpus()
    args.shape = tuple(args.shape or (args.size,) * 3)
    if args.device == "cuda":
        args.only = [name for name in args.only if name not in CPU_ONLY]
    if args.postprocess:
        print(json.dumps(bench_postprocess(args.postprocess)))
        return 0
    if args.run:  # child: one contender
        source, target = args.workdir / "phantom.nii.gz", args.workdir / f"{args.run}.nii.gz"
        result = run_contender(args.run, source, target, args.weights, args)
        print(json.dumps({**result, **peak_memory_mb(args.device)}))
        return 0
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        return orchestrate(args, workdir)


def orchestrate(args, workdir: Path) -> int:
    import SimpleITK as sitk

    from phantoms import generate_case

    image, label = generate_case(args.shape, seed=args.seed + 7)
    sitk.WriteImage(image, str(workdir / "phantom.nii.gz"))
    weights = args.weights or make_weights(workdir, args.folds, args.patch, args.seed)
    results: dict = {
        "shape": args.shape,
        "device": args.device,
        "folds": args.folds,
        "overlap": 0.5,
        "threads": args.threads,
        "weights": str(weights),
        "sw_batch_size": args.sw_batch_size,
    }
    env_cache = {"VESSEL_SEG_CACHE": str(workdir / "cache")}
    for name in args.only:
        command = [
            sys.executable,
            __file__,
            "--run",
            name,
            "--workdir",
            str(workdir),
            "--weights",
            str(weights),
            "--folds",
            str(args.folds),
            "--threads",
            str(args.threads),
            "--sw-batch-size",
            str(args.sw_batch_size),
            "--device",
            args.device,
            *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, **env_cache}
        )
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return 1
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", file=sys.stderr)
    summarize(results, workdir, label, args.shape)
    print(json.dumps(results, indent=2))
    return 0


def summarize(results: dict, workdir: Path, label, shape: tuple[int, int, int]) -> None:
    """Throughputs, speed-ups and mask agreement."""
    import math

    import SimpleITK as sitk

    voxels = math.prod(shape)
    for name in CONTENDERS:
        if name in results:
            results[name]["mvox_per_s"] = voxels / results[name]["seconds"] / 1e6
    project = results.get("project")
    masks = {
        name: sitk.GetArrayFromImage(sitk.ReadImage(str(workdir / f"{name}.nii.gz")))
        for name in ("monai_torch", "monai_openvino", "project")
        if (workdir / f"{name}.nii.gz").is_file()
    }
    truth = sitk.GetArrayFromImage(label)
    results["dice_vs_ground_truth"] = {name: dice(m, truth) for name, m in masks.items()}
    if project:
        for baseline, key in (("monai_torch", "a"), ("monai_openvino", "b")):
            if baseline in results:
                results[f"speedup_over_{key}"] = results[baseline]["seconds"] / project["seconds"]
        if "network_only" in results:
            results["end_to_end_over_network_only"] = (
                project["seconds"] / results["network_only"]["seconds"]
            )
        if "monai_torch" in masks:
            results["dice_project_vs_a"] = dice(masks["project"], masks["monai_torch"])
        if "monai_openvino" in masks:
            results["dice_project_vs_b"] = dice(masks["project"], masks["monai_openvino"])


if __name__ == "__main__":
    sys.exit(main())
