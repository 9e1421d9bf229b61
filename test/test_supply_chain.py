"""Supply chain: exact dependency pins, and no unpickling of arbitrary objects.

* ``requirements.txt`` and ``requirements-dev.txt``: every requirement line pins one exact
  version (``name==X.Y.Z``): no ranges, no unpinned names, no URLs, VCS links, editable installs
  or included files, no package listed twice.
* Every ``torch.load`` call in the repository's Python files passes ``weights_only=True`` (a
  checkpoint can then hold tensors and plain containers only, never code). The SAM/MedSAM
  checkpoints are also verified by SHA-256 before use (model/encoders/weights.py; a wrong hash and
  a crafted pickle are tested in test_model.py).
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = ("requirements.txt", "requirements-dev.txt")
PIN = re.compile(r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)(?:\[[A-Za-z0-9._,-]+\])?"
                 r"==(?P<version>[0-9]+(?:\.[0-9]+)*(?:(?:a|b|rc|\.post|\.dev)[0-9]+)*(?:\+[A-Za-z0-9.]+)?)$")
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "node_modules", "data", "cache", "runs", "checkpoints",
             "demo", "output", "carry", "work"}


def _requirement_lines(name: str) -> list[tuple[int, str]]:
    lines = []
    for number, raw in enumerate((REPO / name).read_text().splitlines(), 1):
        line = raw.split(" #")[0].strip() if not raw.lstrip().startswith("#") else ""
        if line:
            lines.append((number, line))
    return lines


@pytest.mark.parametrize("name", REQUIREMENTS)
def test_every_requirement_is_pinned_exactly(name):
    lines = _requirement_lines(name)
    assert lines, f"{name} lists no requirement"
    seen: dict[str, int] = {}
    for number, line in lines:
        m = PIN.match(line)
        assert m, f"{name}:{number}: {line!r} is not an exact pin (name==version)"
        key = re.sub(r"[-_.]+", "-", m["name"]).lower()  # PEP 503 normalised name
        assert key not in seen, f"{name}:{number}: {m['name']} already pinned on line {seen[key]}"
        seen[key] = number


def test_the_pin_pattern_rejects_loose_requirements():
    for loose in ("torch", "torch>=2.0", "torch~=2.1", "torch==2.*", "torch===2.1", "torch==2.1; python_version<'3.12'",
                  "-r other.txt", "-e .", "git+https://example.org/x.git", "https://example.org/x.whl",
                  "torch == 2.1", "torch!=2.1"):
        assert not PIN.match(loose), loose
    for exact in ("torch==2.14.1", "SimpleITK==2.5.7", "surface-distance==0.1", "foo[bar]==1.0rc1", "x_y==3.0.post1"):
        assert PIN.match(exact), exact


def _python_files() -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files)


def _torch_load_calls(tree: ast.AST) -> tuple[list[ast.Call], list[int]]:
    """Calls of torch.load (also through ``import torch as t`` or ``from torch import load``), and the
    lines where torch.load is referenced without being called (aliasing it would dodge the check)."""
    torch_names, load_names = {"torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            torch_names |= {a.asname or a.name for a in node.names if a.name == "torch"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            load_names |= {a.asname or a.name for a in node.names if a.name == "load"}

    def is_load(f: ast.AST) -> bool:
        return (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name)
                and f.value.id in torch_names) or (isinstance(f, ast.Name) and f.id in load_names)

    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and is_load(n.func)]
    called = {id(c.func) for c in calls}
    bare = [n.lineno for n in ast.walk(tree)
            if is_load(n) and id(n) not in called and not (isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load))]
    return calls, bare


def test_every_torch_load_passes_weights_only_true():
    files = _python_files()
    assert REPO / "training" / "train.py" in files and REPO / "model" / "encoders" / "weights.py" in files
    found, problems = 0, []
    for path in files:
        source = path.read_text(encoding="utf-8", errors="replace")
        if "torch" not in source or "load" not in source:  # the grep: only files that may call it
            continue
        calls, bare = _torch_load_calls(ast.parse(source, str(path)))
        rel = path.relative_to(REPO)
        for call in calls:
            found += 1
            kw = {k.arg: k.value for k in call.keywords}
            value = kw.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                problems.append(f"{rel}:{call.lineno}: torch.load without weights_only=True")
            if any(k.arg is None for k in call.keywords):
                problems.append(f"{rel}:{call.lineno}: torch.load with **kwargs (weights_only cannot be checked)")
        problems += [f"{rel}:{line}: torch.load referenced without being called" for line in bare]
    assert not problems, "\n".join(problems)
    assert found >= 2  # training/train.py (resume) and model/encoders/weights.py (SAM/MedSAM checkpoints)


def test_the_torch_load_check_catches_unsafe_calls():
    # sources written with LOAD for "load", so that no line of this file is itself an unsafe call
    unsafe = {
        "import torch\ntorch.LOAD('x')\n": 1,
        "import torch\ntorch.LOAD('x', weights_only=False)\n": 1,
        "import torch as T\nT.LOAD('x', map_location='cpu')\n": 1,
        "from torch import LOAD\nLOAD('x')\n": 1,
        "import torch\nf = torch.LOAD\n": 0,
    }
    unsafe = {src.replace("LOAD", "load"): n for src, n in unsafe.items()}
    for source, n_calls in unsafe.items():
        calls, bare = _torch_load_calls(ast.parse(source))
        assert len(calls) == n_calls, source
        bad = [c for c in calls if not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                                           and k.value.value is True for k in c.keywords)]
        assert bad or bare, source
    calls, bare = _torch_load_calls(ast.parse("import torch\ntorch.load('x', map_location='cpu', weights_only=True)\n"))
    assert len(calls) == 1 and not bare
