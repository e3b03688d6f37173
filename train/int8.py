"""``python -m train.int8 WEIGHTS``: the int8 OpenVINO models of a weights folder, at build time.

NNCF's post-training quantisation (:func:`quantize`) needs calibration windows: phantoms
(``phantoms.generate_case``, seeds apart from every evaluation set) preprocessed as a case is,
half centred on vessels (the rare bright voxels that set the activation ranges), half anywhere,
and other phantoms' windows for the accuracy control. The image holds neither ``phantoms`` nor
``nncf``: the Dockerfile's ``int8`` stage runs this and copies only the int8 IR it writes
(``WEIGHTS/openvino`` or ``--output``) into the image, where ``--precision auto`` runs it on
CPUs for which int8 is the faster arithmetic and ``--precision int8`` on any with VNNI/AMX.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import nncf
import numpy as np
import openvino as ov
import SimpleITK as sitk

from inference.backend_base import IR_FOLDER
from inference.openvino_backend import int8_ir_name, prepare, read_ir, save_ir
from inference.preprocessing import Geometry, preprocess
from model.weights import MANIFEST, load_manifest
from phantoms import generate_case

CALIBRATION_SEED = 90_000  # phantoms never used for evaluation (those start at 0)


def int8_ignored_scope(model: ov.Model):
    """Layers kept in bf16/f32: the head (its output is thresholded at 0.5) and every
    convolution that feeds a sigmoid gate (HSCA's channel and spatial attention multiply whole
    feature maps: their error would spread everywhere). They are about 1 % of the FLOPs."""
    passthrough = {"Reshape", "Transpose", "Add", "Concat", "Relu", "ReduceMean", "ReduceMax"}

    def feeds_sigmoid(op, depth: int = 0) -> bool:
        for target in op.output(0).get_target_inputs():
            node = target.get_node()
            if node.get_type_name() == "Sigmoid":
                return True
            if depth < 4 and node.get_type_name() in passthrough and feeds_sigmoid(node, depth + 1):
                return True
        return False

    convolutions = [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    names = {convolutions[-1].get_friendly_name()}  # the head
    names |= {op.get_friendly_name() for op in convolutions if feeds_sigmoid(op)}
    return nncf.IgnoredScope(names=sorted(names))


def quantize(
    model: ov.Model,
    windows: Sequence[np.ndarray],
    checks: Sequence[np.ndarray] = (),
    max_drop: float = 0.003,
) -> ov.Model:
    """The model with int8 convolutions (NNCF post-training quantisation: per-channel
    symmetric weights, asymmetric activations with ranges from ``windows``, bias correction),
    except those of :func:`int8_ignored_scope`. With ``checks`` (windows apart from the
    calibration), NNCF's accuracy control then returns to bf16/f32, one at a time, the layers
    whose quantisation costs most, until the masks of ``checks`` agree with the float model's
    at Dice >= 1 - ``max_drop``. (On the shipped folds: the two 3x3x3 convolutions of the
    decoder at half resolution, about 12 % of the FLOPs.)"""
    settings = {
        "preset": nncf.QuantizationPreset.MIXED,  # asymmetric activations: BN shifts them
        "subset_size": len(windows),
        "ignored_scope": int8_ignored_scope(model),
    }
    if not checks:
        return nncf.quantize(model, nncf.Dataset(list(windows)), **settings)
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    reference = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expected = [reference(window)[0] > 0.5 for window in checks]
    return nncf.quantize_with_accuracy_control(
        model,
        nncf.Dataset(list(windows)),
        nncf.Dataset(list(zip(checks, expected))),
        mask_agreement,
        max_drop=max_drop,
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            ranking_subset_size=min(8, len(checks)), num_ranking_workers=1
        ),
        **settings,
    )


def mask_agreement(compiled: ov.CompiledModel, checks) -> tuple[float, list[float]]:
    """Dice of the compiled model's masks with the float masks over all ``checks`` (window,
    expected mask), and per window: NNCF's validation function."""
    overlap = total = 0
    each = []
    for window, expected in checks:
        mask = compiled(window)[0] > 0.5
        both, size = int((mask & expected).sum()), int(mask.sum() + expected.sum())
        overlap, total = overlap + both, total + size
        each.append(2 * both / size if size else 1.0)
    return (2 * overlap / total if total else 1.0), each


def prepare_int8(
    weights: Path, output: Path | None = None, windows: Sequence = (), checks: Sequence = ()
) -> list[Path]:
    """Every fold's float IR (:func:`inference.openvino_backend.prepare`) and, beside it, its
    int8 model (:func:`quantize` of that IR on ``windows``, accuracy-controlled on ``checks``
    when given)."""
    manifest = load_manifest(weights)
    written = []
    for entry, path in zip(manifest.folds, prepare(weights, output)):
        quantized = quantize(read_ir(ov.Core(), path, manifest.patch_size), windows, checks)
        written += [path, path.parent / int8_ir_name(entry.sha256, manifest.patch_size)]
        save_ir(quantized, written[-1], compress=False)
    return written


def calibration_windows(manifest, count: int = 64, seed: int = CALIBRATION_SEED) -> list:
    """``count`` windows ``(1, 1, *patch)`` of phantoms (``phantoms.generate_case``) preprocessed
    as a case is: the activation ranges int8 must cover. Half are centred on vessels (the rare,
    bright voxels that set the ranges), half anywhere."""

    patch = np.array(manifest.patch_size)
    rng = np.random.default_rng(seed)
    windows, case = [], 0
    while len(windows) < count:
        shape = tuple(int(p) for p in 2 * patch)  # drawn at the model's spacing: no resampling
        image, label = generate_case(shape, seed=seed + case, spacing=min(manifest.target_spacing))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        volume = preprocess(array, Geometry.of(image), manifest)
        vessels = np.argwhere(sitk.GetArrayFromImage(label) > 0)
        for k in range(min(8, count - len(windows))):
            centre = vessels[rng.integers(len(vessels))] if k % 2 else rng.integers(volume.shape)
            start = np.clip(centre - patch // 2, 0, np.array(volume.shape) - patch)
            box = tuple(slice(a, a + p) for a, p in zip(start, patch))
            windows.append(np.ascontiguousarray(volume[box])[None, None])
        case += 1
    return windows


def check_windows(manifest) -> list:
    """Windows for the accuracy control of :func:`quantize`, from other phantoms."""
    return calibration_windows(manifest, count=16, seed=CALIBRATION_SEED + 1000)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.int8", description=__doc__)
    parser.add_argument("weights", type=Path, help="weights folder with manifest.json")
    parser.add_argument("--output", type=Path, help="where the IR goes (default WEIGHTS/openvino)")
    parser.add_argument(
        "--if-present", action="store_true", help="do nothing when the folder has no manifest"
    )
    args = parser.parse_args(argv)
    if args.if_present and not (args.weights / MANIFEST).is_file():
        (args.output or args.weights / IR_FOLDER).mkdir(parents=True, exist_ok=True)
        print(f"{args.weights}: no manifest.json, nothing to quantise")
        return 0
    manifest = load_manifest(args.weights)
    windows, checks = calibration_windows(manifest), check_windows(manifest)
    for path in prepare_int8(args.weights, args.output, windows, checks):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
