"""NRRD files: ``.nrrd`` (the header and its pixels in one file, as 3D Slicer saves them) and ``.nhdr``
(the header, its pixels in a data file beside it), known by their suffix or by their magic
(``NRRD0001`` … ``NRRD0005``), read through ITK's NRRD reader with their geometry
(``model.itk_image``, which also writes their masks, as ``.nrrd``). That reader (teem's) refuses pixel
data shorter than the header announces and a damaged gzip stream itself; refused here before it
reads: a ``.nrrd`` whose header points at another file, a ``.nhdr`` whose header points at anything
but one file beside it, bzip2 encoding (which that reader lacks), a ``.nrrd`` whose raw pixels are
its last bytes (``byte skip: -1``) with fewer bytes after its header, and an image larger than
``MAX_PIXELS`` or of more than 4 channels."""
from __future__ import annotations

import math
import re
from pathlib import Path

from .image import (ImageReadError, LoadedImage, check_bytes, check_size, data_file_beside, detached_refused,
                    image_suffix, named_or_signed)
from .itk_image import itk_reason, loaded_from_itk

NRRD_IO = "NrrdImageIO"
NRRD_SUFFIXES = (".nrrd", ".nhdr")
_MAGIC = re.compile(rb"NRRD000[1-5](\r\n|\r|\n)")
# the most header read: a NRRD header is a few hundred bytes of text; one that runs on past this is refused
_MAX_HEADER = 1 << 20
# teem ends a line at \r\n, \n or a lone \r
_LINES = re.compile(rb"\r\n|\r|\n")
# kinds of an axis along which pixels lie (the others hold a pixel's channels: RGB-color, vector, ...)
_SPATIAL_KINDS = {"domain", "space", "time", "???", "none"}


def is_nrrd(path: Path | str) -> bool:
    """Whether ``read_image`` reads ``path`` as NRRD: a ``.nrrd`` or ``.nhdr`` file, or a file whose
    suffix names no image format (a Cog upload's ``file.bin``) and which opens with NRRD's magic. A
    file named as another format (``.png``) is read as that format."""
    return named_or_signed(path, NRRD_SUFFIXES, _MAGIC, 10)


def nrrd_header(path: Path) -> dict[str, str]:
    """The header's fields (``type``, ``sizes``, ``data file``, ...; keys in lower case, teem's
    spellings: ``datafile`` = ``data file``, ``byteskip`` = ``byte skip``), read line by line as teem
    reads it to the blank line that ends it (or the end of a ``.nhdr``); comments and ``key:=value`` pairs skipped; the data file's name
    as teem takes it (spaces and tabs after the ``:`` skipped, those at its end kept; bytes that are not
    UTF-8 kept as lone surrogates), the other values stripped.
    ``ImageReadError`` without NRRD's magic or with a header that runs past ``_MAX_HEADER``."""
    with open(path, "rb") as fh:
        head = fh.read(_MAX_HEADER + 1)
    if not _MAGIC.match(head):
        raise ImageReadError(path, "not a NRRD file (no NRRD0001 to NRRD0005 magic at its start)")
    fields: dict[str, str] = {}
    lines = _LINES.split(head)[1:]
    for i, raw in enumerate(lines):
        if not raw and i < len(lines) - 1:
            break
        if i == len(lines) - 1 and len(head) > _MAX_HEADER:  # no end in sight: its fields cannot all be checked
            raise ImageReadError(path, f"its NRRD header runs past {_MAX_HEADER >> 20} MiB without the blank line "
                                       f"that ends it")
        line = raw.decode("utf-8", "surrogateescape")
        if line.startswith("#") or ":=" in line.split(": ", 1)[0]:
            continue
        key, sep, value = line.partition(": ")
        if sep:
            key = key.strip().lower()
            key = {"datafile": "data file", "byteskip": "byte skip", "lineskip": "line skip"}.get(key, key)
            fields[key] = value.lstrip(" \t") if key == "data file" else value.strip()
    return fields


