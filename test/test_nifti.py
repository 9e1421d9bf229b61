"""NIfTI-1 inputs (``.nii``, ``.nii.gz``; model/nifti.py): read with their geometry as a MetaImage is,
a one-slice volume (nnU-Net v1's ``case_0000.nii.gz``) as the 2-D frame it holds, known by content
under a name that says nothing (a Cog upload), refused with the reason where the file is damaged or
holds what is not a 2-D frame; their masks written back as NIfTI by ``predict_file`` and as MetaImage
with the same geometry in the Grand Challenge format; the same pixels give the same mask as a PNG."""
from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

from make_fixtures import synthetic_ultrasound  # noqa: E402
from make_test_model import make_test_ensemble  # noqa: E402
from model.image import ImageReadError, image_stem, image_suffix  # noqa: E402
from model.io import image_pixels, is_image_file, list_images, read_image  # noqa: E402
from model.itk_image import write_itk  # noqa: E402
from model.nifti import is_nifti, parse_header  # noqa: E402
from model.writers import output_names  # noqa: E402

SPACING, ORIGIN, DIRECTION = (0.12, 0.09), (-4.5, 7.25), (-1.0, 0.0, 0.0, 1.0)


def _frame(h: int = 41, w: int = 57, seed: int = 3) -> np.ndarray:
    return synthetic_ultrasound(h, w, seed)[0]


def _write(path: Path, arr: np.ndarray, volume: bool = False) -> sitk.Image:
    img = sitk.GetImageFromArray(arr[None] if volume else arr)
    if volume:
        img.SetSpacing((*SPACING, 1.5))
        img.SetOrigin((*ORIGIN, 2.0))
        img.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    else:
        img.SetSpacing(SPACING)
        img.SetOrigin(ORIGIN)
        img.SetDirection(DIRECTION)
    sitk.WriteImage(img, str(path))
    return img


def _nifti1(arr: np.ndarray, order: str = "<", magic: bytes = b"n+1\0", datatype: int = 2, bitpix: int = 8,
            vox_offset: float = 352.0, dims: tuple[int, ...] | None = None, sform: tuple | None = None) -> bytes:
    """A NIfTI-1 file written field by field (pixdim as spacing, no qform; an sform where given), in
    either byte order: what other tools than ITK write, and what they write wrong."""
    header = bytearray(348)
    dims = dims or (arr.shape[1], arr.shape[0])
    struct.pack_into(order + "i", header, 0, 348)
    struct.pack_into(order + "8h", header, 40, len(dims), *dims, *[1] * (7 - len(dims)))
    struct.pack_into(order + "hh", header, 70, datatype, bitpix)
    struct.pack_into(order + "8f", header, 76, 1.0, *SPACING, 1, 1, 1, 1, 1)
    struct.pack_into(order + "ff", header, 108, vox_offset, 1.0)  # vox_offset, scl_slope
    if sform is not None:
        struct.pack_into(order + "h", header, 254, 1)
        struct.pack_into(order + "12f", header, 280, *sform)
    header[344:348] = magic
    return bytes(header) + b"\0" * 4 + arr.astype(arr.dtype.newbyteorder(order)).tobytes()


def _nifti2_header(arr: np.ndarray) -> bytes:
    header = bytearray(544)
    struct.pack_into("<i", header, 0, 540)
    header[4:12] = b"n+2\0\r\n\x1a\n"
    struct.pack_into("<hh", header, 12, 2, 8)
    struct.pack_into("<8q", header, 16, 2, arr.shape[1], arr.shape[0], 1, 1, 1, 1, 1)
    struct.pack_into("<q", header, 168, 544)
    return bytes(header) + arr.astype(np.uint8).tobytes()


