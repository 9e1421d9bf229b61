"""NRRD inputs (``.nrrd``, ``.nhdr`` with its data file beside it; model/nrrd.py): read with their
geometry as a MetaImage is, in each encoding ITK reads (raw, gzip, ascii, hex), a one-slice volume as
its frame and a colour one as RGB, known by content under a name that says nothing (a Cog upload);
refused with the reason where the data is short or damaged, lies elsewhere, is bzip2 or the header
announces what is not a 2-D frame. Through ``inference.run`` a NRRD, a ``.nhdr`` and a ``.mhd`` frame
get the mask of the same pixels in a PNG; ``predict_file`` writes a NRRD's mask as NRRD."""
from __future__ import annotations

import gzip
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
from model.image import ImageReadError  # noqa: E402
from model.io import image_pixels, is_image_file, list_images, read_image  # noqa: E402
from model.itk_image import write_itk  # noqa: E402
from model.nrrd import is_nrrd  # noqa: E402

SPACING, ORIGIN, DIRECTION = (0.13, 0.07), (-6.0, 1.5), (-1.0, 0.0, 0.0, 1.0)


def _image(arr: np.ndarray, volume: bool = False) -> sitk.Image:
    img = sitk.GetImageFromArray(arr[None] if volume else arr)
    img.SetSpacing((*SPACING, 2.0) if volume else SPACING)
    img.SetOrigin((*ORIGIN, 0.5) if volume else ORIGIN)
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0) if volume else DIRECTION)
    return img


def _nrrd(arr: np.ndarray, encoding: str = "raw", extra: str = "", sizes: str | None = None,
          type_: str = "unsigned char", kinds: str = "") -> bytes:
    """A NRRD written line by line, as other tools than ITK write it (no geometry)."""
    data = arr.tobytes()
    payload = {"raw": data, "gzip": gzip.compress(data), "ascii": " ".join(map(str, arr.ravel())).encode(),
               "hex": data.hex().encode()}.get(encoding, data)
    sizes = sizes or " ".join(map(str, arr.shape[::-1]))
    head = (f"NRRD0004\n# written by hand\ntype: {type_}\ndimension: {len(sizes.split())}\nsizes: {sizes}\n"
            f"{kinds}encoding: {encoding}\nendian: little\n{extra}")
    return head.encode() + b"\n" + payload


