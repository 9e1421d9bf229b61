"""NRRD files: ``.nrrd`` (the header and its pixels in one file, as 3D Slicer saves them) and ``.nhdr``
(the header, its pixels in a data file beside it), known by their suffix or by their magic
(``NRRD0001`` … ``NRRD0005``), read through ITK's NRRD reader with their geometry
(``model.itk_image``, which also writes their masks, as ``.nrrd``). That reader (teem's) refuses pixel
data shorter than the header announces and a damaged gzip stream itself; refused here before it
reads: a ``.nrrd`` whose header points at another file, a ``.nhdr`` whose header points at anything
but one file beside it, bzip2 encoding (which that reader lacks), and an image larger than
``MAX_PIXELS`` or of more than 4 channels."""
from __future__ import annotations

import math
import re
from pathlib import Path

from .image import ImageReadError, LoadedImage, check_size, data_file_beside, image_suffix, named_or_signed
from .itk_image import loaded_from_itk

NRRD_IO = "NrrdImageIO"
NRRD_SUFFIXES = (".nrrd", ".nhdr")
_MAGIC = re.compile(rb"NRRD000[1-5]\r?\n")
# the most header read: a NRRD header is a few hundred bytes of text; past this it is not one
_MAX_HEADER = 1 << 20
# kinds of an axis along which pixels lie (the others hold a pixel's channels: RGB-color, vector, ...)
_SPATIAL_KINDS = {"domain", "space", "time", "???", "none"}
# teem's "[nrrd] _nrrdEncodingGzip_read: " before each line of its reasons
_TEEM_PREFIX = re.compile(r"^\s*\[nrrd\]\s*[\w.]+:\s*")


def is_nrrd(path: Path | str) -> bool:
    """Whether ``read_image`` reads ``path`` as NRRD: a ``.nrrd`` or ``.nhdr`` file, or a file whose
    suffix names no image format (a Cog upload's ``file.bin``) and which opens with NRRD's magic. A
    file named as another format (``.png``) is read as that format."""
    return named_or_signed(path, NRRD_SUFFIXES, _MAGIC, 10)


def nrrd_header(path: Path) -> dict[str, str]:
    """The header's fields (``type``, ``sizes``, ``data file``, ...; keys in lower case, teem's
    spellings: ``datafile`` = ``data file``), read to the blank line that ends it (or the end of a
    ``.nhdr``); comments and ``key:=value`` pairs skipped. ``ImageReadError`` without NRRD's magic."""
    with open(path, "rb") as fh:
        head = fh.read(_MAX_HEADER)
    if not _MAGIC.match(head):
        raise ImageReadError(path, "not a NRRD file (no NRRD0001 to NRRD0005 magic at its start)")
    fields: dict[str, str] = {}
    for raw in head.split(b"\n")[1:]:
        line = raw.rstrip(b"\r").decode("utf-8", "replace")
        if not line:
            break
        if line.startswith("#") or ":=" in line.split(": ", 1)[0]:
            continue
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip().lower().replace("datafile", "data file")] = value.strip()
    return fields


def _check_header(path: Path, fields: dict[str, str]) -> None:
    """Refuse where the pixels lie anywhere but in this file (a ``.nrrd``) or in one file beside it (a
    ``.nhdr``), in an encoding ITK lacks, and an image too large to read."""
    detached = fields.get("data file")
    if detached is not None:
        if image_suffix(path) != ".nhdr":  # a header that points elsewhere could read any file here
            raise ImageReadError(path, f"its pixel data is in another file (data file: {detached}); a .nrrd must "
                                       f"hold its own pixels, a header whose pixels are in a file beside it is "
                                       f"read as .nhdr")
        data_file_beside(path, detached, "data file:")
    if fields.get("encoding", "").lower() in ("bzip2", "bz2"):  # teem's own reason would read as a fault
        raise ImageReadError(path, "its pixel data is bzip2-encoded, which ITK's NRRD reader cannot read; "
                                   "save it with raw or gzip encoding")
    try:
        sizes = [int(v) for v in fields.get("sizes", "").split()]
    except ValueError:
        return  # ITK says what is wrong with it
    kinds = fields.get("kinds", "").split()
    if len(kinds) != len(sizes):
        kinds = ["domain"] * len(sizes)
    spatial = [s for s, k in zip(sizes, kinds) if k.lower() in _SPATIAL_KINDS]
    channels = math.prod(s for s, k in zip(sizes, kinds) if k.lower() not in _SPATIAL_KINDS)
    if channels > 4:
        raise ImageReadError(path, f"unsupported channel count {channels}")
    if len(spatial) >= 2:
        check_size(path, spatial[0], math.prod(spatial[1:]))


def read_nrrd(path: Path) -> LoadedImage:
    """A 2-D NRRD image (or a 3-D one of one slice) with its spacing, origin and direction as ITK gives
    them, and ``.nrrd`` as the suffix its mask is written with."""
    import SimpleITK as sitk

    _check_header(path, nrrd_header(path))
    try:
        img = sitk.ReadImage(str(path), imageIO=NRRD_IO)
    except RuntimeError as exc:
        lines = [_TEEM_PREFIX.sub("", line).strip() for line in str(exc).strip().splitlines()]
        lines = [line for line in lines if line and not line.startswith(("trouble", "Exception thrown"))]
        reason = lines[-1] if lines else "unknown error"
        if "_nrrdEncoding" in str(exc):  # the header parsed, its pixel data did not
            raise ImageReadError(path, f"corrupt or truncated NRRD: the header reads, the pixel data does not "
                                       f"({reason})") from None
        raise ImageReadError(path, f"cannot read as NRRD ({reason})") from None
    return loaded_from_itk(path, img, ".nrrd")
