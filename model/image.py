"""What reading an image gives (``LoadedImage``) and how it fails (``ImageReadError``), with the
checks every reader applies: the size limit, the pixel array's shape and values, and file names that
the libraries below cannot take; the suffix and stem of a file name (``.nii.gz`` is one suffix); the
data file a detached header names (``.mhd``, ``.nhdr``). Shared by the readers of each format
(``model.io``, ``model.dicom``, ``model.metaimage``, ``model.nifti``, ``model.nrrd``).
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".mha", ".mhd", ".bmp", ".dcm", ".dicom", ".nii", ".nii.gz",
                  ".nrrd", ".nhdr"}
# The largest image read, checked from its header before anything is decoded: an ultrasound frame is
# under a megapixel, and decoding holds a few full-size copies (Pillow's, the orientation's, the array),
# so much beyond this (the size test_odd_inputs runs under 4 GB) would not fit a 4 GB container
MAX_PIXELS = 10000 * 10000


def printable(path: Path | str) -> str:
    """``path`` as text that can be written anywhere: bytes of a file name that are not UTF-8 (which
    Python keeps as lone surrogates) as ``\\xNN`` escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def image_suffix(path: Path | str) -> str:
    """The suffix of ``path`` in lower case, ``.nii.gz`` taken whole (``Scan.NII.GZ`` -> ``.nii.gz``)."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") and len(name) > 7 else Path(name).suffix


def named_or_signed(path: Path | str, suffixes: tuple[str, ...], signature: re.Pattern[bytes], head: int) -> bool:
    """Whether ``path`` is of the format whose ``suffixes`` are given: it has one of them, or it has no
    image suffix (a Cog upload's ``file.bin``) and its first ``head`` bytes open with ``signature``."""
    suffix = image_suffix(path)
    if suffix in suffixes:
        return True
    if suffix in IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as fh:
            return signature.match(fh.read(head)) is not None
    except OSError:
        return False


def image_stem(path: Path | str) -> str:
    """The name of ``path`` without its image suffix (``image_suffix``): ``case_0000.nii.gz`` ->
    ``case_0000``; a name whose suffix names no image format is kept whole (``IM00001``, a DICOM UID)."""
    name, suffix = Path(path).name, image_suffix(path)
    return name[:-len(suffix)] if suffix in IMAGE_SUFFIXES else name


NOT_UTF8 = "its file name is not valid UTF-8 (rename it)"


def is_utf8_name(path: Path | str) -> bool:
    """Whether ``path`` is valid UTF-8. The libraries below need it: ITK aborts the whole process on
    such a name (a C++ exception no Python code can catch), and CSV and JSON outputs cannot hold it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ImageReadError(ValueError):
    """An input that cannot be used; ``str()`` names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class LoadedImage:
    """Pixels plus the geometry needed to write a mask that overlays the input exactly."""

    array: np.ndarray  # H x W or H x W x C
    path: str = ""
    spacing: tuple[float, float] = (1.0, 1.0)  # (x, y), mm for mha, 1.0 (pixels) otherwise
    origin: tuple[float, ...] = (0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 1.0)
    extra: dict = field(default_factory=dict)
    # read through ITK as a MetaImage (".mha", also for a .mhd), NIfTI (".nii", ".nii.gz") or NRRD (".nrrd",
    # also for a .nhdr), by name or by content: the suffix that predict_file gives its mask, written in
    # that format, in one file, with this geometry
    itk_suffix: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.array.shape[0]), int(self.array.shape[1])


def detached_refused(path: Path, field: str, name: str, own: str, detached: str) -> ImageReadError:
    """The error for a header whose pixels lie in another file where it must hold its own: a ``own``
    file (``.mha``, ``.nrrd``) named so, or an upload known by its content, which comes alone."""
    where = f"its pixel data is in another file ({field} {printable(name)})"
    if image_suffix(path) in IMAGE_SUFFIXES:
        return ImageReadError(path, f"{where}; a {own} must hold its own pixels, a header whose pixels are in a "
                                    f"file beside it is read as {detached}")
    return ImageReadError(path, f"{where}, which an upload cannot bring along: send a {own} that holds its pixels")


