"""A run's ``state.pt``: everything to continue training (model, optimiser, scheduler, RNG states, epoch,
history, config, how the run was started), written atomically every epoch, and read back only for the
run it belongs to: ``--resume`` with other settings, another ``--limit`` or other data is refused."""
from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path

import click
import torch

from model.checkpoint import encoder_weights_info
from model.encoders.weights import WeightsError, refuse_torchscript
from model.atomic_files import atomic_path

STATE_NAME = "state.pt"
# which images --limit takes (datasets.first_of_each_class), recorded so that --resume never continues
# a run on other images than it started with
LIMIT_RULE = "each class in turn"


# what a run writes into its folder once an epoch has ended (config.yaml alone: none had); train.py
# writes them under these names
LAST_DIR, BEST_DIR = "last", "best"
LOG_JSON, LOG_CSV, SUMMARY_JSON, CURVES_PNG = "log.json", "log.csv", "summary.json", "curves.png"
RUN_FILES = (STATE_NAME, LAST_DIR, BEST_DIR, LOG_JSON, LOG_CSV, SUMMARY_JSON, CURVES_PNG)


def refuse_earlier_run(out: Path) -> None:
    """A new run (no ``--resume``) into a folder that holds an earlier run's results would mix with
    them (its best/ kept and exported, its state.pt overwritten): refused, before anything is written."""
    found = [name for name in RUN_FILES if (Path(out) / name).exists()]
    if found:
        resume = "pass --resume to continue it, or " if STATE_NAME in found else ""
        raise click.ClickException(
            f"--out {out} holds an earlier run ({', '.join(found)}); {resume}choose another --out or remove that "
            "folder first (a new run there would mix with that run's best/ and logs)")


def get_rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore ``get_rng_state()``'s states; torch takes them as CPU byte tensors only, wherever the
    state was loaded to."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def save_state(path: Path, net, opt, sched, epoch: int, history: list, best: dict, cfg: dict,
               run: dict | None = None) -> None:
    """``run``: how the run was started beyond its config (``--limit``, precision, device type, the
    encoder weights' sha256); ``load_resume_state`` checks it."""
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "epoch": epoch, "history": history, "best": best, "rng": get_rng_state(), "config": cfg,
             "run": run or {}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _flat(cfg, prefix: str = "") -> dict:
    """A nested config as {dotted key: value}."""
    if not isinstance(cfg, dict) or not cfg:
        return {prefix: cfg}
    return {k: v for key, value in cfg.items() for k, v in _flat(value, f"{prefix}.{key}" if prefix else str(key)).items()}


def _same_encoder_weights(state: dict, cfg: dict) -> bool:
    """Whether the encoder checkpoint ``cfg`` names has the sha256 the saved run started from (a
    checkpoint moved or copied elsewhere is the same run; state.pt of older versions records none)."""
    saved = (state.get("run") or {}).get("encoder_sha256")
    m = cfg["model"]
    try:
        info = encoder_weights_info(m["encoder"], m.get("encoder_checkpoint"),
                                    random=m.get("encoder_weights") == "random")
    except WeightsError:
        return False
    return bool(saved) and info.get("sha256") == saved


def data_digest(data: Path) -> str | None:
    """sha256 of DATA's labels.csv and split.csv (the images, their labels, sources and split): a resumed
    run must see the data it started on. None when they cannot be read (loading the records says why)."""
    h = hashlib.sha256()
    try:
        for name in ("labels.csv", "split.csv"):
            h.update((Path(data) / name).read_bytes())
            h.update(b"\0")
    except OSError:
        return None
    return h.hexdigest()


