"""Seeded fuzzing of the reading path with mutated headers and truncations of the bundled sample.

Every mutation must end in a correct read or one :class:`InputError` line naming the file:
never another exception, a hang, or a read that ITK silently completed with zeros. The sample
is cropped to 24^3 and shifted so that no voxel is 0: a zero-filled tail shows. The first reads
that pass go on through a narrow network and a verified write.
"""

import faulthandler
import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import write_weights

from inference.predictor import Predictor, PredictorSettings
from inference.preprocessing import InputError, read_image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "test" / "sample" / "input" / "sample_0000.nii.gz"
SEED = 20240611
HANG_SECONDS = 30  # per mutation; a hang in C code cannot be interrupted: the run is ended

F32 = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-30, 1e30, -1.0, 3.4e38, 1e-45]
I16 = [0, -1, 1, 2, 3, 4, 7, 8, 16, 255, 256, 512, 768, 1024, 2304, 32767, -32768]
# NIfTI-1 fields: name -> (offset, struct code, values, geometry only)
NIFTI_FIELDS = {
    "sizeof_hdr": (0, "i", [0, 540, 347, 1 << 24], False),
    "dim0": (40, "h", I16, False),
    "dim1": (42, "h", I16 + [23, 25], False),
    "dim3": (46, "h", I16 + [23, 25], False),
    "dim4": (48, "h", I16, False),
    "dim5": (50, "h", I16, False),
    "datatype": (70, "h", I16 + [32, 64, 128, 1280, 1536, 1792, 2048], False),
    "bitpix": (72, "h", I16, False),
    "qfac": (76, "f", F32, True),
    "pixdim1": (80, "f", F32 + [0.227, 10.0], True),
    "pixdim3": (88, "f", F32 + [0.0227], True),
    "vox_offset": (108, "f", F32 + [348.0, 352.0, 356.0, 400.0, 351.5, 1e9], False),
    "scl_slope": (112, "f", F32 + [2.0, 1e-3], False),
    "scl_inter": (116, "f", F32 + [1e3], False),
    "xyzt_units": (123, "b", [0, 1, 2, 3, 7, 8, 127, -1], True),
    "qform_code": (252, "h", [0, 1, 2, 4, 5, -1, 32767], True),
    "sform_code": (254, "h", [0, 1, 2, 4, 5, -1, 32767], True),
    "quatern_b": (256, "f", F32 + [0.5, 1.0, 2.0], True),
    "qoffset_x": (268, "f", F32, True),
    "srow_x0": (280, "f", F32 + [0.0], True),
    "srow_y3": (308, "f", F32, True),
    "srow_z2": (320, "f", F32, True),
    "magic": (344, "4s", [b"n+2\0", b"ni1\0", b"\0\0\0\0", b"n+1\1"], False),
}
METAIMAGE_VALUES = {
    "NDims": (["0", "1", "2", "4", "100", "-1", "x"], False),
    "DimSize": (
        [
            "24 24 0",
            "24 24",
            "24 24 24 24",
            "65535 65535 65535",
            "24 24 25",
            "24 24 23",
            "-1 24 24",
            "x y z",
            "1e9 1 1",
            "2 2 2",
        ],
        False,
    ),
    "ElementSpacing": (["0 1 1", "nan 1 1", "1e-30 1 1", "-1 1 1", "inf 1 1", "1 1"], True),
    "ElementType": (
        [
            "MET_UCHAR",
            "MET_CHAR",
            "MET_USHORT",
            "MET_INT",
            "MET_FLOAT",
            "MET_DOUBLE",
            "MET_LONG_LONG",
            "MET_NONE",
            "MET_OTHER",
            "junk",
            "MET_FLOAT_ARRAY",
        ],
        False,
    ),
    "CompressedData": (["True", "False", "maybe"], False),
    "CompressedDataSize": (["0", "10", "99999999999", "-5"], False),
    "BinaryDataByteOrderMSB": (["True", "junk"], False),
    "HeaderSize": (["-1", "0", "100", "1000000"], False),
    "TransformMatrix": (
        ["0 0 0 0 0 0 0 0 0", "nan 0 0 0 1 0 0 0 1", "1 0 0 0 1 0 0 0", "2 0 0 0 1 0 0 0 1"],
        True,
    ),
    "Offset": (["nan 0 0", "1e300 0 0", "1 2"], True),
    "ElementNumberOfChannels": (["3", "0", "-1"], False),
    "ElementDataFile": (
        ["/dev/zero", "../x.raw", "LIST", "x%03d.raw 1 3 1", "missing.raw", "", "LOCAL extra"],
        False,
    ),
}


