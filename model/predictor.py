"""Ensemble inference: load an ensemble directory, batch images, run each shared encoder once.

Segmentation and classification are weighted averages of the members' probabilities
(``ensemble.json``: by default the mask comes from SD-H and the class from MGC-A). Members whose
encoders are frozen and identical share one encoder module and one forward pass per batch.
Precision ``auto``: bf16 autocast on CUDA for encoders whose outputs hold under it (SAM ViTs),
fp32 otherwise (LiteMedSAM, and every encoder on CPU); ``bf16`` forces it. Optional
horizontal-flip TTA: the image mirrored within its own columns (``preprocessing.mirror``: the padding
stays at the right, as in training), its outputs mirrored back and averaged with the plain view's.
Class prior (``postprocess.class_prior``, or ``class_prior=`` to override it): ``trained`` gives the
classification members' probabilities as they learnt them, under their training's class-weighted
sampling; ``data`` divides those weights out (``checkpoint.class_sampling_weights``).
"""
from __future__ import annotations

import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import CLASS_NAMES
from .allocator import keep_freed_memory
from .checkpoint import CLASS_PRIORS, class_sampling_weights, encoder_key, load_model, read_config, read_ensemble
from .encoders import get_spec
from .encoders.weights import checkpoint_reads_shared
from .io_threads import io_pool
from .network import PFSAMNet
from .onnx_encoder import OnnxEncoder, OnnxUnavailable, onnx_encoder
from .preprocessing import (Geometry, grid_cover, keep_largest_component, mirror, mirror_grid, postprocess,
                            postprocess_with_logits, preprocess)
from .refine import BoxRefiner
from .toolchain import build_problem

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights" / "default"
RUNTIMES = ("auto", "torch", "onnx")


@dataclass
class Prediction:
    mask: np.ndarray  # uint8 {0,1}, exactly the input's H x W
    probabilities: dict[str, float]
    label: str
    extra: dict = field(default_factory=dict)