def load_resume_state(path: Path, cfg: dict, run: dict | None = None) -> dict:
    """``path`` (state.pt) with every tensor on the CPU (torch.set_rng_state takes CPU tensors only;
    the optimizer's load_state_dict moves its state to the parameters' device), refused when the run
    was started with another config (epochs, curriculum, optimiser, ...), another ``--limit`` or other
    data (DATA's labels.csv or split.csv changed): a resumed run continues the run that was started,
    never a different one. Another precision, device type or use of the embedding cache is allowed (a
    run started on a GPU may end on another machine) with a warning: the weights then differ from an
    uninterrupted run's by more than rounding."""
    if not path.is_file():
        raise click.ClickException(f"--resume: {path} not found")
    try:
        refuse_torchscript(path)
    except WeightsError as exc:
        raise click.ClickException(f"--resume: {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - cut short, or not ours: torch.load raises many kinds on such bytes
        raise click.ClickException(f"--resume: {path} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): "
                                   f"it was not written whole, or not by training.train; start the run again "
                                   f"into a new --out") from None
    if not isinstance(state, dict):
        raise click.ClickException(f"--resume: {path} holds no training state (a {type(state).__name__}); start the "
                                   f"run again into a new --out")
    saved = state.get("config")
    if saved is None:  # written before state.pt recorded its config: nothing to compare
        print(f"warning: {path} records no config (an older version wrote it); resuming with this one",
              file=sys.stderr)
        return state
    old, new = _flat(saved), _flat(cfg)
    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k, "(unset)") != new.get(k, "(unset)")]
    if "model.encoder_checkpoint" in keys and _same_encoder_weights(state, cfg):
        keys.remove("model.encoder_checkpoint")
        print(f"note: the encoder checkpoint moved ({old.get('model.encoder_checkpoint')} → "
              f"{new.get('model.encoder_checkpoint')}); same sha256, resuming", file=sys.stderr)
    diff = [f"{k}: {old.get(k, '(unset)')!r} → {new.get(k, '(unset)')!r}" for k in keys]
    if diff:
        raise click.ClickException(
            f"--resume: {path} continues a run started with other settings ({'; '.join(diff)}); resume with the "
            f"settings the run was started with (its config.yaml beside state.pt) or train into another --out")
    before, now = state.get("run") or {}, run or {}
    if before.get("data_sha256") and now.get("data_sha256") and before["data_sha256"] != now["data_sha256"]:
        raise click.ClickException(
            f"--resume: {path} continues a run started on other data: DATA's labels.csv or split.csv changed since "
            f"(training.prepare was run again?); restore that data or train into another --out")
    if "limit" in before and before["limit"] != now.get("limit"):
        raise click.ClickException(
            f"--resume: {path} continues a run started with --limit {before['limit'] or '(none)'}, not "
            f"--limit {now.get('limit') or '(none)'} (another set of images); resume with the same --limit")
    if before.get("limit") and before.get("limit_rule") != now.get("limit_rule"):
        raise click.ClickException(
            f"--resume: {path} continues a --limit run of an earlier version, whose --limit took other images "
            f"(the first N by image id, not each class in turn); train into another --out")
    shown = {"cache": lambda v: "embeddings from the cache" if v else "the encoder on the fly"}
    if "precision" in before and "encoder_precision" not in before:  # an older state: the encoder ran as the heads
        before = dict(before, encoder_precision=before["precision"])
    changed = [f"{k.replace('_', ' ')}: {shown.get(k, str)(before[k])} → {shown.get(k, str)(now.get(k))}"
               for k in ("precision", "encoder_precision", "device", "cache")
               if k in before and k in now and before[k] != now[k]]
    if changed:
        print(f"warning: {path} was written by a run with another {', '.join(changed)}; resuming, but the "
              f"result will differ from an uninterrupted run's", file=sys.stderr)
    return state


def views_left_out(state: dict | None, lacking: dict[str, list[int]], path: Path,
                   views: list[str]) -> dict[str, list[int]]:
    """The views the run leaves out of its sampling, {image_id: [view index]}: those the embedding cache
    lacked when the run started (``--no-cache-build`` on a partly built cache; ``lacking`` is what it
    lacks now). A resumed run leaves out what state.pt records, so that it samples the views the run
    started with whatever the cache holds now; refused where the cache now lacks a view the run
    sampled (a state.pt of an older version records none: the cache's views now)."""
    started = ((state or {}).get("run") or {}).get("views_missing")
    if started is None:
        return lacking
    gone = [(i, v) for i, vs in sorted(lacking.items()) for v in vs if v not in started.get(i, ())]
    if gone:
        i, v = gone[0]
        raise click.ClickException(
            f"--resume: {path} continues a run that sampled {len(gone)} views the embedding cache lacks now "
            f"(e.g. {views[v]!r} of {i}); resume without --no-cache-build (the cache then encodes them) or "
            f"with the --cache and --precision the run was started with")
    if sum(map(len, started.values())) > sum(map(len, lacking.values())):
        print(f"note: {path} was started on a cache without {sum(map(len, started.values()))} of the views; the "
              f"resumed run leaves them out too, as the run did", file=sys.stderr)
    return {i: list(vs) for i, vs in started.items()}
