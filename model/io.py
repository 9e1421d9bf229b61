"""Reading and writing image files: the only module that touches image files on disk.

``read_image`` returns the pixels as a numpy array (H x W, or H x W x C with C in 1..4) together
with the geometry a medical image carries (spacing, origin, direction; unit values for PNG/JPEG).
Every failure raises ``ImageReadError`` naming the file and the reason. Writers go through a
temporary file in the same folder and ``os.replace``: a crash never leaves a truncated file under
the final name.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import stat
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".mha", ".bmp", ".dcm", ".dicom"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
# ITK's DICOM reader (GDCM), named: a DICOM file is known by its content too (scanners and PACS exports
# often write it without a suffix, a Cog upload arrives as file.bin)
DICOM_IO = "GDCMImageIO"
# ITK's MetaImage reader, named: ITK picks its reader by the file's suffix, and a MetaImage that
# arrives under another name (a Cog or web upload is saved as ``file.bin``) is known by its content
METAIMAGE_IO = "MetaImageIO"
# a MetaImage's header opens with one of MetaIO's fields, ``=`` (or ``:``) and its value
_METAIO_FIRST_LINE = re.compile(
    rb"[ \t]*(ObjectType|ObjectSubType|NDims|Comment|Name|ID|ParentID|FormTypeName|CompressedData|BinaryData|"
    rb"BinaryDataByteOrderMSB|ElementByteOrderMSB|DimSize|ElementType|ElementSpacing|HeaderSize|Modality)[ \t]*[=:]")
# The largest image read, checked from its header before anything is decoded: an ultrasound frame is
# under a megapixel, and decoding holds a few full-size copies (Pillow's, the orientation's, the array),
# so much beyond this (the size test_odd_inputs runs under 4 GB) would not fit a 4 GB container
MAX_PIXELS = 10000 * 10000
Image.MAX_IMAGE_PIXELS = None  # Pillow's own guard (a warning, then its own error) gives way to this one


def _too_large(path: Path, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ImageReadError(path, f"image too large: {width} x {height} = {width * height:,} pixels; at most "
                                   f"{MAX_PIXELS:,} (10000 x 10000) are read, so that decoding it fits a 4 GB container")


def printable(path: Path | str) -> str:
    """``path`` as text that can be written anywhere: bytes of a file name that are not UTF-8 (which
    Python keeps as lone surrogates) as ``\\xNN`` escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


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
    metaimage: bool = False  # read as a MetaImage (by content): its mask is written as one, with this geometry

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.array.shape[0]), int(self.array.shape[1])


def is_image_file(path: Path) -> bool:
    """An input we try to read: a known suffix (any case), or DICOM content under any other name (a
    scanner's ``IM00001``, a UID such as ``1.2.840.113619.2.55.1``; not ``DICOMDIR``, the index of a
    DICOM folder); not hidden, not AppleDouble/__MACOSX."""
    if path.name.startswith(".") or "__MACOSX" in path.parts:
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    return path.name.upper() != "DICOMDIR" and _dicom_preamble(path)