def _check_header(path: Path, fields: dict[str, str]) -> list[int]:
    """The image's sizes along the axes where its pixels lie; refused where the pixels lie anywhere but
    in this file (a ``.nrrd``) or in one file beside it (a ``.nhdr``), in an encoding ITK lacks, and
    where the sizes are not whole numbers (teem reads ``10001.`` as 10001) or too large to read."""
    detached = fields.get("data file")
    if detached is not None:
        if image_suffix(path) != ".nhdr":  # a header that points elsewhere could read any file here
            raise detached_refused(path, "data file:", detached, ".nrrd", ".nhdr")
        data_file_beside(path, detached, "data file:")
    if fields.get("encoding", "").lower() in ("bzip2", "bz2"):  # teem's own reason would read as a fault
        raise ImageReadError(path, "its pixel data is bzip2-encoded, which ITK's NRRD reader cannot read; "
                                   "save it with raw or gzip encoding")
    sizes_text = fields.get("sizes", "")
    if not re.fullmatch(r"[0-9 \t]*", sizes_text):
        raise ImageReadError(path, f"its header's sizes ({sizes_text}) are not whole numbers")
    sizes = [int(v) for v in sizes_text.split()]
    if len(sizes) == 1:  # ITK would say "The maximum supported IO dimension is 5"
        raise ImageReadError(path, f"1-D image of {sizes[0]} pixels; expected 2-D")
    kinds = fields.get("kinds", "").split()
    if len(kinds) != len(sizes):
        kinds = ["domain"] * len(sizes)
    spatial = [s for s, k in zip(sizes, kinds) if k.lower() in _SPATIAL_KINDS]
    channels = math.prod(s for s, k in zip(sizes, kinds) if k.lower() not in _SPATIAL_KINDS)
    if channels > 4:
        raise ImageReadError(path, f"unsupported channel count {channels}")
    if len(spatial) >= 2:
        check_size(path, spatial[0], math.prod(spatial[1:]))
        sample = _TYPE_BYTES.get(" ".join(fields.get("type", "").split()).lower())
        if sample:
            check_bytes(path, math.prod(sizes) * sample)
    skip = fields.get("byte skip", "")
    if detached is None and re.fullmatch(r"-0*1", skip) and fields.get("encoding", "").lower() == "raw":  # -01 too
        _check_last_bytes(path, fields, sizes)
    return spatial


# bytes per value of teem's type names
_TYPE_BYTES = {**dict.fromkeys(("char", "signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8",
                                "uint8_t"), 1),
               **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                                "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
               **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                                "float"), 4),
               **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int",
                                "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int",
                                "uint64", "uint64_t", "double"), 8)}


def _check_last_bytes(path: Path, fields: dict[str, str], sizes: list[int]) -> None:
    """``byte skip: -1``: teem reads the pixels as the file's last bytes, so a ``.nrrd`` cut a little
    short gave its own header's end as the first pixels. Refused where the bytes after the header are
    fewer than the pixels take."""
    size = _TYPE_BYTES.get(" ".join(fields.get("type", "").split()).lower())
    with open(path, "rb") as fh:
        head = fh.read(_MAX_HEADER + 1)
    end, start = None, 0
    for m in _LINES.finditer(head):
        if start and m.start() == start:  # the blank line that ends the header
            end = m.end()
            break
        start = m.end()
    if size is None or end is None:
        return
    expected, held = math.prod(sizes) * size, path.stat().st_size - end
    if held < expected:
        raise ImageReadError(path, f"corrupt or truncated NRRD: the header reads, the pixel data does not (the "
                                   f"header announces {expected} bytes of it, the file holds {held})")


def nrrd_pixels(path: Path | str) -> int:
    """Height x width from the header alone, after the checks ``read_nrrd`` makes first (ITK, asked for
    a ``.nhdr``'s size, opens its data file: a pipe there would block); 0 when it cannot be read."""
    try:
        spatial = _check_header(Path(path), nrrd_header(Path(path)))
    except (ImageReadError, OSError):
        return 0
    return math.prod(spatial) if len(spatial) >= 2 else 0


def read_nrrd(path: Path) -> LoadedImage:
    """A 2-D NRRD image (or a 3-D one of one slice) with its spacing, origin and direction as ITK gives
    them, and ``.nrrd`` as the suffix its mask is written with."""
    import SimpleITK as sitk

    _check_header(path, nrrd_header(path))
    try:
        img = sitk.ReadImage(str(path), imageIO=NRRD_IO)
    except RuntimeError as exc:
        reason = itk_reason(exc)
        if "_nrrdEncoding" in str(exc):  # the header parsed, its pixel data did not
            raise ImageReadError(path, f"corrupt or truncated NRRD: the header reads, the pixel data does not "
                                       f"({reason})") from None
        raise ImageReadError(path, f"cannot read as NRRD ({reason})") from None
    return loaded_from_itk(path, img, ".nrrd")
