"""DICOM input: ultrasound stills, known by their suffix or by their content, read through ITK's GDCM,
their pixel size from Pixel Spacing or, for ultrasound, the Sequence of Ultrasound Regions (pydicom)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .image import IMAGE_SUFFIXES, ImageReadError, LoadedImage, check_pixels, check_size, image_suffix
from .itk_image import itk_reason

DICOM_SUFFIXES = {".dcm", ".dicom"}
# ITK's DICOM reader (GDCM), named: a DICOM file is known by its content too (scanners and PACS exports
# often write it without a suffix, a Cog upload arrives as file.bin)
DICOM_IO = "GDCMImageIO"


def dicom_preamble(path: Path) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``. Only a regular file is opened (a pipe
    would block the open)."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom(path: Path | str) -> bool:
    """Whether ``read_image`` reads ``path`` as DICOM: a ``.dcm``/``.dicom`` file, or a file whose suffix
    names no image format (none, ``file.bin``, a UID's last number) with DICOM's ``DICM`` signature."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix in DICOM_SUFFIXES:
        return True
    return suffix not in IMAGE_SUFFIXES and dicom_preamble(path)


def read_dicom(path: Path) -> LoadedImage:
    """One DICOM frame (an ultrasound still: grey, RGB, or a palette or YBR image that GDCM turns into
    RGB; compressed or not) with its pixel spacing (Pixel Spacing, else the ultrasound regions' pixel
    size: ``_ultrasound_spacing``, else Imager Pixel Spacing); a cine loop (several frames) is refused. GDCM
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
    check_size(path, size[0], size[1])
    header = _header(path)
    short = _short_pixel_data(header)
    if short:  # GDCM would read it, the rest of the image from uninitialised memory
        raise ImageReadError(path, "corrupt or truncated DICOM pixel data (the header announces {} bytes of it, "
                                   "the file holds {})".format(*short))
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(path, f"corrupt or unsupported DICOM pixel data ({itk_reason(exc)})") from None
    arr = sitk.GetArrayFromImage(img)
    arr = arr.reshape(arr.shape[-3:] if img.GetNumberOfComponentsPerPixel() > 1 else arr.shape[-2:])
    spacing, origin, direction = img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    if not reader.HasMetaDataKey("0028|0030"):  # no Pixel Spacing: ITK reads no ultrasound regions, nor (for an
        # ultrasound still) its Imager Pixel Spacing, and says 1.0; a detector's (DX, CR) it reads itself
        spacing = _ultrasound_spacing(header) or _imager_spacing(header) or spacing
    dim = img.GetDimension()
    d2 = np.array([[direction[dim * r + c] for c in range(2)] for r in range(2)], dtype=float)
    if not np.allclose(d2 @ d2.T, np.eye(2), atol=1e-6):  # a plane the x-y axes do not span: no 2-D direction
        d2 = np.eye(2)
    direction2 = tuple(float(v) for v in d2.ravel())
    extra = {}
    if dim == 3:  # GDCM reads a still as one slice in patient space: its mask is written as one, where the image
        # lies (the z position and a plane other than x-y kept; the 2-D fields above serve 2-D callers)
        extra = {"dimension": 3, "singleton_axis": 2,
                 "geometry": ((*map(float, spacing[:2]), img.GetSpacing()[2]), origin, direction)}
    return LoadedImage(check_pixels(path, arr), str(path), tuple(spacing[:2]), tuple(origin[:2]), direction2, extra)


def _header(path: Path):
    """The file's data set as pydicom reads it, its large values (the pixel data) left in the file with
    their lengths kept; None where pydicom cannot parse it (GDCM then has the last word, as before)."""
    import pydicom

    try:
        return pydicom.dcmread(path, defer_size=1024)
    except Exception:  # noqa: BLE001 - any parse error of a header GDCM could read
        return None


def _short_pixel_data(ds) -> tuple[int, int] | None:
    """(announced, held) bytes where a native (uncompressed) Pixel Data element holds fewer bytes than
    its Rows, Columns, Samples per Pixel, Bits Allocated (and YBR 4:2:2's shared chroma) announce;
    None where it holds enough, is compressed (its decoder then says) or pydicom cannot tell."""
    from pydicom.pixels.utils import get_expected_length

    if ds is None:
        return None
    try:
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            return None
        held = getattr(ds.get_item("PixelData"), "length", None)
        expected = get_expected_length(ds, "bytes")
    except Exception:  # noqa: BLE001 - a header pydicom cannot parse: left to GDCM, as before
        return None
    if held is None or held == 0xFFFFFFFF or held >= expected:
        return None
    return expected, held


def _imager_spacing(ds) -> tuple[float, float] | None:
    """(x, y) in mm from Imager Pixel Spacing (0018,1164: row spacing, then column spacing); None
    without a valid one."""
    try:
        dy, dx = (float(v) for v in ds.ImagerPixelSpacing)
    except Exception:  # noqa: BLE001 - none (or ds None), or a value that is not two numbers
        return None
    return (dx, dy) if all(math.isfinite(v) and v > 0 for v in (dx, dy)) else None


def _ultrasound_spacing(ds) -> tuple[float, float] | None:
    """(x, y) in mm from a DICOM ultrasound still's Sequence of Ultrasound Regions (0018,6011): its 2-D
    tissue regions (spatial format 1) measured in cm (physical units 3), all with one pixel size (a
    dual view's two regions alike); None where there is no such region or they disagree (the mask
    then keeps ITK's unit spacing, as for any image without one)."""
    if ds is None:
        return None
    try:
        deltas = {(abs(float(r.PhysicalDeltaX)) * 10.0, abs(float(r.PhysicalDeltaY)) * 10.0)
                  for r in ds.get("SequenceOfUltrasoundRegions", [])
                  if r.get("RegionSpatialFormat") == 1 and r.get("PhysicalUnitsXDirection") == 3
                  and r.get("PhysicalUnitsYDirection") == 3}
    except Exception:  # noqa: BLE001 - regions pydicom cannot parse: the image is read without them
        return None
    if len(deltas) != 1:
        return None
    (dx, dy), = deltas
    return (dx, dy) if all(math.isfinite(v) and v > 0 for v in (dx, dy)) else None