@pytest.fixture(scope="module")
def sample() -> sitk.Image:
    """The bundled sample cropped to 24^3, every voxel >= 1 (int16, its geometry kept)."""
    image = sitk.ReadImage(str(SAMPLE))[52:76, 52:76, 52:76]
    array = sitk.GetArrayFromImage(image).astype(np.int32)
    shifted = sitk.GetImageFromArray((array - array.min() + 1).astype(np.int16))
    shifted.CopyInformation(image)
    return shifted


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    weights = tmp_path_factory.mktemp("fuzz-weights")
    write_weights(weights, folds=1, base_channels=4, target_spacing=(0.454,) * 3, fitted=False)
    return Predictor(weights, PredictorSettings(device="cpu", backend="torch", postprocess=False))


def encoded(image: sitk.Image, folder: Path, name: str, compress: bool) -> bytes:
    path = folder / name
    sitk.WriteImage(image, str(path), compress)
    data = path.read_bytes()
    path.unlink()
    return data


def nifti_mutations(rng, nii: bytes):
    """(file name, bytes, kind): kind "geometry" (voxels unchanged), "header", "truncated"
    (must be refused) or "corrupt" (a read must give the original voxels)."""
    names = list(NIFTI_FIELDS)
    for index in range(150):
        offset, code, values, geometry = NIFTI_FIELDS[names[rng.integers(len(names))]]
        value = values[rng.integers(len(values))]
        data = bytearray(nii)
        struct.pack_into("<" + code, data, offset, value)
        kind = "geometry" if geometry else "header"
        if index % 2:
            yield "m.nii.gz", gzip.compress(bytes(data), mtime=0), kind
        else:
            yield "m.nii", bytes(data), kind
    for _ in range(40):  # random bytes anywhere in the header
        data = bytearray(nii)
        for offset in rng.integers(0, 352, rng.integers(1, 4)):
            data[offset] ^= int(rng.integers(1, 256))
        yield "m.nii", bytes(data), "header"
    compressed = gzip.compress(nii, mtime=0)
    for _ in range(30):
        yield "m.nii", nii[: rng.integers(0, len(nii))], "truncated"
        yield "m.nii.gz", compressed[: rng.integers(0, len(compressed))], "truncated"
    for _ in range(20):  # flips in the compressed stream: its CRC must catch them
        data = bytearray(compressed)
        data[rng.integers(10, len(data))] ^= int(rng.integers(1, 256))
        yield "m.nii.gz", bytes(data), "corrupt"


def metaimage_mutations(rng, mha: bytes, compressed_mha: bytes):
    keys = list(METAIMAGE_VALUES)
    for index in range(100):
        source = compressed_mha if index % 2 else mha
        end = source.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
        lines = source[:end].decode().splitlines(keepends=True)
        key = keys[rng.integers(len(keys))]
        values, geometry = METAIMAGE_VALUES[key]
        line = f"{key} = {values[rng.integers(len(values))]}\n"
        at = next((i for i, text in enumerate(lines) if text.startswith(key + " ")), None)
        if at is None:  # a field the writer left out: before ElementDataFile
            lines.insert(len(lines) - 1, line)
        else:
            lines[at] = line
        if index % 7 == 0:
            del lines[rng.integers(len(lines) - 1)]
            geometry = False
        yield "m.mha", "".join(lines).encode() + source[end:], "geometry" if geometry else "header"
    for source in (mha, compressed_mha):
        for _ in range(12):
            yield "m.mha", source[: rng.integers(0, len(source))], "truncated"
    start = compressed_mha.index(b"ElementDataFile = LOCAL\n") + 24
    for _ in range(10):
        data = bytearray(compressed_mha)
        data[rng.integers(start, len(data))] ^= int(rng.integers(1, 256))
        yield "m.mha", bytes(data), "corrupt"