def _dicom_preamble(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``. Only a regular file is opened (a pipe
    would block the open)."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom(path: Path | str) -> bool:
    """Whether ``read_image`` reads ``path`` as DICOM: a ``.dcm``/``.dicom`` file, or a file whose suffix
    names no image format (none, ``file.bin``, a UID's last number) with DICOM's ``DICM`` signature."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return True
    return suffix not in IMAGE_SUFFIXES and _dicom_preamble(path)


def list_images(root: Path | str) -> list[Path]:
    """Every image file below ``root`` (recursively, through linked folders), sorted; hidden files
    and folders skipped.

    What cannot be looked at is listed too, so that ``read_image`` reports it by name instead of it
    being skipped in silence: a folder that cannot be listed (its permissions) and a link to an image
    that does not exist. A link to a folder already walked (a loop) is not followed again.
    """
    root = Path(root)
    if root.is_file():
        return [root] if is_image_file(root) else []
    found: list[Path] = []

    def unlistable(exc: OSError) -> None:
        if exc.filename and Path(exc.filename) != root:
            found.append(Path(exc.filename))

    walked: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=True):
        walked.add(os.path.realpath(dirpath))
        keep = []
        for d in sorted(dirnames):
            if d.startswith(".") or d == "__MACOSX":
                continue
            link = os.path.join(dirpath, d)
            if os.path.islink(link) and os.path.realpath(link) in walked:
                continue  # a link to a folder already walked: a loop (or the same images again)
            keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            p = Path(dirpath) / name
            if is_image_file(p) and (p.is_file() or p.is_symlink()):
                found.append(p)
    return sorted(found)


def is_metaimage(path: Path | str) -> bool:
    """Whether ``read_image`` reads ``path`` as a MetaImage: a ``.mha`` file, or a file whose suffix
    names no image format (``upload.bin``, none) and whose first line is a MetaIO header field. A
    file named as another format (``.png``) is read as that format."""
    path = Path(path)
    suffix = path.suffix.lower()
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


def image_pixels(path: Path | str) -> int:
    """Height x width of an image from its header alone (nothing decoded); 0 when it cannot be read
    (``read_image`` then says why)."""
    path = Path(path)
    if not is_utf8_name(path) or not path.is_file():  # a FIFO (or a link to one) would block the open
        return 0
    try:
        dicom = is_dicom(path)
        if dicom or is_metaimage(path):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetImageIO(DICOM_IO if dicom else METAIMAGE_IO)
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            size = reader.GetSize()
            return int(size[0]) * int(size[1])
        with Image.open(path) as im:
            return int(im.size[0]) * int(im.size[1])
    except Exception:  # noqa: BLE001 - any unreadable file: read_image reports it
        return 0


def _check_pixels(path: Path, arr: np.ndarray) -> np.ndarray:
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


def _sixteen_bit_colour(path: Path, im: Image.Image) -> str | None:
    """ITK's reader for a 16-bit image of several channels (colour, or grey with alpha), which Pillow
    decodes to 8 bits per channel, keeping only the high byte; None for every other image."""
    if im.format == "PNG":
        with open(path, "rb") as fh:
            head = fh.read(26)  # signature, IHDR: width, height, bit depth, colour type
        return "PNGImageIO" if len(head) == 26 and head[24] == 16 and head[25] in (2, 4, 6) else None
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, 1)
        bits = bits if isinstance(bits, tuple) else (bits,)
        return "TIFFImageIO" if int(im.tag_v2.get(277, 1)) > 1 and max(bits) > 8 else None
    return None


# EXIF orientation -> the numpy steps that show the stored pixels as a viewer does (Pillow's
# exif_transpose for arrays of any type): 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90
# clockwise, 7 transverse, 8 rotate 90 counter-clockwise
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
           8: lambda a: np.rot90(a, 1)}


def _read_itk_colour(path: Path, reader: str, orientation: int) -> np.ndarray:
    import SimpleITK as sitk

    try:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path), imageIO=reader))
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise ImageReadError(path, f"a 16-bit image with several channels that cannot be read at 16 bits "
                                   f"({lines[-1] if lines else 'unknown error'}); save it as 16-bit grey, or as "
                                   f"8-bit colour") from None
    return np.ascontiguousarray(_ORIENT.get(orientation, lambda a: a)(arr))


def _read_pil(path: Path) -> LoadedImage:
    try:
        # from a file object, not the path: Pillow 13 memory-maps an uncompressed TIFF opened by path,
        # and exif_transpose then returns it unrotated (orientations 5-8 kept the stored h x w)
        with open(path, "rb") as fh, Image.open(fh) as im:
            _too_large(path, *im.size)  # from the header, before decoding
            # a multi-picture JPEG (MPO: phones' and some scanners' exports) holds the image first and
            # previews or gain maps after it; every other format's frames are slices or pages
            if getattr(im, "n_frames", 1) > 1 and im.format != "MPO":
                raise ImageReadError(path, f"has {im.n_frames} frames; expected a single 2-D image")
            reader = _sixteen_bit_colour(path, im)
            if reader:  # all 16 bits, from ITK; the orientation from Pillow's reading of the EXIF
                arr = _read_itk_colour(path, reader, int(im.getexif().get(0x0112, 1) or 1))
                return LoadedImage(_check_pixels(path, arr), str(path))
            im.load()
            # the image as a viewer shows it (and as a mask drawn on it lies): EXIF orientation applied
            im = ImageOps.exif_transpose(im)
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
            elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if im.mode == "1" else "RGB")
            elif im.mode == "I;16" or im.mode.startswith("I;16"):
                im = im.convert("I")
            arr = np.asarray(im)
            if im.mode == "I":
                arr = arr.astype(np.int32)
                arr = arr.astype(np.uint16) if arr.min() >= 0 and arr.max() <= 65535 else arr
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image ({exc})") from None
    return LoadedImage(_check_pixels(path, arr), str(path))


def _read_mha(path: Path) -> LoadedImage:
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
        _too_large(path, dims[0], math.prod(dims[1:]))
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
    dim = img.GetDimension()
    spacing, origin, direction = img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    extra = {"dimension": dim, "geometry": (spacing, origin, direction)}
    size = img.GetSize()
    if dim == 3 and 1 not in size:
        raise ImageReadError(path, f"3-D image of {size[0]} x {size[1]} x {size[2]} voxels; expected a single "
                                   f"2-D slice (one axis of size 1)")
    if dim not in (2, 3):
        raise ImageReadError(path, f"{dim}-D image; expected 2-D")
    arr = sitk.GetArrayFromImage(img)  # (D x) H x W (x C for vector pixels): ITK's axes reversed
    if dim == 3:
        # the slice's axis: the third as usual, else the one stored with size 1 (a W x 1 x D volume)
        axis = 2 if size[2] == 1 else size.index(1)
        keep = [i for i in range(3) if i != axis]
        arr = np.take(arr, 0, axis=2 - axis)  # numpy's axis order is ITK's reversed
        extra["singleton_axis"] = axis
        spacing, origin = tuple(spacing[i] for i in keep), tuple(origin[i] for i in keep)
        direction = tuple(direction[3 * r + c] for r in keep for c in keep)
    return LoadedImage(_check_pixels(path, arr), str(path), tuple(spacing), tuple(origin), tuple(direction),
                       extra, metaimage=True)


def _read_dicom(path: Path) -> LoadedImage:
    """One DICOM frame (an ultrasound still: grey, RGB, or a palette or YBR image that GDCM turns into
    RGB; compressed or not) with its pixel spacing (Pixel Spacing, else the ultrasound regions' pixel
    size: ``_ultrasound_spacing``); a cine loop (several frames) is refused. GDCM
    inverts MONOCHROME1 (low values white), so the image comes as it is displayed (tested)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO(DICOM_IO)
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise ImageReadError(path, "not a readable DICOM image (no image pixel data, or a damaged file)") from None

    size = reader.GetSize()
    frames = math.prod(size[2:])  # 1 for a 2-D image or a one-slice volume
    if frames > 1:
        raise ImageReadError(path, f"has {frames} frames (a cine loop or a volume); expected a single 2-D image: "
                                   "export one frame")
    _too_large(path, size[0], size[1])
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        raise ImageReadError(path, "corrupt or unsupported DICOM pixel data "
                                   f"({lines[-1] if lines else 'unknown error'})") from None
    arr = sitk.GetArrayFromImage(img)
    arr = arr.reshape(arr.shape[-3:] if img.GetNumberOfComponentsPerPixel() > 1 else arr.shape[-2:])
    spacing, origin, direction = img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    if not any(reader.HasMetaDataKey(k) for k in ("0028|0030", "0018|1164")):  # no Pixel / Imager Pixel Spacing
        spacing = _ultrasound_spacing(path) or spacing  # ITK said 1.0: it reads no ultrasound regions
    dim = img.GetDimension()
    d2 = np.array([[direction[dim * r + c] for c in range(2)] for r in range(2)], dtype=float)
    if not np.allclose(d2 @ d2.T, np.eye(2), atol=1e-6):  # a plane the x-y axes do not span: no 2-D direction
        d2 = np.eye(2)
    direction2 = tuple(float(v) for v in d2.ravel())
    return LoadedImage(_check_pixels(path, arr), str(path), tuple(spacing[:2]), tuple(origin[:2]), direction2)


def _ultrasound_spacing(path: Path) -> tuple[float, float] | None:
    """(x, y) in mm from a DICOM ultrasound still's Sequence of Ultrasound Regions (0018,6011): its 2-D
    tissue regions (spatial format 1) measured in cm (physical units 3), all with one pixel size (a
    dual view's two regions alike); None where there is no such region or they disagree (the mask
    then keeps ITK's unit spacing, as for any image without one)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[(0x0018, 0x6011)])
        deltas = {(abs(float(r.PhysicalDeltaX)) * 10.0, abs(float(r.PhysicalDeltaY)) * 10.0)
                  for r in ds.get("SequenceOfUltrasoundRegions", [])
                  if r.get("RegionSpatialFormat") == 1 and r.get("PhysicalUnitsXDirection") == 3
                  and r.get("PhysicalUnitsYDirection") == 3}
    except Exception:  # noqa: BLE001 - a header pydicom cannot parse: the image is read without it
        return None
    if len(deltas) != 1:
        return None
    (dx, dy), = deltas
    return (dx, dy) if all(math.isfinite(v) and v > 0 for v in (dx, dy)) else None


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


def _denied(path: Path, what: str = "readable") -> str:
    """Why this user may not use ``path``: a mounted folder's permissions (the container's user differs)."""
    st = path.stat()
    uid = os.getuid() if hasattr(os, "getuid") else "?"
    kind = "folder" if path.is_dir() else "file"
    return (f"permission denied: not {what} by this user (uid {uid}; the {kind} has mode "
            f"{stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid})")


def unlistable_reason(folder: Path) -> str:
    """Why ``folder`` cannot be listed (an empty string when it can)."""
    try:
        with os.scandir(folder):
            return ""
    except PermissionError:
        return _denied(folder)
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__


def unwritable_reason(folder: Path) -> str:
    """Why this user cannot create files in the existing ``folder`` (an empty string when it can):
    found by creating and removing a hidden temporary file, not by reading permission bits."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".pfsam-write-check-", dir=folder)
    except PermissionError:
        return _denied(folder, "writable")
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__
    os.close(fd)
    os.unlink(tmp)
    return ""


