"""Reading input images: listing a folder's images and reading one (``read_image``), whatever its format
(Pillow's formats here, DICOM in ``model.dicom``, MetaImage in ``model.metaimage``, NIfTI in
``model.nifti``, NRRD in ``model.nrrd``), and masks.

``read_image`` returns the pixels as a numpy array (H x W, or H x W x C with C in 1..4) together
with the geometry a medical image carries (spacing, origin, direction; unit values for PNG/JPEG).
Every failure raises ``ImageReadError`` naming the file and the reason. Outputs are written through
``model.atomic_files`` (a temporary file, then a rename): a crash never leaves a truncated file under
the final name.
"""
from __future__ import annotations

import errno
import math
import os
import stat
import tempfile
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .dicom import DICOM_IO, dicom_preamble, is_dicom, read_dicom
from .image import (IMAGE_SUFFIXES, NOT_UTF8, ImageReadError, LoadedImage, check_pixels, check_size, image_suffix,
                    image_stem, is_utf8_name, printable)
from .metaimage import METAIMAGE_IO, is_metaimage, read_metaimage
from .nifti import is_nifti, nifti_pixels, read_nifti
from .itk_image import itk_reason
from .nrrd import is_nrrd, nrrd_pixels, read_nrrd

Image.MAX_IMAGE_PIXELS = None  # Pillow's own guard (a warning, then its own error) gives way to image.MAX_PIXELS


def is_image_file(path: Path) -> bool:
    """An input we try to read: a known suffix (any case), or DICOM content under any other name (a
    scanner's ``IM00001``, a UID such as ``1.2.840.113619.2.55.1``; not ``DICOMDIR``, the index of a
    DICOM folder); not hidden, not AppleDouble/__MACOSX."""
    if path.name.startswith(".") or "__MACOSX" in path.parts:
        return False
    if image_suffix(path) in IMAGE_SUFFIXES:
        return True
    return path.name.upper() != "DICOMDIR" and dicom_preamble(path)


def _skipped_folder(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


# folders below the input folder that are walked: Python 3.11's os.walk recurses once per level, and
# a tree nested ~1000 deep ended the whole run in a RecursionError
MAX_DEPTH = 100
_too_deep: set[str] = set()  # the folders list_images did not walk for their depth (absolute paths)


def list_images(root: Path | str) -> list[Path]:
    """Every image file below ``root`` (recursively, through linked folders), sorted; hidden files
    and folders skipped.

    What cannot be looked at is listed too, so that ``read_image`` reports it by name instead of it
    being skipped in silence: a folder that cannot be listed (its permissions), a link to an image
    that does not exist, and a pipe, socket or device named as an image. A link to a folder that is
    walked anyway (a loop back to a parent, a sibling, a folder inside one, or another link's target)
    is not followed, so that no image is listed twice; a folder's real subfolders come before its
    links, so that an image keeps its own path where a link also reaches it.
    """
    root = Path(root)
    if root.is_file():
        return [root] if is_image_file(root) else []
    found: list[Path] = []

    def unlistable(exc: OSError) -> None:
        if exc.filename and Path(exc.filename) != root:
            found.append(Path(exc.filename))

    # the real paths of the folders walked or to be walked: what lies below one is listed from there
    walking: set[str] = {os.path.realpath(root)}

    def covered(real: str) -> bool:
        while True:
            if real in walking:
                return True
            parent, name = os.path.split(real)
            if parent == real or _skipped_folder(name):  # a hidden folder's inside is not walked
                return False
            real = parent

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=True):
        if dirpath != str(root) and _unenterable(dirpath):  # listed, but no file in it can be
            found.append(Path(dirpath))  # looked at (mode 644 for this user): reported as a whole, by name
            dirnames[:] = []
            continue
        subfolders = [d for d in sorted(dirnames) if not _skipped_folder(d)]
        if subfolders and dirpath[len(str(root)):].count(os.sep) >= MAX_DEPTH:  # listed, read_image says why
            for d in subfolders:
                found.append(Path(dirpath) / d)
                _too_deep.add(os.path.abspath(os.path.join(dirpath, d)))
            dirnames[:] = []
            subfolders = []
        links = [d for d in subfolders if os.path.islink(os.path.join(dirpath, d))]
        keep = []
        for d in [d for d in subfolders if d not in links] + links:
            real = os.path.realpath(os.path.join(dirpath, d))
            # a folder reached through a link before (a real one: its link came first), or a link into a
            # folder walked anyway: its images are listed from there
            if real in walking or (d in links and covered(real)):
                continue
            walking.add(real)
            keep.append(d)
        dirnames[:] = sorted(keep)
        for name in filenames:
            p = Path(dirpath) / name
            if is_image_file(p):  # a pipe, socket or device under an image's name too: read_image says what it is
                found.append(p)
    return sorted(found)