def test_a_nrrd_frame_is_read_with_its_geometry_in_each_encoding_and_its_mask_written_as_nrrd(tmp_path):
    """ITK's own ``.nrrd`` (raw, gzip), upper case, a ``.nhdr`` with its ``.raw`` beside it, and files
    written by hand in ascii and hex: the pixels as stored, ITK's geometry, ``.nrrd`` the mask's
    suffix; the mask written through the same ITK path lies on the input's physical points."""
    arr = synthetic_ultrasound(33, 47, 7)[0]
    img = _image(arr)
    sitk.WriteImage(img, str(tmp_path / "plain.nrrd"))
    sitk.WriteImage(img, str(tmp_path / "packed.nrrd"), useCompression=True)
    (tmp_path / "packed.nrrd").rename(tmp_path / "PACKED.NRRD")
    sitk.WriteImage(img, str(tmp_path / "detached.nhdr"))
    assert "data file: detached.raw" in (tmp_path / "detached.nhdr").read_text()
    for encoding in ("ascii", "hex"):
        (tmp_path / f"{encoding}.nrrd").write_bytes(_nrrd(arr, encoding))
    assert [p.name for p in list_images(tmp_path)] == sorted(
        ["PACKED.NRRD", "ascii.nrrd", "detached.nhdr", "hex.nrrd", "plain.nrrd"])
    for name in ("plain.nrrd", "PACKED.NRRD", "detached.nhdr", "ascii.nrrd", "hex.nrrd"):
        got = read_image(tmp_path / name)
        np.testing.assert_array_equal(got.array, arr, err_msg=name)
        assert got.itk_suffix == ".nrrd" and image_pixels(tmp_path / name) == arr.size, name
        if name in ("ascii.nrrd", "hex.nrrd"):
            assert got.spacing == (1.0, 1.0), name
        else:
            assert got.spacing == pytest.approx(SPACING) and got.origin == pytest.approx(ORIGIN), name
            assert got.direction == pytest.approx(DIRECTION), name
    mask = (arr > arr.mean()).astype(np.uint8)
    write_itk(tmp_path / "out" / "plain_mask.nrrd", mask, like=read_image(tmp_path / "plain.nrrd"))
    back = sitk.ReadImage(str(tmp_path / "out" / "plain_mask.nrrd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), mask)
    for index in ((0, 0), (46, 0), (5, 30)):
        assert back.TransformIndexToPhysicalPoint(index) == pytest.approx(img.TransformIndexToPhysicalPoint(index))
    assert b"encoding: gzip" in (tmp_path / "out" / "plain_mask.nrrd").read_bytes()[:600]


def test_a_one_slice_or_colour_nrrd_is_read_as_its_frame(tmp_path):
    """A 1 x H x W volume gives its frame, its mask keeping the volume's layout and geometry; a colour
    NRRD (a first axis of 3 values per pixel) gives H x W x 3."""
    arr = synthetic_ultrasound(30, 40, 8)[0]
    sitk.WriteImage(_image(arr, volume=True), str(tmp_path / "slice.nrrd"))
    got = read_image(tmp_path / "slice.nrrd")
    np.testing.assert_array_equal(got.array, arr)
    write_itk(tmp_path / "slice_mask.nrrd", (arr > 100).astype(np.uint8), like=got)
    back = sitk.ReadImage(str(tmp_path / "slice_mask.nrrd"))
    assert back.GetSize() == (40, 30, 1) and back.GetSpacing() == pytest.approx((*SPACING, 2.0))
    rgb = np.stack([arr, arr // 2, 255 - arr], axis=2)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "colour.nrrd"))
    np.testing.assert_array_equal(read_image(tmp_path / "colour.nrrd").array, rgb)
    (tmp_path / "kinds.nrrd").write_bytes(_nrrd(np.ascontiguousarray(rgb), sizes="3 40 30",
                                                kinds="kinds: RGB-color domain domain\n"))
    np.testing.assert_array_equal(read_image(tmp_path / "kinds.nrrd").array, rgb)


def test_a_nrrd_upload_without_its_suffix_is_read_by_its_content(tmp_path):
    """A Cog upload arrives as ``file.bin``: a NRRD is known by its magic and read with its geometry;
    other formats under such names are not taken for NRRD."""
    arr = synthetic_ultrasound(25, 36, 9)[0]
    sitk.WriteImage(_image(arr), str(tmp_path / "x.nrrd"), useCompression=True)
    (tmp_path / "file.bin").write_bytes((tmp_path / "x.nrrd").read_bytes())
    assert is_nrrd(tmp_path / "file.bin") and not is_image_file(tmp_path / "file.bin")
    got = read_image(tmp_path / "file.bin")
    np.testing.assert_array_equal(got.array, arr)
    assert got.itk_suffix == ".nrrd" and got.spacing == pytest.approx(SPACING)
    assert image_pixels(tmp_path / "file.bin") == arr.size
    Image.fromarray(arr).save(tmp_path / "png.bin", format="PNG")
    assert not is_nrrd(tmp_path / "png.bin") and read_image(tmp_path / "png.bin").itk_suffix == ""


def test_damaged_or_unreadable_nrrd_files_are_refused_with_the_reason(tmp_path):
    """Short raw and gzip data and a damaged gzip stream (teem's reasons kept, its call chain dropped);
    pixels in another file for a ``.nrrd`` and anywhere but beside a ``.nhdr``; bzip2, which ITK's
    reader lacks; NaN pixels; from the header before anything is read: a frame over the size limit,
    more than 4 channels; a volume of several slices; a ``.nrrd`` that is not NRRD."""
    arr = synthetic_ultrasound(24, 32, 10)[0]
    good = _nrrd(arr, "gzip")
    cut = _nrrd(arr)[:-11]
    crc = bytearray(good)
    crc[-6] ^= 0xFF  # the gzip trailer's CRC
    (tmp_path / "elsewhere.raw").write_bytes(arr.tobytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.raw").write_bytes(arr.tobytes())
    nan = np.ones((8, 9), np.float32)
    nan[2, 3] = np.nan
    cases = {
        "short.nrrd": (cut, "corrupt or truncated NRRD: the header reads, the pixel data does not "
                            r"\(fread got only 757 1-sized things, not 768"),
        "short_gz.nrrd": (good[:-30], "corrupt or truncated NRRD: the header reads, the pixel data does not"),
        "crc.nrrd": (bytes(crc), "corrupt or truncated NRRD: the header reads, the pixel data does not"),
        "pointing.nrrd": (_nrrd(arr, extra="data file: elsewhere.raw\n")[:-arr.size],
                          r"its pixel data is in another file \(data file: elsewhere.raw\); a .nrrd must hold"),
        "up.nhdr": (_nrrd(arr, extra="data file: ../elsewhere.raw\n")[:-arr.size],
                    "its header names its pixel data as data file: '../elsewhere.raw'; only one data file beside"),
        "down.nhdr": (_nrrd(arr, extra="datafile: sub/x.raw\n")[:-arr.size],
                      "its header names its pixel data as data file: 'sub/x.raw'; only one data file beside"),
        "list.nhdr": (_nrrd(arr, extra="data file: LIST\n")[:-arr.size] + b"elsewhere.raw\n",
                      "its header names its pixel data as data file: 'LIST'; only one data file beside the header"),
        "missing.nhdr": (_nrrd(arr, extra="data file: gone.raw\n")[:-arr.size],
                         r"its pixel data file gone.raw \(data file:\) is missing"),
        "bz.nrrd": (_nrrd(arr, "bzip2"), "its pixel data is bzip2-encoded, which ITK's NRRD reader cannot read"),
        "nan.nrrd": (_nrrd(nan, type_="float"), "contains NaN or infinite pixel values"),
        "huge.nrrd": (_nrrd(arr, sizes="20000 10000"), "image too large: 20000 x 10000"),
        "channels.nrrd": (_nrrd(arr, sizes="6 4 32", kinds="kinds: vector domain domain\n"),
                          "unsupported channel count 6"),
        "volume.nrrd": (_nrrd(arr, sizes="8 4 24"), "3-D image of 8 x 4 x 24 voxels; expected a single 2-D slice"),
        "fake.nrrd": (b"P5\n32 24\n255\n" + arr.tobytes(), "not a NRRD file"),
        "upload.bin": (_nrrd(arr, extra="data file: elsewhere.raw\n")[:-arr.size], r"its pixel data is in another "
                       r"file \(data file: elsewhere.raw\), which an upload cannot bring along: send a .nrrd"),
        "singular.nrrd": (_nrrd(arr, extra="space dimension: 2\nspace directions: (1,1) (2,2)\n"),
                          r"cannot read as NRRD \(its direction \(orientation\) matrix is singular"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageReadError, match=f"{name}: {reason}"):
            read_image(tmp_path / name)
    (tmp_path / "beside.nhdr").write_bytes(_nrrd(arr, extra="data file: elsewhere.raw\n")[:-arr.size])
    np.testing.assert_array_equal(read_image(tmp_path / "beside.nhdr").array, arr)
    (tmp_path / "good.nrrd").write_bytes(good)
    np.testing.assert_array_equal(read_image(tmp_path / "good.nrrd").array, arr)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from model.inference import load_predictor

    return load_predictor(make_test_ensemble(tmp_path_factory.mktemp("ens") / "ens"), device="cpu", batch_size=4)


def test_process_gives_nrrd_nhdr_and_mhd_frames_the_mask_of_the_same_pixels_as_png(tmp_path, predictor):
    """Through ``inference.run``: a ``.nrrd``, a ``.nhdr`` and a ``.mhd`` frame get the same PACE mask as
    the same pixels in a PNG; in the Grand Challenge format their ``.mha`` masks carry the input's
    geometry; ``predict_file`` (Cog) writes a NRRD upload's mask as NRRD with its geometry."""
    from model.inference import predict_file, run

    arr = synthetic_ultrasound(96, 128, 22)[0]
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(arr).save(src / "frame.png")
    for name in ("frame_nrrd.nrrd", "frame_nhdr.nhdr", "frame_mhd.mhd"):
        sitk.WriteImage(_image(arr), str(src / name))
    pace = run(predictor, src, tmp_path / "pace", fmt="pace", progress=False, log=lambda _: None)
    names = ["frame", "frame_mhd", "frame_nhdr", "frame_nrrd"]
    assert pace.exit_code == 0 and [c.name for c in pace.cases] == names
    masks = {n: np.asarray(Image.open(tmp_path / "pace" / "segmentation" / f"{n}_mask.png")) for n in names}
    assert 0 < (masks["frame"] > 0).sum() < arr.size
    for name in names[1:]:
        np.testing.assert_array_equal(masks[name], masks["frame"], err_msg=name)

    gc = run(predictor, src, tmp_path / "gc", fmt="gc", progress=False, log=lambda _: None)
    assert gc.exit_code == 0
    for name in names[1:]:
        seg = sitk.ReadImage(str(tmp_path / "gc" / "images" / "breast-lesion-segmentation" / f"{name}.mha"))
        assert seg.GetSpacing() == pytest.approx(SPACING) and seg.GetOrigin() == pytest.approx(ORIGIN), name
        assert seg.GetDirection() == pytest.approx(DIRECTION), name
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg) * 255, masks["frame"], err_msg=name)

    (tmp_path / "upload").mkdir()
    upload = tmp_path / "upload" / "file.bin"
    upload.write_bytes((src / "frame_nrrd.nrrd").read_bytes())
    case = predict_file(predictor, upload, tmp_path / "cog", overlay=False)
    assert [p.name for p in case.outputs] == ["file_mask.nrrd"]
    back = sitk.ReadImage(str(case.outputs[0]))
    assert back.GetSpacing() == pytest.approx(SPACING) and back.GetDirection() == pytest.approx(DIRECTION)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back) * 255, masks["frame"])


def test_a_nrrd_header_is_read_as_teem_reads_it_so_nothing_it_names_escapes_the_checks(tmp_path):
    """teem ends a header line at a lone CR too, keeps spaces around a data file's name, takes a name
    opening with ``LIST`` for a list, ``C:x`` for a path, and reads ``10001.`` as 10001: a header
    written so would have another file read than the one checked, or skip the size check. Each is
    refused, as is a header that runs past 1 MiB (its fields could not all be checked); ITK's internals
    stay out of a message."""
    arr = synthetic_ultrasound(24, 32, 11)[0]
    (tmp_path / "secret.raw").write_bytes(arr.tobytes())
    (tmp_path / "LIST2").write_bytes(arr.tobytes())
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.raw").write_bytes(arr.tobytes())
    (tmp_path / "in" / "d.raw ").write_bytes(arr.tobytes())
    head = _nrrd(arr)[:-arr.size - 1].decode()
    cr = head.replace("\n", "\r").replace("NRRD0004\r", "NRRD0004\n")
    cases = {
        "cr.nrrd": (cr + "data file: ../secret.raw\r\r", "its pixel data is in another file"),
        "cr.nhdr": (cr + "data file: ../secret.raw\r", "its header names its pixel data as data file: '../secret.raw'"),
        "long.nhdr": (head + "# " + "x" * (1 << 20) + "\ndata file: ../secret.raw\n", "header runs past 1 MiB"),
        "list.nhdr": (head + "data file: LIST2\n../secret.raw\n", "data file: 'LIST2'; only one data file beside"),
        "space.nhdr": (head + "data file: d.raw \n", "data file: 'd.raw '; only one data file beside"),
        "drive.nhdr": (head + "data file: C:d.raw\n", "data file: 'C:d.raw'; only one data file beside"),
        "tilde.nhdr": (head + "data file: ~d.raw\n", "data file: '~d.raw'; only one data file beside"),
        "self.nhdr": (head + "data file: self.nhdr\n", r"data file self.nhdr \(data file:\) is the header"),
    }
    for name, (text, reason) in cases.items():
        (tmp_path / "in" / name).write_bytes(text.encode())
        with pytest.raises(ImageReadError, match=f"{name}: .*{reason}"):
            read_image(tmp_path / "in" / name)
        assert image_pixels(tmp_path / "in" / name) == 0, name
    for i, line in enumerate(("data file: d.raw\n", "data file:   d.raw\n", "data file: \td.raw\r\n")):
        (tmp_path / "in" / f"ok{i}.nhdr").write_text(head + line)  # teem skips spaces and tabs after the ':'
        np.testing.assert_array_equal(read_image(tmp_path / "in" / f"ok{i}.nhdr").array, arr)
    (tmp_path / "in" / "cr_ok.nrrd").write_bytes(_nrrd(arr).replace(b"\n", b"\r", head.count("\n") + 1))
    np.testing.assert_array_equal(read_image(tmp_path / "in" / "cr_ok.nrrd").array, arr)
    (tmp_path / "in" / "big.nrrd").write_bytes(_nrrd(arr, "gzip", sizes="10001. 10001."))
    with pytest.raises(ImageReadError, match=r"big.nrrd: its header's sizes \(10001. 10001.\) are not whole numbers"):
        read_image(tmp_path / "in" / "big.nrrd")
    (tmp_path / "in" / "line.nrrd").write_bytes(_nrrd(arr, sizes="768"))
    with pytest.raises(ImageReadError, match="line.nrrd: 1-D image of 768 pixels; expected 2-D"):
        read_image(tmp_path / "in" / "line.nrrd")
    (tmp_path / "in" / "space.nrrd").write_bytes(_nrrd(arr, extra="space dimension: 4\nspace directions: (1,0,0,0) "
                                                                  "(0,1,0,0)\n"))
    with pytest.raises(ImageReadError, match="space.nrrd: cannot read as NRRD") as err:
        read_image(tmp_path / "in" / "space.nrrd")
    assert "ITK ERROR" not in str(err.value) and "0x" not in str(err.value) and "[nrrd]" not in str(err.value)


def test_the_size_of_a_nhdr_whose_data_file_is_a_pipe_is_asked_without_blocking(tmp_path):
    """ITK, asked only for a ``.nhdr``'s size, opens its data file: a pipe there blocked the run before
    any image was read. The header's checks come first, so its size is 0 and reading it an error."""
    import os
    import subprocess

    arr = synthetic_ultrasound(24, 32, 12)[0]
    os.mkfifo(tmp_path / "pipe.raw")
    (tmp_path / "p.nhdr").write_bytes(_nrrd(arr, extra="data file: pipe.raw\n")[:-arr.size])
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from model.io import image_pixels, read_image;"
            "print(image_pixels(sys.argv[2]))\n"
            "try:\n    read_image(sys.argv[2])\nexcept ValueError as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", code, str(REPO), str(tmp_path / "p.nhdr")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["0", f"{tmp_path / 'p.nhdr'}: its pixel data file pipe.raw (data file:) is "
                                             f"not a regular file"]


def test_byte_skip_minus_one_with_pixel_data_cut_short_is_refused(tmp_path):
    """``byte skip: -1``: teem reads a .nrrd's pixels as its last bytes, so a file cut a little short
    was read with its header's end as the first pixels (every row shifted, no word). Refused with
    both byte counts; the whole file, with \\n or \\r\\n line ends, and a 16-bit one are read right."""
    arr = synthetic_ultrasound(20, 30, 3)[0]
    head = "NRRD0004\ntype: {}\ndimension: 2\nsizes: 30 20\nbyte skip: -1\nendian: little\nencoding: raw\n\n"
    for name, ends, kind, data in (("lf", "\n", "uchar", arr), ("crlf", "\r\n", "unsigned char", arr),
                                   ("u16", "\n", "ushort", arr.astype("<u2") * 257)):
        whole = tmp_path / f"{name}.nrrd"
        whole.write_bytes(head.format(kind).replace("\n", ends).encode() + data.tobytes())
        np.testing.assert_array_equal(read_image(whole).array, data)
        cut = tmp_path / f"{name}-cut.nrrd"
        cut.write_bytes(head.format(kind).replace("\n", ends).encode() + data.tobytes()[:-20])
        with pytest.raises(ImageReadError, match=f"header announces {data.nbytes} bytes of it, the file holds "
                                                 f"{data.nbytes - 20}"):
            read_image(cut)
    for name, line in (("byteskip", "byteskip: -1"), ("zero", "byte skip: -01")):  # teem's other spellings
        cut = tmp_path / f"{name}-cut.nrrd"
        cut.write_bytes(head.format("uchar").replace("byte skip: -1", line).encode() + arr.tobytes()[:-20])
        with pytest.raises(ImageReadError, match="header announces 600 bytes of it, the file holds 580"):
            read_image(cut)
