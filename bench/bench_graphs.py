"""Graph capture against eager kernels: the torch backend's network on its fixed batch shape.

    python bench/bench_graphs.py --device cuda [--folds 5] [--patch 48] [--batch-size N]
    python bench/bench_graphs.py --device cpu --folds 1 --patch 32 --batch-size 2   # dry run

The project's CUDA path runs every fold on batches of one shape (``default_batch_size``; the
last batch padded), under bf16 autocast (fp16 before Ampere), channels-last, cuDNN autotuned.
One shape is what graph capture wants, so each way of running that batch is timed here, in one
process, on the same batch of real windows (a phantom preprocessed as a case is):

- ``eager``: what ships (``TorchBackend.passes``);
- ``cudagraphs`` (CUDA): ``torch.compile(backend="cudagraphs")``, the eager kernels replayed
  from a captured CUDA graph, launch overhead gone;
- ``inductor``: ``torch.compile`` (Inductor's fused kernels, one static shape);
- ``inductor-max-autotune`` (CUDA): the same with Triton/cuBLAS kernels autotuned, no graphs;
- ``inductor-cudagraphs`` (CUDA): Inductor's kernels replayed from CUDA graphs
  (``mode="reduce-overhead"``).

Each contender is compiled and warmed up untimed (``setup_s``: the compile cost a container
pays once per process), then timed over ``--repeats`` batches (median and min per batch, and
per window). Its masks (> 0.5 of the fold mean) are compared with eager's (``mask_dice``), and
``keep`` names the fastest contender whose masks agree at Dice >= 0.999, if it beats eager
by 5 % or more (else ``eager``): what the CUDA path should run. Per-batch times do not depend
on the fold, so one fold (``--folds 1``) measures them. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CUDA_ONLY = ("cudagraphs", "inductor-max-autotune", "inductor-cudagraphs")
COMPILE = {  # contender: torch.compile's arguments
    "cudagraphs": {"backend": "cudagraphs"},
    "inductor": {"mode": "default"},
    "inductor-max-autotune": {"mode": "max-autotune-no-cudagraphs"},
    "inductor-cudagraphs": {"mode": "reduce-overhead"},
}
AGREEMENT = 0.999  # mask Dice with eager for a contender to be kept
MIN_GAIN = 1.05  # and this much faster than eager: a smaller gain is not worth a compiler


def batch_of_windows(predictor, size: int, seed: int):
    """``size`` windows of a phantom preprocessed as a case is, the model's input batch."""
    import torch
    from bench_inference import model_windows, write_cases

    with tempfile.TemporaryDirectory() as temporary:
        folder, patch = Path(temporary), predictor.manifest.patch_size
        write_cases(folder, tuple(max(64, 2 * p) for p in patch), 1, seed)
        windows = model_windows(predictor, next((folder / "input").iterdir()))
    picked = np.concatenate([windows[k % len(windows)] for k in range(size)])
    return torch.from_numpy(picked).to(predictor.backend.torch_device)


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_contender(backend, eager_nets, name: str, batch, repeats: int) -> tuple[dict, object]:
    """Set up ``name`` on ``backend``'s folds, warm it up, time it; its row and probability."""
    import torch

    start = time.perf_counter()
    if name == "eager":
        backend.nets = list(eager_nets)
    else:
        torch._dynamo.reset()  # each contender compiles from scratch
        backend.nets = [torch.compile(net, dynamic=False, **COMPILE[name]) for net in eager_nets]
    with torch.inference_mode(), backend.torch_settings():
        for _ in range(3):  # compile, capture, and autotune for the one shape
            probability = backend.passes(batch, [()]).clone()
        synchronize(batch.device)
        setup = time.perf_counter() - start
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            backend.passes(batch, [()])
            synchronize(batch.device)
            seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    row = {
        "setup_s": round(setup, 2),
        "batch_ms_median": round(1e3 * median, 3),
        "batch_ms_min": round(1e3 * min(seconds), 3),
        "window_ms": round(1e3 * median / len(batch), 3),
    }
    return row, probability.float().cpu().numpy()


def mask_dice(a: np.ndarray, b: np.ndarray, folds: int) -> float:
    """Dice of the masks (> 0.5 of the fold mean) of two fold sums (N, Z, Y, X), the batch's
    windows stacked along z (the metric takes one volume)."""
    from metrics import dice

    first, second = (m.reshape(-1, *m.shape[-2:]) > 0.5 * folds for m in (a, b))
    return float(dice(first, second))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--patch", type=int, help="patch side; random folds unless the shipped ones have it"
    )
    parser.add_argument("--batch-size", type=int, help="default: the CUDA path's own")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--weights", type=Path, help="default: shipped, else fitted random folds")
    parser.add_argument("--only", nargs="+", choices=("eager", *COMPILE))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from bench_inference import make_weights

    from inference.predictor import Predictor, PredictorSettings

    with tempfile.TemporaryDirectory() as workdir:
        weights = args.weights or make_weights(Path(workdir), args.folds, args.patch, args.seed)
        settings = PredictorSettings(
            backend="torch",
            device=args.device,
            folds=list(range(args.folds)),
            batch_size=args.batch_size,
        )
        predictor = Predictor(weights, settings)
    backend = predictor.backend
    batch = batch_of_windows(predictor, backend.batch_size, args.seed)
    names = args.only or ["eager", *COMPILE]
    names = ["eager", *(n for n in names if n != "eager")]  # the reference runs first
    if args.device == "cpu":
        names = [name for name in names if name not in CUDA_ONLY]
    eager_nets = list(backend.nets)
    rows, reference = {}, None
    for name in names:
        try:
            row, probability = run_contender(backend, eager_nets, name, batch, args.repeats)
        except Exception as error:  # a compiler that fails here is a result, not a crash
            rows[name] = {"error": " ".join(f"{type(error).__name__}: {error}".split())[:300]}
            continue
        reference = probability if reference is None else reference
        row["mask_dice"] = round(mask_dice(probability, reference, len(eager_nets)), 5)
        row["max_abs_diff"] = float(np.abs(probability - reference).max() / len(eager_nets))
        rows[name] = row
    agreeing = {n: r for n, r in rows.items() if r.get("mask_dice", 0) >= AGREEMENT}
    eager_ms = rows["eager"]["batch_ms_median"]
    for row in agreeing.values():
        row["speedup_over_eager"] = round(eager_ms / row["batch_ms_median"], 3)
    fastest = max(agreeing, key=lambda n: agreeing[n]["speedup_over_eager"])
    keep = fastest if agreeing[fastest]["speedup_over_eager"] >= MIN_GAIN else "eager"
    print(
        json.dumps(
            {
                "device": backend.device,
                "precision": backend.precision,
                "folds": len(eager_nets),
                "batch": list(batch.shape),
                "patch": list(predictor.manifest.patch_size),
                "weights": str(weights),
                "contenders": rows,
                "keep": keep,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
