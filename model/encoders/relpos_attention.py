"""Fused attention with SAM's decomposed relative-position terms (Triton, CUDA, inference).

SAM's blocks attend over an ``gh x gw`` token grid (64 x 64 for the global blocks at 1024 input,
14 x 14 for the windows) with logits

    s[i, j] = scale * q_i . k_j + eh[i, row(j)] + ew[i, col(j)]

where ``eh`` (N x gh) and ``ew`` (N x gw) are per-query terms (``Attention`` computes them). Two
kernels (``relpos_kernel``), picked by the grid's shape:

* ``rows`` (grid width a power of two, N a multiple of 128: the global blocks): a flash-attention
  loop whose key block is exactly one key row (``gw`` keys) needs only one ``eh`` value per query
  and block and the same ``ew`` tile for every block: the bias costs a column load per block
  instead of a materialised N x N mask (the ``bias`` form) or three times the head size (the
  ``augment`` form). Online softmax in fp32, exp2.
* ``tile`` (any grid of at most ``TILE_MAX_TOKENS`` tokens: the 14 x 14 windows): all keys in one
  tile, the terms added through two small products with one-hots built in registers, one exact
  softmax. It replaces the window blocks' mask, which is as large as q, k and v together.

Both write the output straight into the ``(B, N, heads, head_dim)`` layout that the projection reads.

``relpos_attention`` is a ``torch.library`` custom op, so ``torch.compile`` keeps it as one opaque
kernel. Forward only: ``Attention`` uses it where no gradient is needed. ``supported`` says which
shapes it takes (head size a power of two from 16 to 128; the grid as above; bf16/fp16, CUDA) and
``available`` whether this machine can build it (Triton, torch >= 2.4, a C toolchain that builds
Python extensions: ``model.toolchain``).
Both kernels are tested against the mask form in Triton's interpreter on CPU
(test/test_relpos_attention.py).
"""
from __future__ import annotations

import importlib.util
import inspect

import torch

from ..toolchain import build_problem

LOG2E = 1.4426950408889634
_KERNELS: dict = {}
HAVE_TRITON = importlib.util.find_spec("triton") is not None
HAVE_CUSTOM_OP = hasattr(torch.library, "custom_op")  # torch >= 2.4


def unavailable_reason() -> str | None:
    """Why the kernels cannot run on this machine, or None: they need Triton, torch with custom ops,
    and a C toolchain that builds Python extensions (Triton builds its launcher with it on first
    use: ``toolchain.build_problem``)."""
    if not HAVE_TRITON:
        return "Triton is not installed"
    if not HAVE_CUSTOM_OP:
        return f"torch {torch.__version__} has no custom ops (2.4 or newer has)"
    return build_problem("c")


_AVAILABLE: dict[str, bool] = {}


DYNAMO_CONSTANT_MARK = "_dynamo_marked_constant"  # what torch._dynamo.assume_constant_result sets


def _constant_under_compile(fn):
    """torch.compile calls ``fn`` once while tracing and keeps the result, instead of tracing into it:
    the probe behind ``available`` (``shutil.which``, a compiler run) cannot be traced, and a graph
    break in every attention block's forward splits the compiled encoder into pieces.

    ``torch.compiler.assume_constant_result(fn)`` does this by setting one attribute on ``fn``, but
    it imports dynamo first: 1.1 s of every process's start-up on the development CPU, where nothing
    compiles (a Grand Challenge job starts a process per image). So the attribute is set here
    directly; dynamo reads it when torch.compile runs. test_model checks that the public function
    sets exactly this, and that the encoder compiles as one graph."""
    setattr(fn, DYNAMO_CONSTANT_MARK, True)
    return fn


@_constant_under_compile
def available() -> bool:
    """Whether the kernels can run here (``unavailable_reason``, asked once per process); where
    not, the ``augment`` and mask forms run."""
    if "ok" not in _AVAILABLE:
        _AVAILABLE["ok"] = unavailable_reason() is None
    return _AVAILABLE["ok"]


available.cache_clear = _AVAILABLE.clear  # as an lru_cache's (tests)


def _pow2(x: int, lo: int = 16, hi: int = 128) -> bool:
    return lo <= x <= hi and x & (x - 1) == 0


TILE_MAX_TOKENS = 256  # the tile kernel holds BLOCK_M x next_pow2(N) logits in registers


def form(gh: int, gw: int) -> str | None:
    """Which kernel takes a gh x gw grid: ``rows``, ``tile`` or None."""
    n = gh * gw
    if _pow2(gw) and n % 128 == 0:
        return "rows"
    return "tile" if n <= TILE_MAX_TOKENS else None