def nrrd_mutations(rng, nrrd: bytes):
    header, _, voxels = nrrd.partition(b"\n\n")
    values = {
        "sizes": ["24 24 25", "24 24 0", "65535 65535 65535", "24 24", "24 24 23"],
        "type": ["double", "uchar", "float", "junk"],
        "encoding": ["gzip", "ascii", "raw"],
        "endian": ["big", "middle"],
        "data file": ["/dev/zero", "../x.raw", "LIST", "missing.raw"],
        "space directions": ["(0,0,0) (0,1,0) (0,0,1)", "(1e-30,0,0) (0,1,0) (0,0,1)"],
    }
    keys = list(values)
    for _ in range(30):
        key = keys[rng.integers(len(keys))]
        choice = values[key][rng.integers(len(values[key]))]
        lines = [line for line in header.decode().splitlines() if not line.startswith(key + ":")]
        lines.insert(2, f"{key}: {choice}")
        yield "m.nrrd", "\n".join(lines).encode() + b"\n\n" + voxels, "header"
    for _ in range(10):
        yield "m.nrrd", nrrd[: rng.integers(0, len(nrrd))], "truncated"


def check_outcome(path: Path, kind: str, original: np.ndarray, predictor: Predictor):
    """The array and geometry of a correct read, or ``None`` after one proper error line."""
    try:
        array, geometry = read_image(path, lambda header: predictor.check(header, path))
    except InputError as error:
        message = str(error)
        assert type(error) is InputError and str(path) in message and "\n" not in message
        return None
    assert kind != "truncated", f"{kind} {path.name} was read"
    assert array.dtype == np.float32 and array.shape == geometry.shape
    assert np.isfinite(array).all()
    assert np.any(array.ravel()[-32:] != 0), f"{kind} {path.name}: a zero-filled tail"
    if kind in ("geometry", "corrupt"):
        np.testing.assert_array_equal(array, original, err_msg=f"{kind} {path.name}")
    return array, geometry


def test_mutated_and_truncated_files_read_correctly_or_fail_in_one_line(
    tmp_path, sample, predictor
):
    rng = np.random.default_rng(SEED)
    original = sitk.GetArrayFromImage(sample).astype(np.float32)
    nii = encoded(sample, tmp_path, "s.nii", False)
    mutations = [
        *nifti_mutations(rng, nii),
        *metaimage_mutations(
            rng,
            encoded(sample, tmp_path, "s.mha", False),
            encoded(sample, tmp_path, "c.mha", True),
        ),
        *nrrd_mutations(rng, encoded(sample, tmp_path, "s.nrrd", False)),
    ]
    bundled = SAMPLE.read_bytes()
    for cut in (10, 352, len(bundled) // 2, len(bundled) - 9):
        mutations.append(("bundled.nii.gz", bundled[:cut], "truncated"))
    start, read, segmented = time.perf_counter(), 0, set()
    for number, (name, data, kind) in enumerate(mutations):
        folder = tmp_path / f"{number:04d}"
        folder.mkdir()
        path = folder / name
        path.write_bytes(data)
        faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
        try:
            outcome = check_outcome(path, kind, original, predictor)
        finally:
            faulthandler.cancel_dump_traceback_later()
        if outcome is None:
            continue
        read += 1
        array, geometry = outcome
        if len(segmented) < 4 and (geometry.shape, geometry.spacing) not in segmented:
            segmented.add((geometry.shape, geometry.spacing))
            segment_and_write(predictor, array, geometry, folder)
    assert len(mutations) >= 400 and 0 < read < len(mutations)
    assert len(segmented) >= 2
    assert time.perf_counter() - start < 60


def segment_and_write(predictor: Predictor, array: np.ndarray, geometry, folder: Path) -> None:
    """A read that passed goes through the network and a verified write (or one error line)."""
    from inference.io import WriteError, write_image_atomically

    mask = predictor.segment(array, geometry).mask
    assert mask.shape == geometry.shape and set(np.unique(mask)) <= {0, 1}
    try:
        write_image_atomically(geometry.image_from(mask), folder / "mask.nii.gz")
    except WriteError as error:
        assert "\n" not in str(error) and "mask.nii.gz" in str(error)
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]
