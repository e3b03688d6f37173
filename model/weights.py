"""Fold weights: one fp16 safetensors file per fold, described by ``manifest.json``.

The manifest is the contract between training and inference (as nnU-Net's plans are): it holds
the architecture, the patch size, the target spacing, the intensity normalisation, the
post-processing thresholds, the folds with the sha256 and size of every weight file, and the
provenance (data, sites, rounds, validation metrics). Loading verifies size, hash and
architecture before any tensor reaches the network, and no pickle is involved anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from model.network import Architecture, VesselUNet

MANIFEST = "manifest.json"
FORMAT = "vessel-unet-folds/2"
LEGACY_FORMATS = {"vessel-unet-folds/1": {"upsampling": "transposed"}}
"""Older formats still read, with the architecture settings they implied: format 1 predates
the ``upsampling`` switch, and its decoders upsampled by transposed convolutions."""


class WeightError(ValueError):
    """A weight file or manifest that cannot be used; the message names the file and the problem."""


@dataclass
class FoldEntry:
    fold: int
    file: str
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """Everything inference needs to reproduce what training did. Spacings and sizes are z, y, x."""

    architecture: Architecture
    patch_size: tuple[int, int, int]
    target_spacing: tuple[float, float, float]
    normalization: dict  # {"scheme", "lower/upper_percentile", "exclude_fill"}, see normalize()
    postprocess: dict = field(default_factory=dict)
    folds: list[FoldEntry] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "architecture": self.architecture.to_dict(),
            "patch_size": list(self.patch_size),
            "target_spacing": list(self.target_spacing),
            "normalization": self.normalization,
            "postprocess": self.postprocess,
            "folds": [vars(entry) for entry in self.folds],
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = MANIFEST) -> Manifest:
        version = data.get("format")
        if version != FORMAT and version not in LEGACY_FORMATS:
            raise WeightError(f"{source}: format is {version!r}, expected {FORMAT!r}")
        try:
            implied = LEGACY_FORMATS.get(version, {})
            return cls(
                architecture=Architecture.from_dict({**implied, **data["architecture"]}),
                patch_size=tuple(int(s) for s in data["patch_size"]),
                target_spacing=tuple(float(s) for s in data["target_spacing"]),
                normalization=dict(data["normalization"]),
                postprocess=dict(data.get("postprocess", {})),
                folds=[FoldEntry(**entry) for entry in data["folds"]],
                provenance=dict(data.get("provenance", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise WeightError(f"{source}: invalid manifest ({error})") from error

    def fold_entry(self, fold: int) -> FoldEntry:
        for entry in self.folds:
            if entry.fold == fold:
                return entry
        raise WeightError(f"{MANIFEST}: no fold {fold} (folds: {[e.fold for e in self.folds]})")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        # mkstemp makes the file private (0600); weights must be readable by the container's
        # unprivileged user after a COPY, as any file the user's umask would create.
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_fold(net: VesselUNet, path: str | Path, fold: int) -> FoldEntry:
    """Write ``net``'s state in fp16 (integer buffers unchanged) and return its manifest entry."""
    path = Path(path)
    tensors = {
        name: (t.detach().to("cpu", torch.float16) if t.is_floating_point() else t.detach().cpu())
        for name, t in net.state_dict().items()
    }
    for name, tensor in tensors.items():
        # fp16 tops out at 65504: a diverged model would otherwise ship as silent inf/NaN.
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightError(f"{path}: tensor {name!r} is not finite in fp16 (diverged model or "
                              "values beyond 65504); nothing written")
    metadata = {"architecture": json.dumps(net.architecture.to_dict(), sort_keys=True)}
    data = save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    write_atomically(path, data)
    return FoldEntry(fold=fold, file=path.name, sha256=sha256_hex(data), bytes=len(data))


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    text = json.dumps(manifest.to_dict(), indent=2) + "\n"
    write_atomically(path, text.encode())
    return path


def load_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightError(f"{path}: manifest not found") from None
    except json.JSONDecodeError as error:
        raise WeightError(f"{path}: not valid JSON ({error})") from None
    return Manifest.from_dict(data, source=str(path))


def verified_bytes(path: Path, entry: FoldEntry) -> bytes:
    """The file's bytes, once its size and sha256 match the manifest."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WeightError(f"{path}: weight file not found") from None
    if len(data) < entry.bytes:
        raise WeightError(f"{path}: truncated, {len(data)} of {entry.bytes} bytes")
    if len(data) != entry.bytes or sha256_hex(data) != entry.sha256:
        raise WeightError(
            f"{path}: sha256 {sha256_hex(data)[:16]}... does not match the manifest's "
            f"{entry.sha256[:16]}...: the file is corrupted or was modified"
        )
    return data


def check_architecture(path: Path, tensors: dict, net: VesselUNet) -> None:
    """Name the first tensor that the manifest's architecture does not expect."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightError(
            f"{path}: wrong architecture for {net.architecture}: "
            f"missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise WeightError(
                f"{path}: wrong architecture: tensor {name} has shape {tuple(tensor.shape)}, "
                f"{net.architecture} expects {tuple(expected[name].shape)}"
            )


def load_fold(directory: str | Path, manifest: Manifest, fold: int) -> VesselUNet:
    """Build the manifest's network and load one fold's verified weights (fp32, eval mode)."""
    entry = manifest.fold_entry(fold)
    path = Path(directory) / entry.file
    data = verified_bytes(path, entry)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as error:
        raise WeightError(f"{path}: not a readable safetensors file ({error})") from None
    net = VesselUNet(manifest.architecture)
    check_architecture(path, tensors, net)
    net.load_state_dict({k: v.to(net.state_dict()[k].dtype) for k, v in tensors.items()})
    return net.eval()


def load_ensemble(
    directory: str | Path, folds: list[int] | None = None
) -> tuple[Manifest, list[VesselUNet]]:
    """The manifest and the networks of ``folds`` (all folds of the manifest by default)."""
    manifest = load_manifest(directory)
    folds = [entry.fold for entry in manifest.folds] if folds is None else folds
    if not folds:
        raise WeightError(f"{Path(directory) / MANIFEST}: lists no folds")
    return manifest, [load_fold(directory, manifest, fold) for fold in folds]