def data_file_beside(path: Path, name: str, field: str) -> Path:
    """The file that the detached header ``path`` (a ``.mhd``, a ``.nhdr``) names in ``field`` for its
    pixel data, when it is a readable regular file in the same folder other than the header, named
    without a path; else ``ImageReadError`` with the reason. ``name`` is the value as the library that
    reads the file takes it (MetaIO strips spaces, teem keeps them). A list of files, a numbered
    pattern or a path elsewhere are not read: a header could otherwise have any file on the machine
    read as pixels. Where the libraries would open another file than the one checked here, the name
    is refused too: one with control characters or bytes that are not UTF-8 (kept as lone surrogates
    by the header's reader), spaces at either end, a last character that is not printable ASCII
    (MetaIO strips such bytes from a name's end: ``daté.raw`` stays, ``daté`` would be ``dat``), a
    ``:`` (teem takes ``C:x.raw`` for a path), a leading ``~`` (MetaIO does), or opening with
    ``LIST`` (both take that for a list, whatever follows; ``list_a.raw`` is a name)."""
    plain = name.isprintable() and name == name.strip() and name[-1:].isascii()
    if (not plain or name in ("", ".", "..") or any(c in name for c in "/\\%:") or name.startswith(("~", "LIST"))):
        raise ImageReadError(path, f"its header names its pixel data as {field} {printable(repr(name))}; only one "
                                   f"data file beside the header, named without a folder, is read (no path, list or "
                                   f"pattern, control character, ':' or space at either end)")
    data = path.parent / name
    try:
        st = data.stat()
    except OSError:
        raise ImageReadError(path, f"its pixel data file {name} ({field}) is missing: it must be beside the "
                                   f"header, in the same folder") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(path, f"its pixel data file {name} ({field}) is not a regular file")
    if os.path.samefile(data, path):
        raise ImageReadError(path, f"its pixel data file {name} ({field}) is the header itself")
    if data.is_symlink() and os.path.dirname(os.path.realpath(data)) != os.path.realpath(path.parent):
        raise ImageReadError(path, f"its pixel data file {name} ({field}) is a link out of the header's folder: "
                                   f"only a data file beside the header is read")
    try:
        open(data, "rb").close()
    except OSError as exc:
        raise ImageReadError(path, f"its pixel data file {name} ({field}) cannot be opened "
                                   f"({exc.strerror})") from None
    return data


def check_size(path: Path, width: int, height: int) -> None:
    """Refuse an image larger than ``MAX_PIXELS``, from the size its header gives, before decoding it."""
    if width * height > MAX_PIXELS:
        raise ImageReadError(path, f"image too large: {width} x {height} = {width * height:,} pixels; at most "
                                   f"{MAX_PIXELS:,} (10000 x 10000) are read, so that decoding it fits a 4 GB container")


# decoded pixel data: 10000 x 10000 RGBA at 16 bits, or grey at 64; reading takes about twice that at
# its peak (a 3 MB compressed .mha of 10000 x 10000 x 4 doubles, 3.2 GB, peaked at 6.8 GB: the review's figure)
MAX_PIXEL_BYTES = MAX_PIXELS * 8


def check_bytes(path: Path, nbytes: int) -> None:
    """Refuse pixel data larger than ``MAX_PIXEL_BYTES`` decoded (channels and sample size counted),
    from the size its header gives, before decoding it."""
    if nbytes > MAX_PIXEL_BYTES:
        raise ImageReadError(path, f"image too large: its pixel data takes {nbytes:,} bytes decoded (channels and "
                                   f"sample size counted); at most {MAX_PIXEL_BYTES:,} are read, so that decoding "
                                   f"it fits a 4 GB container")


def check_pixels(path: Path, arr: np.ndarray) -> np.ndarray:
    """``arr`` if it is a 2-D image (grey, or 1-4 channels) of finite real values; else ``ImageReadError``."""
    if arr.size == 0 or arr.ndim < 2:
        raise ImageReadError(path, f"no 2-D pixel data (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[2] > 4:
        raise ImageReadError(path, f"unsupported channel count {arr.shape[2]}")
    if arr.ndim > 3:
        raise ImageReadError(path, f"unsupported array shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ImageReadError(path, "contains NaN or infinite pixel values")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ImageReadError(path, "complex pixel type is not an image")
    return arr
