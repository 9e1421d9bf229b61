"""The one image <-> network path, shared by training and inference.

Forward (``preprocess``): any 2-D image (grey, grey+alpha, RGB, RGBA; uint8, uint16, float) ->
3 channels on a 0-255 scale -> longest side resized to the encoder's input size (aspect kept,
antialiased bilinear) -> the encoder's own normalisation -> zero padding at the bottom and right
(SAM style) -> float32 tensor 3 x S x S.

* Intensity scale: uint8 is used as is; bool becomes {0, 255}; any other type is rescaled linearly
  from its own min..max to 0..255 (16-bit and float images rarely use their full range) and rounded
  to 8 bits, as the training images (8-bit PNGs) and SAM's own pipeline (uint8) come: a scan that spans
  0..255 at 8 bits gives the same network input stored at 16 bits (x 257) or as float on 0..1, where
  resizing the fine levels apart gave masks that differed (Dice 0.72 at worst on real images). A scan
  that does not span its type's range is stretched to 0..255, unless it is uint8: the same narrow
  scan at 8 and at 16 bits then differs.
* Resizing: one filter for every encoder, Pillow's antialiased bilinear (LiteMedSAM's inference script
  uses OpenCV's INTER_AREA, MedSAM's bicubic; the shipped heads were trained on this input; README,
  Checkpoints).
* Alpha is dropped; grey is replicated to three channels (after resizing, to save memory on
  huge images).
* Normalisation ``sam``: (x - SAM pixel mean) / SAM pixel std on 0-255.
  Normalisation ``minmax``: per-image (x - min) / (max - min) to [0, 1] over the resized image,
  as MedSAM's and LiteMedSAM's inference scripts normalise; a constant image becomes all zeros.
  The image is padded, not stretched to a square as MedSAM's script does (its aspect ratio kept).
  Padding is applied after normalisation, so padded pixels are 0 in the network's input space.

Mirroring (``mirror``, test-time augmentation): an input or a head's output is mirrored left-right
within the image's own columns, so the padding stays at the right: the mirrored input is the input
of the mirrored image (to rounding), as the encoder was trained on it.

Backward (``postprocess``): mask logits at the head's resolution -> upsampled to S x S -> padding
cropped -> resized to the input's exact height x width -> threshold (probability 0.5, logit 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
NORMALIZATIONS = ("sam", "minmax")


@dataclass(frozen=True)
class Geometry:
    """How an input of ``height x width`` sits inside the ``size x size`` network input."""

    height: int
    width: int
    size: int

    @property
    def scale(self) -> float:
        return self.size / max(self.height, self.width)

    @property
    def resized(self) -> tuple[int, int]:
        h = max(1, min(self.size, int(self.height * self.scale + 0.5)))
        w = max(1, min(self.size, int(self.width * self.scale + 0.5)))
        return h, w


def _channels(arr: np.ndarray) -> np.ndarray:
    """H x W x C (C in 1..4) or H x W -> H x W or H x W x 3 (alpha dropped)."""
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3:
        raise ValueError(f"expected a 2-D image, got shape {arr.shape}")
    c = arr.shape[2]
    if c in (1, 2):  # grey, grey + alpha
        return arr[..., 0]
    if c in (3, 4):
        rgb = arr[..., :3]
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0]  # grey stored as RGB: resize one channel, not three
        return rgb
    raise ValueError(f"unsupported channel count {c}")


_F32_SAFE = float(np.finfo(np.float32).max) / 4  # values and ranges float32 arithmetic handles without overflow


def _to_0_255(arr: np.ndarray) -> np.ndarray:
    """uint8 unchanged; bool -> {0,255}; other types -> min-max rescaled to 0..255, rounded to uint8."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"unsupported pixel type {arr.dtype} (expected integers, floats or booleans)")
    lo, hi = float(arr.min()), float(arr.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):  # else every probability is NaN and the label "normal"
        raise ValueError("the image holds NaN or infinite pixel values")
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    if not (hi - lo < _F32_SAFE and max(-lo, hi) < _F32_SAFE):
        # floats near float32's or float64's limits: (a - lo) would overflow to inf, then NaN.
        # Rescale in float64, halved first so that hi - lo stays finite even for float64.
        a = ((arr.astype(np.float64) * 0.5 - lo * 0.5) / (hi * 0.5 - lo * 0.5)).astype(np.float32)
    else:
        a = arr.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            return np.zeros(a.shape, np.uint8)
        a -= np.float32(lo)
        a /= np.float32(hi - lo)  # divide, not multiply by 255 / (hi - lo): that overflows for a range under 1e-36
    a *= np.float32(255.0)
    np.rint(a, out=a)
    np.clip(a, 0, 255, out=a)
    return a.astype(np.uint8)


