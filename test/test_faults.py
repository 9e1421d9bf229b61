"""Faults: a training run killed with SIGKILL, a crash in the middle of writing a file, CUDA out of memory.

* Training killed with ``kill -9`` during epoch 2 and started again with ``--resume`` ends with the
  same weights, tensor for tensor, as an uninterrupted run (CPU, tiny config, fp32).
* A writer that fails half way (the underlying writer is patched to write half its bytes, then
  raise) never leaves a truncated file under the final name, nor a temporary file: the final path
  does not exist, or still holds its previous complete content.
* ``torch.cuda.OutOfMemoryError`` for a batch (simulated on the CPU by patching the predictor's
  ``forward``): the batch is retried in halves and gives the same outputs; when even one image does
  not fit, a clear error ("out of GPU memory at batch size N; use --batch-size 1 or -d cpu") and a
  non-zero exit status through ``model.inference.run`` and process.py.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test"))

from model import io as mio  # noqa: E402
from model.atomic_files import atomic_path, write_png, write_text  # noqa: E402
from model.itk_image import write_itk  # noqa: E402

# ------------------------------------------------------------------------------------------
# Training killed with SIGKILL during epoch 2, then resumed


def _train_cmd(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """The tiny config of test_training.tiny_cfg (frozen LiteMedSAM, small heads, curriculum gt ->
    mixed -> pred over 3 epochs), one view to keep the embedding cache small, fp32 for exactness."""
    return [sys.executable, "-m", "training.train", "--config", "training/configs/mgc-a.yaml",
            "--data", str(data), "--out", str(out), "--cache", str(cache), "--encoder", "litemedsam", "--frozen",
            "--epochs", "3", "--batch-size", "4", "--lr", "1e-3", "--device", "cpu", "--precision", "fp32",
            "--set", "views=[orig]", "--set", "model.seg_head.channels=[32,16]",
            "--set", "curriculum={gt_until: 1, mixed_until: 2, p_gt: 0.5}", *extra]


def _kill_during_epoch_2(cmd: list[str], out: Path, log: Path, timeout: float = 600) -> None:
    """Start ``cmd``; once epoch 1's state.pt exists and the epoch-2 progress bar has appeared on
    stderr, SIGKILL it."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "state.pt").is_file() and b"epoch 2/3" in log.read_bytes():
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, log.read_text()[-2000:])


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_to_the_same_weights(tiny_dataset, tmp_path):
    cache = tmp_path / "cache"
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    done = subprocess.run(_train_cmd(tiny_dataset, straight, cache), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]

    for attempt in range(3):  # epochs take well under a second: the kill may, rarely, come too late
        _kill_during_epoch_2(_train_cmd(tiny_dataset, broken, cache), broken, tmp_path / f"killed{attempt}.log")
        state = torch.load(broken / "state.pt", map_location="cpu", weights_only=True)
        if state["epoch"] == 1:
            break
        import shutil

        shutil.rmtree(broken)
    assert state["epoch"] == 1, "could not kill the run during epoch 2"
    assert len(json.loads((broken / "log.json").read_text())) == 1
    assert not (broken / "summary.json").exists()
    # a SIGKILL during a write could leave a hidden temporary file (never a truncated final file)
    killed_leftovers = {p for p in broken.rglob("*") if p.name.startswith(".") or ".tmp" in p.name}

    resumed = subprocess.run(_train_cmd(tiny_dataset, broken, cache, "--resume"), cwd=REPO, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "after epoch 1" in resumed.stderr

    a = load_file(str(straight / "last" / "model.safetensors"))
    b = load_file(str(broken / "last" / "model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((straight / "log.json").read_text())
    hb = json.loads((broken / "log.json").read_text())
    assert [h["epoch"] for h in hb] == [1, 2, 3]
    assert [h["train_loss"] for h in ha] == [h["train_loss"] for h in hb]
    leftovers = {p for p in broken.rglob("*") if p.name.startswith(".") or ".tmp" in p.name} - killed_leftovers
    assert not leftovers, leftovers


def test_building_the_cache_leaves_the_rng_alone(tiny_dataset, tmp_path):
    """The uninterrupted run above builds the embedding cache, the killed and resumed runs find it
    built: the weights agree only if building it draws no random numbers from the training's stream."""
    from training.cache import build_cache
    from training.datasets import load_records
    from training.config import load_config
    from training.train import build_model

    cfg = load_config(REPO / "training" / "configs" / "mgc-a.yaml", {"model.encoder": "litemedsam", "model.mode": "frozen"})
    cfg["model"]["seg_head"] = {"type": "sd-h", "channels": [8, 8]}
    model = build_model(cfg)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    build_cache(model, load_records(tiny_dataset)[:2], tmp_path / "cache", ["orig"], torch.device("cpu"), "fp32")
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------------------
# A crash in the middle of a write


class Crash(RuntimeError):
    pass


def _half_then_crash(path, data: bytes):
    """What a writer killed half way leaves: half the bytes, then an exception."""
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
    raise Crash("simulated crash while writing")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or ".tmp" in p.name)


def test_atomic_path_keeps_the_final_name_complete(tmp_path):
    final = tmp_path / "out" / "result.json"
    with pytest.raises(Crash):
        with atomic_path(final) as tmp:
            _half_then_crash(tmp, b'{"complete": true}\n')
    assert not final.exists() and _leftovers(final.parent) == []
    write_text(final, '{"complete": true}\n')
    with pytest.raises(Crash):
        with atomic_path(final) as tmp:
            _half_then_crash(tmp, b'{"complete": false, "longer": "content"}\n')
    assert final.read_text() == '{"complete": true}\n' and _leftovers(final.parent) == []


def test_write_png_crash_leaves_no_truncated_png(tmp_path, monkeypatch):
    final = tmp_path / "mask.png"
    first = np.arange(60 * 80, dtype=np.uint32).reshape(60, 80).astype(np.uint8)
    real_save = Image.Image.save

    def crashing_save(self, fp, format=None, **params):
        import io

        buf = io.BytesIO()
        real_save(self, buf, format=format, **params)
        _half_then_crash(fp, buf.getvalue())

    monkeypatch.setattr(Image.Image, "save", crashing_save)
    with pytest.raises(Crash):
        write_png(final, first)
    assert not final.exists() and _leftovers(tmp_path) == []
    monkeypatch.setattr(Image.Image, "save", real_save)
    write_png(final, first)
    before = final.read_bytes()
    monkeypatch.setattr(Image.Image, "save", crashing_save)
    with pytest.raises(Crash):
        write_png(final, 255 - first)
    assert final.read_bytes() == before and _leftovers(tmp_path) == []
    np.testing.assert_array_equal(np.asarray(Image.open(final)), first)


def test_write_mha_crash_leaves_no_truncated_mha(tmp_path, monkeypatch):
    import SimpleITK as sitk

    final = tmp_path / "mask.mha"
    write_itk(final, np.ones((20, 30), np.uint8))
    before = final.read_bytes()
    real_write = sitk.WriteImage

    def crashing_write(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        _half_then_crash(path, Path(path).read_bytes())

    monkeypatch.setattr(sitk, "WriteImage", crashing_write)
    with pytest.raises(Crash):
        write_itk(final, np.zeros((20, 30), np.uint8))
    assert final.read_bytes() == before and _leftovers(tmp_path) == []


def _tiny_model():
    from model.network import PFSAMNet, make_config

    torch.manual_seed(0)
    return PFSAMNet(make_config("litemedsam", "finetuned", "sd-h", "gap", seg_head_args={"channels": [8, 8]},
                                cls_head_args={"hidden": 8}, encoder_weights={"source": "random"}),
                    encoder_weights="random")


def test_save_model_crash_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from model import checkpoint

    model = _tiny_model()
    out = tmp_path / "model"
    real_save_file = checkpoint.save_file

    def crashing_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        _half_then_crash(filename, Path(filename).read_bytes())

    monkeypatch.setattr(checkpoint, "save_file", crashing_save_file)
    with pytest.raises(Crash):
        checkpoint.save_model(model, out)
    assert not (out / checkpoint.WEIGHTS_NAME).exists() and _leftovers(out) == []

    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    checkpoint.save_model(model, out)
    before = {n: (out / n).read_bytes() for n in (checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME)}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    monkeypatch.setattr(checkpoint, "save_file", crashing_save_file)
    with pytest.raises(Crash):
        checkpoint.save_model(model, out)
    assert {n: (out / n).read_bytes() for n in before} == before and _leftovers(out) == []
    reloaded = checkpoint.load_model(out)  # the previous checkpoint still loads
    assert reloaded.config["seg_head"] == model.config["seg_head"]


def test_training_state_crash_keeps_the_previous_state(tmp_path, monkeypatch):
    from training import train as tr

    model = _tiny_model()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    path = tmp_path / tr.STATE_NAME
    cfg = {"epochs": 2, "seed": 0}
    tr.save_state(path, model, opt, sched, 1, [{"epoch": 1}], {"epoch": 1, "value": 0.5, "metric": "val_dsc"}, cfg)
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        _half_then_crash(f, Path(f).read_bytes())

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(Crash):
        tr.save_state(path, model, opt, sched, 2, [{"epoch": 1}, {"epoch": 2}], {"epoch": 2, "value": 0.6,
                                                                                "metric": "val_dsc"}, cfg)
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
    assert torch.load(path, map_location="cpu", weights_only=True)["epoch"] == 1


def test_atomic_path_temp_files_are_never_inputs(tmp_path):
    """A temporary file left by a killed writer is hidden (leading dot): never read as an input."""
    with atomic_path(tmp_path / "case.png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and not mio.is_image_file(tmp)


def test_files_written_all_or_none_are_put_in_place_together_or_not_at_all(tmp_path):
    """A run's summary files: within ``all_or_none`` none is in place until all are written; a stop
    (SIGTERM's SystemExit) or a folder where one goes leaves every earlier file as it was (and what
    ``remove_file`` named), and no temporary file."""
    from model.atomic_files import all_or_none, remove_file

    for name, text in (("a.csv", "old a"), ("b.csv", "old b"), ("c.json", "old c")):
        (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit):
        with all_or_none():
            write_text(tmp_path / "a.csv", "new a")
            assert (tmp_path / "a.csv").read_text() == "old a"  # not yet
            remove_file(tmp_path / "c.json")
            raise SystemExit(143)
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(IsADirectoryError, match=r"a folder has the name of this output file: '.*d\.csv'"):
        with all_or_none():
            write_text(tmp_path / "a.csv", "new a")
            write_text(tmp_path / "d.csv", "new d")
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()} == \
        {"a.csv": "old a", "b.csv": "old b", "c.json": "old c"}
    with all_or_none():
        write_text(tmp_path / "a.csv", "new a")
        write_text(tmp_path / "b.csv", "new b")
        remove_file(tmp_path / "c.json")
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()} == {"a.csv": "new a", "b.csv": "new b"}


def test_a_stop_or_an_error_while_the_files_are_renamed_puts_the_renamed_ones_back(tmp_path, monkeypatch):
    """all_or_none renames its files one by one: SIGTERM (or a full disk on a file system without hard
    links, copying what a file replaces) after the first rename left this run's predictions.csv beside
    the earlier run's probabilities.csv. Everything is now kept before the first rename, and what was
    renamed goes back."""
    from model import atomic_files
    from model.atomic_files import all_or_none, remove_file

    for name in ("a.csv", "b.csv", "c.json"):
        (tmp_path / name).write_text(f"old {name}")
    real = os.replace
    calls = []

    def stop_at_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise SystemExit(143)
        real(src, dst)
    monkeypatch.setattr(atomic_files.os, "replace", stop_at_second)
    with pytest.raises(SystemExit):
        with all_or_none():
            write_text(tmp_path / "a.csv", "new a")
            write_text(tmp_path / "b.csv", "new b")
            remove_file(tmp_path / "c.json")
    monkeypatch.setattr(atomic_files.os, "replace", real)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {n: f"old {n}" for n in ("a.csv", "b.csv", "c.json")}
    calls.clear()

    def stop_twice(src, dst):  # a stop after b.csv is renamed, a second one while it is put back
        real(src, dst) if len(calls) != 2 else None
        calls.append(dst)
        if len(calls) in (2, 3):
            raise SystemExit(143)
    monkeypatch.setattr(atomic_files.os, "replace", stop_twice)
    with pytest.raises(SystemExit):
        with all_or_none():
            write_text(tmp_path / "a.csv", "new a")
            write_text(tmp_path / "b.csv", "new b")
    monkeypatch.setattr(atomic_files.os, "replace", real)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {n: f"old {n}" for n in ("a.csv", "b.csv", "c.json")}

    def no_links(*args):
        raise OSError(1, "Operation not permitted")
    copies = []

    def copy_until_full(src, dst, **kwargs):
        if copies:
            raise OSError(28, "No space left on device")
        copies.append(dst)
        return __import__("shutil").copyfile(src, dst)
    monkeypatch.setattr(atomic_files.os, "link", no_links)
    monkeypatch.setattr(atomic_files.shutil, "copy2", copy_until_full)
    with pytest.raises(OSError, match="No space left on device"):
        with all_or_none():
            write_text(tmp_path / "a.csv", "new a")
            write_text(tmp_path / "b.csv", "new b")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {n: f"old {n}" for n in ("a.csv", "b.csv", "c.json")}


def test_undo_puts_a_linked_output_back_as_the_link(tmp_path, monkeypatch):
    """Where a file system has no hard links, the kept copy of an output that is a link was a copy of
    the file it points to: undo put back a plain file in the link's place."""
    from model import atomic_files
    from model.atomic_files import replacements_kept, undo

    (tmp_path / "target.png").write_text("elsewhere")
    (tmp_path / "out.png").symlink_to(tmp_path / "target.png")

    def no_links(*args):
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(atomic_files.os, "link", no_links)
    with replacements_kept():
        write_text(tmp_path / "out.png", "this run")
        assert not (tmp_path / "out.png").is_symlink()
        undo(tmp_path / "out.png")
    assert (tmp_path / "out.png").is_symlink() and (tmp_path / "target.png").read_text() == "elsewhere"


def test_blocks_inside_blocks_join_the_outer_one(tmp_path):
    """A replacements_kept or all_or_none block inside another (a run inside a run: a notebook, a
    service) dropped the outer block's kept files: its undo deleted instead of restoring, and it
    ended in an AttributeError."""
    from model.atomic_files import all_or_none, replacements_kept, undo

    (tmp_path / "b.csv").write_text("earlier")
    with replacements_kept():
        write_text(tmp_path / "b.csv", "outer")
        with replacements_kept():
            write_text(tmp_path / "c.csv", "inner")
        with all_or_none():
            write_text(tmp_path / "d.csv", "staged")
            with all_or_none():
                write_text(tmp_path / "e.csv", "staged too")
            assert not (tmp_path / "d.csv").exists() and not (tmp_path / "e.csv").exists()
        undo(tmp_path / "b.csv")
        assert (tmp_path / "b.csv").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.csv", "c.csv", "d.csv", "e.csv"]


def test_a_runs_lock_keeps_its_files_from_another_runs_clean_up(tmp_path, monkeypatch):
    """A run (run_lock) names its hidden files after a lock file that it holds locked (flock) under its
    name from the first moment: another process's clean-up (remove_leftovers) leaves them alone while
    it lives, and removes them, lock and all, once it is killed. Two runs in one process (threads)
    name each folder's files after its own run. Where flock fails, no lock file is left behind."""
    import fcntl

    from model import atomic_files
    from model.atomic_files import remove_leftovers, run_lock

    a, b = tmp_path / "a", tmp_path / "b"
    (a / "segmentation").mkdir(parents=True)
    b.mkdir()
    with run_lock(a), run_lock(b):
        names = {p.name for p in a.iterdir() if p.is_file()}
        assert len(names) == 1 and re.fullmatch(r"\.pfsam-r[0-9a-f]+-run\.lock", names.pop())
        lock = next(a.glob(".pfsam-r*-run.lock"))
        fd = os.open(lock, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        token_a = lock.name.split("-")[1]
        token_b = next(b.glob(".pfsam-r*-run.lock")).name.split("-")[1]
        assert atomic_files._mkstemp(a / "segmentation" / "x.png", ".tmp").name.startswith(f".pfsam-{token_a}-")
        assert atomic_files._mkstemp(b / "y.png", ".tmp").name.startswith(f".pfsam-{token_b}-")
        other = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                                "from model.atomic_files import remove_leftovers as r; print(len(r(sys.argv[2], "
                                "('', 'segmentation'))))", str(REPO), str(a)], capture_output=True, text=True)
        assert other.stdout.strip() == "0", other.stderr  # another process: a live run's files stay
    assert sorted(p.name for p in a.rglob("*") if p.is_file())[0].startswith(f".pfsam-{token_a}-")
    (a / lock.name).write_bytes(b"")  # as a run killed by SIGKILL leaves it: nobody holds it
    assert len(remove_leftovers(a, ("", "segmentation"))) == 2 and not any(a.rglob(".pfsam-*"))

    def no_flock(*args):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    with run_lock(a):
        assert [p for p in a.iterdir() if p.is_file()] == []
        assert atomic_files._mkstemp(a / "z.png", ".tmp").name.startswith(f".pfsam-p{os.getpid()}-")


def test_what_a_file_replaced_comes_back_by_undo_until_the_block_ends(tmp_path):
    """Within ``replacements_kept`` a replaced file is kept (a hard link, or a copy where the file system
    has none); ``undo`` puts back the first content the block found (an earlier run's), or removes a
    file that is new; the kept files go with the block."""
    from model import atomic_files
    from model.atomic_files import replacements_kept, undo

    (tmp_path / "old.png").write_text("earlier run")
    for links in (True, False):
        with replacements_kept():
            if not links:
                real = os.link
                atomic_files.os.link = lambda *a: (_ for _ in ()).throw(OSError(1, "no hard links here"))
            try:
                write_text(tmp_path / "old.png", "this run")
                write_text(tmp_path / "old.png", "this run, again")
                write_text(tmp_path / "new.png", "this run")
            finally:
                if not links:
                    atomic_files.os.link = real
            assert len([p for p in tmp_path.iterdir() if p.name.startswith(".pfsam-")]) == 1  # the one kept
            undo(tmp_path / "old.png")
            undo(tmp_path / "new.png")
            assert (tmp_path / "old.png").read_text() == "earlier run" and not (tmp_path / "new.png").exists()
            write_text(tmp_path / "new.png", "kept")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["new.png", "old.png"]
        (tmp_path / "new.png").unlink()
    undo(tmp_path / "old.png")  # outside the block: the file goes
    assert not (tmp_path / "old.png").exists()


def test_a_write_error_names_the_output_file_not_its_temporary_name(tmp_path):
    """An error from writing the temporary file (a read-only or full disk) named ``.pfsam-…tmp.png``;
    numpy's short write said "N requested and M written" with no file and no cause."""
    import errno

    with pytest.raises(OSError, match=r"\[Errno 30\] Read-only file system: '.*/out\.png'$"):
        with atomic_path(tmp_path / "out.png") as tmp:
            raise OSError(errno.EROFS, "Read-only file system", str(tmp))
    with pytest.raises(OSError, match=r"181566 requested and 1984 written: written in part \(is the disk full\?\): "
                                      r"'.*/logits\.npy'$"):
        with atomic_path(tmp_path / "logits.npy"):
            raise OSError("181566 requested and 1984 written")
    assert _leftovers(tmp_path) == []


def test_a_temporary_file_that_cannot_be_made_or_an_itk_failure_names_the_output(tmp_path, monkeypatch):
    """A read-only folder fails at the temporary file's creation, which named its random name; ITK's
    own exception gave its first line ("Exception thrown in SimpleITK ImageFileWriter_Execute: ...cxx:1110:"),
    naming neither the file nor the cause."""
    import errno
    import tempfile

    import SimpleITK as sitk

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".pfsam-p1-abcd.tmp.png"))
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError, match=r"\[Errno 30\] Read-only file system: '.*/mask\.png'$"):
        write_text(tmp_path / "mask.png", "x")
    monkeypatch.undo()

    def itk_full(img, path, *args, **kwargs):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: /x/itkMetaImageIO.cxx:1110:\n"
                           f"ITK ERROR: MetaImageIO(0x5639a8a3acc0): File cannot be written: {path}\n"
                           "Reason: No space left on device")
    monkeypatch.setattr(sitk, "WriteImage", itk_full)
    with pytest.raises(OSError, match=r"ITK could not write it: No space left on device: '.*/b\.mha'$"):
        write_itk(tmp_path / "b.mha", np.zeros((20, 20), np.uint8))
    assert _leftovers(tmp_path) == []