def _not_a_file(path: Path) -> str:
    """Why ``path``, which is no regular file, cannot be read: a broken link, a link loop, or a FIFO,
    socket or device (opening a FIFO would wait for a writer for ever)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"link loop: its links (the first to {os.readlink(path)}) never reach a file"
        if path.is_symlink():
            return f"broken link: its target {os.readlink(path)} does not exist"
        return "file not found"
    return "not a regular file (a pipe, socket or device)" + (
        f": its link target is {os.readlink(path)}" if path.is_symlink() else "")


def read_image(path: Path | str) -> LoadedImage:
    """Read one 2-D image (png, jpg, tif, bmp, mha, DICOM); raise ``ImageReadError`` with the reason. The
    suffix picks DICOM, MetaImage or Pillow; a file whose suffix names no image format is read by its
    content (``is_dicom``, ``is_metaimage``, else Pillow, which knows its formats by their signatures)."""
    path = Path(path)
    if not is_utf8_name(path):
        raise ImageReadError(printable(path), NOT_UTF8)
    if path.is_dir():  # list_images lists the folders it could not list
        raise ImageReadError(path, f"folder cannot be listed, so its images are not read: {unlistable_reason(path)}")
    if not path.is_file():
        raise ImageReadError(path, _not_a_file(path))
    st = path.stat()
    if st.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        open(path, "rb").close()
    except PermissionError:  # not "corrupt": a mounted folder's permissions (the container's user differs)
        raise ImageReadError(path, _denied(path)) from None
    if is_dicom(path):
        return _read_dicom(path)
    if is_metaimage(path):
        return _read_mha(path)
    return _read_pil(path)


def read_mask(path: Path | str) -> np.ndarray:
    """A lesion mask as uint8 {0, 1}: any non-zero pixel (any channel, alpha ignored) is lesion.

    Masks come as 1-bit, 8- or 16-bit grey, RGB or RGBA with {0,1}, {0,255} or (16-bit) {0,65535};
    other values raise ``ImageReadError`` (a mask that is not binary is a data error, not something to
    guess).
    """
    arr = read_image(path).array
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    values = np.unique(arr)
    if not set(values.tolist()) <= {0, 1, 255, 65535}:
        raise ImageReadError(path, f"mask is not binary (values {values[:6].tolist()}...)")
    return (arr > 0).astype(np.uint8)


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # a short name: the final name may be as long as the file system allows, the temporary one too
    fd, tmp = tempfile.mkstemp(prefix=".pfsam-", suffix=".tmp" + final.suffix[:16], dir=final.parent)
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
        tmp.write_text(text)


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
    """Write uint8 (grey or RGB) pixels as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")