def _resize_plane(plane: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of one H x W plane (uint8 images; float32 masks) with PIL."""
    h, w = hw
    if plane.shape == (h, w):
        return plane.astype(np.float32)
    mode = "L" if plane.dtype == np.uint8 else "F"
    im = Image.fromarray(np.ascontiguousarray(plane if mode == "L" else plane.astype(np.float32)), mode)
    return np.array(im.resize((w, h), Image.BILINEAR), dtype=np.float32)  # a writable copy for torch


def resize_image(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Image (any supported layout/type) -> float32 h x w (grey) or h x w x 3, on 0..255."""
    img = _to_0_255(_channels(arr))
    if img.ndim == 2:
        return _resize_plane(img, hw)
    return np.stack([_resize_plane(img[..., c], hw) for c in range(3)], axis=-1)


def normalize(img: torch.Tensor, method: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """img: h x w (grey) or h x w x 3, float32 on 0..255 (unpadded) -> 3 x h x w encoder input
    values, written into ``out`` when given (a view into the padded input: one pass per channel,
    no three-channel copy of a grey image and no temporaries; the same values as the formulas)."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"unknown normalisation {method!r}; known: {NORMALIZATIONS}")
    h, w = img.shape[:2]
    if out is None:
        out = torch.empty(3, h, w, dtype=torch.float32)
    planes = [img] * 3 if img.ndim == 2 else [img[..., c] for c in range(3)]
    if method == "sam":
        shift = torch.tensor(SAM_PIXEL_MEAN, dtype=torch.float32)
        scale = torch.tensor(SAM_PIXEL_STD, dtype=torch.float32)
    else:  # minmax over the whole resized image
        lo, hi = img.min(), img.max()
        if float(hi - lo) <= 0:
            return out.zero_()
        shift, scale = lo.expand(3), (hi - lo).expand(3)
    for c in range(3):
        torch.sub(planes[c], shift[c], out=out[c])
        out[c].div_(scale[c])
    return out


def preprocess(arr: np.ndarray, size: int, normalization: str) -> tuple[torch.Tensor, Geometry]:
    """One image -> (3 x size x size float32 network input, its Geometry)."""
    if arr.ndim < 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected a non-empty 2-D image, got shape {arr.shape}")
    geom = Geometry(int(arr.shape[0]), int(arr.shape[1]), size)
    h, w = geom.resized
    img = torch.from_numpy(resize_image(arr, (h, w)))
    out = torch.zeros(3, size, size, dtype=torch.float32)
    normalize(img, normalization, out=out[:, :h, :w])
    return out, geom


def mask_to_model(mask: np.ndarray, geom: Geometry, out_size: int) -> torch.Tensor:
    """Ground-truth mask (H x W, {0,1}) -> out_size x out_size float {0,1}, aligned with the
    head's output grid (same resize + padding as the image, scaled to ``out_size``). On a grid
    coarser than the input (SAM's 1024 input, a 256 head) the image's last row or column may cover
    part of a cell: the mask is placed on the input's pixels as the image is, and each cell takes the
    mean of the image's pixels in it, the padding's left out (``postprocess`` crops the head's output the
    same exact way; placed on whole cells, the mask was stretched by up to half a cell)."""
    h, w = geom.resized
    plane = (mask > 0).astype(np.float32)
    if geom.size == out_size:
        small = _resize_plane(plane, (h, w))
    else:
        full = torch.zeros(2, 1, geom.size, geom.size, dtype=torch.float32)
        full[0, 0, :h, :w] = torch.from_numpy(_resize_plane(plane, (h, w)))
        full[1, 0, :h, :w] = 1.0  # the image's share of each cell
        mean, share = F.interpolate(full, size=(out_size, out_size), mode="area")[:, 0].numpy()
        h, w = grid_cover((h, w), geom.size, out_size)
        small = mean[:h, :w] / share[:h, :w]
    out = torch.zeros(out_size, out_size, dtype=torch.float32)
    out[:h, :w] = torch.from_numpy((small >= 0.5).astype(np.float32))
    return out


def grid_cover(sides, size: int, grid: int) -> list[int]:
    """Image rows or columns (``Geometry.resized``) as the grid x grid map's cells that hold any of the
    image, a cell it covers in part counted (beyond them: padding alone)."""
    return [-(-int(s) * grid // size) for s in sides]


def mirror(t: torch.Tensor, widths=None) -> torch.Tensor:
    """``t`` (B x ... x W) with each item mirrored left-right within its first ``widths[i]`` columns,
    the image's own; the padding after them stays where it is. ``widths`` None: all W columns (a
    plain flip)."""
    if widths is None:
        return t.flip(-1)
    n, cols = t.shape[0], t.shape[-1]
    if len(widths) != n:
        raise ValueError(f"mirror: {len(widths)} widths for a batch of {n}")
    w = torch.as_tensor(list(widths), device=t.device).view(n, *([1] * (t.ndim - 1)))
    j = torch.arange(cols, device=t.device)
    idx = torch.where(j < w, w - 1 - j, j).expand(t.shape)
    return torch.gather(t, -1, idx)


def mirror_grid(t: torch.Tensor, widths, size: int) -> torch.Tensor:
    """``t`` (B x ... x R), a map over the ``size`` x ``size`` input at R cells a side (the head's mask),
    mirrored left-right about each image's own middle: its first ``widths[i]`` input columns, as
    ``mirror`` mirrors the input; the padding after them stays. Where an image ends inside a cell (SAM's
    1024 input on a 256 grid: 683 columns are 170.75 cells) each mirrored cell is interpolated between the
    two its mirror image falls on (mirrored within whole cells it moved by up to half a cell). ``widths``
    None: a plain flip."""
    if widths is None:
        return t.flip(-1)
    res = t.shape[-1]
    cells = [int(w) * res / size for w in widths]
    if all(c.is_integer() for c in cells):
        return mirror(t, [int(c) for c in cells])
    if len(cells) != t.shape[0]:
        raise ValueError(f"mirror_grid: {len(cells)} widths for a batch of {t.shape[0]}")
    out = t.clone()
    j = torch.arange(res, device=t.device, dtype=torch.float64)
    for i, c in enumerate(cells):
        cover = math.ceil(c)  # cell k's centre, k + 0.5 cells in, mirrors to c - k - 0.5: index c - k - 1
        src = (c - 1 - j[:cover]).clamp(0, cover - 1)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=cover - 1)
        frac = (src - lo).to(t.dtype)
        out[i, ..., :cover] = t[i, ..., lo] * (1 - frac) + t[i, ..., hi] * frac
    return out


def upsample_logits(logits: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Head logits (..., R, R) -> cropped to the valid region at size S, (..., h, w)."""
    x = logits.float()
    lead = x.shape[:-2]
    x = x.reshape(-1, 1, *x.shape[-2:])
    if x.shape[-1] != geom.size:
        x = F.interpolate(x, size=(geom.size, geom.size), mode="bilinear", align_corners=False)
    h, w = geom.resized
    return x[..., :h, :w].reshape(*lead, h, w)


def _full_size(logits: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """Mask logits (R x R) -> float32 logits of exactly geom.height x geom.width (bilinear)."""
    crop = upsample_logits(logits, geom)[None, None]
    return F.interpolate(crop, size=(geom.height, geom.width), mode="bilinear", align_corners=False)[0, 0]


def _cut(threshold: float) -> float:
    return math.log(threshold / (1 - threshold))


def postprocess_with_logits(logits: torch.Tensor, geom: Geometry,
                            threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``postprocess``'s mask and, from the same resize, the float16 full-size logits it thresholds
    (their sigmoid is the lesion probability). Logits rather than probabilities: float16 keeps both
    tails, where probabilities near 1 would round to 1, and their sign, the mask at threshold 0.5 (a
    logit too small for float16, within 6e-8 of 0, is stored as its smallest number of the same sign,
    not as 0). For ``--logits`` (ensembling; the segmentation BCE in evaluation): one full-size copy,
    no banding."""
    full = _full_size(logits, geom).numpy()
    half = full.astype(np.float16)
    flushed = (half == 0) & (full != 0)
    if flushed.any():
        half[flushed] = np.copysign(np.float16(2.0 ** -24), full[flushed])
    return (full > _cut(threshold)).astype(np.uint8), half


def postprocess(logits: torch.Tensor, geom: Geometry, threshold: float = 0.5,
                band_rows: int = 1024) -> np.ndarray:
    """Mask logits (R x R) -> uint8 {0,1} mask of exactly geom.height x geom.width.

    Large outputs are resized in horizontal bands of ``band_rows`` rows, so a 10000 x 10000 input
    never holds a full-size float copy.
    """
    cut = _cut(threshold)
    H, W = geom.height, geom.width
    if H * W <= 2048 * 2048:
        return (_full_size(logits, geom) > cut).numpy().astype(np.uint8)
    crop = upsample_logits(logits, geom)[None, None]  # 1,1,h,w
    h = crop.shape[-2]
    cols = F.interpolate(crop, size=(h, W), mode="bilinear", align_corners=False)[0, 0]  # h x W
    out = np.empty((H, W), np.uint8)
    for r0 in range(0, H, band_rows):
        r1 = min(H, r0 + band_rows)
        # bilinear rows, the same mapping as F.interpolate(align_corners=False)
        ys = ((torch.arange(r0, r1, dtype=torch.float64) + 0.5) * h / H - 0.5).clamp(min=0)
        y0 = ys.floor().long().clamp(max=h - 1)
        y1 = (y0 + 1).clamp(max=h - 1)
        wy = (ys - y0).float()[:, None]
        rows = cols[y0] * (1 - wy) + cols[y1] * wy
        out[r0:r1] = (rows > cut).numpy()
    return out


def keep_largest_component(binary: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a 2-D boolean mask (ties: the first label)."""
    labels, n = ndimage.label(binary)
    if n <= 1:
        return binary
    sizes = ndimage.sum_labels(binary, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))