def supported(q: torch.Tensor, gh: int, gw: int) -> bool:
    """Whether a fused kernel takes q (B, heads, N, head_dim) on a gh x gw grid."""
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    if not (available() and _pow2(q.shape[-1]) and form(gh, gw) is not None and q.shape[-2] == gh * gw):
        return False
    # measured on Hopper only; older GPUs (a T4 is 7.5: no bf16 tensor cores) take the augmented form
    return torch.cuda.get_device_properties(q.device).major >= 8  # constant-folded by torch.compile


def _next_pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (x - 1).bit_length())


def kernel(tuned: bool = True, shape: str = "rows"):
    """The Triton kernel for ``shape`` (``rows`` or ``tile``; autotuned over block size, warps and
    stages) or None without Triton."""
    key = (shape, tuned)
    if key in _KERNELS:
        return _KERNELS[key]
    try:
        import triton

        from . import relpos_kernel
    except ImportError:
        _KERNELS[key] = None
        return None
    _fwd = relpos_kernel.relpos_flash_fwd if shape == "rows" else relpos_kernel.relpos_tile_fwd
    if tuned:
        if shape == "rows":
            # (two key rows per step were tried: never faster; on an H100 the best was 64 / 4 warps / 3 stages)
            configs = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=s)
                       for bm in (64, 128) for w, s in ((4, 2), (4, 3), (8, 3))]
        else:  # no loop to pipeline; the logits tile is BLOCK_M x NP (on an H100 the best was 64 / 4 warps)
            configs = [triton.Config({"BLOCK_M": bm}, num_warps=w, num_stages=1)
                       for bm, w in ((32, 4), (64, 4), (64, 8))]
        # the chosen config is kept in Triton's cache (TRITON_CACHE_DIR) where this Triton can: autotuning
        # took about 14 s at the first call of every process
        keep = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
        _KERNELS[key] = triton.autotune(configs, key=["HEADS", "GH", "GW", "D"], **keep)(_fwd)
    else:
        _KERNELS[key] = _fwd
    return _KERNELS[key]


def launch(q, k, v, eh, ew, scale: float, block_m: int | None = None) -> torch.Tensor:
    """Run the kernel: q, k, v (B, heads, N, D), eh (B, heads, N, gh),
    ew (B, heads, N, gw); returns (B, N, heads, D). ``block_m`` fixes the block size (no autotuning;
    the default off CUDA, i.e. in Triton's interpreter)."""
    b, heads, n, d = q.shape
    gh, gw = eh.shape[-1], ew.shape[-1]
    assert gh * gw == n, "eh and ew must span the token grid"
    shape = form(gh, gw)
    assert shape is not None, f"no fused kernel for a {gh} x {gw} grid"
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if block_m is None and q.device.type != "cuda":  # autotuning times on a GPU; interpreter: fixed blocks
        block_m = (64 if n % 64 == 0 else 32) if shape == "rows" else 32
    out = torch.empty(b, n, heads, d, device=q.device, dtype=q.dtype)
    o = out.transpose(1, 2)
    fn = kernel(tuned=block_m is None, shape=shape)
    extra = {} if block_m is None else {"BLOCK_M": block_m}
    if shape == "rows":
        def grid(meta):
            return n // meta["BLOCK_M"], b * heads
    else:  # (batch x heads, query blocks): see relpos_tile_fwd
        extra.update(NP=_next_pow2(n), RP=_next_pow2(max(gh, gw)))

        def grid(meta):
            return b * heads, -(-n // meta["BLOCK_M"])
    fn[grid if block_m is None else grid({"BLOCK_M": block_m})](q, k, v, eh, ew, o, scale * LOG2E,
             *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *eh.stride(), *ew.stride(),
             HEADS=heads, GH=gh, GW=gw, D=d, **extra)
    return out


def _relpos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eh: torch.Tensor, ew: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """softmax(scale q k^T + eh[:, row(j)] + ew[:, col(j)]) v, returned as (B, N, heads, D)."""
    return launch(q, k, v, eh, ew, scale)


if HAVE_CUSTOM_OP:
    relpos_attention = torch.library.custom_op("pfsam::relpos_attention", mutates_args=())(_relpos_attention)

    @relpos_attention.register_fake
    def _(q, k, v, eh, ew, scale):
        b, heads, n, d = q.shape
        return q.new_empty(b, n, heads, d)
else:  # torch < 2.4: no custom ops; ``supported`` is False, so Attention never calls it
    relpos_attention = _relpos_attention
