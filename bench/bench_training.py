"""Benchmark of the training data path: step throughput with and without background loading,
and the peak memory of a site with clinical-size cases, each against its baseline in one run.

1. Training steps per second and patch voxels per second (batch 2, forward + backward + Adam,
   the full-width network, ``precision`` auto) at 64^3, 96^3, 128^3 and 160^3, on the CPU and
   on CUDA when present, three ways over the same batches of cached cases:
   ``in_memory`` (the batches made beforehand: the step alone, the reference),
   ``synchronous`` (patches cut and augmented in the training loop, as before) and
   ``background`` (:class:`train.sampling.BackgroundBatches`, ``--workers`` processes). A step
   is timed from asking for its batch to the end of its optimiser step (``seconds_per_step``,
   the median of ``--steps`` steps after one warm-up step), with the part spent waiting for
   the batch (``wait``) and the training process's own CPU seconds (``cpu``, without the
   workers'): where other load slows or pauses this process, ``cpu`` and ``wait`` still
   compare the ways. Target: ``background`` within 10% of ``in_memory`` on the CPU.
2. Peak resident memory of one site with ``--cases`` cases of 512x512x400 (made once with
   ``python -m phantoms``, kept in ``--data``) training one round (fold 0, ``--memory-patch``
   patches, 10 per case), each way in a process of its own: ``in_memory`` (the loader before
   the cache: every case preprocessed and held in memory), ``cached_cold`` (the on-disk cache
   built first, in the same process) and ``cached_warm`` (the cache already there). Memory is
   sampled every 0.1 s over the process and its patch workers: resident set (RSS, shared
   pages counted in each process) and proportional set (PSS, shared pages divided among
   them), besides the kernel's ``ru_maxrss`` of the process itself. Target: at most 4 GB.
   ``--validate`` adds the round's validation of the held-out cases to ``cached_warm``.
3. The allocator: the same warm-cache round, in a process of its own, under glibc's default
   allocator settings and under :data:`train.deploy.localhost.TRAINING_ALLOCATOR` (which every
   Flower process of a training gets): seconds of the round, CPU seconds in the kernel, page
   faults and peak memory, and their ratios. glibc maps every freed block above 32 MB apart
   and hands it back to the kernel, so each step page-faults its widest feature maps in again.

Prints one JSON object.

    python bench/bench_training.py                        # everything (an hour on 2 CPUs)
    python bench/bench_training.py --quick                # 64^3 and 96^3, 2 steps, 4 cases
    python bench/bench_training.py --device cuda --skip-memory
    python bench/bench_training.py --quick --skip-memory --skip-steps   # the allocator alone
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.config import TrainConfig  # noqa: E402
from train.data import load_site  # noqa: E402
from train.deploy.localhost import TRAINING_ALLOCATOR, descendants  # noqa: E402
from train.loss import positive_weight, vessel_loss  # noqa: E402
from train.sampling import epoch_batches, loader_workers  # noqa: E402
from train.task import autocast_dtype, build_network, fit, train_site, validate_site  # noqa: E402

GIB = 1024**3


class PeakMemory:
    """Peak RSS and PSS of this process and its descendants, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.rss, self.pss = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _usage(pid: int) -> tuple[int, int]:
        rss = pss = 0
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return rss, pss

    def sample(self) -> None:
        usages = [self._usage(pid) for pid in (os.getpid(), *descendants(os.getpid()))]
        self.rss = max(self.rss, sum(u[0] for u in usages))
        self.pss = max(self.pss, sum(u[1] for u in usages))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def report(self) -> dict:
        return {
            "peak_rss_gib": round(self.rss / GIB, 3),
            "peak_pss_gib": round(self.pss / GIB, 3),
            "ru_maxrss_gib": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3
            ),
        }


def phantom_site(root: Path, cases: int, shape: tuple[int, int, int]) -> Path:
    """``cases`` phantoms of ``shape`` in ``root`` (``python -m phantoms``), made once."""
    if len(list(root.glob("imagesTr/*_0000.nii.gz"))) < cases:
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "phantoms",
                "--out",
                str(root),
                "--cases",
                str(cases),
                "--size",
                *map(str, shape),
                "--seed",
                "0",
            ],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    return root


# --- 1. steps per second ----------------------------------------------------------------------


def timed(batches, device: torch.device, steps: list[dict]):
    """``batches``, recording for each one: ``wall``, the seconds from asking for it to the
    end of its step (the next request); ``wait``, the part spent waiting for the batch; and
    ``cpu``, the CPU seconds of this process meanwhile (its threads, not the patch workers).
    CUDA work is waited for at each step's end."""
    iterator = iter(batches)
    while True:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        waited = time.perf_counter() - start
        yield batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        steps.append(
            {"wall": time.perf_counter() - start, "wait": waited, "cpu": time.process_time() - cpu}
        )