# BUSI's layout: ``benign (4).png`` beside its masks ``benign (4)_mask.png`` and ``benign (4)_mask_1.png``
_MASK_NAME = re.compile(r"^(?P<image>.+)_mask(?:_\d+)?$", re.IGNORECASE)


def masks_beside_images(paths: list[Path]) -> list[Path]:
    """Those of ``paths`` named as a mask of an image listed beside them: ``X_mask.png`` or
    ``X_mask_1.png`` (any image suffix, ``_mask`` in any case) where ``X.<suffix>`` is in ``paths``, in
    the same folder. A dataset's ground truth (BUSI keeps it so), not an input to predict."""
    images = {(p.parent, image_stem(p)) for p in paths}
    found = []
    for p in paths:
        m = _MASK_NAME.match(image_stem(p))
        if m and (p.parent, m["image"]) in images:
            found.append(p)
    return found


def image_pixels(path: Path | str) -> int:
    """Height x width of an image from its header alone (nothing decoded); 0 when it cannot be read
    (``read_image`` then says why)."""
    path = Path(path)
    try:
        if not is_utf8_name(path) or not path.is_file():  # a FIFO (or a link to one) would block the open
            return 0
        dicom = is_dicom(path)
        if dicom or is_metaimage(path):  # a one-slice volume's slice may lie in any plane: x-z, y-z
            return math.prod(_itk_size(path, DICOM_IO if dicom else METAIMAGE_IO))
        if is_nifti(path):
            return nifti_pixels(path)
        if is_nrrd(path):
            return nrrd_pixels(path)
        try:
            with Image.open(path, formats=PIL_FORMATS) as im:
                return int(im.size[0]) * int(im.size[1])
        except UnidentifiedImageError:
            if not _is_tiff(path):
                raise
            size = _itk_size(path, "TIFFImageIO")
            return int(size[0]) * int(size[1])
    except Exception:  # noqa: BLE001 - any unreadable file: read_image reports it
        return 0


# what Pillow may read a file as, by its content whatever its name: the formats the README names, and GIF
# and WebP content under such a name; none of the others Pillow knows (an EPS would start Ghostscript on
# an untrusted file; PSD, ICO, FITS, ... are no ultrasound export)
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "DIB", "GIF", "WEBP")  # JPEG: MPO too


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


_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, either byte order


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


