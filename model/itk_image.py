"""Images read and masks written through ITK with their geometry (MetaImage, NIfTI and NRRD): a 2-D image,
or a 3-D one of one slice kept as 2-D with its 3-D geometry, so that its mask is written back in the
same layout and overlays the input exactly."""
from __future__ import annotations

import errno
import re
from pathlib import Path

import numpy as np

from .atomic_files import atomic_path
from .image import ImageReadError, LoadedImage, check_pixels, is_utf8_name, printable

# "ITK ERROR: NiftiImageIO(0x55d0c0a1b2c0): " before ITK's reasons, and "[nrrd] _nrrdEncodingGzip_read: "
# before each line of its NRRD library's (teem's) call chain: their internals, not the input's
ITK_PREFIX = re.compile(r"ITK ERROR: (?:\w+ ?\(0x[0-9a-fA-F]+\): )?|^\s*\[nrrd\]\s*[\w.]+:\s*")


def itk_reason(exc: RuntimeError) -> str:
    """The reason ITK gives for a failed read: its last line (a call chain's innermost), without ITK's
    internals; for a direction matrix ITK will not take ("Bad direction, determinant is 0. Refusing
    to change direction from ...", whose last line is a row of that matrix) a sentence saying so."""
    text = str(exc)
    if "Bad direction" in text:
        return "its direction (orientation) matrix is singular (determinant 0)"
    lines = [ITK_PREFIX.sub("", line).strip() for line in text.strip().splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else "unknown error"


def loaded_from_itk(path: Path, img, itk_suffix: str) -> LoadedImage:
    """The ITK image ``img`` read from ``path`` as a ``LoadedImage`` with its spacing, origin and
    direction; a 3-D image without an axis of size 1 (or of more dimensions) refused."""
    import SimpleITK as sitk

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
    return LoadedImage(check_pixels(path, arr), str(path), tuple(spacing), tuple(origin), tuple(direction),
                       extra, itk_suffix=itk_suffix)


def write_itk(path: Path | str, array: np.ndarray, like: LoadedImage | None = None) -> None:
    """Write a 2-D array, compressed, in the format that ``path``'s suffix names (``.mha``, ``.nii``,
    ``.nii.gz``, ``.nrrd``), with the geometry of ``like``, atomically.

    An input that was 3-D with one slice gets a 3-D, one-slice output, as Grand Challenge expects.
    """
    import SimpleITK as sitk

    if not is_utf8_name(Path(path).absolute()):  # ITK would abort the process (is_utf8_name)
        raise ValueError(f"{printable(path)}: cannot write an image there through ITK: the path is not valid UTF-8")
    array = np.ascontiguousarray(array)
    img = sitk.GetImageFromArray(array)
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
    with atomic_path(path) as tmp:  # the temporary name keeps the suffix, by which ITK picks the format
        try:
            sitk.WriteImage(img, str(tmp), useCompression=True)
        except RuntimeError as exc:  # "Exception thrown in ...cxx:1110:" first; the reason last
            if "ITK" not in str(exc):
                raise
            reason = itk_reason(exc).removeprefix("Reason: ")
            raise OSError(errno.EIO, f"ITK could not write it: {reason}", str(tmp)) from None
        # ITK's MetaImage, NIfTI and NRRD writers do not report a failed flush (a full disk): a small
        # compressed image came out as 0 bytes without an error. Read back, it is checked whole.
        try:
            whole = np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp))).reshape(-1),
                                   array.reshape(-1))
        except RuntimeError:
            whole = False
        if not whole:
            raise OSError(errno.EIO, "ITK wrote a file that does not read back whole (is the disk full?)", str(tmp))