def step_rates(
    cases: list, patch: int, device: torch.device, steps: int, workers: int, base_channels: int
) -> dict:
    config = TrainConfig(patch_size=patch, base_channels=base_channels)
    amp = autocast_dtype(config.precision, device, patch)
    count = steps + 1  # one warm-up step
    per_case = math.ceil(count * config.batch_size / len(cases))

    def plan(seed: int = 0):
        return dict(
            cases=cases,
            patch=config.patch_shape,
            patches_per_case=per_case,
            batch_size=config.batch_size,
            rng=np.random.default_rng(seed),
            foreground_fraction=config.foreground_fraction,
            augmentation=True,
            intensity_augmentation=True,
        )

    prepared = list(itertools.islice(epoch_batches(**plan()), count))  # arrays of their own
    weight = positive_weight(0.01)
    loss = lambda logits, y: vessel_loss(logits, y, weight)  # noqa: E731
    torch.manual_seed(0)
    net = build_network(config).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    fit(net, prepared[:1], loss, optimizer, device, amp)  # allocator and autotuning warm-up
    results = {}
    for mode in ("in_memory", "synchronous", "background"):
        records: list[dict] = []
        if mode == "in_memory":
            source = prepared
        else:
            source = epoch_batches(
                **plan(), workers=workers if mode == "background" else 0, copy=False
            )
        fit(
            net,
            itertools.islice(timed(source, device, records), count),
            loss,
            optimizer,
            device,
            amp,
        )
        if hasattr(source, "close"):
            source.close()
        median = {key: statistics.median(r[key] for r in records[1:]) for key in records[0]}
        results[mode] = {
            "seconds_per_step": round(median["wall"], 4),
            "steps_per_second": round(1 / median["wall"], 3),
            "voxels_per_second": round(config.batch_size * patch**3 / median["wall"]),
            "wait_seconds_per_step": round(median["wait"], 4),
            "cpu_seconds_per_step": round(median["cpu"], 4),
        }
    for mode in ("synchronous", "background"):
        for key, name in (
            ("seconds_per_step", "vs_in_memory"),
            ("cpu_seconds_per_step", "cpu_vs_in_memory"),
        ):
            results[f"{mode}_{name}"] = round(results[mode][key] / results["in_memory"][key], 3)
    results["precision"] = str(amp).replace("torch.", "") if amp else "fp32"
    return results


def steps_benchmark(args, cases: list) -> dict:
    devices = [] if args.device == "cuda" else ["cpu"]
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    report = {
        "batch_size": 2,
        "base_channels": args.base_channels,
        "workers": args.workers,
        "cases": [list(c.shape) for c in cases],
        "threads": torch.get_num_threads(),
    }
    for device in map(torch.device, devices):
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        steps = args.steps if device.type == "cpu" else args.cuda_steps
        report[device.type] = {
            str(p): step_rates(cases, p, device, steps, args.workers, args.base_channels)
            for p in args.patches
        }
        if device.type == "cuda":
            report[device.type]["name"] = torch.cuda.get_device_name()
            report[device.type]["peak_memory_gib"] = round(
                torch.cuda.max_memory_allocated() / GIB, 2
            )
    return report


# --- 2. peak memory of a site ------------------------------------------------------------------


def memory_child(args) -> dict:
    """One way of training a round of the site at ``args.data`` (run in its own process)."""
    config = TrainConfig(patch_size=args.memory_patch, base_channels=16, num_folds=5)
    start = time.perf_counter()
    with PeakMemory() as memory:
        site = load_site(
            args.data,
            config.spacing,
            cache_dir=args.cache,
            in_memory=args.memory_child == "in_memory",
        )
        loaded = time.perf_counter()
        net = build_network(config)
        result, cases = train_site(net, site, config, 1, torch.device("cpu"), args.workers)
        trained = time.perf_counter()
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    report = {
        "load_seconds": round(loaded - start, 1),
        "train_seconds": round(trained - loaded, 1),
        "training_cases": cases,
        "steps": result.steps,
        "user_cpu_seconds": round(sum(u.ru_utime for u in usage), 1),
        "kernel_cpu_seconds": round(sum(u.ru_stime for u in usage), 1),
        "page_faults": sum(u.ru_minflt + u.ru_majflt for u in usage),
        **memory.report(),
    }
    if args.validate:
        with PeakMemory() as validation:
            scores, count = validate_site(net, site, config, torch.device("cpu"))
        report["validation"] = {
            "cases": count,
            "dice": round(scores["dice"], 4),
            "seconds": round(time.perf_counter() - trained, 1),
            **validation.report(),
        }
    return report


