"""model/toolchain.py: whether Triton and inductor can build their code here is decided by building
and loading a real Python extension, so a compiler without Python's headers or the C library's
headers is found out before a GPU's first kernel, not on it."""
import shutil
import stat

import pytest

from model import toolchain


@pytest.fixture(autouse=True)
def fresh_probe():
    toolchain.build_problem.cache_clear()
    yield
    toolchain.build_problem.cache_clear()


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("g++") is None,
                               reason="gcc and g++ are not installed")


@needs_gcc
def test_a_working_toolchain_builds_and_loads_c_and_cxx_extensions(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    assert toolchain.build_problem("c") is None
    assert toolchain.build_problem("c++") is None


def test_no_compiler(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "no C compiler" in toolchain.build_problem("c")
    assert "no C++ compiler" in toolchain.build_problem("c++")


def test_a_compiler_that_cannot_run_or_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert "could not be run" in toolchain.build_problem("c")
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'probe.c: In function pfsam_probe:' >&2\n"
                       "echo 'fatal error: stdio.h: No such file or directory' >&2\n"
                       "echo 'compilation terminated.' >&2\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(failing))
    toolchain.build_problem.cache_clear()
    # the line that says what is wrong, not the compiler's first line
    assert toolchain.build_problem("c") == f"{failing} could not build a Python extension: fatal error: stdio.h: No such file or directory"
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-cxx"))  # C++ is built with $CXX, not $CC
    assert toolchain.build_problem("c++").startswith(f"{tmp_path / 'no-such-cxx'} could not be run")


def test_a_compiler_that_writes_nothing_loadable(monkeypatch, tmp_path):
    """Exit status 0 is not enough: the extension must load."""
    liar = tmp_path / "cc"
    liar.write_text("#!/bin/sh\nexit 0\n")
    liar.chmod(liar.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(liar))
    assert "built no loadable extension" in toolchain.build_problem("c")


@needs_gcc
def test_missing_python_headers_are_named(monkeypatch, tmp_path):
    """A Debian or Ubuntu system Python without python3-dev: gcc is there, Python.h is not."""
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(toolchain, "python_include_dir", lambda: str(tmp_path))
    problem = toolchain.build_problem("c")
    assert problem.startswith("Python's headers are missing") and "python3-dev" in problem


@needs_gcc
def test_triton_launcher_compiles(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("CC", raising=False)
    assert toolchain.triton_launcher_problem() is None


@needs_gcc
def test_the_check_command_exits_1_when_only_the_triton_launcher_does_not_build(monkeypatch, capsys):
    pytest.importorskip("triton")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(toolchain, "triton_launcher_problem", lambda: "gcc could not build Triton's launcher: cuda.h")
    assert toolchain.main() == 1
    out = capsys.readouterr().out
    assert "toolchain: c: ok" in out
    assert "toolchain: triton launcher: gcc could not build Triton's launcher: cuda.h" in out


def test_the_check_command_exits_1_with_the_reason(monkeypatch, capsys):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert toolchain.main() == 1
    out = capsys.readouterr().out
    assert "toolchain: c: no C compiler" in out and "toolchain: c++: no C++ compiler" in out