def test_a_nifti_frame_is_read_with_its_geometry_and_its_mask_written_back_in_its_format(tmp_path):
    """``.nii`` and ``.nii.gz`` (any case): the pixels as stored, the spacing, origin and direction as
    ITK gives them, the suffix its mask takes; the mask written through the same ITK path lies on
    the input's physical points, in the input's format, and no temporary file is left."""
    arr = _frame()
    for name in ("scan.nii", "scan.nii.gz", "SCAN2.NII.GZ"):
        img = _write(tmp_path / name.lower(), arr)  # ITK writes NIfTI under a lower-case suffix only
        (tmp_path / name.lower()).rename(tmp_path / name)
        got = read_image(tmp_path / name)
        np.testing.assert_array_equal(got.array, arr)
        assert got.spacing == pytest.approx(SPACING) and got.origin == pytest.approx(ORIGIN)
        assert got.direction == pytest.approx(DIRECTION)
        assert got.itk_suffix == image_suffix(name) == (".nii" if name == "scan.nii" else ".nii.gz")
        assert image_pixels(tmp_path / name) == arr.size
        mask = (arr > arr.mean()).astype(np.uint8)
        out = tmp_path / f"{image_stem(name)}_mask{got.itk_suffix}"
        write_itk(out, mask, like=got)
        back = sitk.ReadImage(str(out))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask)
        for index in ((0, 0), (56, 0), (7, 40)):
            assert back.TransformIndexToPhysicalPoint(index) == pytest.approx(img.TransformIndexToPhysicalPoint(index))
        gz = out.read_bytes()[:2] == b"\x1f\x8b"
        assert gz == out.name.endswith(".nii.gz"), out.name  # ITK wrote the format the name says
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in list_images(tmp_path)] == sorted(
        ["SCAN2.NII.GZ", "SCAN2_mask.nii.gz", "scan.nii", "scan.nii.gz", "scan_mask.nii", "scan_mask.nii.gz"])


def test_a_nifti_is_read_from_its_own_bytes_whatever_lies_beside_it_and_however_its_suffix_is_spelled(tmp_path):
    """ITK's NIfTI library, asked for ``a.nii.gz``, reads ``a.nii`` where one lies beside it (as after
    ``gunzip -k``), and refuses ``a.Nii.Gz`` or gzip content named ``.nii``: each file is read from its
    own bytes, and its mask takes the suffix of what it holds."""
    own, other = _frame(40, 60, 4), _frame(32, 48, 9)
    _write(tmp_path / "a.nii.gz", own)
    _write(tmp_path / "a.nii", other)
    np.testing.assert_array_equal(read_image(tmp_path / "a.nii.gz").array, own)
    np.testing.assert_array_equal(read_image(tmp_path / "a.nii").array, other)
    (tmp_path / "b.Nii.Gz").write_bytes((tmp_path / "a.nii.gz").read_bytes())
    (tmp_path / "c.nii").write_bytes((tmp_path / "a.nii.gz").read_bytes())  # gzip content named .nii
    (tmp_path / "d.nii.gz").write_bytes((tmp_path / "a.nii").read_bytes())  # plain content named .nii.gz
    for name, arr, suffix in (("b.Nii.Gz", own, ".nii.gz"), ("c.nii", own, ".nii.gz"), ("d.nii.gz", other, ".nii")):
        got = read_image(tmp_path / name)
        np.testing.assert_array_equal(got.array, arr, err_msg=name)
        assert got.itk_suffix == suffix and got.spacing == pytest.approx(SPACING), name


def test_a_one_slice_nifti_volume_is_read_as_its_frame_and_its_mask_keeps_the_volume(tmp_path):
    """nnU-Net v1 stores a 2-D frame as a 1 x H x W volume (``case_0000.nii.gz``): read as the H x W
    frame with its in-plane geometry; its mask is written back as the same one-slice volume. A
    volume of several slices is refused with its size."""
    arr = _frame(33, 45, 8)
    _write(tmp_path / "case_0000.nii.gz", arr, volume=True)
    got = read_image(tmp_path / "case_0000.nii.gz")
    np.testing.assert_array_equal(got.array, arr)
    assert got.spacing == pytest.approx(SPACING) and got.origin == pytest.approx(ORIGIN)
    mask = (arr > arr.mean()).astype(np.uint8)
    write_itk(tmp_path / "case_mask.nii.gz", mask, like=got)
    back = sitk.ReadImage(str(tmp_path / "case_mask.nii.gz"))
    assert back.GetSize() == (45, 33, 1) and back.GetSpacing() == pytest.approx((*SPACING, 1.5))
    assert back.GetOrigin() == pytest.approx((*ORIGIN, 2.0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back)[0], mask)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr, arr, arr])), str(tmp_path / "stack.nii.gz"))
    with pytest.raises(ImageReadError, match=r"stack.nii.gz: 3-D image of 45 x 33 x 3 voxels; expected a single"):
        read_image(tmp_path / "stack.nii.gz")


def test_a_nifti_written_by_another_tool_is_read_in_either_byte_order(tmp_path):
    """A NIfTI-1 header laid out field by field (no ITK), little- and big-endian: the same frame and
    spacing; the header parser reads the size both ways."""
    arr = _frame(21, 34, 5)
    for order, name in (("<", "le.nii"), (">", "be.nii")):
        data = _nifti1(arr, order)
        (tmp_path / name).write_bytes(data)
        header = parse_header(data)
        assert (header.version, header.single_file, header.ndim, header.dims, header.datatype, header.vox_offset,
                header.problem()) == (1, True, 2, (34, 21), 2, 352.0, None)
        got = read_image(tmp_path / name)
        np.testing.assert_array_equal(got.array, arr)
        assert got.spacing == pytest.approx(SPACING)
    assert parse_header(_frame().tobytes()) is None


