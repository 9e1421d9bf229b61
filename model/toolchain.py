"""The C compiler that Triton and ``torch.compile``'s inductor backend build their code with.

Both look for ``$CC``, then ``gcc``, then ``clang``; the container's runtime images ship none, so
code paths that need one are chosen (fused attention) or accepted (``--compile``) only where it
exists.
"""
from __future__ import annotations

import os
import shutil


def c_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
