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
import math
import os
import stat
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
            raise WeightError(
                f"{path}: tensor {name!r} is not finite in fp16 (diverged model or "
                "values beyond 65504); nothing written"
            )
    metadata = {"architecture": json.dumps(net.architecture.to_dict(), sort_keys=True)}
    data = save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    write_atomically(path, data)
    return FoldEntry(fold=fold, file=path.name, sha256=sha256_hex(data), bytes=len(data))


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    text = json.dumps(manifest.to_dict(), indent=2) + "\n"
    write_atomically(path, text.encode())
    return path


MAX_MANIFEST_BYTES = 1 << 20


def read_confined(path: Path, limit: int, what: str) -> bytes:
    """At most ``limit`` + 1 bytes of ``path``, once it is a regular file in its own folder:
    never a device (``/dev/zero`` would fill the memory), a pipe (which blocks the reader) or
    a link leaving the weights folder. One-line :class:`WeightError` otherwise."""
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(path.parent):
        raise WeightError(f"{path}: the {what} is a link leaving {path.parent}")
    try:
        handle = os.open(real, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except FileNotFoundError:
        raise WeightError(f"{path}: {what} not found") from None
    except OSError as error:
        raise WeightError(f"{path}: cannot read the {what} ({error.strerror})") from None
    with os.fdopen(handle, "rb") as stream:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise WeightError(f"{path}: the {what} is not a regular file")
        return stream.read(limit + 1)


def load_manifest(directory: str | Path) -> Manifest:
    """The manifest of a weights folder, its types checked: any defect is one WeightError."""
    path = Path(directory) / MANIFEST
    text = read_confined(path, MAX_MANIFEST_BYTES, "manifest")
    if len(text) > MAX_MANIFEST_BYTES:
        raise WeightError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes: not a manifest")
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightError(f"{path}: not valid JSON ({error})") from None
    problem = manifest_type_problem(data)
    if problem:
        raise WeightError(f"{path}: invalid manifest ({problem})")
    return Manifest.from_dict(data, source=str(path))


def is_count(value, minimum: int = 0) -> bool:
    return type(value) is int and value >= minimum


def is_plain_name(name) -> bool:
    """A file name inside the weights folder: no separator, not ``.`` or ``..``."""
    return isinstance(name, str) and name not in ("", ".", "..") and not set(name) & set("/\\\0")


def manifest_type_problem(data) -> str | None:
    """What is wrong with the types of a parsed manifest, or ``None``: checked before anything
    reaches a dataclass, which would take a string for a size and fail far from the file."""
    if not isinstance(data, dict):
        return f"a JSON object expected, not {type(data).__name__}"
    checks = (sections_problem, architecture_problem, grid_problem, folds_problem)
    return next((problem for check in checks if (problem := check(data))), None)


def sections_problem(data: dict) -> str | None:
    kinds = {"architecture": dict, "normalization": dict, "postprocess": dict, "folds": list}
    kinds |= {"provenance": dict, "patch_size": list, "target_spacing": list, "format": str}
    for key, kind in kinds.items():
        if not isinstance(data.get(key, kind()), kind):
            return f"{key} must be a {kind.__name__}"
    return None


def architecture_problem(data: dict) -> str | None:
    """Each setting of the type of :class:`Architecture`'s default, counts positive."""
    defaults = {name: f.default for name, f in Architecture.__dataclass_fields__.items()}
    for key, value in data.get("architecture", {}).items():
        if key in defaults and type(value) is not type(defaults[key]):
            return f"architecture.{key} must be a {type(defaults[key]).__name__}"
        if type(value) is int and value < 1:
            return f"architecture.{key} must be positive"
    return None


def grid_problem(data: dict) -> str | None:
    patch = data.get("patch_size", [16] * 3)
    if len(patch) != 3 or not all(is_count(n, 16) and n % 16 == 0 for n in patch):
        return "patch_size must be three positive multiples of 16"
    spacing = data.get("target_spacing", [1.0] * 3)
    if len(spacing) != 3 or not all(type(s) in (int, float) and 0 < s < math.inf for s in spacing):
        return "target_spacing must be three positive, finite numbers"
    normalization = data.get("normalization", {})
    percentiles = [normalization.get(k, 0) for k in ("lower_percentile", "upper_percentile")]
    if not all(type(v) in (int, float) and 0 <= v <= 100 for v in percentiles):
        return "normalization percentiles must be numbers in [0, 100]"
    return None


def folds_problem(data: dict) -> str | None:
    """Each entry exactly fold, file (a name in the folder), sha256 (hex) and bytes."""
    folds = data.get("folds", [])
    for index, entry in enumerate(folds):
        if not isinstance(entry, dict) or set(entry) != {"fold", "file", "sha256", "bytes"}:
            return f"folds[{index}] must have exactly fold, file, sha256 and bytes"
        if not (is_count(entry["fold"]) and is_count(entry["bytes"], 1)):
            return f"folds[{index}]: fold and bytes must be non-negative integers"
        if not is_plain_name(entry["file"]):
            return f"folds[{index}]: file {entry['file']!r} is not a name in the weights folder"
        sha = entry["sha256"]
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef")):
            return f"folds[{index}]: sha256 must be 64 lower-case hex digits"
    numbers = [entry["fold"] for entry in folds]
    return f"fold numbers repeat: {numbers}" if len(set(numbers)) != len(numbers) else None


def verified_bytes(path: Path, entry: FoldEntry) -> bytes:
    """The file's bytes, once its size and sha256 match the manifest (read with that bound)."""
    if not is_plain_name(entry.file):
        raise WeightError(f"{path}: the manifest's file {entry.file!r} leaves the weights folder")
    data = read_confined(path, entry.bytes, "weight file")
    if len(data) < entry.bytes:
        raise WeightError(f"{path}: truncated, {len(data)} of {entry.bytes} bytes")
    if len(data) != entry.bytes:
        raise WeightError(f"{path}: larger than the manifest's {entry.bytes} bytes: modified?")
    if sha256_hex(data) != entry.sha256:
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
