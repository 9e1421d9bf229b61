"""Detached MetaImage inputs (``.mhd`` with its ``.raw`` or ``.zraw`` beside it; model/metaimage.py): read
with their geometry as the same image in a ``.mha`` is, listed by their header only, their masks written
as one ``.mha``; refused with the reason where the header names its pixels anywhere but in one file
beside it, or that file is missing or shorter than the header announces. A ``.mha`` must still hold
its own pixels."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

from make_fixtures import synthetic_ultrasound  # noqa: E402
from model.image import ImageReadError  # noqa: E402
from model.io import image_pixels, list_images, read_image  # noqa: E402
from model.itk_image import write_itk  # noqa: E402
from model.metaimage import is_metaimage  # noqa: E402

SPACING, ORIGIN, DIRECTION = (0.11, 0.08), (3.5, -2.25), (0.0, 1.0, 1.0, 0.0)


def _image(h: int = 37, w: int = 52, seed: int = 5) -> tuple[np.ndarray, sitk.Image]:
    arr = synthetic_ultrasound(h, w, seed)[0]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    return arr, img


def test_an_mhd_is_read_from_the_data_file_beside_it_with_its_geometry(tmp_path):
    """``.mhd`` + ``.raw`` and ``.mhd`` + ``.zraw`` (compressed), any case of the suffix: the pixels and
    the geometry of the same image saved as ``.mha``; listed by the header, not the data file; the
    mask written as one ``.mha`` lies on the input's physical points."""
    arr, img = _image()
    sitk.WriteImage(img, str(tmp_path / "plain.mhd"))
    sitk.WriteImage(img, str(tmp_path / "packed.mhd"), useCompression=True)
    (tmp_path / "packed.mhd").rename(tmp_path / "PACKED.MHD")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PACKED.MHD", "packed.zraw", "plain.mhd", "plain.raw"]
    assert [p.name for p in list_images(tmp_path)] == ["PACKED.MHD", "plain.mhd"]
    for name in ("plain.mhd", "PACKED.MHD"):
        assert is_metaimage(tmp_path / name)
        got = read_image(tmp_path / name)
        np.testing.assert_array_equal(got.array, arr)
        assert got.spacing == pytest.approx(SPACING) and got.origin == pytest.approx(ORIGIN)
        assert got.direction == pytest.approx(DIRECTION) and got.itk_suffix == ".mha"
        assert image_pixels(tmp_path / name) == arr.size
    mask = (arr > arr.mean()).astype(np.uint8)
    write_itk(tmp_path / "out" / "plain_mask.mha", mask, like=read_image(tmp_path / "plain.mhd"))
    back = sitk.ReadImage(str(tmp_path / "out" / "plain_mask.mha"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask)
    for index in ((0, 0), (51, 0), (9, 30)):
        assert back.TransformIndexToPhysicalPoint(index) == pytest.approx(img.TransformIndexToPhysicalPoint(index))
    assert b"ElementDataFile = LOCAL" in (tmp_path / "out" / "plain_mask.mha").read_bytes()


def test_an_mhd_whose_pixels_lie_anywhere_but_in_one_file_beside_it_is_refused(tmp_path):
    """A header could otherwise have any file on the machine read as pixels: a path (absolute, up or
    down a folder), a list or a numbered pattern are refused, naming the field; so are a data file
    that is missing, not a regular file, or shorter than the header announces (both counts named:
    ITK would say only "No such file or directory"). A ``.mha`` (or an upload known by its header)
    that points at another file is refused as before, with the ``.mhd`` way named."""
    arr, img = _image(20, 30, 2)
    secret = tmp_path / "secret.raw"
    secret.write_bytes(np.full(arr.size, 200, np.uint8).tobytes())
    case = tmp_path / "case"
    case.mkdir()
    (case / "sub").mkdir()
    (case / "sub" / "x.raw").write_bytes(arr.tobytes())
    sitk.WriteImage(img, str(case / "good.mhd"))
    header = (case / "good.mhd").read_text()
    assert "ElementDataFile = good.raw" in header

    def mhd(name: str, data: str) -> Path:
        path = case / name
        path.write_text(header.replace("ElementDataFile = good.raw", f"ElementDataFile = {data}"))
        return path

    elsewhere = {"abs.mhd": str(secret), "up.mhd": "../secret.raw", "down.mhd": "sub/x.raw",
                 "back.mhd": "sub\\x.raw", "list.mhd": "LIST 2D", "pattern.mhd": "slice%03d.raw 1 3 1"}
    for name, data in elsewhere.items():
        with pytest.raises(ImageReadError, match=f"{name}: its header names its pixel data as ElementDataFile = "
                                                 f".*only one data file beside the header"):
            read_image(mhd(name, data))
    with pytest.raises(ImageReadError, match="missing.mhd: its pixel data file none.raw .* is missing"):
        read_image(mhd("missing.mhd", "none.raw"))
    os.mkfifo(case / "fifo.raw")
    with pytest.raises(ImageReadError, match="fifo.mhd: its pixel data file fifo.raw .* is not a regular file"):
        read_image(mhd("fifo.mhd", "fifo.raw"))
    (case / "short.raw").write_bytes(arr.tobytes()[:-7])
    with pytest.raises(ImageReadError, match=rf"short.mhd: corrupt or truncated MetaImage: .*announces {arr.size} "
                                             rf"bytes of it, its data file short.raw holds {arr.size - 7}\)"):
        read_image(mhd("short.mhd", "short.raw"))
    np.testing.assert_array_equal(read_image(mhd("beside.mhd", "good.raw")).array, arr)

    for name, reason in (("pointing.mha", "; a .mha .* must hold its own pixels, a header whose pixels are in a "
                                          "file beside it is read as .mhd"),  # an upload comes alone:
                         ("upload.bin", ", which an upload cannot bring along: send a .mha .* that holds its pixels")):
        (case / name).write_text(header)
        assert is_metaimage(case / name)
        with pytest.raises(ImageReadError, match=rf"{name}: its pixel data is in another file \(ElementDataFile = "
                                                 rf"good.raw\){reason}"):
            read_image(case / name)
    (case / "flat.mhd").write_text(header.replace("TransformMatrix = 0 1 1 0", "TransformMatrix = 0 0 0 0"))
    with pytest.raises(ImageReadError, match=r"flat.mhd: cannot read as MetaImage \(its direction \(orientation\) "
                                             r"matrix is singular \(determinant 0\)\)"):
        read_image(case / "flat.mhd")


def test_an_mhd_data_file_linked_out_of_its_folder_is_refused_and_one_linked_beside_it_read(tmp_path):
    """A data file that is a link out of the header's folder had any file read as pixels (and written
    into an overlay): refused, as a path in the header is. A link to a file in the same folder is read."""
    from model.image import ImageReadError

    arr, img = _image()
    (tmp_path / "in").mkdir()
    sitk.WriteImage(img, str(tmp_path / "in" / "x.mhd"))
    (tmp_path / "in" / "x.raw").rename(tmp_path / "in" / "real.raw")
    (tmp_path / "in" / "x.raw").symlink_to("real.raw")
    np.testing.assert_array_equal(read_image(tmp_path / "in" / "x.mhd").array, arr)
    (tmp_path / "secret.bin").write_bytes((tmp_path / "in" / "real.raw").read_bytes())
    (tmp_path / "in" / "x.raw").unlink()
    (tmp_path / "in" / "x.raw").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(ImageReadError, match=r"x.mhd: its pixel data file x.raw \(ElementDataFile =\) is a link out "
                                             r"of the header's folder"):
        read_image(tmp_path / "in" / "x.mhd")


def test_pixel_data_too_large_decoded_is_refused_from_the_header_counting_channels_and_sample_size(tmp_path):
    """A 3 MB compressed .mha of 10000 x 10000 pixels of 4 doubles passed the pixel limit (channels and
    sample size were not counted) and peaked at 6.8 GB reading it, past a 4 GB container; a .nrrd
    likewise. Refused from the header; 10000 x 10000 RGBA at 16 bits (800 MB) is still within."""
    import gzip

    from model.image import MAX_PIXEL_BYTES, ImageReadError

    header = ("ObjectType = Image\nNDims = 2\nDimSize = 10000 10000\nElementNumberOfChannels = 4\n"
              "ElementType = MET_DOUBLE\nCompressedData = True\nCompressedDataSize = 20\nElementDataFile = LOCAL\n")
    (tmp_path / "bomb.mha").write_bytes(header.encode() + gzip.compress(b"\0" * 1000))
    with pytest.raises(ImageReadError, match=r"bomb.mha: image too large: its pixel data takes 3,200,000,000 bytes "
                                             r"decoded \(channels and sample size counted\); at most 800,000,000"):
        read_image(tmp_path / "bomb.mha")
    nrrd = ("NRRD0004\ntype: double\ndimension: 3\nsizes: 4 10000 10000\nkinds: vector domain domain\n"
            "encoding: gzip\n\n")
    (tmp_path / "bomb.nrrd").write_bytes(nrrd.encode() + gzip.compress(b"\0" * 1000))
    with pytest.raises(ImageReadError, match=r"bomb.nrrd: image too large: its pixel data takes 3,200,000,000 bytes"):
        read_image(tmp_path / "bomb.nrrd")
    assert 10000 * 10000 * 4 * 2 <= MAX_PIXEL_BYTES


def test_a_cog_upload_named_mhd_is_refused_not_read_from_a_file_beside_it(tmp_path):
    """Cog saves a URL input under a temporary name that keeps the URL's suffix: a header named
    ``….mhd`` had a file of a known name in the server's temporary folder read as its pixels, and sent
    back in the overlay. predict_file refuses detached headers whatever their name."""
    from model.image import ImageReadError
    from model.inference import predict_file

    arr, img = _image()
    sitk.WriteImage(img, str(tmp_path / "tmp_5e3z7kkx.mhd"))
    assert read_image(tmp_path / "tmp_5e3z7kkx.mhd").array.shape == arr.shape  # a folder's .mhd is read
    with pytest.raises(ImageReadError, match=r"tmp_5e3z7kkx.mhd: a detached header \(.mhd, .nhdr\), whose pixel "
                                             r"data is in another file, which an upload cannot bring along"):
        predict_file(None, tmp_path / "tmp_5e3z7kkx.mhd", tmp_path / "out")


def test_an_mhd_data_file_name_that_the_libraries_would_take_for_another_file_is_refused(tmp_path):
    """MetaIO takes a name opening with ``LIST`` for a list whatever follows, one opening with ``~`` or
    holding ``C:`` for a path, and strips bytes that are not printable ASCII from a name's end: each
    would have it open another file than the one checked here, so such names are refused; so are a
    NUL, bytes that are not UTF-8 and the header naming itself. Names ITK itself writes (``név.raw``,
    with spaces inside) and ones that merely open with ``list`` are read."""
    arr, img = _image(20, 30, 3)
    sitk.WriteImage(img, str(tmp_path / "good.mhd"))
    header = (tmp_path / "good.mhd").read_bytes()
    for i, name in enumerate((b"LIST.raw", b"LIST2", b"~x.raw", b"C:x.raw", b"a\xffb.raw", "daté".encode(), b"a\0b")):
        text = header.replace(b"ElementDataFile = good.raw", b"ElementDataFile = " + name)
        (tmp_path / f"n{i}.mhd").write_bytes(text)
        with pytest.raises(ImageReadError, match=f"n{i}.mhd: its header names its pixel data as ElementDataFile = "
                                                 f".*only one data file beside the header"):
            read_image(tmp_path / f"n{i}.mhd")
    for i, name in enumerate(("név.raw", "list_a.raw", "échographie 1.raw")):
        (tmp_path / name).write_bytes((tmp_path / "good.raw").read_bytes())
        (tmp_path / f"ok{i}.mhd").write_bytes(header.replace(b"= good.raw", b"= " + name.encode()))
        np.testing.assert_array_equal(read_image(tmp_path / f"ok{i}.mhd").array, arr)
    (tmp_path / "self.mhd").write_bytes(header.replace(b"= good.raw", b"= self.mhd"))
    with pytest.raises(ImageReadError, match=r"self.mhd: its pixel data file self.mhd .* is the header itself"):
        read_image(tmp_path / "self.mhd")


def test_compressed_metaimage_data_that_does_not_inflate_to_its_pixels_is_refused(tmp_path):
    """MetaIO says "Uncompress failed" on stderr and hands ITK the image anyway (the rest of it whatever
    its memory held): a damaged, cut or foreign ``.zraw``, a ``CompressedDataSize`` that stops short, and
    damaged data in a ``.mha`` are refused with the reason; so are sizes that are not whole numbers (MetaIO
    reads 1.0001e4 as 10001, past the size check) and a 1-D image."""
    arr, img = _image(30, 40, 4)
    sitk.WriteImage(img, str(tmp_path / "z.mhd"), useCompression=True)
    sitk.WriteImage(img, str(tmp_path / "whole.mha"), useCompression=True)
    header, packed = (tmp_path / "z.mhd").read_text(), (tmp_path / "z.zraw").read_bytes()
    np.testing.assert_array_equal(read_image(tmp_path / "z.mhd").array, arr)
    damaged = bytearray(packed)
    damaged[len(packed) // 2] ^= 0x5A
    blobs = {"cut": packed[: len(packed) // 3], "damaged": bytes(damaged), "plain": arr.tobytes()}
    for name, blob in blobs.items():
        (tmp_path / f"{name}.zraw").write_bytes(blob)
        (tmp_path / f"{name}.mhd").write_text(header.replace("z.zraw", f"{name}.zraw").replace(
            f"CompressedDataSize = {len(packed)}", f"CompressedDataSize = {len(blob)}"))
    stops = header.replace(f"CompressedDataSize = {len(packed)}", "CompressedDataSize = 20")
    (tmp_path / "stops.mhd").write_text(stops)
    whole = bytearray((tmp_path / "whole.mha").read_bytes())
    whole[-len(packed) // 2] ^= 0x5A
    (tmp_path / "damaged.mha").write_bytes(bytes(whole))
    zeroed = bytearray((tmp_path / "whole.mha").read_bytes())
    zeroed[-len(packed) // 2:] = bytes(len(packed) - len(packed) // 2)  # as an interrupted download leaves it
    (tmp_path / "zeroed.mha").write_bytes(bytes(zeroed))
    (tmp_path / "nosize.mha").write_bytes(bytes(zeroed).replace(f"CompressedDataSize = {len(packed)}\n".encode(), b""))
    skip0 = header.replace("z.zraw", "damaged.zraw").replace("NDims", "HeaderSize = 0\nNDims")  # MetaIO: none
    (tmp_path / "skip0.mhd").write_text(skip0)
    (tmp_path / "negative.mhd").write_text(header.replace(f"CompressedDataSize = {len(packed)}",
                                                          "CompressedDataSize = -5"))
    reasons = {"cut.mhd": "inflates to [0-9]+ of the 1200 bytes the header announces",
               "damaged.mhd": r"in its data file damaged.zraw is damaged \(zlib: ",
               "plain.mhd": r"is damaged \(zlib: ", "stops.mhd": "inflates to [0-9]+ of the 1200 bytes",
               "damaged.mha": r"in the file is damaged \(zlib: ", "zeroed.mha": "", "skip0.mhd": "is damaged"}
    for name, reason in reasons.items():
        with pytest.raises(ImageReadError, match=f"{name}: corrupt or truncated MetaImage: .*{reason}"):
            read_image(tmp_path / name)
    with pytest.raises(ImageReadError, match="nosize.mha: its compressed pixel data has no CompressedDataSize"):
        read_image(tmp_path / "nosize.mha")
    with pytest.raises(ImageReadError, match=r"negative.mhd: its header's CompressedDataSize \(-5\) is not a whole"):
        read_image(tmp_path / "negative.mhd")
    (tmp_path / "float.mhd").write_text(header.replace("DimSize = 40 30", "DimSize = 1.0001e4 10001"))
    with pytest.raises(ImageReadError, match=r"float.mhd: its header's DimSize \(1.0001e4 10001\) is not whole"):
        read_image(tmp_path / "float.mhd")
    (tmp_path / "line.mhd").write_text(header.replace("NDims = 2", "NDims = 1").replace("DimSize = 40 30",
                                                                                         "DimSize = 1200"))
    with pytest.raises(ImageReadError, match="line.mhd: 1-D image of 1200 pixels; expected 2-D"):
        read_image(tmp_path / "line.mhd")


def test_a_header_size_to_skip_is_checked_against_the_pixel_data_there(tmp_path):
    """With HeaderSize = -1 MetaIO reads the file's last bytes: a .mha cut a little short was read with
    its own header's text as the first pixels and every row shifted (exit 0, a mask and a label). It is
    refused with both byte counts, as without a HeaderSize; so is one whose pixels a HeaderSize starts
    inside the header. A whole file, and an .mhd's data file with bytes to skip, are read right."""
    arr = synthetic_ultrasound(30, 40, 7)[0]
    head = "ObjectType = Image\nNDims = 2\nDimSize = 40 30\nHeaderSize = {}\nElementType = MET_UCHAR\n" \
           "ElementDataFile = {}\n"
    whole = tmp_path / "whole.mha"
    whole.write_bytes(head.format(-1, "LOCAL").encode() + arr.tobytes())
    np.testing.assert_array_equal(read_image(whole).array, arr)
    for skip in ("-1", "-01"):  # MetaIO reads both as -1
        cut = tmp_path / "cut.mha"
        cut.write_bytes(head.format(skip, "LOCAL").encode() + arr.tobytes()[:-100])
        with pytest.raises(ImageReadError, match="the header announces 1200 bytes of it, the file holds 1100"):
            read_image(cut)
    zero = tmp_path / "zero.mha"  # HeaderSize 0, however written, skips nothing
    zero.write_bytes(head.format("00", "LOCAL").encode() + arr.tobytes())
    np.testing.assert_array_equal(read_image(zero).array, arr)
    inside = tmp_path / "inside.mha"
    inside.write_bytes(head.format(5, "LOCAL").encode() + arr.tobytes())
    with pytest.raises(ImageReadError, match=r"its HeaderSize \(5\) starts the pixel data inside the header"):
        read_image(inside)
    (tmp_path / "d.raw").write_bytes(b"J" * 16 + arr.tobytes())
    (tmp_path / "d.mhd").write_text(head.format(16, "d.raw"))
    np.testing.assert_array_equal(read_image(tmp_path / "d.mhd").array, arr)
    (tmp_path / "e.raw").write_bytes(b"J" * 16 + arr.tobytes()[:-1])
    (tmp_path / "e.mhd").write_text(head.format(16, "e.raw"))
    with pytest.raises(ImageReadError, match="announces 1200 bytes of it, its data file e.raw holds 1199"):
        read_image(tmp_path / "e.mhd")