def test_an_input_that_became_a_folder_after_listing_says_so(tmp_path):
    """It said "folder cannot be listed, so its images are not read:" and nothing more, and the summary
    line counted it as a folder not listed rather than as an image."""
    from model.inference import RunResult, summary_line
    from model.writers import Case

    (tmp_path / "m1.png").mkdir()
    with pytest.raises(mio.ImageReadError, match=r"m1.png: is a folder now, not an image file \(it changed after "
                                                 r"the input folder was listed\)") as exc:
        mio.read_image(tmp_path / "m1.png")
    case = Case(tmp_path / "m1.png", "m1.png", "m1", error=exc.value.reason)
    assert summary_line(RunResult([case], tmp_path)).startswith("0 of 1 image processed, 1 failed (")


def test_sigterm_stops_the_run_when_stderr_cannot_be_written(monkeypatch):
    """The stop message raised OSError on a full stderr, inside the signal handler: the run took it for
    the failure of whatever it was writing, failed that case and went on to exit 3 instead of 143."""
    import process

    from synthetic import UnwritableStream
    monkeypatch.setattr(sys, "stderr", UnwritableStream())
    with pytest.raises(SystemExit) as exc:
        process._stop(signal.SIGTERM, None)
    assert exc.value.code == 143


def test_export_on_a_full_disk_is_an_error_naming_the_folder(tmp_path, monkeypatch):
    from training import export as export_mod

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "ens" / ".staging" / "model.safetensors"))
    monkeypatch.setattr(export_mod, "export", full)
    (tmp_path / "run").mkdir()
    res = CliRunner().invoke(export_mod.main, [str(tmp_path / "run"), "--out", str(tmp_path / "ens")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"writing the ensemble into {tmp_path / 'ens'} failed: [Errno 28] No space left on device" in res.output
    assert f"(what was in {tmp_path / 'ens'} is kept as it was)" in res.output


# ------------------------------------------------------------------------------------------
# CUDA out of memory


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    from make_test_model import make_test_ensemble
    from model import inference

    ens = make_test_ensemble(tmp_path_factory.mktemp("ensemble") / "ens")
    return inference.load_predictor(ens, device="cpu", batch_size=4)


def _images(n: int = 5) -> list[np.ndarray]:
    from make_fixtures import synthetic_ultrasound

    return [synthetic_ultrasound(40 + 3 * i, 52 + 5 * i, 30 + i)[0] for i in range(n)]


def _oom_forward(predictor, monkeypatch, fails, calls: list[int]):
    real = type(predictor).forward.__get__(predictor)  # the class's method, not an earlier patch

    def forward(x, widths=None, heights=None):
        calls.append(int(x.shape[0]))
        # each image's own columns and rows, halved with the batch
        assert widths is not None and heights is not None and len(widths) == len(heights) == len(x)
        if fails(int(x.shape[0])):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(x, widths, heights)

    monkeypatch.setattr(predictor, "forward", forward)


def _same(a, b, exact: bool) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p.mask, q.mask)
        assert p.label == q.label
        if exact:
            assert p.probabilities == q.probabilities
        else:
            assert p.probabilities == pytest.approx(q.probabilities, abs=1e-4)


def test_oom_batches_are_retried_in_halves_with_the_same_outputs(predictor, monkeypatch):
    images = _images(3)
    batched = predictor.predict(images)  # the normal path, one batch of 3
    predictor.batch_size = 1
    try:
        single = predictor.predict(images)
    finally:
        predictor.batch_size = 4
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # so the cache is emptied, as on a GPU
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    calls: list[int] = []
    _oom_forward(predictor, monkeypatch, lambda n: n > 1, calls)
    retried = predictor.predict(images)
    assert calls == [3, 2, 1, 1, 1]  # 3 -> 2 + 1, 2 -> 1 + 1
    assert len(emptied) == 2  # once after each failed batch
    _same(retried, single, exact=True)  # the images went through one at a time, as with --batch-size 1
    _same(retried, batched, exact=False)
    assert all(p.mask.shape == img.shape for p, img in zip(retried, images))


def test_oom_for_a_single_image_is_a_clear_error(predictor, monkeypatch):
    from model.predictor import GPUOutOfMemoryError

    calls: list[int] = []
    _oom_forward(predictor, monkeypatch, lambda n: True, calls)
    with pytest.raises(GPUOutOfMemoryError, match=r"out of GPU memory at batch size 4.*use --batch-size 1 or -d cpu"):
        predictor.predict(_images(4))
    assert calls == [4, 2, 1]  # the first single image that does not fit stops the batch
    assert isinstance(GPUOutOfMemoryError("x"), RuntimeError)


def _input_folder(root: Path, n: int = 2) -> Path:
    root.mkdir(parents=True)
    for i, img in enumerate(_images(n)):
        Image.fromarray(img).save(root / f"case{i}.png")
    return root


def test_oom_through_inference_run_fails_the_cases_with_the_message(predictor, monkeypatch, tmp_path):
    from model import inference

    calls: list[int] = []
    _oom_forward(predictor, monkeypatch, lambda n: True, calls)
    logged: list[str] = []
    d = _input_folder(tmp_path / "in")
    result = inference.run(predictor, d, tmp_path / "out", fmt="pace", progress=False, log=logged.append)
    assert result.exit_code == inference.EXIT_NOTHING_DONE
    assert len(result.failed) == 2
    for case in result.cases:
        assert "out of GPU memory at batch size 2" in case.error and "-d cpu" in case.error
    assert calls == [2, 1]  # no per-image retries after the predictor gave up
    assert len(logged) == 2 and all("out of GPU memory" in m for m in logged)
    assert "out of GPU memory" in (tmp_path / "out" / "errors.csv").read_text()
    assert not (tmp_path / "out" / "segmentation").exists()


def test_oom_through_process_exits_non_zero_with_the_message(predictor, monkeypatch, tmp_path):
    import process

    calls: list[int] = []
    _oom_forward(predictor, monkeypatch, lambda n: True, calls)
    monkeypatch.setattr(process, "load_predictor", lambda *a, **k: predictor)
    d = _input_folder(tmp_path / "in")
    res = CliRunner().invoke(process.main, ["-i", str(d), "-o", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "out of GPU memory at batch size" in res.stderr and "use --batch-size 1 or -d cpu" in res.stderr
    assert "0 of 2 images processed, 2 failed" in res.stderr
    # a transient failure: only the first batch runs out of memory; everything is written, exit 0
    calls.clear()
    _oom_forward(predictor, monkeypatch, lambda n: len(calls) == 1, calls)
    res = CliRunner().invoke(process.main, ["-i", str(d), "-o", str(tmp_path / "out2"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert calls == [2, 1, 1]
