"""Benchmark of the federated training: Flower's cost per round, and CPU seconds per step.

1. Federation overhead. A 3-site phantom federation trains the same rounds twice, in this one
   process: without Flower (every site's epochs in sequence, the same FedAvg average and
   validation, plain function calls) and with Flower's simulation engine (ServerApp, Ray
   actors, messages, checkpoints). The steady-state round time (round 1 pays for process
   start, imports and data loading in both) is compared; the baseline runs before and after
   the simulation and its mean is the reference. On a shared machine whose load drifts over
   minutes this comparison is noisy, so the report adds a second, drift-free one from the
   same rounds: Flower's round time against the seconds the sites spent inside the ClientApp
   (the same training and validation calls the baseline makes); the difference is what
   Flower adds (messages, serialisation, Ray, aggregation, checkpoints).
   Target: at most 15% more per round with Flower.
2. Seconds per training step (batch 2, forward + backward + Adam) of the full-width network
   on phantom patches, fp32 and bf16 autocast, for each ``--step-patches`` size.

Prints one JSON object. ``python bench/bench_federation.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from phantoms import write_dataset
from train.config import TrainConfig
from train.data import load_site
from train.loss import positive_weight, vessel_loss
from train.sampling import epoch_batches
from train.server_app import initial_arrays
from train.simulation import prepare_environment, simulate
from train.task import (
    autocast_dtype,
    build_network,
    cpu_bf16_backward_safe,
    cpu_bf16_faster,
    fit,
    train_site,
    validate_site,
)


def tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}


def local_rounds(config: TrainConfig, roots: list[Path], rounds: int) -> dict:
    """The federation's rounds as plain calls: train each site, average, validate each site."""
    start = time.perf_counter()
    sites = sorted((load_site(root, config.spacing) for root in roots), key=lambda s: s.name)
    loaded = time.perf_counter() - start
    arrays, seconds = initial_arrays(config), []
    for server_round in range(1, rounds + 1):
        begin = time.perf_counter()
        updates, weights = [], []
        for site in sites:
            net = build_network(config, tensors(arrays))
            _, cases = train_site(net, site, config, server_round)
            updates.append({k: v.detach().numpy() for k, v in net.state_dict().items()})
            weights.append(cases / 1.0)
        total = sum(weights)
        arrays = {
            k: np.asarray(sum(u[k] * (w / total) for u, w in zip(updates, weights))) for k in arrays
        }
        for site in sites:
            validate_site(build_network(config, tensors(arrays)), site, config)
        seconds.append(time.perf_counter() - begin)
    return {
        "round_seconds": seconds,
        "data_seconds": loaded,
        "wall_seconds": time.perf_counter() - start,
    }


def site_seconds(record: dict) -> float:
    """Seconds the sites spent inside the ClientApp's train and validate functions."""
    phases = (record["train"]["sites"], record["validation"]["sites"])
    return sum(report["site-seconds"] for sites in phases for report in sites.values())


def flower_rounds(config: TrainConfig, sites: int) -> dict:
    """The rounds under Flower (sites one after the other, each on every CPU)."""
    start = time.perf_counter()
    simulate(config, sites)
    state = json.loads((Path(config.run_dir) / f"fold{config.fold}" / "state.json").read_text())
    return {
        "round_seconds": [r["seconds"] for r in state["history"]],
        "site_seconds": [site_seconds(r) for r in state["history"]],
        "wall_seconds": time.perf_counter() - start,
    }


