"""The tests' encoder memo (test/encoder_memo.py) gives what the real encoder gives, and runs the real
encoder again whenever the weights, the input batch or the mode differ."""
from __future__ import annotations

import pytest
import torch

from encoder_memo import EncoderMemo
from model.encoders.tiny_vit import TinyViT


def _encoder() -> TinyViT:
    torch.manual_seed(0)
    return TinyViT().eval()


def _equal(a, b) -> bool:
    (ea, fa), (eb, fb) = a, b
    return torch.equal(ea, eb) and len(fa) == len(fb) and all(torch.equal(x, y) for x, y in zip(fa, fb))


def test_a_repeat_batch_gets_a_copy_of_the_real_output_and_anything_else_runs_the_encoder():
    enc, memo = _encoder(), EncoderMemo()
    forward = memo.wrap(TinyViT.forward)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g)
    with torch.inference_mode():
        real = TinyViT.forward(enc, x)
        first = forward(enc, x)
        assert _equal(first, real) and (memo.misses, memo.hits) == (1, 0)
        first[0].zero_()  # a caller's in-place change does not reach the next answer
        again = forward(enc, x.clone())
        assert _equal(again, real) and (memo.misses, memo.hits) == (1, 1)
        other = x.flip(-1)
        assert _equal(forward(enc, other), TinyViT.forward(enc, other)) and memo.misses == 2
        # the same values in another layout: another key (oneDNN may take another kernel)
        forward(enc, x.contiguous(memory_format=torch.channels_last))
        assert memo.misses == 3
    with torch.no_grad():  # outside inference mode: another key
        assert _equal(forward(enc, x), real) and memo.misses == 4
    with torch.inference_mode():
        with torch.no_grad():
            enc.neck[0].weight[0, 0] += 1.0  # weights changed in place: the real encoder again
        changed = forward(enc, x)
        assert memo.misses == 5 and not torch.equal(changed[0], real[0])
        assert _equal(changed, TinyViT.forward(enc, x))
        enc.fuse()
        plain = forward(enc, x)
        assert memo.misses == 6
        if enc.use_onednn_postops():
            fused = forward(enc, x)
            assert memo.misses == 7 and _equal(fused, TinyViT.forward(enc, x))
            enc.use_onednn_postops(False)
            assert _equal(forward(enc, x), plain) and memo.hits == 2


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # torch.jit.trace
def test_gradients_autocast_and_tracing_run_the_real_encoder_unremembered():
    enc, memo = _encoder(), EncoderMemo()
    forward = memo.wrap(TinyViT.forward)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    xg = x.clone().requires_grad_()
    emb, _ = forward(enc, xg)
    emb.sum().backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    assert (memo.misses, memo.hits, len(memo.store)) == (0, 0, 0)
    with torch.no_grad():
        full, _ = forward(enc, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = forward(enc, x)
            real_low, _ = TinyViT.forward(enc, x)
    assert memo.misses == 2 and torch.equal(low, real_low) and not torch.equal(low, full)  # autocast: in the key
    enc.requires_grad_(False)
    with torch.no_grad():
        traced = torch.jit.trace(lambda t: forward(enc, t)[0], x, check_trace=False)
    assert memo.misses == 2 and torch.allclose(traced(x), TinyViT.forward(enc, x)[0], atol=1e-5)
