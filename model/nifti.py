"""NIfTI-1 files (``.nii``, ``.nii.gz``), the format of nnU-Net's and MONAI's 2-D
datasets (a frame as a 2-D image, or as a volume of one slice: nnU-Net v1's ``case_0000.nii.gz``).

Known by their suffix, or by their header where a name says nothing (a Cog upload, ``file.bin``);
read through ITK with their geometry as a MetaImage is (``model.itk_image``, which also writes their
masks back as NIfTI); refused before ITK reads them where the header's pixels are in another file (a
``.hdr``/``.img`` pair) or the file holds fewer pixel bytes than the header announces, which ITK would
read without a word, filling the rest with zeros. A NIfTI-2 file is refused by name: the ITK here
reads NIfTI-1 only (a 2-D frame never needs NIfTI-2's 64-bit sizes).
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from .image import IMAGE_SUFFIXES, ImageReadError, LoadedImage, check_size, image_suffix
from .itk_image import loaded_from_itk

NIFTI_IO = "NiftiImageIO"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
GZIP_MAGIC = b"\x1f\x8b"
_HEADER_BYTES = 540  # NIfTI-2's header; NIfTI-1's is 348
_CHUNK = 1 << 20


@dataclass(frozen=True)
class NiftiHeader:
    version: int  # 1 or 2
    single_file: bool  # magic n+1 / n+2: the pixels follow the header in this file (ni1 / ni2: in a .img)
    dims: tuple[int, ...]  # dim[1] .. dim[dim[0]]
    bitpix: int
    vox_offset: int

    @property
    def pixel_bytes(self) -> int | None:
        """The bytes of pixel data the header announces; None where it does not say plainly."""
        if self.bitpix <= 0 or self.bitpix % 8 or any(d < 0 for d in self.dims):
            return None
        return math.prod(self.dims) * self.bitpix // 8


def parse_header(head: bytes) -> NiftiHeader | None:
    """The NIfTI-1 or NIfTI-2 header at the start of ``head`` (the file's first bytes, decompressed),
    in either byte order; None when ``head`` does not start with one."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348 and head[344:347] in (b"n+1", b"ni1") \
                and head[347:348] == b"\0":
            ndim = struct.unpack(order + "h", head[40:42])[0]
            if not 1 <= ndim <= 7:
                return None
            dims = struct.unpack(order + "7h", head[42:56])[:ndim]
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            vox_offset = struct.unpack(order + "f", head[108:112])[0]
            return NiftiHeader(1, head[344:347] == b"n+1", dims, bitpix, int(vox_offset) if math.isfinite(vox_offset)
                               else -1)
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540 and head[4:7] in (b"n+2", b"ni2") \
                and head[7:8] == b"\0":
            ndim = struct.unpack(order + "q", head[16:24])[0]
            if not 1 <= ndim <= 7:
                return None
            dims = struct.unpack(order + "7q", head[24:80])[:ndim]
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            vox_offset = struct.unpack(order + "q", head[168:176])[0]
            return NiftiHeader(2, head[4:7] == b"n+2", dims, bitpix, vox_offset)
    return None


def _head(path: Path, n: int = _HEADER_BYTES) -> bytes:
    """The first ``n`` bytes of ``path``'s content (decompressed where it is gzip); b"" if unreadable."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(n)
        if raw[:2] == GZIP_MAGIC:
            with gzip.open(path, "rb") as gz:
                return gz.read(n)
        return raw
    except (OSError, EOFError, zlib.error):
        return b""


def nifti_suffix(path: Path | str) -> str:
    """``.nii.gz`` or ``.nii`` when ``read_image`` reads ``path`` as NIfTI, else "": a file named so, or
    one whose suffix names no image format and whose content (gzip or not) opens with a single-file
    NIfTI header. A file named as another format (``.png``) is read as that format."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix in NIFTI_SUFFIXES:
        return suffix
    if suffix in IMAGE_SUFFIXES:
        return ""
    header = parse_header(_head(path))
    if header is None or not header.single_file or header.version != 1:
        return ""
    try:
        with open(path, "rb") as fh:
            return ".nii.gz" if fh.read(2) == GZIP_MAGIC else ".nii"
    except OSError:
        return ""


def _content_bytes(path: Path, gzipped: bool) -> int:
    """How many bytes ``path`` holds (decompressed: the whole gzip stream is read, so that one that
    ends early or fails its CRC check is refused here, not read by ITK as garbage or zeros)."""
    if not gzipped:
        return path.stat().st_size
    held = 0
    try:
        with gzip.open(path, "rb") as gz:
            while chunk := gz.read(_CHUNK):
                held += len(chunk)
    except EOFError:
        raise ImageReadError(path, "corrupt or truncated NIfTI: its gzip stream ends early") from None
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ImageReadError(path, f"corrupt NIfTI: its gzip stream is damaged ({exc})") from None
    return held


def read_header(path: Path) -> NiftiHeader:
    """``path``'s NIfTI header, or ``ImageReadError`` saying why it is not one."""
    header = parse_header(_head(path))
    if header is None:
        raise ImageReadError(path, "not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header at its start)")
    return header


def nifti_pixels(path: Path | str) -> int:
    """Height x width from the header alone; 0 when it cannot be read."""
    header = parse_header(_head(Path(path)))
    return math.prod(header.dims[:3]) if header is not None and len(header.dims) >= 2 else 0


def read_nifti(path: Path) -> LoadedImage:
    """A 2-D NIfTI image (or a 3-D one of one slice) with its spacing, origin and direction, as ITK
    gives them (the same physical space as a MetaImage's), and the suffix its mask is written with."""
    import SimpleITK as sitk

    suffix = nifti_suffix(path) or image_suffix(path)
    header = read_header(path)
    if header.version != 1:
        raise ImageReadError(path, "a NIfTI-2 file: only NIfTI-1 is read (ITK's NIfTI reader here reads no "
                                   "NIfTI-2; a 2-D frame fits NIfTI-1: convert it, e.g. nibabel's Nifti1Image)")
    if not header.single_file:
        raise ImageReadError(path, "its pixel data is in another file (a NIfTI .hdr/.img pair header, magic "
                                   f"ni{header.version}); a .nii must hold its own pixels (magic n+{header.version})")
    if len(header.dims) >= 2:
        check_size(path, header.dims[0], math.prod(header.dims[1:]))
    expected = header.pixel_bytes
    if expected is not None and header.vox_offset >= 0:  # ITK would read the rest as zeros
        with open(path, "rb") as fh:
            gzipped = fh.read(2) == GZIP_MAGIC
        held = _content_bytes(path, gzipped) - header.vox_offset
        if held < expected:
            raise ImageReadError(path, f"corrupt or truncated NIfTI: the header reads, the pixel data does not "
                                       f"(the header announces {expected} bytes of it, the file holds {max(held, 0)})")
    with tempfile.TemporaryDirectory(prefix="pfsam-nifti-") as tmp:
        name = str(path)
        if not path.name.lower().endswith(suffix):  # ITK's NIfTI reader goes by the name: a link under one it knows
            name = os.path.join(tmp, "image" + suffix)
            os.symlink(os.path.abspath(path), name)
        try:
            img = sitk.ReadImage(name, imageIO=NIFTI_IO)
        except RuntimeError as exc:
            msg = str(exc).strip().splitlines()
            raise ImageReadError(path, f"cannot read as NIfTI ({msg[-1] if msg else 'unknown error'})") from None
    return loaded_from_itk(path, img, suffix)
