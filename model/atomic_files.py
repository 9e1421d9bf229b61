"""Writing files so that a crash never leaves a truncated one under its final name: each is written
to a temporary file in the same folder and renamed onto its name (``os.replace``) once complete.

Two blocks widen this to a run's many files (``model.inference.run``): within ``replacements_kept``
a file that is replaced is first kept under a hidden name beside it, so that ``undo`` puts it back
(a case that fails after some of its outputs were written leaves an earlier run's files as they
were); within ``all_or_none`` the files written are put in place together when the block ends,
or none is (a run's summary files: never some of this run's beside some of an earlier run's).
Temporary and kept files are named ``.pfsam-<run or process>-…``; ``remove_leftovers`` clears those
of a run that is over (killed by SIGKILL), known by its lock file (``run_lock``).
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
_kept_depth = 0  # replacements_kept blocks entered (an inner one joins the outer)
_local = threading.local()  # .staged [(temporary, final)] and .removals: this thread's all_or_none
_run_tokens: dict[str, str] = {}  # within run_lock: a run's folder (absolute) -> its name in its hidden files' names


def _prefix(final: Path) -> str:
    """``.pfsam-r<token>-`` for a file below a live run's folder (``run_lock``; any thread writing it),
    else ``.pfsam-p<pid>-``."""
    where = os.path.abspath(final)
    with _lock:
        tokens = [(len(root), token) for root, token in _run_tokens.items() if where.startswith(root + os.sep)]
    return f".pfsam-{max(tokens)[1] if tokens else f'p{os.getpid()}'}-"


# r<token>: a run's (run_lock), p<pid>: a process's outside a run
_OURS = re.compile(r"^\.pfsam-(?:(r[0-9a-f]+)|p(\d+))-")


def _run_lock_path(folder: Path, token: str) -> Path:
    return Path(folder) / f".pfsam-{token}-run.lock"


@contextlib.contextmanager
def run_lock(folder: Path | str) -> Iterator[None]:
    """For a run writing into ``folder``: its hidden files are named by a token of its own, and a lock
    file in ``folder`` (``flock``ed while the run lives, removed when it ends) tells another run that
    they are not a killed run's (``remove_leftovers``), also from another container (PID namespace)."""
    import secrets

    try:
        import fcntl
    except ImportError:  # not a POSIX system: the run's files are named by its process (p<pid>)
        yield
        return
    token = "r" + secrets.token_hex(6)
    root = os.path.abspath(folder)
    path = _run_lock_path(Path(folder), token)
    # locked under a name that no run's clean-up looks at, then renamed: the lock file never stands
    # unlocked under its name, where another run starting now would take it for a killed run's
    pending = Path(folder) / f".pfsam-lock-{token}.new"
    try:
        fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666 & ~_UMASK)
    except OSError:  # cannot lock: the run's files are named by its process (p<pid>), as outside a run
        yield
        return
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(pending, path)
            locked = True
        except OSError:  # a file system without locks: no lock file left
            with contextlib.suppress(OSError):
                pending.unlink(missing_ok=True)
        if not locked:
            yield
            return
        with _lock:
            _run_tokens[root] = token
        try:
            yield
        finally:
            with _lock:
                _run_tokens.pop(root, None)
    finally:
        with contextlib.suppress(OSError):
            (path if locked else pending).unlink(missing_ok=True)
        os.close(fd)


