"""MetaImage (.mha) files: known by their suffix or by their header, read through ITK with their
geometry (``model.itk_image``, which also writes their masks), and refused before ITK reads them where
the header points at another file or announces more pixels than the file holds."""
from __future__ import annotations

import math
import re
from pathlib import Path

from .image import IMAGE_SUFFIXES, ImageReadError, LoadedImage, check_size, image_suffix
from .itk_image import loaded_from_itk

# ITK's MetaImage reader, named: ITK picks its reader by the file's suffix, and a MetaImage that
# arrives under another name (a Cog or web upload is saved as ``file.bin``) is known by its content
METAIMAGE_IO = "MetaImageIO"
# a MetaImage's header opens with one of MetaIO's fields, ``=`` (or ``:``) and its value
_METAIO_FIRST_LINE = re.compile(
    rb"[ \t]*(ObjectType|ObjectSubType|NDims|Comment|Name|ID|ParentID|FormTypeName|CompressedData|BinaryData|"
    rb"BinaryDataByteOrderMSB|ElementByteOrderMSB|DimSize|ElementType|ElementSpacing|HeaderSize|Modality)[ \t]*[=:]")


def is_metaimage(path: Path | str) -> bool:
    """Whether ``read_image`` reads ``path`` as a MetaImage: a ``.mha`` file, or a file whose suffix
    names no image format (``upload.bin``, none) and whose first line is a MetaIO header field. A
    file named as another format (``.png``) is read as that format."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix == ".mha":
        return True
    if suffix in IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(256)
    except OSError:
        return False
    return _METAIO_FIRST_LINE.match(head) is not None


def read_metaimage(path: Path) -> LoadedImage:
    """A 2-D MetaImage (or a 3-D one of one slice, kept as 2-D with its 3-D geometry in ``extra`` for the
    mask written back) with its spacing, origin and direction."""
    import SimpleITK as sitk

    fields, data_offset = _mha_header(path)
    detached = fields.get("ElementDataFile")
    if detached and detached not in ("LOCAL", "Local", "local"):
        # a .mha keeps its pixels; a header that points elsewhere could read any file here
        raise ImageReadError(path, f"its pixel data is in another file (ElementDataFile = {detached}); a .mha "
                                   f"must hold its own pixels (ElementDataFile = LOCAL)")
    expected = _pixel_data_bytes(fields)
    if expected is not None and data_offset >= 0:  # refused here, before ITK prints its own complaint
        held = path.stat().st_size - data_offset
        if held < expected:
            raise ImageReadError(path, f"corrupt or truncated MetaImage: the header reads, the pixel data does not "
                                       f"(the header announces {expected} bytes of it, the file holds {held})")
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
    except ValueError:
        dims = []  # ITK reports it
    if len(dims) >= 2:
        check_size(path, dims[0], math.prod(dims[1:]))
    try:
        img = sitk.ReadImage(str(path), imageIO=METAIMAGE_IO)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()
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
        raise ImageReadError(path, f"cannot read as MetaImage ({msg[-1] if msg else 'unknown error'})") from None
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
            fields[name] = b"".join(value).strip().decode("utf-8", "replace")
            if name == "ElementDataFile":
                return fields, fh.tell()
    return fields, -1


# MetaIO's element types whose size does not depend on the platform
_MET_TYPE_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                   "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _pixel_data_bytes(fields: dict[str, str]) -> int | None:
    """How many bytes of pixel data a local MetaImage header announces; None where it does not say
    plainly (a ``HeaderSize`` to skip, pixels as text, an unknown element type or flag, compressed
    without its size)."""
    if "HeaderSize" in fields or fields.get("BinaryData", "True").lower() not in ("true", "t", "1"):
        return None
    compressed = fields.get("CompressedData", "False").lower()
    try:
        if compressed in ("true", "t", "1"):
            return int(fields["CompressedDataSize"])
        if compressed not in ("false", "f", "0"):
            return None
        dims = [int(v) for v in fields["DimSize"].split()]
        if "NDims" in fields:
            dims = dims[:int(fields["NDims"])]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        element = _MET_TYPE_BYTES[fields["ElementType"]]
    except (KeyError, ValueError):
        return None
    return math.prod(dims) * channels * element