def child_round(
    args, way: str, data: Path, cache: Path, validate: bool = False, env: dict | None = None
) -> dict:
    """:func:`memory_child`'s report of one way of training a round, in a process of its own."""
    command = [
        sys.executable,
        __file__,
        "--memory-child",
        way,
        "--data",
        str(data),
        "--cache",
        str(cache),
        "--memory-patch",
        str(args.memory_patch),
        "--workers",
        str(args.workers),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if validate:
        command.append("--validate")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return json.loads(done.stdout)


def memory_benchmark(args, data: Path, work: Path) -> dict:
    cache = work / "memory-cache"
    shutil.rmtree(cache, ignore_errors=True)
    runs = {}
    for way in ("in_memory", "cached_cold", "cached_warm"):
        runs[way] = child_round(args, way, data, cache, args.validate and way == "cached_warm")
    cached = sum(f.stat().st_size for f in cache.rglob("*.npy")) if cache.exists() else 0
    report = {
        "cases": args.cases,
        "shape": list(args.shape),
        "patch": args.memory_patch,
        "network": "full width (base_channels 16)",
        "workers": args.workers,
        "cache_gib": round(cached / GIB, 2),
        **runs,
        "target_gib": 4.0,
    }
    if all("peak_pss_gib" in runs[w] for w in ("in_memory", "cached_warm")):
        report["cached_warm_vs_in_memory_pss"] = round(
            runs["cached_warm"]["peak_pss_gib"] / runs["in_memory"]["peak_pss_gib"], 3
        )
    return report


# --- 3. the allocator ------------------------------------------------------------------------


def allocator_benchmark(args, data: Path, work: Path) -> dict:
    """A warm-cache round under glibc's defaults, then under ``TRAINING_ALLOCATOR``; the
    memory benchmark's cache where it ran, else one built first."""
    cache = work / "memory-cache"
    plain = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if not cache.is_dir():
        child_round(args, "cached_cold", data, cache, env=plain)
    runs = {
        "glibc_default": child_round(args, "cached_warm", data, cache, env=plain),
        "training_allocator": child_round(
            args, "cached_warm", data, cache, env={**plain, **TRAINING_ALLOCATOR}
        ),
    }
    report = {"settings": TRAINING_ALLOCATOR, "patch": args.memory_patch, **runs}
    keys = ("train_seconds", "kernel_cpu_seconds", "page_faults", "peak_pss_gib")
    if all("train_seconds" in run for run in runs.values()):
        tuned, default = runs["training_allocator"], runs["glibc_default"]
        report["training_allocator_vs_default"] = {
            key: round(tuned[key] / max(default[key], 1e-9), 3) for key in keys
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "all"),
        default="all",
        help="where to time steps (all: the CPU, and CUDA when present)",
    )
    parser.add_argument("--patches", type=int, nargs="+", default=[64, 96, 128, 160])
    parser.add_argument("--steps", type=int, default=4, help="timed CPU steps per way")
    parser.add_argument("--cuda-steps", type=int, default=20, help="timed CUDA steps per way")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument(
        "--workers",
        type=int,
        default=loader_workers(),
        help="background patch workers (default: as training)",
    )
    parser.add_argument("--cases", type=int, default=12, help="cases of the site (12)")
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=(400, 512, 512),
        metavar=("Z", "Y", "X"),
        help="their size (default 400 512 512)",
    )
    parser.add_argument("--memory-patch", type=int, default=64)
    parser.add_argument(
        "--data",
        type=Path,
        help="where the 512x512x400 phantoms are kept "
        "(default: a temporary folder; made when absent)",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="also validate the held-out cases in the warm-cache round",
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-allocator", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="64^3 and 96^3, 2 steps; 4 cases of 256x256x200 for memory",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's; 1 on a machine that is busy)",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    if args.quick:
        args.patches, args.steps, args.cuda_steps, args.cases = [64, 96], 2, 5, 4
        args.shape = (200, 256, 256)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        }
    }
    with tempfile.TemporaryDirectory(prefix="bench_training_") as folder:
        work = Path(folder)
        data = args.data or work / "clinical"
        if not args.skip_memory:
            phantom_site(data, args.cases, tuple(args.shape))
            report["memory"] = memory_benchmark(args, data, work)
        if not args.skip_allocator:
            phantom_site(data, args.cases, tuple(args.shape))
            report["allocator"] = allocator_benchmark(args, data, work)
        if not args.skip_steps:
            size = max(args.patches) + 32
            steps_data = phantom_site(work / "steps", 3, (size, size, size))
            site = load_site(steps_data, TrainConfig().spacing, cache_dir=work / "steps-cache")
            report["steps"] = steps_benchmark(args, list(site.cases.values()))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
