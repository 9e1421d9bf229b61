"""The compilers that Triton and ``torch.compile``'s inductor backend build their code with.

Triton builds its launcher, a small Python extension, with a C compiler on first use (``$CC``, then
``gcc``, then ``clang``) and Python's headers; inductor does the same on CUDA, and on CPU builds its
kernels with a C++ compiler (``$CXX``, then ``g++``, then ``clang++``). Finding a compiler is not
enough: a Debian or Ubuntu system Python without ``python3-dev``, or a ``gcc`` without the C
library's headers, fails on the first kernel. So ``build_problem`` builds and loads a tiny extension
the way Triton does, once per process, and code paths that need a toolchain are chosen (fused
attention) or accepted (``--compile``) only where it works. The container ships one (Dockerfile,
``COMPILER``).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

PROBE = ('#include <Python.h>\n#ifdef __cplusplus\nextern "C"\n#endif\n'
         'int pfsam_probe(void) { return 0; }\n')


def c_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def cxx_compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def python_include_dir() -> str:
    """Where Python.h should be, chosen as Triton chooses it (Debian's ``posix_local`` scheme has
    its headers under ``posix_prefix``)."""
    scheme = sysconfig.get_default_scheme()
    return sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]


@functools.lru_cache(maxsize=None)
def build_problem(language: str = "c") -> str | None:
    """None when a Python extension in ``language`` ("c" or "c++") builds and loads here; otherwise
    why not, in words that say what to install."""
    if language not in ("c", "c++"):
        raise ValueError(f"language must be 'c' or 'c++', not {language!r}")
    compiler = c_compiler() if language == "c" else cxx_compiler()
    if compiler is None:
        var, names = ("CC", "gcc or clang") if language == "c" else ("CXX", "g++ or clang++")
        return f"no {language.upper()} compiler was found ({names}, or ${var})"
    include = python_include_dir()
    if not (Path(include) / "Python.h").is_file():
        return (f"Python's headers are missing ({include}/Python.h; on Debian or Ubuntu: "
                f"apt-get install python3-dev)")
    try:
        with tempfile.TemporaryDirectory(prefix="pfsam-toolchain-") as tmp:
            src = Path(tmp) / ("probe.c" if language == "c" else "probe.cpp")
            so = Path(tmp) / "probe.so"
            src.write_text(PROBE)
            problem = _compile([compiler, str(src), "-O0", "-shared", "-fPIC", "-o", str(so), f"-I{include}"],
                               "a Python extension")
            if problem:
                return problem
            try:
                ctypes.CDLL(str(so)).pfsam_probe()
            except (OSError, AttributeError) as e:
                noexec = hasattr(os, "ST_NOEXEC") and os.statvfs(tmp).f_flag & os.ST_NOEXEC
                hint = f" ({tempfile.gettempdir()} is mounted noexec: code built there cannot be loaded)" if noexec else ""
                return f"{compiler} built no loadable extension: {e}{hint}"
    except OSError as e:  # the temporary folder
        return f"{compiler} could not be probed in {tempfile.gettempdir()}: {e}"
    return None


def _compile(cmd: list[str], what: str) -> str | None:
    """Run the compiler command ``cmd``; None when it succeeds, else why (its first error line)."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cmd[0]} could not be run: {e}"
    if res.returncode == 0:
        return None
    lines = [ln.strip() for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else f"exit {res.returncode}")
    return f"{cmd[0]} could not build {what}: {detail}"


def triton_launcher_problem() -> str | None:
    """None when Triton's own CUDA launcher source (``backends/nvidia/driver.c``) compiles here as
    Triton compiles it on a GPU's first kernel, linked without libcuda (no GPU is needed); otherwise
    why not. None also where this Triton has no such file."""
    import triton

    nvidia = Path(triton.__file__).parent / "backends" / "nvidia"
    if not (nvidia / "driver.c").is_file():
        return None
    compiler = c_compiler()
    if compiler is None:
        return build_problem("c")
    with tempfile.TemporaryDirectory(prefix="pfsam-toolchain-") as tmp:
        return _compile([compiler, str(nvidia / "driver.c"), "-O3", "-shared", "-fPIC", "-Wno-psabi", "-o",
                         str(Path(tmp) / "cuda_utils.so"), f"-I{nvidia / 'include'}", f"-I{python_include_dir()}"],
                        "Triton's launcher")


def main() -> int:
    """``python -m model.toolchain``: check the toolchain as the container's build does; exit 1 with
    the reason when Python extensions cannot be built in C or C++, or Triton's launcher does not
    compile (not checked without Triton)."""
    problems = {lang: build_problem(lang) for lang in ("c", "c++")}
    if importlib.util.find_spec("triton") is None:
        print("toolchain: triton launcher: not checked (Triton is not installed)")
    else:
        problems["triton launcher"] = triton_launcher_problem() if problems["c"] is None else "(no C toolchain)"
    for what, problem in problems.items():
        print(f"toolchain: {what}: {problem or 'ok'}")
    return 1 if any(problems.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