def test_a_nifti_upload_without_its_suffix_is_read_by_its_content(tmp_path):
    """A Cog upload arrives as ``file.bin``: a NIfTI-1 file, gzip-compressed or not, is known by its
    header and read with its geometry; the suffix its mask takes follows the content. Files of other
    formats under such names are not taken for NIfTI, and a name that says NIfTI is read as NIfTI."""
    arr = _frame(29, 38, 11)
    _write(tmp_path / "x.nii", arr)
    plain = (tmp_path / "x.nii").read_bytes()
    (tmp_path / "file.bin").write_bytes(plain)
    (tmp_path / "upload").write_bytes(gzip.compress(plain))
    for name, suffix in (("file.bin", ".nii"), ("upload", ".nii.gz")):
        assert is_nifti(tmp_path / name) and not is_image_file(tmp_path / name)
        got = read_image(tmp_path / name)
        np.testing.assert_array_equal(got.array, arr)
        assert got.itk_suffix == suffix and got.spacing == pytest.approx(SPACING)
        assert image_pixels(tmp_path / name) == arr.size
    Image.fromarray(arr).save(tmp_path / "png.bin", format="PNG")
    assert not is_nifti(tmp_path / "png.bin") and read_image(tmp_path / "png.bin").itk_suffix == ""
    (tmp_path / "pair.bin").write_bytes(_nifti1(arr, magic=b"ni1\0"))  # known by content, and refused with why
    (tmp_path / "two.bin").write_bytes(_nifti2_header(arr))
    for name, reason in (("pair.bin", "its pixel data is in another file"), ("two.bin", "a NIfTI-2 file")):
        assert is_nifti(tmp_path / name)
        with pytest.raises(ImageReadError, match=f"{name}: {reason}"):
            read_image(tmp_path / name)
    (tmp_path / "random.gz").write_bytes(gzip.compress(np.random.default_rng(0).bytes(4000)))
    assert not is_nifti(tmp_path / "random.gz")


