"""Weights and volumes for tests and benchmarks (never part of the container image).

``write_weights`` writes randomly initialised folds in exactly the shipped format
(:func:`model.weights.save_fold` + :func:`model.weights.write_manifest`); ``tube_volume`` draws
bright tubes on a noisy background, a stand-in for a 3DRA volume when the ``phantoms`` package
is not needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from inference.preprocessing import DEFAULT_NORMALIZATION
from model.network import Architecture, VesselUNet
from model.weights import Manifest, save_fold, write_manifest
from postprocess import DEFAULT_SETTINGS


def write_weights(
    directory: str | Path,
    folds: int = 5,
    base_channels: int = 4,
    patch: tuple[int, int, int] = (32, 32, 32),
    target_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    nets: list[VesselUNet] | None = None,
    postprocess: dict | None = None,
    fitted: bool = True,
) -> Manifest:
    """Save ``folds`` networks (random with ``seed``, their heads fitted by :func:`fit_head`
    unless ``fitted`` is false; or ``nets``) and their manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if nets is None:
        nets = []
        for fold in range(folds):
            torch.manual_seed(seed + fold)
            net = VesselUNet(Architecture(base_channels=base_channels)).eval()
            nets.append(fit_head(net, seed=seed + fold) if fitted else net)
    entries = [save_fold(net, directory / f"fold_{k}.safetensors", k) for k, net in enumerate(nets)]
    manifest = Manifest(
        architecture=nets[0].architecture,
        patch_size=tuple(patch),
        target_spacing=tuple(target_spacing),
        normalization=dict(DEFAULT_NORMALIZATION),
        postprocess=dict(postprocess if postprocess is not None else DEFAULT_SETTINGS.to_dict()),
        folds=entries,
        provenance={"source": "random initialisation (tests and benchmarks)", "seed": seed},
    )
    write_manifest(directory, manifest)
    return manifest


class SigmoidOfInput(torch.nn.Module):
    """A stand-in network whose vessel probability is sigmoid(input): stitching must return
    exactly sigmoid(volume) whatever the windows, weights, mirrors and device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), x], dim=1)


def tube_case(shape: tuple[int, int, int], seed: int = 0, tubes: int = 6):
    """A uint16 ``(z, y, x)`` volume and its uint8 label: ``tubes`` bright straight tubes
    (radius 1.5-3 voxels) between random points, on a noisy, slowly varying background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    volume = 200.0 + 50.0 * np.sin(grid[..., 0] / 11.0) + rng.normal(0.0, 20.0, shape)
    label = np.zeros(shape, np.uint8)
    size = np.array(shape, float)
    for _ in range(tubes):
        start, end = rng.uniform(0.1, 0.9, 3) * size, rng.uniform(0.1, 0.9, 3) * size
        axis = (end - start) / np.linalg.norm(end - start)
        offset = grid - start
        along = np.clip(offset @ axis, 0, np.linalg.norm(end - start))
        distance = np.linalg.norm(offset - along[..., None] * axis, axis=-1)
        label[distance <= rng.uniform(1.5, 3.0)] = 1
    volume += 800.0 * label
    return np.clip(volume, 0, 65535).astype(np.uint16), label


def tube_array(shape: tuple[int, int, int], seed: int = 0, tubes: int = 6) -> np.ndarray:
    """The volume of :func:`tube_case`."""
    return tube_case(shape, seed, tubes)[0]


def calibrate_batch_norm(net: VesselUNet, batch: torch.Tensor) -> VesselUNet:
    """Set every batch norm's running statistics to those of ``batch`` (one forward pass with a
    cumulative average), so that a random network's activations keep unit scale through its
    depth instead of vanishing: features of order one, a well-conditioned head, and bf16
    rounding that moves few voxels across the threshold."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: after one pass, exactly this batch's statistics
    with torch.no_grad():
        net.train()(batch)
    for norm in norms:
        norm.momentum = 0.1
    return net.eval()


def fit_head(
    net: VesselUNet,
    size: int = 48,
    seed: int = 0,
    sharpness: float = 4.0,
    case: tuple[np.ndarray, np.ndarray] | None = None,
    ridge: float = 1e-3,
) -> VesselUNet:
    """Fit only the 1x1x1 head of a (random) network to :func:`tube_case` labels.

    The decoder's random features are kept; the head becomes the logistic regression of the
    label on them (L-BFGS on centred, scaled features, class-balanced, ridge-penalised), its
    logits multiplied by ``sharpness`` so that few voxels sit near probability 0.5. Seconds on a
    CPU, and the network then outputs a confident, non-trivial vessel mask: enough to compare
    pipelines and backends, far from a model.
    ``case`` (a raw volume and its label, sides multiples of 16) replaces the tube volume.
    """
    from inference.preprocessing import normalize

    volume, label = case if case is not None else tube_case((size,) * 3, seed=seed, tubes=10)
    image = torch.from_numpy(normalize(volume.astype(np.float32), DEFAULT_NORMALIZATION))
    calibrate_batch_norm(net, image[None, None])
    captured = {}
    hook = net.head.register_forward_hook(lambda m, i, o: captured.setdefault("x", i[0]))
    with torch.no_grad():
        net.eval()(image[None, None])
    hook.remove()
    features = captured["x"][0].flatten(1).T  # (voxels, channels)
    # One scale for all channels: a per-channel one would give near-constant (dead ReLU)
    # channels huge weights that overflow fp16.
    mean, std = features.mean(0), features.std(0).mean() + 1e-12
    standard = (features - mean) / std
    target = torch.from_numpy(label.ravel().astype(np.float32))
    weight = torch.zeros(features.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")
    balance = (1 - target.mean()) / target.mean() / 2

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(
                standard @ weight + bias, target, pos_weight=balance
            )
            + ridge * weight.square().sum()
        )  # ridge: bounded weights, exact in fp16
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():  # logit_1 - logit_0 = sharpness * (w . (f - mean) / std + b)
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.weight[1, :, 0, 0, 0] = sharpness * weight / std
        net.head.bias[1] = sharpness * (bias - (mean / std * weight).sum())
    return net


def tube_volume(
    path: str | Path,
    shape: tuple[int, int, int] = (48, 48, 48),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    direction: tuple[float, ...] | None = None,
) -> Path:
    """Write :func:`tube_array` with the given ``(z, y, x)`` spacing to ``path``."""
    image = sitk.GetImageFromArray(tube_array(shape, seed))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    image.SetOrigin((-10.0, 5.0, 2.5))
    if direction is not None:
        image.SetDirection(direction)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path
