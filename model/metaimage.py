"""MetaImage files: ``.mha`` (the header and its pixels in one file) and ``.mhd`` (the header, its pixels
in a data file beside it, ``.raw`` or ``.zraw``), known by their suffix or (a ``.mha``) by their header,
read through ITK with their geometry (``model.itk_image``, which also writes their masks, as ``.mha``),
and refused before ITK reads them where a ``.mha``'s header points at another file, a ``.mhd``'s at
anything but one file beside it, or the header announces more pixels than the data holds."""
from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

from .image import (ImageReadError, LoadedImage, check_bytes, check_size, data_file_beside, detached_refused,
                    image_suffix, named_or_signed, printable)
from .itk_image import itk_reason, loaded_from_itk

# ITK's MetaImage reader, named: ITK picks its reader by the file's suffix, and a MetaImage that
# arrives under another name (a Cog or web upload is saved as ``file.bin``) is known by its content
METAIMAGE_IO = "MetaImageIO"
METAIMAGE_SUFFIXES = (".mha", ".mhd")
_CHUNK = 1 << 20
# a MetaImage's header opens with one of MetaIO's fields, ``=`` (or ``:``) and its value
_METAIO_FIRST_LINE = re.compile(
    rb"[ \t]*(ObjectType|ObjectSubType|NDims|Comment|Name|ID|ParentID|FormTypeName|CompressedData|BinaryData|"
    rb"BinaryDataByteOrderMSB|ElementByteOrderMSB|DimSize|ElementType|ElementSpacing|HeaderSize|Modality)[ \t]*[=:]")


def is_metaimage(path: Path | str) -> bool:
    """Whether ``read_image`` reads ``path`` as a MetaImage: a ``.mha`` or ``.mhd`` file, or a file whose
    suffix names no image format (``upload.bin``, none) and whose first line is a MetaIO header field. A
    file named as another format (``.png``) is read as that format."""
    return named_or_signed(path, METAIMAGE_SUFFIXES, _METAIO_FIRST_LINE, 256)


def read_metaimage(path: Path) -> LoadedImage:
    """A 2-D MetaImage (or a 3-D one of one slice, kept as 2-D with its 3-D geometry in ``extra`` for the
    mask written back) with its spacing, origin and direction. A ``.mhd``'s pixels are read from the one
    data file beside it that its header names; any other MetaImage must hold its own."""
    import SimpleITK as sitk

    fields, data_offset = _mha_header(path)
    detached = fields.get("ElementDataFile")
    where = "the file"
    if detached and detached not in ("LOCAL", "Local", "local"):
        if image_suffix(path) != ".mhd":
            # a .mha keeps its pixels; a header that points elsewhere could read any file here
            raise detached_refused(path, "ElementDataFile =", detached, ".mha (ElementDataFile = LOCAL)", ".mhd")
        data = data_file_beside(path, detached, "ElementDataFile =")
        data_offset, where = 0, f"its data file {printable(detached)}"
    else:
        data = path
    expected = _pixel_data_bytes(fields)
    skip = _header_size(fields)
    if expected is not None and data_offset >= 0:  # refused here, before ITK prints its own complaint
        # MetaIO reads the pixels after the header; with HeaderSize N > 0 from byte N of the data file (a
        # .mha's own first byte: the pixels may not start inside its header); with -1, the file's last bytes
        held = data.stat().st_size - data_offset
        if skip not in ("", "-1"):
            if not skip.isdigit():
                raise ImageReadError(path, f"its header's HeaderSize ({skip}) is not a whole number or -1")
            if data == path and int(skip) < data_offset:
                raise ImageReadError(path, f"its HeaderSize ({skip}) starts the pixel data inside the header, "
                                           f"which ends at byte {data_offset}")
            held = data.stat().st_size - int(skip)
        if held < expected:
            raise ImageReadError(path, f"corrupt or truncated MetaImage: the header reads, the pixel data does not "
                                       f"(the header announces {expected} bytes of it, {where} holds {held})")
    dim_text = fields.get("DimSize", "")
    if not re.fullmatch(r"[0-9 \t]*", dim_text):  # MetaIO reads 10001.0 or 1e4 as sizes
        raise ImageReadError(path, f"its header's DimSize ({dim_text}) is not whole numbers")
    dims = [int(v) for v in dim_text.split()]
    if len(dims) == 1:  # ITK would say "The maximum supported IO dimension is 5"
        raise ImageReadError(path, f"1-D image of {dims[0]} pixels; expected 2-D")
    if len(dims) >= 2:
        check_size(path, dims[0], math.prod(dims[1:]))
        nbytes = _raw_pixel_bytes(fields)
        if nbytes is not None:
            check_bytes(path, nbytes)
    if fields.get("CompressedData", "").lower() in ("true", "t", "1"):
        _check_compressed(path, fields, data, data_offset, where)
    try:
        img = sitk.ReadImage(str(path), imageIO=METAIMAGE_IO)
    except RuntimeError as exc:
        if "File cannot be read" in str(exc):  # ITK's "Reason" is then errno's leftover, not the cause
            try:
                reader = sitk.ImageFileReader()
                reader.SetImageIO(METAIMAGE_IO)
                reader.SetFileName(str(path))
                reader.ReadImageInformation()
            except RuntimeError:
                raise ImageReadError(path, "not a readable MetaImage (its header cannot be parsed)") from None
            raise ImageReadError(path, "corrupt or truncated MetaImage: the header reads, the pixel data "
                                       "does not (incomplete or damaged)") from None
        raise ImageReadError(path, f"cannot read as MetaImage ({itk_reason(exc)})") from None
    return loaded_from_itk(path, img, ".mha")