def _keep(final: Path) -> None:
    """Within ``replacements_kept``: keep the file ``final`` holds (a hard link, else a copy) before it
    is replaced, once per block (the first one: what was there before this run)."""
    key = os.path.abspath(final)
    with _lock:
        if _kept is None or key in _kept or not final.is_file():
            return
    backup = _mkstemp(final, ".kept")
    backup.unlink()
    try:
        os.link(final, backup)
    except OSError:  # a file system without hard links
        try:
            shutil.copy2(final, backup, follow_symlinks=False)  # a link stays a link
        except OSError as exc:  # named by the file it keeps, not the hidden copy
            backup.unlink(missing_ok=True)
            raise OSError(exc.errno, f"{exc.strerror or exc} (keeping the earlier file to put it back on a "
                                     f"failure)", str(final)) from exc
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
    files go when the outermost block ends, however it ends (an inner block joins the outer one)."""
    global _kept, _kept_depth
    with _lock:
        if _kept_depth == 0:
            _kept = {}
        _kept_depth += 1
    try:
        yield
    finally:
        with _lock:
            _kept_depth -= 1
            kept = {}
            if _kept_depth == 0:
                kept, _kept = _kept or {}, None
        for backup in kept.values():
            with contextlib.suppress(OSError):
                backup.unlink(missing_ok=True)


def undo(path: Path | str) -> None:
    """Put back what ``path`` held before ``atomic_path`` replaced it within ``replacements_kept``;
    a file that was not there before is removed."""
    path, key = Path(path), os.path.abspath(path)
    with _lock:
        backup = _kept.get(key) if _kept is not None else None
    if backup is not None:
        os.replace(backup, path)
        backup.unlink(missing_ok=True)  # a rename onto a link to the same file does nothing (POSIX)
        with _lock:  # only once it is back: a stop before leaves the record for the next try
            if _kept is not None:
                _kept.pop(key, None)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def all_or_none() -> Iterator[None]:
    """Within the block, the files that this thread's ``atomic_path`` writes are completed under their
    temporary names, and ``remove_file`` only notes its files; when the block ends without an error they
    are all put in place (and removed) together: after a check that no final name is taken by a folder,
    and with what they replace kept first (``replacements_kept``), so that an error or a stop while they
    are renamed puts the ones already renamed back. On an error (a full disk, SIGTERM) no final name is
    left changed and every temporary file goes. An inner block joins the outer one."""
    if getattr(_local, "staged", None) is not None:
        yield
        return
    staged: list[tuple[Path, Path]] = []
    removals: list[Path] = []
    _local.staged, _local.removals = staged, removals
    try:
        with replacements_kept():
            try:
                yield
            finally:
                _local.staged = _local.removals = None
            for _, final in staged:
                if final.is_dir():
                    raise IsADirectoryError(errno.EISDIR, "a folder has the name of this output file", str(final))
            for path in [final for _, final in staged] + removals:
                _keep(path)  # all of them before the first change
            done: list[Path] = []  # each noted before it changes: a stop during os.replace still puts it back
            try:
                for tmp, final in staged:
                    done.append(final)
                    os.replace(tmp, final)
                for path in removals:
                    if path.is_file():
                        done.append(path)
                        path.unlink()
            except BaseException:
                _put_back(done)
                raise
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _put_back(paths: list[Path]) -> None:
    """``undo`` each of ``paths``, last first, to the end: a second stop (SIGTERM, Ctrl-C) while this
    runs is raised once all are back (the first is already on its way)."""
    stop = None
    for path in reversed(paths):
        for _ in range(3):
            try:
                undo(path)
                break
            except OSError:
                break
            except BaseException as exc:  # noqa: BLE001 - the same file again; the stop after
                stop = stop or exc
    if stop is not None:
        raise stop


def remove_file(path: Path | str) -> None:
    """Remove ``path`` if it is there; within ``all_or_none``, when the block's files are put in place."""
    removals = getattr(_local, "removals", None)
    if removals is not None:
        removals.append(Path(path))
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


def _locked(lock: Path) -> bool:
    """Whether a live run holds ``lock`` (any process, any PID namespace on this machine)."""
    try:
        import fcntl
    except ImportError:  # cannot tell: taken for a live run's
        return True
    try:
        fd = os.open(lock, os.O_RDONLY)  # flock needs no write access: another user's lock is read too
    except FileNotFoundError:
        return False
    except OSError:  # cannot tell: taken for a live run's
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def remove_leftovers(root: Path | str, folders: tuple[str, ...] | list[str] = ("",)) -> list[Path]:
    """Remove the hidden temporary and kept files (``.pfsam-…``) in ``root``'s ``folders`` of a run that
    is over (killed by SIGKILL): a run's (``run_lock``) where its lock file in ``root`` is gone or held by
    no process; a process's outside a run where that process is not running. Returns them. A live
    run's files are left alone, from any container. An earlier run's files under their final names
    are complete (renamed once written)."""
    root = Path(root)
    found, over = [], {}
    for sub in folders:
        with contextlib.suppress(OSError):
            for entry in os.scandir(root / sub):
                m = _OURS.match(entry.name)
                if not m or not entry.is_file(follow_symlinks=False):
                    continue
                token, pid = m.groups()
                if token:
                    if token not in over:
                        with _lock:
                            mine = token in _run_tokens.values()
                        over[token] = not mine and not _locked(_run_lock_path(root, token))
                    stale = over[token]
                else:
                    stale = not _alive(int(pid))
                if stale:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                        found.append(Path(entry.path))
    return found


def _named(exc: OSError, final: Path) -> OSError:
    """``exc`` naming ``final`` (the output) instead of a temporary file."""
    return OSError(exc.errno, exc.strerror or str(exc), str(final))


def _mkstemp(final: Path, kind: str) -> Path:
    """A new hidden file beside ``final`` (its suffix kept); an ``OSError`` names ``final``."""
    try:
        fd, name = tempfile.mkstemp(prefix=_prefix(final), suffix=kind + image_suffix(final)[:16], dir=final.parent)
    except OSError as exc:
        raise _named(exc, final) from exc
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds
    (within ``all_or_none``, when that block ends). An ``OSError`` names ``final``, not the temporary file."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # a short name: the final name may be as long as the file system allows, the temporary one too
    # the final suffix kept (``.nii.gz`` whole): ITK picks the format it writes by the name's suffix
    tmp_path = _mkstemp(final, ".tmp")
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
            raise _named(exc, final) from exc
        staged = getattr(_local, "staged", None)
        if staged is not None:
            staged.append((tmp_path, final))
        else:
            _keep(final)
            try:
                os.replace(tmp_path, final)
            except OSError as exc:
                raise _named(exc, final) from exc
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