def federation_overhead(args, work: Path) -> dict:
    roots = write_dataset(work / "federation", args.cases, (args.size,) * 3, 7, sites=3)
    config = TrainConfig.from_run_config(
        {
            "num-rounds": args.rounds,
            "patience": args.rounds,
            "patch-size": args.patch,
            "base-channels": args.base_channels,
            "precision": args.precision,
            "wait-for-sites": 3,
            "run-dir": str(work / "runs"),
            "out-dir": str(work / "weights"),
            "sim-data-root": str(roots[0].parent),
        }
    )
    before = local_rounds(config, roots, args.rounds)
    flower = flower_rounds(config, len(roots))
    after = local_rounds(config, roots, args.rounds)
    steady = slice(1, None) if args.rounds > 1 else slice(None)
    baseline = statistics.mean(before["round_seconds"][steady] + after["round_seconds"][steady])
    federated = statistics.mean(flower["round_seconds"][steady])
    inside = statistics.mean(flower["site_seconds"][steady])
    return {
        "config": {
            k: v
            for k, v in config.to_run_config().items()
            if k
            in (
                "patch-size",
                "base-channels",
                "precision",
                "local-epochs",
                "patches-per-case",
                "batch-size",
                "num-rounds",
            )
        },
        "sites": 3,
        "cases_per_site": args.cases,
        "volume": [args.size] * 3,
        "baseline_round_seconds": {
            "before": before["round_seconds"],
            "after": after["round_seconds"],
        },
        "flower_round_seconds": flower["round_seconds"],
        "steady_state_baseline_seconds": round(baseline, 3),
        "steady_state_flower_seconds": round(federated, 3),
        "overhead": round(federated / baseline - 1.0, 4),
        "steady_state_site_seconds": round(inside, 3),
        "overhead_within_run": round(federated / inside - 1.0, 4),
        "target_overhead": 0.15,
        "wall_seconds": {
            "baseline_including_data": round(before["wall_seconds"], 2),
            "flower_including_ray_start": round(flower["wall_seconds"], 2),
        },
    }


def seconds_per_step(case_root: Path, patch: int, precision: str, steps: int) -> float | None:
    """Mean wall seconds of one training step of the full-width network, after one warm-up."""
    device = torch.device("cpu")
    if precision == "bf16" and not cpu_bf16_backward_safe(patch):
        return None
    config = TrainConfig(patch_size=patch, precision=precision)
    site = load_site(case_root, config.spacing)
    cases = list(site.cases.values())
    weight = positive_weight(0.02)
    net = build_network(config)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    batches = list(
        epoch_batches(
            cases, config.patch_shape, (steps + 1) * 2, 2, np.random.default_rng(0), 0.33, True
        )
    )[: steps + 1]
    loss = lambda logits, y: vessel_loss(logits, y, weight)  # noqa: E731
    amp = autocast_dtype(precision, device, patch)
    fit(net, batches[:1], loss, optimizer, device, amp)
    result = fit(net, batches[1:], loss, optimizer, device, amp)
    return round(result.seconds / result.steps, 3)


def step_times(args, work: Path) -> dict:
    root = write_dataset(work / "steps", 1, (max(args.step_patches) + 32,) * 3, 3)[0]
    times = {}
    for patch in args.step_patches:
        times[str(patch)] = {
            p: seconds_per_step(root, patch, p, args.steps) for p in ("fp32", "bf16")
        }
    return {
        "network": "full width (base_channels 16, HSCA, MSFE), batch 2",
        "seconds_per_step": times,
        "threads": torch.get_num_threads(),
        "bf16_training": cpu_bf16_faster(training=True),  # autocast "auto" trains in bf16
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", type=int, default=5, help="cases per site (4 train, 1 val)")
    parser.add_argument("--size", type=int, default=64, help="phantom edge length")
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--base-channels", type=int, default=8)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--step-patches", type=int, nargs="*", default=[64, 96])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-federation", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 64^3 steps only")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.cases, args.step_patches, args.steps = 2, 3, [64], 2
    with tempfile.TemporaryDirectory(prefix="bench_federation_") as folder:
        work = Path(folder)
        prepare_environment(work)
        report = {
            "machine": {
                "cpus": os.cpu_count(),
                "processor": platform.processor(),
                "torch": torch.__version__,
                "python": sys.version.split()[0],
            }
        }
        if not args.skip_federation:
            report["federation"] = federation_overhead(args, work)
        if args.step_patches:
            report["training_steps"] = step_times(args, work)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