def _mha_header(path: Path) -> tuple[dict[str, str], int]:
    """A MetaImage's header fields and the offset of its pixel data (-1 without ``ElementDataFile``).

    Parsed as MetaIO parses it: the header is read line by line up to ``ElementDataFile`` (MetaIO's
    last field, after which the pixels follow), however long the comments before it; ``=`` or ``:``
    separates key and value."""
    fields: dict[str, str] = {}
    with open(path, "rb") as fh:
        for line in fh:
            key, *value = re.split(rb"[=:]", line, maxsplit=1)
            name = key.strip().decode("latin-1")
            fields[name] = b"".join(value).strip().decode("utf-8", "surrogateescape")
            if name == "ElementDataFile":
                return fields, fh.tell()
    return fields, -1


# MetaIO's element types whose size does not depend on the platform
_MET_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                   "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _pixel_data_bytes(fields: dict[str, str]) -> int | None:
    """How many bytes of pixel data a MetaImage header announces; None where it does not say plainly
    (pixels as text, an unknown element type or flag, compressed without its size or after a
    ``HeaderSize``, which ``_check_compressed`` refuses)."""
    if fields.get("BinaryData", "True").lower() not in ("true", "t", "1"):
        return None
    compressed = fields.get("CompressedData", "False").lower()
    try:
        if compressed in ("true", "t", "1"):
            return None if _header_size(fields) else int(fields["CompressedDataSize"])
        if compressed not in ("false", "f", "0"):
            return None
    except (KeyError, ValueError):
        return None
    return _raw_pixel_bytes(fields)


def _raw_pixel_bytes(fields: dict[str, str]) -> int | None:
    """How many bytes the pixels take uncompressed; None for an element type whose size depends on the
    platform, or a header that does not say."""
    try:
        dims = [int(v) for v in fields["DimSize"].split()]
        if "NDims" in fields:
            dims = dims[:int(fields["NDims"])]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        element = _MET_TYPE_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):
        return None
    return math.prod(dims) * channels * element



def _header_size(fields: dict[str, str]) -> str:
    """The ``HeaderSize`` to skip before the pixels, "" where there is none (MetaIO skips none for 0)."""
    size = fields.get("HeaderSize", "").strip()
    if re.fullmatch(r"[+-]?[0-9]+", size):  # as MetaIO's atoi reads it: "00" is 0, "-01" is -1
        size = str(int(size))
    return "" if size == "0" else size


def _check_compressed(path: Path, fields: dict[str, str], data: Path, offset: int, where: str) -> None:
    """Refuse compressed pixel data that does not inflate to exactly the bytes the header announces,
    its stream whole to its end (its checksum), or that MetaIO would not read as it is checked here:
    MetaIO says "Uncompress failed" on stderr and hands ITK the image anyway, the rest of it whatever
    its memory held. Inflated in chunks and thrown away (nothing held), from ``offset``, for
    ``CompressedDataSize`` bytes (a ``.mha`` must give it: without it MetaIO inflates the file from
    its first byte, header and all), else to the end of a data file. A ``HeaderSize`` to skip before
    compressed data is refused (no writer makes one)."""
    if _header_size(fields):
        raise ImageReadError(path, f"its compressed pixel data follows a HeaderSize ({_header_size(fields)}) to "
                                   f"skip, which is not read")
    size = fields.get("CompressedDataSize", "").strip()
    if size in ("", "0"):
        if data == path:
            raise ImageReadError(path, "its compressed pixel data has no CompressedDataSize, without which MetaIO "
                                       "does not read a .mha's compressed pixels")
        limit = None
    elif not size.isdigit():
        raise ImageReadError(path, f"its header's CompressedDataSize ({size}) is not a whole number")
    else:
        limit = int(size)
    expected = _raw_pixel_bytes(fields)
    if expected is None or offset < 0:
        return
    inflate = zlib.decompressobj(47)  # a zlib or gzip stream, as MetaIO's inflateInit2(..., 47) takes
    out = read = 0
    try:
        with open(data, "rb") as fh:
            fh.seek(offset)
            while not inflate.eof and out <= expected:
                chunk = fh.read(_CHUNK if limit is None else min(_CHUNK, limit - read))
                if not chunk:
                    break
                read += len(chunk)
                while chunk and not inflate.eof and out <= expected:
                    out += len(inflate.decompress(chunk, _CHUNK))
                    chunk = inflate.unconsumed_tail
    except zlib.error as exc:
        raise ImageReadError(path, f"corrupt or truncated MetaImage: its compressed pixel data in {where} is "
                                   f"damaged (zlib: {exc})") from None
    if out < expected:
        raise ImageReadError(path, f"corrupt or truncated MetaImage: its compressed pixel data in {where} inflates "
                                   f"to {out} of the {expected} bytes the header announces")
    if out > expected:
        raise ImageReadError(path, f"corrupt or truncated MetaImage: its compressed pixel data in {where} inflates "
                                   f"past the {expected} bytes the header announces")
    if not inflate.eof:
        raise ImageReadError(path, f"corrupt or truncated MetaImage: its compressed pixel data in {where} is cut "
                                   f"short before the end of its stream (its checksum)")
