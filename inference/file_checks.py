"""Image files on disk before ITK reads them: what may be handed to it, checked from the header.

ITK trusts a file's header: it zero-fills voxels a short NIfTI or a short zlib stream lacks,
follows a MetaImage/NRRD data-file name anywhere (``/dev/zero``, ``../../x``), reads the voxels
of ``NAME.nii`` when asked for ``NAME.nii.gz`` beside it, and hangs or crashes on some broken
headers. Everything here closes one of those gaps, with one line naming the file when it
refuses. Writing (verified before the rename) is :mod:`inference.io`.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from inference.naming import image_suffix

GZIP_MAGIC = b"\x1f\x8b"
MAX_TEXT_HEADER = 1 << 16  # MetaImage/NRRD headers are a few hundred bytes
CHUNK = 1 << 22
INFLATE_SLACK = 1 << 20  # inflate at most this beyond the payload (a gzip bomb costs no time)
MAX_NIFTI_OFFSET = 1 << 30  # NIfTI extensions before the voxels


class InputError(ValueError):
    """An input volume that cannot be segmented; the message is one line naming the file."""


# --- reading: checks before and beside ITK ---------------------------------------------------


def regular_file(path: Path, label: str | None = None) -> os.stat_result:
    """``path``'s status once it is a regular file (after symlinks): never a FIFO that blocks
    the reader, a device that never ends, a folder or a dangling link. Errors start with
    ``label`` (default: the path)."""
    label = label or str(path)
    try:
        status = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise InputError(f"{label}: dangling symbolic link to {os.readlink(path)}") from None
        raise InputError(f"{label}: file not found") from None
    except OSError as error:
        raise InputError(f"{label}: cannot access ({error.strerror})") from None
    if not stat.S_ISREG(status.st_mode):
        kind = "folder" if stat.S_ISDIR(status.st_mode) else "device, pipe or socket"
        raise InputError(f"{label}: not a regular file ({kind})")
    return status


def is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as raw:
            return raw.read(2) == GZIP_MAGIC
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error.strerror or error})") from None


def read_head(path: Path, size: int) -> bytes:
    """The first ``size`` bytes of ``path`` (inflated for gzip), for header parsing."""
    try:
        with (gzip.open if is_gzip(path) else open)(path, "rb") as stream:
            return stream.read(size)
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"{path}: truncated or corrupt gzip data ({error})") from None


def text_header(path: Path, end_key: str | None) -> tuple[dict[str, str], int]:
    """Fields of a MetaImage (``Key = value``, ending at ``end_key``) or NRRD (``key: value``,
    ending at a blank line) header, and the byte offset where the header ends."""
    head = read_head(path, MAX_TEXT_HEADER)
    fields, offset = {}, 0
    for line in head.splitlines(keepends=True):
        offset += len(line)
        text = line.decode("latin-1").strip()
        if end_key is None:
            if not text:
                return fields, offset
            if not text.startswith("#") and ":" in text and ":=" not in text:
                key, _, value = text.partition(":")
                fields[key.strip().lower()] = value.strip()
        elif "=" in text:
            key, _, value = text.partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == end_key:
                return fields, offset
    what = "ElementDataFile line" if end_key else "end of the NRRD header"
    raise InputError(f"{path}: no {what} within {MAX_TEXT_HEADER} bytes: not a valid header")


def confined_data_file(header: Path, name: str) -> Path:
    """The data file a MetaImage/NRRD header names, once it is a plain regular file beside the
    header (no absolute path, ``..``, list or pattern, device, pipe or link leaving the folder)."""
    plain = name and "/" not in name and "\\" not in name and name not in (".", "..")
    if not plain or any(c in name for c in "%\0") or name.split()[0].upper() == "LIST":
        raise InputError(
            f"{header}: data file {name!r} refused: only LOCAL or a file name beside the header"
        )
    folder = Path(os.path.realpath(header.parent))
    target = Path(os.path.realpath(header.parent / name))
    if target.parent != folder:
        raise InputError(f"{header}: data file {name!r} is a link leaving {header.parent}")
    regular_file(target, f"{header}: data file {name!r}")
    return target


def check_raw_header(path: Path) -> tuple[dict[str, str], int]:
    """Checks on the header's own bytes before ITK reads it (MetaImage/NRRD data files,
    NIfTI spacings); the fields and the length of a text header ("{}, 0" for NIfTI)."""
    suffix = image_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        check_nifti_header(path, read_head(path, 544))
        return {}, 0
    if suffix in (".mha", ".mhd"):
        fields, length = text_header(path, "ElementDataFile")
        check_metaimage_fields(path, fields)
        if fields["ElementDataFile"] != "LOCAL":
            confined_data_file(path, fields["ElementDataFile"])
        return fields, length
    if suffix == ".nrrd":
        fields, length = text_header(path, None)
        check_nrrd_fields(path, fields)
        name = fields.get("data file", fields.get("datafile"))
        if name is not None:
            confined_data_file(path, name)
        return fields, length
    return {}, 0


METAIMAGE_SCALARS = ("CHAR", "SHORT", "INT", "LONG", "LONG_LONG")  # and their U... forms
METAIMAGE_TYPES = {f"MET_{u}{kind}" for kind in METAIMAGE_SCALARS for u in ("", "U")}
METAIMAGE_TYPES |= {"MET_FLOAT", "MET_DOUBLE"}


def check_metaimage_fields(path: Path, fields: dict[str, str]) -> None:
    """Refuse what MetaIO parses unsafely: ``NDims = 100`` with three sizes corrupts its heap
    and aborts the process (measured, ITK 5.4). Every array field must hold NDims (or NDims^2)
    numbers; one scalar channel of a known type."""
    ndims = fields.get("NDims", "")
    if ndims not in ("3", "4"):
        raise InputError(f"{path}: NDims {ndims[:20]!r} in the header, expected 3D")
    n = int(ndims)
    counts = {"DimSize": n, "ElementSpacing": n, "ElementSize": n, "Offset": n, "Origin": n}
    counts |= {"Position": n, "CenterOfRotation": n, "TransformMatrix": n * n}
    counts |= {"Rotation": n * n, "Orientation": n * n}
    for key, count in counts.items():
        if key in fields and not are_numbers(fields[key], count):
            raise InputError(f"{path}: {key} in the header is not {count} finite numbers")
    sizes = fields.get("DimSize", "").split()
    if len(sizes) != n or not all(size.isdigit() and int(size) > 0 for size in sizes):
        raise InputError(f"{path}: DimSize {fields.get('DimSize', '')[:40]!r} in the header")
    if fields.get("ElementType") not in METAIMAGE_TYPES:
        raise InputError(
            f"{path}: ElementType {fields.get('ElementType', '')[:20]!r}: not a "
            "single-channel scalar type"
        )
    if fields.get("ElementNumberOfChannels", "1") != "1":
        raise InputError(
            f"{path}: {fields['ElementNumberOfChannels'][:20]} channels per voxel, "
            "expected a single-channel volume"
        )
    for key, pattern in (("CompressedDataSize", r"\d{1,18}"), ("HeaderSize", r"-1|\d{1,18}")):
        if key in fields and not re.fullmatch(pattern, fields[key]):
            raise InputError(f"{path}: {key} {fields[key][:20]!r} in the header")
    if metaimage_compressed(fields) and fields.get("HeaderSize", "0") != "0":
        raise InputError(f"{path}: HeaderSize with compressed data: MetaIO reads zeros")


def check_nrrd_fields(path: Path, fields: dict[str, str]) -> None:
    """Refuse what teem parses unsafely: ``encoding: ascii`` over binary voxels crashes the
    process (measured, ITK 5.4). Raw or gzip encoding, 3 (or 4) positive sizes."""
    encoding = fields.get("encoding", "")
    if encoding not in ("raw", "gzip", "gz"):
        raise InputError(f"{path}: NRRD encoding {encoding[:20]!r} is not supported (raw or gzip)")
    sizes = fields.get("sizes", "").split()
    dimension = fields.get("dimension", "")
    if dimension not in ("3", "4") or len(sizes) != int(dimension):
        raise InputError(f"{path}: NRRD dimension {dimension[:20]!r}, sizes {sizes[:5]}: not 3D")
    if not all(size.isdigit() and int(size) > 0 for size in sizes):
        raise InputError(f"{path}: NRRD sizes {sizes} in the header")


def are_numbers(text: str, count: int) -> bool:
    values = text.split()
    try:
        return len(values) == count and all(math.isfinite(float(v)) for v in values)
    except ValueError:
        return False


def nifti_version(header: bytes) -> tuple[str, int] | None:
    """Byte order and header size (348: NIfTI-1, 540: NIfTI-2) of a NIfTI header, or None."""
    for order in "<>":
        (size,) = struct.unpack_from(order + "i", header.ljust(4, b"\0"), 0)
        if size in (348, 540):
            return (order, size) if len(header) >= size else None
    return None


# Header size -> (float code, integer code, dim offset, pixdim offset, (qform/sform code type,
# offset), quatern_b offset, srow_x offset), from nifti1.h and nifti2.h.
NIFTI_LAYOUT = {
    348: ("f", "h", 40, 76, ("h", 252), 256, 280),
    540: ("d", "q", 16, 104, ("i", 344), 352, 400),
}


def check_nifti_header(path: Path, header: bytes) -> None:
    """Refuse a spatial ``pixdim`` that is 0, negative or not finite (niftilib silently makes it
    1 mm: the true extent is unknown), and an infinite or NaN qform/sform, on which ITK 5.4's
    reader loops forever (measured: ``srow_z[2] = inf``)."""
    if (version := nifti_version(header)) is None:
        return  # not NIfTI: ITK or the payload check says so
    order, size = version
    real, integer, dim_at, pixdim_at, (code, codes_at), quatern_at, srow_at = NIFTI_LAYOUT[size]
    (dims,) = struct.unpack_from(order + integer, header, dim_at)
    spatial = min(max(dims, 0), 3)
    pixdim = struct.unpack_from(order + "8" + real, header, pixdim_at)[1 : 1 + spatial]
    if not all(math.isfinite(p) and p > 0 for p in pixdim):
        shown = ", ".join(f"{p:g}" for p in pixdim)
        raise InputError(f"{path}: spacing (pixdim) {shown} mm in the header, expected > 0")
    qform, sform = struct.unpack_from(order + "2" + code, header, codes_at)
    quatern = struct.unpack_from(order + "6" + real, header, quatern_at) if qform > 0 else ()
    srow = struct.unpack_from(order + "12" + real, header, srow_at) if sform > 0 else ()
    if not all(math.isfinite(v) for v in quatern + srow):
        raise InputError(f"{path}: orientation (qform or sform) in the header is not finite")


def nifti_data_offset(header: bytes) -> int | None:
    """Byte offset of the voxels of a single-file NIfTI-1/2 header, as niftilib reads them:
    ``vox_offset``, or the header's end when it is smaller or not a number (measured with ITK
    5.4: 0, -5, NaN and inf all read from byte 348). ``None`` for an unrecognised header."""
    if (version := nifti_version(header)) is None:
        return None
    order, size = version
    code, at = ("f", 108) if size == 348 else ("q", 168)
    (value,) = struct.unpack_from(order + code, header, at)
    return max(size, math.floor(value)) if math.isfinite(value) else size


def gzip_length(path: Path, needed: int) -> int:
    """Bytes the gzip stream of ``path`` inflates to, counted up to ``needed`` +
    :data:`INFLATE_SLACK` (bounded time: a gzip bomb costs nothing); raises
    :class:`InputError` for a truncated or corrupt stream, which ITK completes with zeros."""
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while total <= needed + INFLATE_SLACK and (chunk := stream.read(CHUNK)):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"{path}: truncated or corrupt gzip data ({error})") from None
    return total


def zlib_length(path: Path, offset: int, size: int | None, needed: int) -> int:
    """:func:`gzip_length` for the zlib stream of MetaImage voxels: ``size`` bytes (its
    ``CompressedDataSize``, which MetaIO reads and no more) from ``offset``."""
    total, left = 0, size if size is not None else 1 << 62
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            while not inflater.eof and total <= needed + INFLATE_SLACK:
                data = inflater.unconsumed_tail or raw.read(min(CHUNK, left))
                left -= 0 if inflater.unconsumed_tail else len(data)
                if not data:
                    raise EOFError("the stream ends before its end marker")
                total += len(inflater.decompress(data, CHUNK))
    except (EOFError, OSError, zlib.error) as error:
        raise InputError(f"{path}: truncated or corrupt zlib data ({error})") from None
    return total


def check_payload(path: Path, payload: int, fields: dict[str, str], header_length: int) -> None:
    """Refuse a file that holds fewer voxel bytes than its header's ``payload``: a short .nii,
    .nii.gz or compressed MetaImage, which ITK would silently complete with zeros. (ITK itself
    refuses short raw MetaImage and NRRD files and short gzip NRRD streams.)"""
    suffix = image_suffix(path)
    if suffix in (".nii", ".nii.gz"):
        offset = nifti_data_offset(read_head(path, 544))
        if offset is None:
            raise InputError(f"{path}: not a NIfTI-1 or NIfTI-2 header")
        if offset > MAX_NIFTI_OFFSET:  # extensions of a gigabyte: a header meant to cost time
            raise InputError(f"{path}: vox_offset {offset:,} in the header")
        needed = offset + payload
        length = gzip_length(path, needed) if is_gzip(path) else os.stat(path).st_size
    elif suffix in (".mha", ".mhd") and metaimage_compressed(fields):
        name, size = fields["ElementDataFile"], fields.get("CompressedDataSize")
        data = path if name == "LOCAL" else confined_data_file(path, name)
        needed = payload
        length = zlib_length(
            data, header_length if name == "LOCAL" else 0, int(size) if size else None, needed
        )
    else:
        return
    if length < needed:
        raise InputError(
            f"{path}: truncated: {length:,} of the {needed:,} bytes its header announces"
        )


def metaimage_compressed(fields: dict[str, str]) -> bool:
    """MetaIO's reading of the flag: true when the value starts with T, t or 1."""
    return fields.get("CompressedData", "")[:1] in ("T", "t", "1")


@contextlib.contextmanager
def itk_name(path: Path) -> Iterator[str]:
    """The name under which ITK reads ``path`` itself.

    niftilib loads the voxels of ``NAME.nii.gz`` from ``NAME.nii`` when that exists beside it;
    then ITK gets a symbolic link to ``path`` in a private temporary folder instead.
    """
    name = path.name
    base = name[: -len(".gz")] if image_suffix(path) == ".nii.gz" else None
    shadows = [path.with_name(base[:-4] + ext) for ext in (".nii", ".NII")] if base else []
    shadow = next((s for s in shadows if os.path.lexists(s)), None)
    if shadow is None:
        yield str(path)
        return
    try:
        folder = tempfile.mkdtemp(prefix="vessel-seg-read-")
    except OSError as error:
        raise InputError(
            f"{path}: {shadow.name} beside it would be read in its place (a NIfTI library "
            f"quirk) and no temporary folder is writable ({error.strerror})"
        ) from None
    alias = os.path.join(folder, "image.nii.gz")
    try:
        os.symlink(os.path.abspath(path), alias)
        yield alias
    finally:
        with contextlib.suppress(OSError):
            os.unlink(alias)
            os.rmdir(folder)
