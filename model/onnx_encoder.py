"""A frozen encoder through ONNX Runtime on CPU (fp32), behind the same interface as the module.

Why: on a CPU the LiteMedSAM encoder is most of the time per image, and fp32 eager PyTorch is
close to what its GEMMs allow; ONNX Runtime fuses the attention, GELU and layer-norm graphs and
ran the same encoder 1.5x faster on the 2-core AVX-512 development machine (0.56 -> 0.37
s/image at batch 8, session 7), with outputs equal to 3e-6 (tested in test/test_onnx_encoder.py).
It was the CPU default until session 17. Since then PyTorch's own encoder runs its attention on
the fused kernel and its GELUs inside oneDNN's convolutions and linears, and is the faster of the
two (13 % end to end on 64 real images, the same masks), so this is the opt-in ``--runtime onnx``.
bf16 would be faster still but moves the default model's masks beyond tolerance (model/predictor.py).

The ONNX graph is exported once per encoder state (``torch.onnx.export``, TorchScript exporter,
a few seconds) and kept in a cache folder, keyed by a digest of the weights and one of the code
that runs them (this package's layer sources and torch's version: an upgraded package exports
again, not the old encoder's graph): ``$PFSAM_CACHE``, else
``$XDG_CACHE_HOME/pfsam-bus``, else ``~/.cache/pfsam-bus``. The container exports it at build time
(Dockerfile). A cache folder that cannot be written is not an error: the graph then lives in memory
for the process. Only encoders whose stage features no head needs are exported (SD-H and MGC-A).

ONNX Runtime's Linux wheels (1.32) carry Microsoft's telemetry client: on first use it writes a
device id and an event database under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime`` and later
looks up ``mobile.events.data.microsoft.com``, its upload endpoint (seen with strace, session 33; the
lookup failed there, so no upload was seen). A medical
image tool sends nothing anywhere, so onnxruntime is only imported here, after
``ORT_DISABLE_TELEMETRY=1`` is set (the variable is read once, at import: set afterwards, or
``onnxruntime.disable_telemetry_events()``, still leaves the files). A value the user set is kept.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from .atomic_files import atomic_path

OPSET = 17
_PACKAGE = Path(__file__).resolve().parent  # model/: the layers whose source a graph's name records


class OnnxUnavailable(RuntimeError):
    """onnxruntime (or, for a first export, onnx) is not installed, or the export failed."""


def import_onnxruntime():
    """The onnxruntime module, its telemetry off (module docstring); ``OnnxUnavailable`` without it."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxUnavailable("onnxruntime is not installed") from exc
    return onnxruntime


def cache_dir() -> Path:
    if os.environ.get("PFSAM_CACHE"):
        return Path(os.environ["PFSAM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pfsam-bus"


def code_digest(module: nn.Module) -> str:
    """Digest of the code the module runs: the source files of this package that define its layers
    (and the files they list in ``CODE_FILES``), and torch's version (its exporter and its layers).
    A graph exported from other code is another graph, whatever the weights."""
    h = hashlib.sha256(torch.__version__.encode())
    files = {Path(__file__).resolve()}  # the export itself (its wrapper, opset, axes)
    for m in module.modules():
        source = sys.modules.get(type(m).__module__)
        path = getattr(source, "__file__", None)
        if path and Path(path).resolve().is_relative_to(_PACKAGE):
            files.add(Path(path).resolve())
            files.update(Path(f).resolve() for f in getattr(source, "CODE_FILES", ()))
    for path in sorted(files):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def state_digest(module: nn.Module) -> str:
    """Digest of the module's parameters and buffers (names, shapes, values)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:20]


class _EmbeddingOnly(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return self.encoder(x)[0]


def export_bytes(encoder: nn.Module, input_size: int) -> bytes:
    """The encoder's embedding as an ONNX graph with a dynamic batch dimension."""
    try:
        import onnx  # noqa: F401 - the exporter needs it
    except ImportError as exc:
        raise OnnxUnavailable("exporting the encoder to ONNX needs the 'onnx' package") from exc
    buf = io.BytesIO()
    x = torch.rand(2, 3, input_size, input_size)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-level branches on shapes
            torch.onnx.export(_EmbeddingOnly(encoder), (x,), buf, dynamo=False, opset_version=OPSET,
                              input_names=["image"], output_names=["embedding"],
                              dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}})
    except Exception as exc:  # noqa: BLE001 - any exporter failure means: stay with PyTorch
        raise OnnxUnavailable(f"ONNX export failed: {exc}") from exc
    finally:
        encoder.train(was_training)
    return buf.getvalue()


def onnx_graph(encoder: nn.Module, name: str, input_size: int, log=None) -> bytes | Path:
    """The cached graph file of this encoder state, exported first if missing (in memory only when
    the cache folder cannot be written)."""
    path = cache_dir() / f"{name}-{input_size}-{state_digest(encoder)}-{code_digest(encoder)}-opset{OPSET}.onnx"
    if path.is_file():
        return path
    if log:
        log(f"exporting the {name} encoder to ONNX once (a few seconds; cached in {path.parent})")
    data = export_bytes(encoder, input_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
        return path
    except OSError as exc:
        if log:
            log(f"the ONNX graph cannot be cached there ({exc.strerror or exc}): it is kept in memory for "
                "this process only (set PFSAM_CACHE to a writable folder)")
        return data


class OnnxEncoder(nn.Module):
    """``forward(x) -> (embedding, [])`` like the encoder it was exported from (fp32, CPU)."""

    def __init__(self, graph: bytes | Path, threads: int | None = None):
        super().__init__()
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        source = str(graph) if isinstance(graph, Path) else graph
        self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        self.graph = graph if isinstance(graph, Path) else None

    def forward(self, x: torch.Tensor):
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (emb,) = self.session.run(["embedding"], {"image": arr})
        return torch.from_numpy(emb), []


def onnx_encoder(encoder: nn.Module, name: str, input_size: int, log=None) -> OnnxEncoder:
    """The encoder through ONNX Runtime; ``OnnxUnavailable`` when that cannot be done here."""
    import_onnxruntime()
    return OnnxEncoder(onnx_graph(encoder, name, input_size, log))
