"""Shared fixtures: paths to the real data (tests skip when absent) and a tiny synthetic dataset."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))
warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
# Test modules import onnxruntime before the product does (importorskip): its telemetry off here
# too, before that import (model/onnx_encoder.py says why).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
# The suite is one process of many predictions, as process.py is: the heap keeps freed memory, as the
# tools' load_predictor asks (Predictor.from_dir alone leaves it to its caller; about 2x faster CPU batches).
from model.allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()


def free_loopback_port() -> int:
    """A free port on 127.0.0.1, once a connection to it has gone through; OSError where the
    loopback interface is down (a network namespace, ``unshare -n``: binding still works there,
    connecting not). Tests that need it skip on that error."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return port


def pytest_configure(config):
    # the ONNX graph cache (model/onnx_encoder.py) of this session: never the user's ~/.cache
    if "PFSAM_CACHE" not in os.environ:
        config._pfsam_cache = os.environ["PFSAM_CACHE"] = tempfile.mkdtemp(prefix="pfsam-test-cache-")
    config.addinivalue_line("markers", "slow: over ~20 s on the slowest 2-core host, or over ~10 s off the container's default path (opt-in "
                            "runtimes, developer tools, a whole real dataset); run with --slow (CI runs them)")
    config.addinivalue_line("markers", "real_data: needs ../shared/data")


def pytest_unconfigure(config):
    made = getattr(config, "_pfsam_cache", None)
    if made:  # removed with the session that made it (about 25 MB of ONNX graphs)
        shutil.rmtree(made, ignore_errors=True)
        os.environ.pop("PFSAM_CACHE", None)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="module")
def encoder_memo():
    """LiteMedSAM's encoder remembering the batches it has encoded, for this module's tests
    (test/encoder_memo.py says when it runs the real encoder and which tests use it)."""
    from encoder_memo import EncoderMemo
    from model.encoders.tiny_vit import TinyViT

    memo = EncoderMemo()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TinyViT, "forward", memo.wrap(TinyViT.forward))
        yield memo


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from synthetic import make_prepared_dataset

    return make_prepared_dataset(tmp_path_factory.mktemp("tiny") / "data", n_per_class=4)
