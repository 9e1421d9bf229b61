"""The fused relative-position attention kernels (model/encoders/relpos_attention.py: ``rows`` for
the global blocks, ``tile`` for small grids such as SAM's 14 x 14 windows) against the additive-mask
form, run in Triton's interpreter on CPU (no GPU needed). The interpreter has to be
chosen before Triton is imported, hence a child process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import torch
import torch.nn.functional as F
from model.encoders.relpos_attention import launch

def reference(q, k, v, eh, ew, scale):
    b, heads, n, _ = q.shape
    bias = (eh[..., :, None] + ew[..., None, :]).reshape(b, heads, n, n)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale).transpose(1, 2)

out = {}
torch.manual_seed(0)
for gh, gw, d, block_m in json.loads(sys.argv[1]):
    b, heads, n = 2, 3, gh * gw
    qkv = torch.randn(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)  # strided views, as Attention makes them
    q, k, v = qkv.unbind(0)
    eh, ew = 2 * torch.randn(b, heads, n, gh), 2 * torch.randn(b, heads, n, gw)
    res = launch(q, k, v, eh, ew, d ** -0.5, block_m=block_m)
    ref = reference(q, k, v, eh, ew, d ** -0.5)
    eh_t = eh.transpose(-1, -2).contiguous().transpose(-1, -2)  # other strides, other scale
    res2 = launch(q, k, v, eh_t, ew, 0.5, block_m=block_m)
    ref2 = reference(q, k, v, eh, ew, 0.5)
    out[f"{gh}x{gw}x{d}"] = {"shape": list(res.shape), "contiguous": res.is_contiguous(),
                             "err": float((res - ref).abs().max()), "err2": float((res2 - ref2).abs().max()),
                             "ref_scale": float(ref.abs().max())}

# the Attention module's fused form (bias terms reshaped, scale, output layout) against its mask form:
# a 16 x 16 grid (rows kernel) and a 14 x 14 window block (tile kernel, through Block's partition)
from model.encoders import relpos_attention
from model.encoders.sam_vit import Attention, Block

relpos_attention.supported = lambda q, gh, gw: relpos_attention.form(gh, gw) is not None  # CPU, fp32 here
for name, module, x in (("module", Attention(64, 4, (16, 16)), torch.randn(2, 16, 16, 64)),
                        ("window_block", Block(64, 4, 14, 32), torch.randn(1, 32, 32, 64))):
    module.eval()
    attn = module if isinstance(module, Attention) else module.attn
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
        attn.impl = "bias"
        ref = module(x)
        attn.impl = "fused"
        res = module(x)
        torch._dynamo.reset()  # torch.compile takes the kernel's custom op whole, as one graph
        compiled = torch.compile(module, backend="eager", fullgraph=True)(x)
    out[name] = {"err": float((res - ref).abs().max()), "ref_scale": float(ref.abs().max()),
                 "compiled_err": float((compiled - res).abs().max())}
print(json.dumps(out))
"""


@pytest.mark.slow  # Triton's interpreter: 30 s on a slow 2-core host
def test_fused_kernel_equals_the_mask_form():
    cases = [(4, 16, 16, 32), (2, 32, 32, 64),  # rows kernel
             (14, 14, 32, 32), (6, 10, 16, 16), (7, 7, 64, 64)]  # tile kernel: SAM's windows, odd grids
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for gh, gw, d, _ in cases:
        r = res[f"{gh}x{gw}x{d}"]
        assert r["shape"] == [2, gh * gw, 3, d] and r["contiguous"]
        assert r["ref_scale"] > 0.5
        assert r["err"] < 2e-5 and r["err2"] < 2e-5, r
    for name in ("module", "window_block"):
        assert res[name]["ref_scale"] > 0.1 and res[name]["err"] < 2e-5, (name, res[name])
        assert res[name]["compiled_err"] < 1e-6, (name, res[name])


def test_available_needs_a_working_c_toolchain(monkeypatch, tmp_path):
    """Triton builds its launcher, a Python extension, on first use: without a C compiler, or with
    one that cannot build against Python's headers, the kernels are not offered and the augmented and
    mask forms run instead of failing on the first batch."""
    import shutil

    from model import toolchain
    from model.encoders import relpos_attention as ra

    def fresh():
        ra.available.cache_clear()
        toolchain.build_problem.cache_clear()

    monkeypatch.delenv("CC", raising=False)
    real_which = shutil.which
    try:
        monkeypatch.setattr(shutil, "which", lambda name: None)
        fresh()
        assert not ra.available()
        monkeypatch.setattr(shutil, "which", real_which)
        monkeypatch.setattr(toolchain, "python_include_dir", lambda: str(tmp_path))  # no Python.h
        fresh()
        assert not ra.available()
        if real_which("gcc"):
            monkeypatch.undo()
            monkeypatch.delenv("CC", raising=False)
            fresh()
            assert ra.available() == (ra.HAVE_TRITON and ra.HAVE_CUSTOM_OP)
    finally:
        fresh()


