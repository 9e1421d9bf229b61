"""Writing files so that a crash never leaves a truncated one under its final name: each is written
to a temporary file in the same folder and renamed onto its name (``os.replace``) once complete.

Two blocks widen this to a run's many files (``model.inference.run``): within ``replacements_kept``
a file that is replaced is first kept under a hidden name beside it, so that ``undo`` puts it back
(a case that fails after some of its outputs were written leaves an earlier run's files as they
were); within ``all_or_none`` the files written are put in place together when the block ends,
or none is (a run's summary files: never some of this run's beside some of an earlier run's).
Temporary and kept files are named ``.pfsam-<pid>-…``; ``remove_leftovers`` clears those of a
process that is gone (a run killed by SIGKILL).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .image import image_suffix

_UMASK = os.umask(0)
os.umask(_UMASK)


_lock = threading.Lock()
_kept: dict[str, Path] | None = None  # within replacements_kept: final path -> what it held before, kept
_staged: list[tuple[Path, Path]] | None = None  # within all_or_none: (temporary, final) to rename at its end
_removals: list[Path] | None = None  # within all_or_none: files to remove at its end


def _prefix() -> str:
    return f".pfsam-{os.getpid()}-"


_OURS = re.compile(r"^\.pfsam-(\d+)-")


def _keep(final: Path) -> None:
    """Within ``replacements_kept``: keep the file ``final`` holds (a hard link, else a copy) before it
    is replaced, once per block (the first one: what was there before this run)."""
    key = os.path.abspath(final)
    with _lock:
        if _kept is None or key in _kept or not final.is_file():
            return
    fd, name = tempfile.mkstemp(prefix=_prefix(), suffix=".kept" + image_suffix(final)[:16], dir=final.parent)
    os.close(fd)
    backup = Path(name)
    backup.unlink()
    try:
        os.link(final, backup)
    except OSError:  # a file system without hard links
        try:
            shutil.copy2(final, backup)
        except BaseException:
            backup.unlink(missing_ok=True)
            raise
    with _lock:
        if _kept is not None:
            _kept[key] = backup
            return
    backup.unlink(missing_ok=True)


@contextlib.contextmanager
def replacements_kept() -> Iterator[None]:
    """Within the block, each file that ``atomic_path`` replaces is kept first, for ``undo``; the kept
    files go when the block ends, however it ends."""
    global _kept
    with _lock:
        _kept = {}
    try:
        yield
    finally:
        with _lock:
            kept, _kept = _kept, None
        for backup in kept.values():
            with contextlib.suppress(OSError):
                backup.unlink(missing_ok=True)


def undo(path: Path | str) -> None:
    """Put back what ``path`` held before ``atomic_path`` replaced it within ``replacements_kept``;
    a file that was not there before is removed."""
    path = Path(path)
    with _lock:
        backup = _kept.pop(os.path.abspath(path), None) if _kept is not None else None
    if backup is not None:
        os.replace(backup, path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def all_or_none() -> Iterator[None]:
    """Within the block, the files ``atomic_path`` writes are completed under their temporary names,
    and ``remove_file`` only notes its files; when the block ends without an error they are all put in
    place (and removed) together, after a check that no final name is taken by a folder. On an error
    (a full disk, SIGTERM) every temporary file goes and no final name is touched."""
    global _staged, _removals
    _staged, _removals = [], []
    staged, removals = _staged, _removals
    try:
        try:
            yield
        finally:
            _staged = _removals = None
        for _, final in staged:
            if final.is_dir():
                raise IsADirectoryError(errno.EISDIR, "a folder has the name of this output file", str(final))
        for tmp, final in staged:
            _keep(final)
            os.replace(tmp, final)
        for path in removals:
            path.unlink(missing_ok=True)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def remove_file(path: Path | str) -> None:
    """Remove ``path`` if it is there; within ``all_or_none``, when the block's files are put in place."""
    if _removals is not None:
        _removals.append(Path(path))
    else:
        Path(path).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # a process before this one with the same number (PID 1 in a container)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def remove_leftovers(folder: Path | str) -> list[Path]:
    """Remove the temporary and kept files (``.pfsam-<pid>-…``) in ``folder`` of a process that is no
    longer running (a run killed by SIGKILL, or this process's number reused); returns them. An
    earlier run's files under their final names are complete (renamed once written)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = _OURS.match(entry.name)
            if m and entry.is_file(follow_symlinks=False) and not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    found.append(Path(entry.path))
    return found


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds
    (within ``all_or_none``, when that block ends). An ``OSError`` names ``final``, not the temporary file."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # a short name: the final name may be as long as the file system allows, the temporary one too
    # the final suffix kept (``.nii.gz`` whole): ITK picks the format it writes by the name's suffix
    fd, tmp = tempfile.mkstemp(prefix=_prefix(), suffix=".tmp" + image_suffix(final)[:16], dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    done = False
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs must be readable like any file
        try:
            yield tmp_path
        except OSError as exc:
            if exc.filename not in (None, str(tmp_path)):
                raise
            if exc.errno is None:  # numpy's "181566 requested and 1984 written": a short write
                raise OSError(errno.EIO, f"{exc}: written in part (is the disk full?)", str(final)) from exc
            raise OSError(exc.errno, exc.strerror or str(exc), str(final)) from exc
        if _staged is not None:
            _staged.append((tmp_path, final))
        else:
            _keep(final)
            os.replace(tmp_path, final)
        done = True
    finally:
        if not done:
            with contextlib.suppress(OSError):
                tmp_path.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # the summaries are UTF-8 whatever the locale


def write_zip(path: Path | str, members: dict[str, Path | bytes]) -> None:
    """A zip of ``members`` (name in the archive -> a file, or its bytes), in sorted order with a fixed
    date, so that the same files always give the same bytes; PNGs stored, other files deflated."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if name.lower().endswith(".png") else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            data = members[name]
            zf.writestr(info, data if isinstance(data, bytes) else Path(data).read_bytes())


def write_png(path: Path | str, array: np.ndarray) -> None:
    """Write grey or RGB pixels (8-bit, or 16-bit) as PNG, atomically."""
    array = np.ascontiguousarray(array)
    with atomic_path(path) as tmp:
        if array.ndim == 3 and array.dtype == np.uint16:  # 16-bit colour: Pillow cannot write it, ITK can
            import SimpleITK as sitk

            sitk.WriteImage(sitk.GetImageFromArray(array, isVector=True), str(tmp))
        else:
            Image.fromarray(array).save(tmp, format="PNG")


def write_npy(path: Path | str, array: np.ndarray) -> None:
    """Write an array as .npy (no pickle), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