def resolve_device(device: str = "auto") -> torch.device:
    device = {"gpu": "cuda"}.get(device, device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():  # cuda:N too
        raise RuntimeError(f"device {device!r} requested but no CUDA GPU is available (use auto or cpu)")
    return torch.device(device)


def bf16_supported(device: torch.device) -> bool:
    """Native bf16: CUDA compute capability 8.0+ (a T4, 7.5, only emulates it, slowly; torch's
    ``is_bf16_supported()`` counts emulation), or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).major >= 8
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()) or \
        bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def use_bf16(precision: str, device: torch.device, cpu_auto: bool = True) -> bool:
    """``auto``: bf16 on CUDA GPUs with native bf16 (8.0+), and on CPUs with native bf16 (AVX512-BF16/AMX) when ``cpu_auto``.

    Training and the embedding cache use ``cpu_auto=True`` (bf16 features are as good to learn
    from); the predictor uses ``cpu_auto=False``: on CPU, bf16 moves the default model's masks
    further than the stated tolerance (Dice 0.94-0.98 against fp32 on real images, < 0.99; the
    LiteMedSAM encoder's embedding changes by 6 %), so bf16 inference on CPU is opt-in."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    if precision == "auto":
        return bf16_supported(device) and (device.type == "cuda" or cpu_auto)
    if precision == "bf16" and not bf16_supported(device):
        warnings.warn(f"bf16 was asked for on a {device.type.upper()} without native bf16 "
                      f"({'compute capability 8.0+' if device.type == 'cuda' else 'AVX512-BF16 or AMX'}): it is "
                      f"emulated, many times slower than fp32 (--precision auto or fp32 avoids it)",
                      RuntimeWarning, stacklevel=2)
    return precision == "bf16"


def encoder_bf16(precision: str, device: torch.device, encoder_name: str) -> bool:
    """Training's pass through a frozen encoder (the embedding cache, or each batch without one): under
    ``auto`` bf16 only for an encoder that inference runs in bf16 too (``EncoderSpec.bf16_inference``),
    so the heads learn from the embeddings the container will give them (LiteMedSAM's bf16 embedding
    differs from its fp32 one by about 5 %); ``bf16`` forces it, ``fp32`` never."""
    if precision == "auto" and not get_spec(encoder_name).bf16_inference:
        return False
    return use_bf16(precision, device)


class GPUOutOfMemoryError(RuntimeError):
    """Even a single image does not fit in the GPU's free memory; the message says what to do."""


def free_gpu_memory() -> None:
    import gc

    gc.collect()  # tensors of the failed pass may still be referenced from its traceback's frames
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _to_onnx(members: dict[str, PFSAMNet], force: bool) -> None:
    """Swap each distinct encoder that allows it for its ONNX Runtime twin (in place)."""
    groups: dict[int, list[PFSAMNet]] = {}
    for m in members.values():
        groups.setdefault(id(m.encoder), []).append(m)
    for ms in groups.values():
        name = ms[0].config["encoder"]["name"]
        if any(m.needs_features for m in ms):  # the graph exports the embedding only
            if force:
                raise OnnxUnavailable(f"runtime 'onnx': the {name} encoder's stage features are needed (UNet-H)")
            continue
        if not (force or get_spec(name).onnx_on_cpu):
            continue
        try:
            ort = onnx_encoder(ms[0].encoder, name, ms[0].input_size,
                               log=lambda msg: print(msg, file=sys.stderr, flush=True))
        except OnnxUnavailable:
            if force:
                raise
            continue
        for m in ms:
            m.encoder = ort


def fit_in_gpu_memory(fn, batch, join, first_size: int | None = None):
    """``fn(batch)``, but a batch that runs out of GPU memory is retried in two halves (after emptying
    the CUDA cache), recursively down to single items, and ``join(first, second)`` puts the halves'
    results together; a single item that still does not fit raises ``GPUOutOfMemoryError``."""
    n = len(batch)
    first_size = first_size or n
    try:
        return fn(batch)
    except torch.cuda.OutOfMemoryError:
        pass  # handled below, outside the except block, so the failed pass's tensors can be freed
    free_gpu_memory()
    if n == 1:
        raise GPUOutOfMemoryError(
            f"out of GPU memory at batch size {first_size} (retried in halves down to single images, "
            f"which did not fit either); use --batch-size 1 or -d cpu")
    half = (n + 1) // 2
    return join(fit_in_gpu_memory(fn, batch[:half], join, first_size),
                fit_in_gpu_memory(fn, batch[half:], join, first_size))


class Predictor:
    def __init__(self, members: dict[str, PFSAMNet], spec: dict, device: torch.device,
                 batch_size: int = 4, tta: bool = False, precision: str = "auto", class_prior: str | None = None):
        self.members = members
        self.spec = spec
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.tta = tta
        self.precision = precision
        self.keep_logits = False  # Prediction.extra["logits"] at full size (run(logits=True): --logits)
        self.class_names = CLASS_NAMES
        self.seg_w = {k: float(v) for k, v in spec["segmentation_weights"].items() if float(v) > 0}
        self.cls_w = {k: float(v) for k, v in spec["classification_weights"].items() if float(v) > 0}
        self.post = spec["postprocess"]
        used = set(self.seg_w) | set(self.cls_w)
        self.members = {k: m for k, m in members.items() if k in used}
        inputs = {(m.input_size, m.normalization) for m in self.members.values()}
        if len(inputs) != 1:
            raise ValueError(f"ensemble members need one input size and normalisation, found {sorted(inputs)}")
        (self.input_size, self.normalization), = inputs
        # "auto" runs bf16 only where it keeps the outputs (EncoderSpec.bf16_inference); "bf16" forces it
        auto_ok = all(get_spec(m.config["encoder"]["name"]).bf16_inference for m in self.members.values())
        self.bf16 = use_bf16(precision, device, cpu_auto=False) and (precision == "bf16" or auto_ok)
        self.refiner: BoxRefiner | None = None
        self.set_refine(self.post.get("refine"))
        # log of each classification member's sampling weights: subtracted from its class logits
        # under class_prior "data" (softmax(z - log w) = p / w, renormalised: Bayes' rule)
        self._log_sampling = {k: torch.tensor(class_sampling_weights(self.members[k].config), device=device).log()
                              for k in self.cls_w}
        self.class_prior = class_prior or self.post.get("class_prior", "trained")
        # threads for decoding, pre- and postprocessing beside the model (model.inference.run
        # prefetches the next batch; predict maps its per-image steps): 0 on CPU, where the model
        # already uses every core; on CUDA the CPU work would otherwise leave the GPU idle
        self.io_threads = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
        self._pool: tuple[int, ThreadPoolExecutor] | None = None

    @property
    def class_prior(self) -> str:
        """``trained`` or ``data`` (module docstring); settable, as ``tta`` is, between predictions."""
        return self._class_prior

    @class_prior.setter
    def class_prior(self, value: str) -> None:
        if value not in CLASS_PRIORS:
            raise ValueError(f"class_prior must be one of {', '.join(CLASS_PRIORS)}, not {value!r}")
        self._class_prior = value

    @property
    def encoder_runtime(self) -> str:
        """"onnxruntime" when an encoder runs through ONNX Runtime (model/onnx_encoder.py), else "torch"."""
        return "onnxruntime" if any(isinstance(m.encoder, OnnxEncoder) for m in self.members.values()) else "torch"

    @property
    def seg_member(self) -> str:
        """The first segmentation member (``segmentation_weights``' order): box refinement decodes its embedding."""
        return next(iter(self.seg_w))

    @property
    def seg_encoder_name(self) -> str:
        """The encoder of ``seg_member``: the one whose decoder box refinement needs."""
        return self.members[self.seg_member].config["encoder"]["name"]

    def set_refine(self, spec: dict | None) -> None:
        """Box refinement (``model/refine.py``) from its ``ensemble.json`` spec, or None for off."""
        self.refiner = None
        if spec:
            self.refiner = BoxRefiner.from_spec({"threshold": self.post.get("threshold", 0.5), **spec},
                                                self.seg_encoder_name, self.input_size).to(self.device)

    @classmethod
    @checkpoint_reads_shared()  # the encoder and the box refiner read LiteMedSAM's file once
    def from_dir(cls, model_dir: str | Path = DEFAULT_MODEL_DIR, device: str = "auto", batch_size: int = 4,
                 tta: bool = False, precision: str = "auto", encoder_checkpoint=None,
                 compile_backend: str | None = None, runtime: str = "auto",
                 class_prior: str | None = None, keep_freed: bool = False) -> "Predictor":
        """``keep_freed``: on CPU, keep freed memory in the process heap (``model/allocator.py``: about 2x
        faster batches, for the rest of the process, which then holds its largest working set; the
        command-line tools and the container ask for it through ``model.inference.load_predictor``, a
        notebook or another program building a predictor does not get it unasked).
        ``compile_backend``: ``torch.compile`` each distinct encoder with this backend ("inductor"
        for speed on CUDA; the first batch of each new batch size then takes a while to compile).
        ``runtime``: where the encoder runs. ``auto``: ONNX Runtime for encoders whose spec asks for it
        (``EncoderSpec.onnx_on_cpu``; none does now) on CPU in fp32 when onnxruntime is installed, else
        PyTorch; ``onnx``: ONNX Runtime (on the CPU, which ``device="auto"`` then means) or an error;
        ``torch``: PyTorch (model/onnx_encoder.py).
        ``class_prior``: ``trained`` or ``data`` (module docstring); None: the ensemble's."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, not {runtime!r}")
        if runtime == "onnx" and compile_backend:  # torch.compile of ONNX Runtime's module failed every batch
            raise ValueError("torch.compile runs the encoder in PyTorch: not with runtime 'onnx'")
        # ONNX Runtime runs on the CPU: there "auto" is the CPU, as on a host without a GPU
        dev = resolve_device("cpu" if runtime == "onnx" and device == "auto" else device)
        if compile_backend == "inductor":  # its kernels are built with C (CUDA) or C++ (CPU) on first use
            problem = build_problem("c" if dev.type == "cuda" else "c++")
            if problem:
                raise ValueError(f"torch.compile (inductor) needs a compiler that builds Python extensions, "
                                 f"and here {problem}; run without --compile")
            from torch._inductor.runtime.cache_dir_utils import cache_dir

            if any(c.isspace() for c in cache_dir()):  # its C++ build commands take the path unquoted
                raise ValueError(f"torch.compile (inductor) builds its code in {cache_dir()}, whose path holds a "
                                 "space, which its compiler commands do not take (every image would fail); set "
                                 "TORCHINDUCTOR_CACHE_DIR to a folder without one, or run without --compile")
        model_dir = Path(model_dir)
        spec = read_ensemble(model_dir)
        shared: dict[str, torch.nn.Module] = {}
        members = {}
        for name, sub in spec["members"].items():  # a shareable encoder is built (and verified) once
            mdir = model_dir / sub
            key = encoder_key(read_config(mdir))
            model = load_model(mdir, device="cpu", encoder=shared.get(key), encoder_checkpoint=encoder_checkpoint)
            if key is not None:
                shared.setdefault(key, model.encoder)
            members[name] = model
        for enc in {id(m.encoder): m.encoder for m in members.values()}.values():
            if hasattr(enc, "fuse"):
                enc.fuse()  # fold BatchNorm into convs: identical outputs, faster
        for m in members.values():
            m.to(dev).eval()
            if dev.type == "cpu":
                m.to_cpu_layout()
        cpu_fp32 = dev.type == "cpu" and precision != "bf16"
        if runtime == "onnx" and not cpu_fp32:
            raise ValueError("runtime 'onnx' runs the encoder on CPU in fp32 only (device cpu, precision auto/fp32)")
        if runtime == "onnx" or (runtime == "auto" and cpu_fp32 and not compile_backend):
            _to_onnx(members, force=runtime == "onnx")
        if cpu_fp32 and not compile_backend:  # GELU inside the convs and linears (model/encoders/tiny_vit.py)
            for enc in {id(m.encoder): m.encoder for m in members.values()}.values():
                if hasattr(enc, "use_onednn_postops"):
                    enc.use_onednn_postops()
        if compile_backend:
            compiled: dict[int, torch.nn.Module] = {}
            for m in members.values():
                key = id(m.encoder)
                if key not in compiled:
                    compiled[key] = torch.compile(m.encoder, backend=compile_backend, dynamic=False)
                m.encoder = compiled[key]
        if dev.type == "cpu" and keep_freed:
            keep_freed_memory()  # no page faults per batch: about 2x faster on CPU (model/allocator.py)
        return cls(members, spec, dev, batch_size, tta, precision, class_prior)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, widths=None, heights=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Network inputs (B x 3 x S x S) -> (mask probabilities B x R x R, class probabilities B x 3).
        ``widths``: each image's columns in its input (``Geometry.resized[1]``; the rest is padding),
        which TTA mirrors within; None: all S columns. ``heights``: its rows (``Geometry.resized[0]``);
        with both, box refinement looks for the lesion in the image alone, not in the padding."""
        return self.combine_views(self.encode_views(x, widths), widths, heights)

    def encode_views(self, x: torch.Tensor, widths=None) -> list:
        """The encoder outputs of x (and with TTA of its mirror image, ``mirror(x, widths)``), as
        ``encoded(model)`` functions for ``combine``: each runs one pass per distinct encoder module, on
        first use, and keeps it (``training.tune`` combines one batch's encoding under several
        postprocess options)."""
        x = x.to(self.device, non_blocking=True)
        views = []
        for v in ([x, mirror(x, widths)] if self.tta else [x]):
            if self.device.type == "cpu" and self.encoder_runtime == "torch":  # ONNX Runtime takes NCHW as it is
                v = v.contiguous(memory_format=torch.channels_last)
            cache: dict[int, tuple] = {}

            def encoded(model, v=v, cache=cache):  # called inside combine (inference mode)
                key = id(model.encoder)
                if key not in cache:
                    with self._autocast():
                        cache[key] = model.encode(v)
                return cache[key]

            views.append(encoded)
        return views

    @torch.inference_mode()
    def combine_views(self, views: list, widths=None, heights=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``combine`` over ``encode_views``' views (the same ``widths``), the mirrored view's mask
        mirrored back, averaged."""
        seg_sum, cls_sum = 0.0, 0.0
        for vi, encoded in enumerate(views):
            seg, cls = self.combine(encoded, widths, heights)  # a mirrored image keeps its padding where it was
            if vi == 1:
                seg = mirror_grid(seg, widths, self.input_size)
            seg_sum = seg_sum + seg
            cls_sum = cls_sum + cls
        return (seg_sum / len(views)).cpu(), (cls_sum / len(views)).cpu()

    @torch.inference_mode()
    def combine(self, encoded, widths=None, heights=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted member outputs from encoder outputs; ``encoded(model) -> (embedding, features)``;
        ``widths`` and ``heights``: ``forward``'s."""
        cls = 0.0
        segs = []
        seg_embedding = None
        with self._autocast():
            for name, model in self.members.items():
                emb, feats = encoded(model)
                out = model.heads(emb, feats if model.needs_features else None)
                if name in self.seg_w:
                    segs.append((self.seg_w[name], torch.sigmoid(out["mask_logits"].float())[:, 0]))
                    if name == self.seg_member:  # the member whose encoder the refiner was checked for
                        seg_embedding = emb
                if name in self.cls_w:
                    logits = out["class_logits"].float()
                    if self.class_prior == "data":
                        logits = logits - self._log_sampling[name]
                    cls = cls + self.cls_w[name] * torch.softmax(logits, -1)
        # members whose heads give other grids (SD-H's blocks, another encoder's) on the finest of them:
        # each grid covers the same padded input square
        res = max(p.shape[-1] for _, p in segs)
        seg = sum(w * (p if p.shape[-1] == res else
                       F.interpolate(p[:, None], size=(res, res), mode="bilinear", align_corners=False)[:, 0])
                  for w, p in segs) / sum(self.seg_w.values())
        if self.refiner is not None:  # fp32: the decoder's boundaries are what it is there for
            extents = None
            if widths is not None and heights is not None:  # each image's rows and columns in the input
                extents = [(int(h), int(w)) for h, w in zip(heights, widths)]
            seg = self.refiner(seg_embedding, seg, extents)
        return seg, cls / sum(self.cls_w.values())

    def finish(self, prob: torch.Tensor, cls: torch.Tensor, geom: Geometry) -> Prediction:
        """One image's mask probabilities (R x R) and class probabilities -> its Prediction
        (postprocess options of ensemble.json, resize to the input's exact size)."""
        probs = {n: float(p) for n, p in zip(CLASS_NAMES, cls.tolist())}
        label = CLASS_NAMES[int(torch.argmax(cls))]
        thr = float(self.post.get("threshold", 0.5))
        p = prob.clamp(1e-6, 1 - 1e-6)
        if self.post.get("gate_normal") and label == "normal":
            p = torch.full_like(p, 1e-6)
        elif self.post.get("largest_component"):
            binary = (p > thr).numpy()
            res = binary.shape[-1]  # among the image's own cells: a false blob in the padding may not win
            rows, cols = grid_cover(geom.resized, geom.size, res)
            binary[rows:] = False
            binary[:, cols:] = False
            keep = keep_largest_component(binary)
            p = torch.where(torch.from_numpy(keep), p, torch.full_like(p, 1e-6))
        logits = torch.log(p) - torch.log1p(-p)
        if self.keep_logits:  # one resize for the mask and the logits
            mask, full = postprocess_with_logits(logits, geom, threshold=thr)
            return Prediction(mask, probs, label, {"logits": full})
        return Prediction(postprocess(logits, geom, threshold=thr), probs, label)

    def _forward_fitting(self, x: torch.Tensor, widths: list[int],
                         heights: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` through ``fit_in_gpu_memory`` (which halves the range of items it is given)."""
        return fit_in_gpu_memory(lambda r: self.forward(x[r.start:r.stop], widths[r.start:r.stop],
                                                        heights[r.start:r.stop]), range(len(x)),
                                 lambda a, b: (torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])))

    def _map(self, fn, *iterables) -> list:
        if self.io_threads <= 0:
            return list(map(fn, *iterables))
        if self._pool is None or self._pool[0] != self.io_threads:
            if self._pool is not None:
                self._pool[1].shutdown()
            self._pool = (self.io_threads, io_pool(self.io_threads, "pfsam-io"))
        return list(self._pool[1].map(fn, *iterables))

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Predict a list of images (H x W or H x W x C arrays as read by ``model.io``)."""
        if isinstance(images, np.ndarray):  # iterating it would predict each of its rows as an image
            raise TypeError(f"predict takes a list of images, not one array (shape {images.shape}): "
                            "predict([image]) or predict_one(image)")
        results: list[Prediction] = []
        for start in range(0, len(images), self.batch_size):
            batch = self._map(lambda img: preprocess(img, self.input_size, self.normalization),
                              images[start:start + self.batch_size])
            x = torch.stack([b[0] for b in batch])
            seg, cls = self._forward_fitting(x, [b[1].resized[1] for b in batch], [b[1].resized[0] for b in batch])
            results += self._map(lambda i: self.finish(seg[i], cls[i], batch[i][1]), range(len(batch)))
        return results

    def predict_one(self, image: np.ndarray) -> Prediction:
        return self.predict([image])[0]