def test_supported_shapes():
    from model.encoders.relpos_attention import supported

    cpu = torch.zeros(1, 12, 4096, 64, dtype=torch.bfloat16)
    assert not supported(cpu, 64, 64)  # CUDA only
    meta = torch.empty(1, 12, 4096, 64, dtype=torch.bfloat16, device="meta")
    assert not supported(meta, 64, 64)


def test_gpus_without_native_bf16_get_neither_bf16_nor_the_fused_kernel(monkeypatch):
    """A T4 (compute capability 7.5, Grand Challenge's GPU) only emulates bf16, and torch's
    is_bf16_supported() says yes to emulation: precision auto stays fp32 there, and the fused
    kernel (measured on Hopper only) is not offered; 8.0+ gets both."""
    from types import SimpleNamespace

    import warnings

    from model.encoders import relpos_attention as ra
    from model.predictor import bf16_supported, use_bf16

    cuda = torch.device("cuda")
    q = SimpleNamespace(device=cuda, dtype=torch.bfloat16, shape=(2, 12, 4096, 64))
    monkeypatch.setattr(ra, "available", lambda: True)
    for capability, native in (((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None, c=capability: SimpleNamespace(major=c[0], minor=c[1]))
        assert bf16_supported(cuda) is native and use_bf16("auto", cuda) is native
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert use_bf16("bf16", cuda) and not use_bf16("fp32", cuda)  # an explicit choice stands
        # ... with a warning where bf16 is only emulated
        assert ["on a CUDA without native bf16 (compute capability 8.0+): it is emulated" in str(w.message)
                for w in caught] == ([] if native else [True])
        assert ra.supported(q, 64, 64) is native
        assert not ra.supported(q, 48, 48)  # shapes are still checked first


def test_kernel_forms():
    """The rows kernel for power-of-two grid widths (SAM's 64 x 64 global grid), the tile kernel for
    small grids of any shape (the 14 x 14 windows), neither for large odd grids (ViT at other sizes)."""
    from model.encoders.relpos_attention import form

    assert form(64, 64) == "rows" and form(32, 32) == "rows" and form(8, 16) == "rows"
    assert form(14, 14) == "tile" and form(7, 7) == "tile" and form(16, 16) == "rows"
    assert form(6, 10) == "tile" and form(16, 17) is None and form(48, 48) is None


def _tuning_keys(tuned) -> list[str]:
    """The argument names an autotuner keys its choice on (``keys`` in Triton 3.8, torch 2.14.1's; Triton
    3.1, which Cog's torch 2.5.1 brings, keeps only their indices)."""
    if hasattr(tuned, "keys"):
        return list(tuned.keys)
    return [tuned.arg_names[i] for i in tuned.key_idx]


def test_autotuned_kernel_keeps_its_choice_across_processes():
    """The six configs are tuned once per shape, and the choice goes to Triton's on-disk cache
    where this Triton supports that (a later process skips the ~14 s of tuning)."""
    import inspect

    import triton

    from model.encoders.relpos_attention import kernel

    tuned = kernel(tuned=True)
    assert len(tuned.configs) == 6 and _tuning_keys(tuned) == ["HEADS", "GH", "GW", "D"]
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        assert tuned.cache_results
    assert kernel(tuned=False) is not tuned and kernel(tuned=True) is tuned


def test_tile_kernel_is_autotuned_per_shape():
    from model.encoders.relpos_attention import kernel

    tuned = kernel(tuned=True, shape="tile")
    assert tuned is not kernel(tuned=True, shape="rows") and _tuning_keys(tuned) == ["HEADS", "GH", "GW", "D"]
    assert {c.kwargs["BLOCK_M"] for c in tuned.configs} == {32, 64}


def test_the_custom_ops_fake_gives_the_kernels_output_layout():
    """torch.compile traces ``relpos_attention`` through its fake implementation and plans the
    compiled graph's buffers from it: it must give the kernel's (B, N, heads, D) output, the layout
    ``launch`` writes and ``Attention`` reshapes (the kernel itself: test_fused_kernel_equals_the_mask_form)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from model.encoders import relpos_attention as ra

    if not ra.HAVE_CUSTOM_OP:
        pytest.skip("torch without custom ops: relpos_attention is a plain function")
    b, heads, gh, gw, d = 2, 3, 4, 16, 32
    n = gh * gw
    with FakeTensorMode():
        q, k, v = (torch.empty(b, heads, n, d, dtype=torch.bfloat16) for _ in range(3))
        out = ra.relpos_attention(q, k, v, torch.empty(b, heads, n, gh), torch.empty(b, heads, n, gw), d ** -0.5)
    assert tuple(out.shape) == (b, n, heads, d) and out.dtype == torch.bfloat16
