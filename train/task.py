"""Model-agnostic local training and validation, shared by the sites and the benchmarks.

Nothing here knows about Flower: :func:`fit` runs optimiser steps over batches,
:func:`validate` segments whole volumes and scores them with the challenge's metrics, and
:func:`train_site` / :func:`validate_site` put a site's data, the paper's loss and the
run configuration together. The ClientApp wraps these two and nothing else.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from inference.backend_base import cpu_flags
from inference.predictor import Predictor, PredictorSettings
from inference.preprocessing import DEFAULT_NORMALIZATION, Geometry
from inference.torch_backend import cuda_autocast_dtype
from metrics import cldice, dice
from model.network import VesselUNet
from model.weights import Manifest
from train.config import TrainConfig
from train.data import CachedCase, Case, Site, SiteDataError, has_ignore, vessel_fraction
from train.loss import positive_weight, vessel_loss
from train.sampling import IGNORE_TARGET, epoch_batches, loader_workers


@dataclass
class FitResult:
    """What one local training did: mean loss over its steps, steps, patches, seconds."""

    loss: float
    steps: int
    patches: int
    seconds: float


def cpu_bf16_faster(training: bool) -> bool:
    """True where bf16 autocast outruns fp32 on this CPU. Inference: with native bf16 (AVX512-BF16
    or AMX). Training: with AMX tiles only; AVX512-BF16 alone speeds the dot products, and
    oneDNN's reorders around them in the backward pass cost more. On a Xeon with AVX512-BF16
    and VNNI but no AMX (torch 2.13, 2 threads), a 64^3 training step (batch 2, base 16) took
    3.1-4.1 s in bf16 against 2.3-2.9 s in fp32 channels-last (a site's round: 150-208 s
    against 115-141 s), while a site's validation of fold 1's three cases took 30-37 s in bf16
    against 49-54 s in fp32."""
    return bool(({"amx_bf16"} if training else {"avx512_bf16", "amx_bf16"}) & cpu_flags())


def training_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_bf16_backward_safe(patch_size: int) -> bool:
    """False where a feature map of the network is 2 voxels wide during training.

    oneDNN's bf16 weight gradient of a 3x3x3 convolution over a 2x2x2 map is wrong (huge
    or NaN values, checked with torch 2.13 on AVX512-BF16 CPUs; fp32 and the bf16 forward
    are correct): with four poolings, patches of 16 and 32 voxels produce such maps.
    """
    return all(patch_size >> level != 2 for level in range(5))


def autocast_dtype(
    precision: str, device: torch.device, training_patch: int | None = None
) -> torch.dtype | None:
    """The autocast dtype for ``precision`` ("auto", "fp32", "bf16"); None means fp32.

    "auto" picks, on a GPU, what the container picks (:func:`cuda_autocast_dtype`: bf16 from
    compute capability 8.0, fp16 before, e.g. a T4 or V100, whose bf16 is emulated; :func:`fit`
    scales fp16 losses), and on a CPU bf16 where it is the faster (:func:`cpu_bf16_faster`,
    which differs for training, given ``training_patch``, and for validation), else fp32. For
    CPU training with ``training_patch`` where bf16 gradients are wrong
    (:func:`cpu_bf16_backward_safe`), "auto" falls back to fp32 and "bf16" is an error.
    """
    if precision == "fp32":
        return None
    cpu_unsafe = (
        device.type == "cpu"
        and training_patch is not None
        and not cpu_bf16_backward_safe(training_patch)
    )
    if precision == "bf16":
        if cpu_unsafe:
            raise ValueError(
                f"precision bf16: CPU bf16 gradients are wrong with {training_patch}^3 patches "
                "(2-voxel feature maps); use fp32 or patches of 48 or more"
            )
        return torch.bfloat16
    if device.type == "cuda":
        return cuda_autocast_dtype()
    faster = cpu_bf16_faster(training=training_patch is not None)
    return torch.bfloat16 if faster and not cpu_unsafe else None


def training_memory_format(
    device: torch.device, amp_dtype: torch.dtype | None
) -> torch.memory_format:
    """channels-last where a CPU trains in fp32: oneDNN's fp32 3D convolutions need fewer
    reorders in it (a 64^3 step 1.3-1.5x faster on an AVX2 CPU, same losses); in bf16 it was
    slower (1.71 s against 1.55 s), and GPUs keep what cuDNN was tuned with."""
    fp32_cpu = device.type == "cpu" and amp_dtype is None
    return torch.channels_last_3d if fp32_cpu else torch.contiguous_format


def seeded_generator(*keys: int) -> np.random.Generator:
    """A numpy generator from a tuple of non-negative integers; also seeds torch from it."""
    sequence = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys])
    torch.manual_seed(int(sequence.generate_state(1, np.uint64)[0] & 0x7FFFFFFFFFFFFFFF))
    return np.random.default_rng(sequence)


def site_key(name: str) -> int:
    """A stable integer for a site's name (seeds its patch sampling)."""
    return zlib.crc32(name.encode())