def write_npy(path: Path | str, array: np.ndarray) -> None:
    """Write an array as .npy (no pickle), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def write_mha(path: Path | str, array: np.ndarray, like: LoadedImage | None = None) -> None:
    """Write a 2-D array as compressed MetaImage with the geometry of ``like``, atomically.

    An input that was 3-D with one slice gets a 3-D, one-slice output, as Grand Challenge expects.
    """
    import SimpleITK as sitk

    if not is_utf8_name(Path(path).absolute()):  # ITK would abort the process (is_utf8_name)
        raise ValueError(f"{printable(path)}: cannot write a MetaImage there: the path is not valid UTF-8")
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    if like is not None:
        if like.extra.get("dimension") == 3:  # only the 3-D geometry: a slice in the x-z or y-z plane
            spacing, origin, direction = like.extra["geometry"]  # has no valid 2-D direction of its own
            axis = like.extra.get("singleton_axis", 2)  # the size-1 axis where the input had it
            img = sitk.GetImageFromArray(np.ascontiguousarray(np.expand_dims(array, 2 - axis)))
            img.SetSpacing(spacing)
            img.SetOrigin(origin)
            img.SetDirection(direction)
        else:
            img.SetSpacing(tuple(float(s) for s in like.spacing))
            img.SetOrigin(tuple(float(o) for o in like.origin))
            img.SetDirection(tuple(float(d) for d in like.direction))
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