def _itk_size(path: Path, io: str) -> tuple[int, ...]:
    """An image's size as ITK's reader ``io`` reads it from the header; RuntimeError where it cannot."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO(io)
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize()


def _read_itk_tiff(path: Path) -> np.ndarray:
    """A TIFF that Pillow cannot decode (float colour, for one) through ITK's TIFF reader, size checked
    from its header first; ``ImageReadError`` where ITK cannot read it either."""
    import SimpleITK as sitk

    try:
        size = _itk_size(path, "TIFFImageIO")
        if len(size) > 2 and math.prod(size[2:]) > 1:
            raise ImageReadError(path, f"has {math.prod(size[2:])} frames; expected a single 2-D image")
        check_size(path, size[0], size[1])
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path), imageIO="TIFFImageIO"))
    except RuntimeError as exc:
        if "bit samples" in str(exc):  # libtiff's RGBA reader, which ITK falls back to for these: a valid file
            raise ImageReadError(path, f"a TIFF of samples that ITK's TIFF reader cannot decode ({itk_reason(exc)}): "
                                       f"such samples are read only top-left (Orientation 1), and 64-bit ones not "
                                       f"at all; save it top-left, as 8- or 16-bit integers or float32") from None
        raise ImageReadError(path, f"a TIFF that neither Pillow nor ITK can read ({itk_reason(exc)})") from None
    return arr.reshape(arr.shape[len(size) - 2:])  # a one-page volume: its page


def _first(value):
    """A TIFF tag's value, the first of one given per sample."""
    return value[0] if isinstance(value, tuple) and value else value


def _read_pil(path: Path) -> LoadedImage:
    try:
        # from a file object, not the path: Pillow 13 memory-maps an uncompressed TIFF opened by path,
        # and exif_transpose then returns it unrotated (orientations 5-8 kept the stored h x w)
        with open(path, "rb") as fh, Image.open(fh, formats=PIL_FORMATS) as im:
            check_size(path, *im.size)  # from the header, before decoding
            # a multi-picture JPEG (MPO: phones' and some scanners' exports) holds the image first and
            # previews or gain maps after it; every other format's frames are slices or pages
            if getattr(im, "n_frames", 1) > 1 and im.format != "MPO":
                raise ImageReadError(path, f"has {im.n_frames} frames; expected a single 2-D image")
            reader = _sixteen_bit_colour(path, im)
            if reader:  # all 16 bits, from ITK; the orientation from Pillow's reading of the EXIF
                orientation = int(im.getexif().get(0x0112, 1) or 1)
                if reader == "TIFFImageIO" and orientation != 1:  # libtiff through ITK orients such a file
                    # itself, at 8 bits, and not for every orientation: the picture would come out turned
                    raise ImageReadError(path, f"a 16-bit TIFF with several channels and Orientation {orientation} "
                                               f"(not top-left), which cannot be read at 16 bits as shown; save it "
                                               f"top-left (Orientation 1), as 16-bit grey, or as 8-bit colour")
                arr = _read_itk_colour(path, reader, orientation)
                return LoadedImage(check_pixels(path, arr), str(path))
            # TIFF's photometric interpretation (0: white is zero) and sample format (1: unsigned), for the
            # values Pillow leaves as stored: above 8 bits it neither inverts them nor reads 32 bits unsigned
            tiff = {k: im.tag_v2.get(k) for k in (262, 339)} if im.format == "TIFF" else {}
            im.load()
            # the image as a viewer shows it (and as a mask drawn on it lies): EXIF orientation applied
            im = ImageOps.exif_transpose(im)
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
            elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if im.mode == "1" else "RGB")
            wide_16 = im.mode.startswith("I;16")  # 16 bits a sample (else mode I holds 32)
            if wide_16:
                im = im.convert("I")
            arr = np.asarray(im)
            if im.mode == "I":
                arr = arr.astype(np.int32)
                if tiff and _first(tiff.get(339)) in (None, 1) and not wide_16:  # 32-bit unsigned, read as signed
                    arr = arr.view(np.uint32)
                arr = arr.astype(np.uint16) if arr.min() >= 0 and arr.max() <= 65535 else arr
            if _first(tiff.get(262)) == 0 and im.mode in ("I", "F"):  # MinIsWhite above 8 bits: as shown (Pillow
                # inverts 8-bit ones itself); the range kept, as the model min-max scales it anyway
                arr = (65535 - arr) if arr.dtype == np.uint16 and wide_16 else arr.max() + arr.min() - arr
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        if _is_tiff(path):  # a TIFF of a kind Pillow does not decode (float colour): libtiff, through ITK
            return LoadedImage(check_pixels(path, _read_itk_tiff(path)), str(path))
        raise ImageReadError(path, "not a readable image (corrupt, or a format other than PNG, JPEG, "
                                   "TIFF, BMP, GIF or WebP)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image ({exc})") from None
    return LoadedImage(check_pixels(path, arr), str(path))


