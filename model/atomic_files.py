"""Writing files so that a crash never leaves a truncated one under its final name: each is written
to a temporary file in the same folder and renamed onto its name (``os.replace``) once complete."""
from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .image import image_suffix

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # a short name: the final name may be as long as the file system allows, the temporary one too
    # the final suffix kept (``.nii.gz`` whole): ITK picks the format it writes by the name's suffix
    fd, tmp = tempfile.mkstemp(prefix=".pfsam-", suffix=".tmp" + image_suffix(final)[:16], dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs must be readable like any file
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")  # the summaries are UTF-8 whatever the locale


def write_zip(path: Path | str, members: dict[str, Path]) -> None:
    """A zip of the files ``members`` (name in the archive -> file), in sorted order with a fixed
    date, so that the same files always give the same bytes; PNGs stored, other files deflated."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if name.lower().endswith(".png") else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, Path(members[name]).read_bytes())


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
