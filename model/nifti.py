"""NIfTI-1 files (``.nii``, ``.nii.gz``), the format of nnU-Net's and MONAI's 2-D datasets (a frame as
a 2-D image, or as a volume of one slice: nnU-Net v1's ``case_0000.nii.gz``).

Known by their suffix, or by their header where a name says nothing (a Cog upload, ``file.bin``);
read through ITK with their geometry as a MetaImage is (``model.itk_image``, which also writes their
masks back as NIfTI). ITK's NIfTI library reads some damaged files without a word, so the header and
the pixel data are checked here first, and a file is refused with the reason where:

* the header is malformed (dimensions, a datatype ITK does not read, pixels said to start inside the
  header), announces complex pixels or more than 16 MiB of extensions before the pixels, is a
  ``.hdr``/``.img`` pair's header (its pixels are in another file), or NIfTI-2 (the ITK here reads
  NIfTI-1 only; a 2-D frame never needs NIfTI-2's 64-bit sizes);
* the file holds fewer pixel bytes than its header announces (ITK would read the rest as zeros), or
  its gzip stream ends early or fails its CRC check;
* float pixels are NaN or infinite (ITK's NIfTI library would make them 0).

ITK is handed the file through a link of its own in a private folder, under the input's stem and a
suffix named by the content (gzip or not): ITK's NIfTI library looks for ``x.nii`` beside a
``x.nii.gz`` it is asked for and would read that file's pixels, and it refuses mixed-case suffixes
(``x.Nii.Gz``) and gzip content named ``.nii``.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .image import (IMAGE_SUFFIXES, ImageReadError, LoadedImage, check_bytes, check_size, image_stem,
                    image_suffix)
from .itk_image import itk_reason, loaded_from_itk

NIFTI_IO = "NiftiImageIO"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
GZIP_MAGIC = b"\x1f\x8b"
FIRST_PIXEL_BYTE = 352  # a single-file NIfTI-1's pixels start here or later (348 header + 4 extension bytes)
# NIfTI-1 datatype -> bytes per voxel, for the types ITK reads (not DT_BINARY, 1 bit per voxel, nor 128-bit float)
# and no complex type (refused from the header: ITK would read the whole image before check_pixels could)
DATATYPE_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 2304: 4}
COMPLEX_DATATYPES = (32, 1792, 2048)
# the most header and extensions read before the pixels: a larger vox_offset would have the check below
# inflate a gzip stream's padding (a small file can inflate to GBs)
MAX_VOX_OFFSET = FIRST_PIXEL_BYTE + (16 << 20)
FLOAT_DATATYPES = {16: "f4", 64: "f8"}  # checked for NaN and infinity before ITK reads them
_HEADER_BYTES = 540  # NIfTI-2's header; NIfTI-1's is 348
_CHUNK = 1 << 20
_SLACK = 1 << 20  # read a gzip stream at most this far past the pixels its header announces (ITK reads no further)


@dataclass(frozen=True)
class NiftiHeader:
    version: int  # 1 or 2 (of NIfTI-2 only the magic is read: it is refused)
    single_file: bool  # magic n+1 / n+2: the pixels follow the header in this file (ni1 / ni2: in a .img)
    ndim: int = 0  # dim[0]
    dims: tuple[int, ...] = ()  # dim[1] .. dim[ndim] (all seven where ndim is out of range)
    datatype: int = 0
    vox_offset: float = 0.0
    byte_order: str = "<"

    def problem(self) -> str | None:
        """Why this header is not read, or None."""
        if self.version != 1:
            return ("a NIfTI-2 file: only NIfTI-1 is read (ITK's NIfTI reader here reads no NIfTI-2; a 2-D frame "
                    "fits NIfTI-1: convert it, e.g. nibabel's Nifti1Image)")
        if not self.single_file:
            return ("its pixel data is in another file (a NIfTI .hdr/.img pair header, magic ni1); a .nii must hold "
                    "its own pixels (magic n+1)")
        if not 1 <= self.ndim <= 7:
            return f"malformed NIfTI header: dim[0] = {self.ndim} (the number of dimensions, 1 to 7)"
        if self.ndim == 1:
            return f"a 1-D NIfTI image of {self.dims[0]} voxels; expected 2-D"
        if any(d < 1 for d in self.dims):
            return f"malformed NIfTI header: dimensions {' x '.join(map(str, self.dims))} (each must be at least 1)"
        if self.datatype in COMPLEX_DATATYPES:
            return "complex pixel type is not an image"
        if self.datatype not in DATATYPE_BYTES:
            kind = " (DT_BINARY, one bit per voxel)" if self.datatype == 1 else ""
            return f"unsupported NIfTI datatype {self.datatype}{kind}"
        if not math.isfinite(self.vox_offset) or self.vox_offset < FIRST_PIXEL_BYTE:
            return (f"malformed NIfTI header: vox_offset = {self.vox_offset:g} (the pixels of a .nii start at byte "
                    f"{FIRST_PIXEL_BYTE} or later)")
        if self.vox_offset > MAX_VOX_OFFSET:
            return (f"NIfTI header extensions too large: the pixels start at byte {self.vox_offset:.0f}; at most "
                    f"{MAX_VOX_OFFSET} are read before them")
        return None

    @property
    def pixel_bytes(self) -> int:
        """The bytes of pixel data the header announces (its datatype's size: ITK goes by it, not bitpix)."""
        return math.prod(self.dims) * DATATYPE_BYTES[self.datatype]


def parse_header(head: bytes) -> NiftiHeader | None:
    """The NIfTI-1 (or NIfTI-2) header at the start of ``head`` (the file's first bytes, decompressed),
    in either byte order, as stored (``NiftiHeader.problem`` says whether it is read); None when
    ``head`` does not start with one."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348 and head[344:347] in (b"n+1", b"ni1") \
                and head[347:348] == b"\0":
            ndim = struct.unpack(order + "h", head[40:42])[0]
            dims = struct.unpack(order + "7h", head[42:56])
            return NiftiHeader(1, head[344:347] == b"n+1", ndim, dims[:ndim] if 1 <= ndim <= 7 else dims,
                               struct.unpack(order + "h", head[70:72])[0], struct.unpack(order + "f", head[108:112])[0],
                               order)
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540 and head[4:7] in (b"n+2", b"ni2") \
                and head[7:8] == b"\0":
            return NiftiHeader(2, head[4:7] == b"n+2", byte_order=order)
    return None


def _gzipped(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def _gzip_error(path: Path, exc: Exception) -> ImageReadError:
    if isinstance(exc, EOFError):
        return ImageReadError(path, "corrupt or truncated NIfTI: its gzip stream ends early")
    return ImageReadError(path, f"corrupt NIfTI: its gzip stream is damaged ({exc})")


def _head(path: Path, strict: bool = False) -> bytes:
    """The first bytes of ``path``'s content (decompressed where it is gzip): enough for a header.
    b"" where they cannot be read; with ``strict``, a damaged gzip stream is refused instead."""
    try:
        if not _gzipped(path):
            with open(path, "rb") as fh:
                return fh.read(_HEADER_BYTES)
    except OSError:
        return b""
    try:
        with gzip.open(path, "rb") as gz:
            return gz.read(_HEADER_BYTES)
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        if strict:
            raise _gzip_error(path, exc) from None
        return b""


def is_nifti(path: Path | str) -> bool:
    """Whether ``read_image`` reads ``path`` as NIfTI: a ``.nii``/``.nii.gz`` file, or one whose suffix
    names no image format and whose content (gzip or not) opens with a NIfTI header (read, or refused
    with the reason: NIfTI-2, a pair's header). A file named as another format (``.png``) is read as
    that format; what a NIfTI holds, gzip or not, ``read_nifti`` tells from its content."""
    suffix = image_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return True
    return suffix not in IMAGE_SUFFIXES and parse_header(_head(Path(path))) is not None


def nifti_pixels(path: Path | str) -> int:
    """Height x width from the header alone; 0 when it cannot be read."""
    header = parse_header(_head(Path(path)))
    if header is None or header.problem():
        return 0
    return math.prod(header.dims[:3])  # a read header has 2 to 7 dimensions


def _check_pixel_data(path: Path, header: NiftiHeader, gzipped: bool) -> None:
    """Refuse a file that holds fewer pixel bytes than ``header`` announces, a damaged gzip stream, and
    NaN or infinite float pixels. A gzip stream is read to its end (so that its CRC is checked), or to
    ``_SLACK`` bytes past the pixels where it goes on (a stream that inflates far beyond its header);
    bytes after its end that are not gzip (which ITK ignores) end it once the pixels are in hand."""
    start = int(header.vox_offset)  # as ITK takes it
    expected = header.pixel_bytes
    end = start + expected
    code = FLOAT_DATATYPES.get(header.datatype)
    if not gzipped and code is None:
        held = path.stat().st_size - start
    else:
        dtype = np.dtype(header.byte_order + code) if code else None
        pos, carry, finite = 0, b"", True
        limit = end + _SLACK if gzipped else end
        try:
            with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
                while pos < limit:
                    # the pixels first, to their last byte: what follows may end the stream in a fault
                    chunk = fh.read(min(_CHUNK, (end if pos < end else limit) - pos))
                    if not chunk:
                        break
                    lo, hi = max(start - pos, 0), min(end - pos, len(chunk))
                    if dtype is not None and finite and lo < hi:
                        data = carry + chunk[lo:hi]
                        whole = len(data) // dtype.itemsize * dtype.itemsize
                        finite = bool(np.isfinite(np.frombuffer(data[:whole], dtype)).all())
                        carry = data[whole:]
                    pos += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            trailing = isinstance(exc, gzip.BadGzipFile) and str(exc).startswith("Not a gzipped file")
            if not (trailing and pos >= end):
                raise _gzip_error(path, exc) from None
        held = pos - start
        if not finite:
            raise ImageReadError(path, "contains NaN or infinite pixel values")
    if held < expected:
        raise ImageReadError(path, f"corrupt or truncated NIfTI: the header reads, the pixel data does not "
                                   f"(the header announces {expected} bytes of it, the file holds {max(held, 0)})")


@contextlib.contextmanager
def _private_folder(path: Path) -> Iterator[str]:
    """A temporary folder of our own (removed after), or ``ImageReadError`` naming ``path`` when none can be made."""
    try:
        tmp = tempfile.TemporaryDirectory(prefix="pfsam-nifti-")
    except OSError as exc:
        raise ImageReadError(path, f"cannot make a temporary folder to read it through ITK ({exc.strerror}: "
                                   f"{exc.filename})") from None
    with tmp as folder:
        yield folder


def read_nifti(path: Path) -> LoadedImage:
    """A 2-D NIfTI-1 image (or a 3-D one of one slice) with its spacing, origin and direction, as ITK
    gives them (the same physical space as a MetaImage's), and the suffix its mask is written with."""
    import SimpleITK as sitk

    header = parse_header(_head(path, strict=True))
    if header is None:
        raise ImageReadError(path, "not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header at its start)")
    problem = header.problem()
    if problem:
        raise ImageReadError(path, problem)
    check_size(path, header.dims[0], math.prod(header.dims[1:]))  # a read header has 2 to 7 dimensions
    check_bytes(path, header.pixel_bytes)
    gzipped = _gzipped(path)
    _check_pixel_data(path, header, gzipped)
    suffix = ".nii.gz" if gzipped else ".nii"
    # the link named after the input: ITK's warnings (a sform's odd scales) name it
    stem = (image_stem(path) or "image").encode("utf-8")[:200].decode("utf-8", "ignore")
    with _private_folder(path) as tmp:
        name = os.path.join(tmp, stem + suffix)
        try:
            os.symlink(os.path.abspath(path), name)
        except OSError as exc:
            raise ImageReadError(path, f"cannot make a link to it for ITK in the temporary folder ({exc.strerror})") \
                from None
        try:
            img = sitk.ReadImage(name, imageIO=NIFTI_IO)
        except RuntimeError as exc:
            reason = itk_reason(exc).replace(name, path.name)
            raise ImageReadError(path, f"cannot read as NIfTI ({reason})") from None
    return loaded_from_itk(path, img, suffix)