def test_damaged_or_unreadable_nifti_files_are_refused_with_the_reason(tmp_path, capfd):
    """ITK reads a NIfTI that holds fewer pixel bytes than its header announces without complaint
    (zeros for the rest): refused here, naming both counts; so are a gzip stream that ends early or
    is damaged, a file named .nii that is no NIfTI, a .hdr/.img pair's header, a NIfTI-2 file and a
    header announcing more pixels than are read, each naming the file."""
    arr = _frame(40, 60, 2)
    _write(tmp_path / "ok.nii", arr)
    whole = (tmp_path / "ok.nii").read_bytes()
    (tmp_path / "short.nii").write_bytes(whole[:-500])
    gz = gzip.compress(whole)
    (tmp_path / "short.nii.gz").write_bytes(gz[:len(gz) // 2])
    damaged = bytearray(gz)
    damaged[len(gz) // 2:len(gz) // 2 + 40] = bytes(40)
    (tmp_path / "damaged.nii.gz").write_bytes(bytes(damaged))
    Image.fromarray(arr).save(tmp_path / "png.nii", format="PNG")
    (tmp_path / "pair.nii").write_bytes(_nifti1(arr, magic=b"ni1\0"))
    (tmp_path / "two.nii").write_bytes(_nifti2_header(arr))
    huge = bytearray(_nifti1(arr))
    struct.pack_into("<8h", huge, 40, 2, 32000, 32000, 1, 1, 1, 1, 1)
    (tmp_path / "huge.nii").write_bytes(bytes(huge))
    expected = {
        "short.nii": r"corrupt or truncated NIfTI: the header reads, the pixel data does not \(the header announces "
                     r"2400 bytes of it, the file holds 1900\)",
        "short.nii.gz": "corrupt or truncated NIfTI: its gzip stream ends early",
        "damaged.nii.gz": r"corrupt NIfTI: its gzip stream is damaged \(CRC check failed",
        "png.nii": r"not a readable NIfTI file \(no NIfTI-1 or NIfTI-2 header at its start\)",
        "pair.nii": r"its pixel data is in another file \(a NIfTI .hdr/.img pair header, magic ni1\)",
        "two.nii": "a NIfTI-2 file: only NIfTI-1 is read",
        "huge.nii": "image too large: 32000 x 32000",
    }
    # what ITK would read with zeros for the missing pixels, or with the header's bytes as pixels
    i16 = arr.astype(np.int16)
    bad = {
        "vox0.nii": (_nifti1(arr, vox_offset=0.0), r"malformed NIfTI header: vox_offset = 0 \(the pixels of a .nii "
                                                   r"start at byte 352 or later\)"),
        "voxnan.nii": (_nifti1(arr, vox_offset=float("nan")), "malformed NIfTI header: vox_offset = nan"),
        "bitpix.nii": (_nifti1(i16, datatype=4, bitpix=8)[:-600],  # ITK sizes pixels by datatype, not bitpix
                       r"corrupt or truncated NIfTI: .* \(the header announces 4800 bytes of it, the file holds 4200\)"),
        "dimzero.nii": (_nifti1(arr, dims=(60, 40, 0)), r"malformed NIfTI header: dimensions 60 x 40 x 0 \(each must"),
        "dt999.nii": (_nifti1(arr, datatype=999), "unsupported NIfTI datatype 999$"),
        "binary.nii": (_nifti1(arr, datatype=1, bitpix=1), r"unsupported NIfTI datatype 1 \(DT_BINARY"),
        "line.nii": (_nifti1(arr, dims=(2400,)), "a 1-D NIfTI image of 2400 voxels; expected 2-D"),
        "nan.nii": (_nifti1(np.where(arr > 200, np.nan, arr.astype(np.float32)), datatype=16, bitpix=32),
                    "contains NaN or infinite pixel values"),
        "inf.nii.gz": (gzip.compress(_nifti1(np.where(arr > 200, -np.inf, arr.astype(np.float64)), ">", datatype=64,
                                             bitpix=64)), "contains NaN or infinite pixel values"),
        "shear.nii": (_nifti1(arr, sform=(1, 0.5, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0)),
                      r"cannot read as NIfTI \(.*orthonormal direction cosines"),
        # refused from the header, before ITK would allocate the whole image (or a check inflate the padding)
        "complex.nii": (_nifti1(arr, datatype=1792, bitpix=128, dims=(5000, 5000)), "complex pixel type is not an image"),
        "float128.nii": (_nifti1(arr, datatype=1536, bitpix=128), "unsupported NIfTI datatype 1536$"),
        "extensions.nii.gz": (gzip.compress(_nifti1(arr, vox_offset=2.0 ** 30)),
                              "NIfTI header extensions too large: the pixels start at byte 1073741824"),
    }
    for name, (data, reason) in bad.items():
        (tmp_path / name).write_bytes(data)
        expected[name] = reason
    for name, reason in expected.items():
        with pytest.raises(ImageReadError, match=f"^{tmp_path / name}: (?:{reason})") as err:
            read_image(tmp_path / name)
        assert "ITK ERROR" not in str(err.value) and "pfsam-nifti" not in str(err.value), err.value  # no ITK internals
        if name == "shear.nii":  # ITK's own warning on stderr names the input, not an anonymous link
            warning = capfd.readouterr().err
            assert "sform" in warning and "/shear.nii" in warning, warning
    np.testing.assert_array_equal(read_image(tmp_path / "ok.nii").array, arr)
    (tmp_path / "trailing.nii.gz").write_bytes(gzip.compress(whole) + b"garbage")  # ITK ignores what follows
    np.testing.assert_array_equal(read_image(tmp_path / "trailing.nii.gz").array, arr)


def test_a_gzip_stream_that_inflates_far_beyond_its_pixels_is_not_read_to_its_end(tmp_path):
    """A few MB of gzip can inflate to GBs: the stream is checked to its end (its CRC) only up to 1 MiB
    past the pixels its header announces, where ITK stops reading too. So a stream with 3 MiB of
    trailing zeros and a wrong CRC is read; the same CRC fault right after the pixels is refused."""
    arr = _frame(30, 40, 6)
    for trailing, ok in ((3 << 20, True), (0, False)):
        data = bytearray(gzip.compress(_nifti1(arr) + bytes(trailing)))
        data[-8] ^= 0xFF  # the CRC-32 of the trailer
        path = tmp_path / f"t{trailing}.nii.gz"
        path.write_bytes(bytes(data))
        if ok:
            np.testing.assert_array_equal(read_image(path).array, arr)
        else:
            with pytest.raises(ImageReadError, match="its gzip stream is damaged"):
                read_image(path)


def test_nifti_inputs_are_named_by_their_stem_without_the_double_suffix():
    """``case_0000.nii.gz`` is ``case_0000`` (not ``case_0000.nii``); a clash with ``a.png`` gives
    ``a_nii_gz`` by the same rule as ``a.jpg`` / ``a.png``."""
    assert (image_suffix("x/Case.NII.GZ"), image_stem("x/Case.NII.GZ")) == (".nii.gz", "Case")
    assert (image_suffix("a.nii"), image_stem("a.nii")) == (".nii", "a")
    assert (image_suffix("archive.gz"), image_stem("archive.gz")) == (".gz", "archive.gz")
    assert image_stem("1.2.840.113619.2.55.7") == "1.2.840.113619.2.55.7"
    paths = [Path(p) for p in ("in/a.png", "in/a.nii.gz", "in/case_0000.nii.gz", "in/b.NII", "in/b.nii.gz")]
    assert output_names(paths, "in") == ["a_png", "a", "case_0000", "b", "b_nii_gz"]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from model.inference import load_predictor

    return load_predictor(make_test_ensemble(tmp_path_factory.mktemp("ens") / "ens"), device="cpu", batch_size=4)


def test_process_gives_a_nifti_frame_the_mask_of_the_same_pixels_as_png(tmp_path, predictor):
    """Through ``inference.run``: a NIfTI frame and a one-slice NIfTI volume get the same PACE mask and
    class as the same pixels in a PNG; in the Grand Challenge format their ``.mha`` masks carry the
    NIfTI's geometry; ``predict_file`` (Cog) writes a NIfTI's mask as NIfTI with its geometry."""
    from model.inference import predict_file, run

    arr = synthetic_ultrasound(96, 128, 21)[0]
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(arr).save(src / "frame.png")
    _write(src / "frame_nifti.nii.gz", arr)
    _write(src / "case_0000.nii.gz", arr, volume=True)
    pace = run(predictor, src, tmp_path / "pace", fmt="pace", progress=False, log=lambda _: None)
    assert pace.exit_code == 0 and [c.name for c in pace.cases] == ["case_0000", "frame", "frame_nifti"]
    masks = {n: np.asarray(Image.open(tmp_path / "pace" / "segmentation" / f"{n}_mask.png"))
             for n in ("frame", "frame_nifti", "case_0000")}
    assert 0 < (masks["frame"] > 0).sum() < arr.size
    for name in ("frame_nifti", "case_0000"):
        np.testing.assert_array_equal(masks[name], masks["frame"], err_msg=name)
    labels = (tmp_path / "pace" / "classification" / "predictions.csv").read_text().splitlines()[1:]
    assert len({row.split(",")[1] for row in labels}) == 1

    gc = run(predictor, src, tmp_path / "gc", fmt="gc", progress=False, log=lambda _: None)
    assert gc.exit_code == 0
    seg = tmp_path / "gc" / "images" / "breast-lesion-segmentation"
    flat = sitk.ReadImage(str(seg / "frame_nifti.mha"))
    assert flat.GetSpacing() == pytest.approx(SPACING) and flat.GetOrigin() == pytest.approx(ORIGIN)
    assert flat.GetDirection() == pytest.approx(DIRECTION)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(flat) * 255, masks["frame"])
    vol = sitk.ReadImage(str(seg / "case_0000.mha"))
    assert vol.GetSize() == (128, 96, 1) and vol.GetSpacing() == pytest.approx((*SPACING, 1.5))

    (tmp_path / "upload").mkdir()
    upload = tmp_path / "upload" / "file.bin"
    upload.write_bytes((src / "frame_nifti.nii.gz").read_bytes())
    case = predict_file(predictor, upload, tmp_path / "cog", overlay=False)
    assert [p.name for p in case.outputs] == ["file_mask.nii.gz"]
    back = sitk.ReadImage(str(case.outputs[0]))
    assert back.GetSpacing() == pytest.approx(SPACING) and back.GetDirection() == pytest.approx(DIRECTION)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back) * 255, masks["frame"])


def test_a_nifti_read_without_a_usable_temporary_folder_names_the_file_and_why(tmp_path, monkeypatch):
    """ITK reads each NIfTI through a link in a private temporary folder: where none can be made, the
    error is the input's, with the reason (not an OSError about a temporary path)."""
    import tempfile

    _write(tmp_path / "scan.nii.gz", _frame())
    (tmp_path / "not-a-folder").write_text("x")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "not-a-folder"))
    with pytest.raises(ImageReadError, match=r"scan.nii.gz: cannot make a temporary folder to read it through ITK "
                                             r"\(Not a directory: .*not-a-folder"):
        read_image(tmp_path / "scan.nii.gz")