def fit(
    net: nn.Module,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> FitResult:
    """One optimiser step per batch; the forward pass under autocast, the loss in fp32, and
    under fp16 the loss scaled (``GradScaler``) so that small gradients do not flush to zero.

    A batch's arrays are used before the next batch is asked for, and not kept: a background
    loader may reuse their memory (:class:`train.sampling.BackgroundBatches`).
    """
    net.train()
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start, losses, patches = time.perf_counter(), [], 0
    for images, labels in batches:
        x = torch.from_numpy(images).to(device)
        y = torch.from_numpy(labels).to(device)
        with torch.autocast(
            device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.detach())
        patches += images.shape[0]
    mean = float(torch.stack(losses).mean()) if losses else float("nan")
    return FitResult(mean, len(losses), patches, time.perf_counter() - start)


def validation_predictor(
    net: nn.Module,
    config: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
) -> Predictor:
    """The container's predictor (:class:`inference.predictor.Predictor`) around the network
    being trained: the same windows, Gaussian stitching, probability and threshold as
    ``process.py``, without component cleaning (its settings are chosen afterwards, on these
    masks)."""
    manifest = Manifest(
        architecture=config.architecture,
        patch_size=config.patch_shape,
        target_spacing=config.spacing,
        normalization=DEFAULT_NORMALIZATION,
    )
    settings = PredictorSettings(overlap=config.val_overlap, postprocess=False)
    return Predictor.from_networks([net], manifest, settings, device.type, amp_dtype)


def predict_mask(predictor: Predictor, image: np.ndarray) -> np.ndarray:
    """Vessel mask (bool) of a preprocessed volume on the model's grid."""
    geometry = Geometry(
        image.shape,
        predictor.manifest.target_spacing,
        (0.0,) * 3,
        (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
    )
    probability = predictor.probability_of_input(image, geometry)
    return predictor.mask_of(probability, geometry)[0].astype(bool)


def labelled_part(mask: np.ndarray, case: Case | CachedCase) -> np.ndarray:
    """``mask`` without the case's ignore-label voxels: there a prediction is neither a hit
    nor a false positive (the case's label is background there, and so is the mask now)."""
    ignore = case.ignore
    return mask if ignore is None else mask & ~ignore


def validate(predictor: Predictor, cases: list[Case | CachedCase]) -> dict[str, float]:
    """Mean Dice, clDice, clRe and clPr over ``cases`` (metrics on the model grid), each on
    the labelled voxels only (:func:`labelled_part`)."""
    scores = {"dice": [], "cldice": [], "clre": [], "clpr": []}
    for case in cases:
        mask = labelled_part(predict_mask(predictor, case.image), case)
        topology = cldice(mask, case.label)
        scores["dice"].append(dice(mask, case.label))
        scores["cldice"].append(topology.cldice)
        scores["clre"].append(topology.clre)
        scores["clpr"].append(topology.clpr)
    return {key: float(np.mean(values)) for key, values in scores.items()}


def build_network(config: TrainConfig, state: dict[str, torch.Tensor] | None = None) -> VesselUNet:
    """The configured network, with ``state`` loaded (dtypes follow the network's)."""
    net = VesselUNet(config.architecture)
    if state is not None:
        own = net.state_dict()
        net.load_state_dict({k: torch.as_tensor(v).to(own[k].dtype) for k, v in state.items()})
    return net


def train_site(
    net: nn.Module,
    site: Site,
    config: TrainConfig,
    server_round: int,
    device: torch.device | None = None,
    workers: int | None = None,
) -> tuple[FitResult, int]:
    """``local_epochs`` of the paper's training on the site's training cases of the fold.

    A fresh Adam (its moments are not carried between rounds: FedAvg averages parameters
    only) and a generator seeded by (seed, fold, round, site) make a round reproducible and
    resumable. Patches are cut and augmented by ``workers`` background processes (default
    :func:`train.sampling.loader_workers`; 0: in this loop), which changes nothing in what is
    computed. Returns the result and the number of training cases (FedAvg's weight).

    On a GPU, cuDNN picks its fastest convolution algorithms (``cudnn.benchmark``); those are
    not bitwise deterministic, so a resumed GPU run matches an uninterrupted one in
    distribution, not bit for bit as on a CPU.
    """
    device = device or training_device()
    workers = loader_workers() if workers is None else workers
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    training, _ = site.split(config.fold, config.num_folds)
    rng = seeded_generator(config.seed, config.fold, server_round, site_key(site.name))
    fraction = vessel_fraction(training)
    if fraction == 0.0:
        raise SiteDataError(
            f"{site.path}: no vessel voxels in the training cases of fold {config.fold}"
        )
    weight = config.pos_weight or positive_weight(fraction)
    ignore_value = IGNORE_TARGET if has_ignore(training) else None  # None: the plain loss
    amp_dtype = autocast_dtype(config.precision, device, config.patch_size)
    memory_format = training_memory_format(device, amp_dtype)
    net.to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
    results = []

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return vessel_loss(logits, y, weight, config.loss_alpha, ignore_value)

    for _ in range(config.local_epochs):
        with epoch_batches(
            training,
            config.patch_shape,
            config.patches_per_case,
            config.batch_size,
            rng,
            config.foreground_fraction,
            config.augment,
            config.augment_intensity,
            config.augment_levels,
            workers=workers,
            copy=False,
        ) as batches:
            results.append(fit(net, batches, loss_fn, optimizer, device, amp_dtype))
    net.to(memory_format=torch.contiguous_format)  # the reply's arrays in the plain layout
    steps = sum(r.steps for r in results)
    loss = sum(r.loss * r.steps for r in results) / max(steps, 1)
    total = FitResult(loss, steps, sum(r.patches for r in results), sum(r.seconds for r in results))
    return total, len(training)


def validate_site(
    net: nn.Module, site: Site, config: TrainConfig, device: torch.device | None = None
) -> tuple[dict[str, float], int]:
    """Scores of ``net`` on the site's validation cases of the fold, and their number."""
    device = device or training_device()
    _, validation = site.split(config.fold, config.num_folds)
    predictor = validation_predictor(net, config, device, autocast_dtype(config.precision, device))
    return validate(predictor, validation), len(validation)