def _denied(path: Path, what: str = "readable") -> str:
    """Why this user may not use ``path``: a mounted folder's permissions (the container's user differs)."""
    st = path.stat()
    uid = os.getuid() if hasattr(os, "getuid") else "?"
    kind = "folder" if path.is_dir() else "file"
    hint = ""
    if what == "writable" and os.environ.get("PFSAM_IMAGE") and st.st_uid != uid:  # in the container (Dockerfile)
        hint = (f": give docker run --user with the folder's owner (--user {st.st_uid}), or build the image to run "
                f"as root for a command that cannot (PACE's): ./build.sh --build-arg USER_UID=0 --build-arg USER_GID=0")
    return (f"permission denied: not {what} by this user (uid {uid}; the {kind} has mode "
            f"{stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid}){hint}")


def lookup_denied(path: Path | str) -> str:
    """Why looking at ``path`` raised ``PermissionError`` (Python's ``exists``/``is_dir`` raise it rather
    than answer False): the first folder on its way that this user may not enter, else ``path`` itself,
    which it may not read (a mounted folder's permissions; the container's user differs)."""
    path = Path(os.path.abspath(path))
    for folder in reversed(path.parents):
        if not os.access(folder, os.X_OK):
            return f"{folder}, a folder on its way, cannot be entered: " + _denied(folder, "searchable")
    try:
        return _denied(path)
    except OSError:  # gone, or still not reachable: what is known
        return "permission denied"


def _unenterable(folder: Path | str) -> bool:
    """A folder whose names this user can list but which it cannot enter (mode 644 for it)."""
    return os.access(folder, os.R_OK) and not os.access(folder, os.X_OK)


def unlistable_reason(folder: Path) -> str:
    """Why ``folder`` cannot be listed, or entered to look at what it lists (an empty string when it can)."""
    if _unenterable(folder):
        return _denied(folder, "searchable") + " (its names can be listed, but no file in it can be opened)"
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
        fd, tmp = tempfile.mkstemp(prefix=f".pfsam-{os.getpid()}-write-check-", dir=folder)
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
    """Read one 2-D image (png, jpg, tif, bmp, mha/mhd, nii/nii.gz, nrrd/nhdr, DICOM); raise
    ``ImageReadError`` with the reason. The suffix picks DICOM, MetaImage, NIfTI, NRRD or Pillow; a file
    whose suffix names no image format is read by its content (``is_dicom``, ``is_metaimage``,
    ``is_nifti``, ``is_nrrd``, else Pillow, which knows its formats by their signatures)."""
    path = Path(path)
    if not is_utf8_name(path):
        raise ImageReadError(printable(path), NOT_UTF8)
    if path.is_dir():  # list_images lists the folders it could not list
        if os.path.abspath(path) in _too_deep:
            raise ImageReadError(path, f"folder cannot be walked, so its images are not read: it lies more than "
                                       f"{MAX_DEPTH} folders below the input folder")
        unenterable, reason = _unenterable(path), unlistable_reason(path)
        if not unenterable and not reason:  # a file when its folder was listed, a folder now
            raise ImageReadError(path, "is a folder now, not an image file (it changed after the input folder was "
                                       "listed)")
        raise ImageReadError(path, f"folder cannot be {'entered' if unenterable else 'listed'}, so its "
                                   f"images are not read: {reason}")
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
        return read_dicom(path)
    if is_metaimage(path):
        return read_metaimage(path)
    if is_nifti(path):
        return read_nifti(path)
    if is_nrrd(path):
        return read_nrrd(path)
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
