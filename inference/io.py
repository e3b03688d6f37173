"""Writing outputs: atomically, verified before the rename, never interrupted half-way.

ITK's NIfTI writer reports a short write (full disk, ``ulimit -f``) only as ``** ERROR: NWAD``
on stderr, so every image is read back and compared before it takes its final name. A stop
(SIGTERM from ``docker stop``) is deferred until a write and its cleanup are complete, and one
run at a time owns an output folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.file_checks import InputError, check_payload, check_raw_header
from inference.naming import image_suffix

TEMPORARY_PREFIX = ".tmp-"  # of the files written before their rename into place


class WriteError(RuntimeError):
    """An output that could not be written completely; one line naming the file."""


class Interrupted(BaseException):
    """SIGTERM (``docker stop``) or SIGINT during a run; not an :class:`Exception`, so that no
    per-case handler mistakes it for a bad case."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.result = None  # the report entry of the case it stopped, when there was one


# --- writing: atomic, verified, never interrupted half-way ----------------------------------

_deferred = {"depth": 0, "signum": None}  # signal handlers run in the main thread only


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Defer :class:`Interrupted` to the end of the block: a write and its cleanup finish (or
    fail) as a whole, so that a stop never leaves a temporary or half-written file. Signals
    interrupt the main thread only: a block in another thread (``run_cases``'s writer) needs no
    deferral."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
        if _deferred["depth"] == 0 and _deferred["signum"] is not None:
            signum, _deferred["signum"] = _deferred["signum"], None
            raise Interrupted(signum)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` in the main thread (deferred inside
    :func:`uninterrupted`); a second signal is ignored while the first one is handled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for number in stops:
            signal.signal(number, signal.SIG_IGN)
        if _deferred["depth"]:
            _deferred["signum"] = signum
            return
        raise Interrupted(signum)

    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {number: signal.signal(number, handler) for number in stops}
    # A file-size limit (ulimit -f) becomes an error on the write (EFBIG), not a killed process.
    previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


def quiet_itk() -> None:
    """No ITK warnings (multi-line blocks on stderr): a container run reports one line per
    file, and every condition that matters is an error of its own here."""
    sitk.ProcessObject.SetGlobalWarningDisplay(False)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def temporary_beside(path: Path, suffix: str) -> Iterator[Path]:
    """A new, uniquely and briefly named file in ``path``'s folder (unique per process, never
    longer than 255 bytes whatever ``path``'s name), removed unless renamed into place."""
    try:
        handle, name = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=suffix, dir=path.parent)
    except OSError as error:
        raise WriteError(f"{path}: cannot write ({error.strerror or error})") from None
    os.close(handle)
    os.chmod(name, 0o666 & ~current_umask())  # mkstemp's 0600 would stay on the output
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def write_text_atomically(text: str, path: str | Path) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place; raises
    :class:`WriteError` (one line) for a full disk or an unwritable folder."""
    path = Path(path)
    with uninterrupted(), temporary_beside(path, ".tmp") as temporary:
        try:
            with open(temporary, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.replace(temporary, path)
        except OSError as error:
            raise WriteError(f"{path}: cannot write ({error.strerror or error})") from None


def write_image_atomically(image: sitk.Image, path: str | Path, compress: bool = True) -> None:
    """Write ``image`` to a temporary file beside ``path``, verify it, then rename it into place.

    SimpleITK chooses the format from the (lower-case) suffix, which the temporary name keeps.
    The temporary file is read back (:func:`verify_written`) before the rename, since ITK's
    NIfTI writer does not fail on a short write. Raises :class:`WriteError` with one line; no
    file is left under either name on failure.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if not suffix or suffix == ".mhd":
        raise ValueError(f"{path}: cannot write atomically; use .nii.gz, .nii, .mha or .nrrd")
    with uninterrupted(), temporary_beside(path, suffix) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), compress)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1][:160] if str(error).strip() else "?"
            raise WriteError(f"{path}: cannot write ({reason})") from None
        verify_written(image, temporary, path)
        try:
            os.replace(temporary, path)
        except OSError as error:
            raise WriteError(f"{path}: cannot write ({error.strerror or error})") from None


def verify_written(image: sitk.Image, temporary: Path, path: Path) -> None:
    """Raise :class:`WriteError` unless ``temporary`` reads back as ``image``: the payload
    complete (the file size for .nii, the whole stream for .nii.gz), the same voxels and the
    same geometry (to NIfTI's float32 precision)."""
    try:
        if os.stat(temporary).st_size == 0:
            raise InputError(f"{temporary}: empty file")
        fields, length = check_raw_header(temporary)
        payload = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel()
        payload *= image.GetSizeOfPixelComponent()
        check_payload(temporary, payload, fields, length)
        written = sitk.ReadImage(str(temporary))
    except (InputError, RuntimeError, OSError) as error:
        reason = " ".join(str(error).split())[-160:]
        raise WriteError(f"{path}: the written file is incomplete ({reason})") from None
    if written.GetSize() != image.GetSize() or written.GetPixelID() != image.GetPixelID():
        raise WriteError(f"{path}: the written file reads back with another size or type")
    if not np.array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(image)):
        raise WriteError(f"{path}: the written file reads back with other voxels")
    if not same_grid(written, image):
        raise WriteError(f"{path}: the written file reads back with another origin or orientation")


def index_to_point(image: sitk.Image) -> np.ndarray:
    """The 4x4 affine from voxel index to physical point: direction x spacing, and origin."""
    dimension = image.GetDimension()
    affine = np.eye(dimension + 1)
    direction = np.reshape(image.GetDirection(), (dimension, dimension))
    affine[:dimension, :dimension] = direction * np.asarray(image.GetSpacing())
    affine[:dimension, dimension] = image.GetOrigin()
    return affine


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """The same voxel-to-point mapping, to NIfTI's float32 precision (formats split it into
    direction and spacing differently: NRRD keeps non-unit direction vectors' length in the
    spacing)."""
    return np.allclose(index_to_point(a), index_to_point(b), rtol=1e-5, atol=1e-4)


@contextlib.contextmanager
def claim_folder(folder: Path, lock_name: str = ".lock") -> Iterator[None]:
    """Own ``folder`` for a run: create it, then hold an exclusive, non-blocking ``flock`` on
    ``folder/.lock`` (removed at the end). Raises :class:`WriteError` (one line) when the folder
    is a file, cannot be created or written, or another run holds it."""
    if folder.exists() and not folder.is_dir():
        raise WriteError(f"{folder}: the output path exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WriteError(f"{folder}: cannot create the output folder ({error.strerror})") from None
    lock = folder / lock_name
    for _ in range(3):  # the previous owner may remove the lock between our open and flock
        try:
            handle = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            raise WriteError(f"{folder}: output folder not writable ({error.strerror})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise WriteError(f"{folder}: another run is writing here (it holds {lock})") from None
        except OSError as error:  # a file system without flock (some network mounts): go on
            print(f"warning: {lock}: cannot lock ({error.strerror})", file=sys.stderr)
            break
        if same_file(handle, lock):
            break
        os.close(handle)
    else:
        raise WriteError(f"{folder}: another run is writing here (it holds {lock})")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: a waiting run sees a new inode
        os.close(handle)


def same_file(handle: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle), os.stat(path))
    except OSError:
        return False
