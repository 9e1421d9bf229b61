"""Train one variant (unet-h, sd-h, mgc-a): ``python -m training.train --config ... --data ... --out RUN``.

The same script runs on one CPU, one GPU, or several GPUs under ``torchrun`` (DistributedDataParallel;
each epoch's sample list is drawn once from the seed and sharded by rank; rank 0 logs and saves).
A frozen encoder trains from the embedding cache (``training.cache``); a fine-tuned one encodes
images on the fly. Every epoch writes ``RUN/state.pt`` atomically (model, optimizer, scheduler,
RNG states, epoch, history, config: ``training.run_state``); ``--resume`` continues from it exactly,
and only with the config the run was started with (``training.config`` reads and checks it). Each epoch's sample order, views and curriculum draws come
from generators seeded by (seed, epoch), so a resumed run ends with the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import copy
import csv
import gc
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.allocator import keep_freed_memory
from model.checkpoint import encoder_weights_info, resolve_encoder_checkpoint, save_model
from model.encoders import ENCODERS
from model.encoders.weights import WeightsError
from model.atomic_files import atomic_path, write_text
from model.io import ImageReadError
from model.network import PFSAMNet, make_config
from model.predictor import encoder_bf16, resolve_device, use_bf16
from model.program import run_program
from model.preprocessing import mask_to_model, preprocess

from .augment import apply_view, class_views
from .cache import MASK_RES, CacheError, build_cache, views_for_classes, views_missing
from .config import AUGMENT_MODES, ConfigError, check_config, config_error_origin, load_config
from .curriculum import curriculum_generator, curriculum_phase, guide_masks
from .datasets import DataError, Record, limit_records, load_pair, load_records
from .losses import multitask_loss
from .metrics import auc_macro, dice, to_jsonable
from .run_state import (BEST_DIR, CURVES_PNG, LAST_DIR, LIMIT_RULE, LOG_CSV, LOG_JSON, STATE_NAME, SUMMARY_JSON,
                        data_digest, load_resume_state, refuse_earlier_run, save_state, set_rng_state,
                        views_left_out)


class NonFiniteLoss(RuntimeError):
    """Training diverged: a non-finite training or validation loss, or non-finite weights."""

    def __init__(self, epoch: int, what: str, state_path: Path):
        kept = (f"The last good checkpoint (epoch {epoch - 1}) is kept in {state_path}" if epoch > 1
                else "No checkpoint was written (the first epoch failed)")
        super().__init__(f"epoch {epoch}: {what}; stopping. {kept}")


def divergence(net: PFSAMNet, val_loss: float | None) -> str | None:
    """What makes an epoch's model unfit to save, or None: a non-finite validation loss (``None``: this
    rank did not validate) or non-finite trainable weights."""
    if val_loss is not None and not math.isfinite(val_loss):
        return f"validation loss is {val_loss}"
    bad = next((n for n, p in net.named_parameters() if p.requires_grad and not torch.isfinite(p).all()), None)
    return f"weights are not finite (e.g. {bad})" if bad else None


def stop_if_diverged(net: PFSAMNet, val_loss: float | None, epoch: int, state_path: Path, distributed: bool,
                     device: torch.device) -> None:
    """NonFiniteLoss before a diverged epoch is saved; under torchrun rank 0 (which validates) tells the
    other ranks, which stop too."""
    what = divergence(net, val_loss)
    if distributed:
        flag = torch.tensor([int(what is not None)], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(flag, src=0)
        if flag.item() and what is None:
            what = "rank 0 found the model diverged (its error is above)"
    if what is not None:
        raise NonFiniteLoss(epoch, what, state_path)


def build_model(cfg: dict) -> PFSAMNet:
    m = cfg["model"]
    seg, cls = dict(m["seg_head"]), dict(m["cls_head"])
    random_init = m.get("encoder_weights") == "random"
    ckpt = resolve_encoder_checkpoint(m["encoder"], m.get("encoder_checkpoint"), random=random_init)
    mcfg = make_config(m["encoder"], m["mode"], seg.pop("type"), cls.pop("type"), seg, cls,
                       encoder_weights=encoder_weights_info(m["encoder"], ckpt, random=random_init))
    return PFSAMNet(mcfg, encoder_weights="random" if random_init else "pretrained", encoder_checkpoint=ckpt)


# ------------------------------------------------------------------------------------------- data
def _leave_stops_to_the_run(worker_id: int) -> None:
    """A DataLoader worker ignores Ctrl-C (the terminal sends it to every process of the run, which stops
    its workers itself) and dies of SIGTERM, the signal its shutdown uses on a worker that does not end
    (not the run's own handler, inherited at the fork; torch's makes a SIGTERM from the run an exit 0):
    a job's scheduler signals every process of the job, and a worker killed first is then known by
    ``_worker_terminated``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _worker_terminated(exc: BaseException) -> bool:
    """torch's error for a DataLoader worker killed by SIGTERM (a job's time limit signals every process
    of the job: the run stops as for its own SIGTERM, not with a traceback and exit 1)."""
    while exc is not None:
        if isinstance(exc, RuntimeError) and "killed by signal: Terminated" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class CachedSet(Dataset):
    """Items from the embedding cache: (embedding, skips, mask, label, index)."""

    def __init__(self, cache, records: list[Record]):
        self.cache, self.records = cache, records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        idx, view = item[:2]
        rec = self.records[idx]
        emb, skips, mask = self.cache.get(rec.image_id, view, np.float16)
        return {"embedding": emb, "features": skips, "mask": mask, "label": rec.label_index, "index": idx}


class ImageSet(Dataset):
    """Items decoded and preprocessed on the fly (fine-tuned encoder): (x, mask, label, index).

    An item is (record index, view index[, epoch, position in the epoch's plan]); with the last two
    and ``random_seed`` set, the view's parameters are drawn from a generator seeded by (seed, epoch,
    position): random, yet the same again in a resumed run or another worker process."""

    def __init__(self, records: list[Record], views: list[str], size: int, normalization: str,
                 random_seed: int | None = None):
        self.records, self.views, self.size, self.norm = records, views, size, normalization
        self.random_seed = random_seed

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        idx, view, *draw = item
        rec = self.records[idx]
        rng = np.random.default_rng([self.random_seed, *draw]) if draw and self.random_seed is not None else None
        image, mask = apply_view(*load_pair(rec), self.views[view], rng)
        x, geom = preprocess(image, self.size, self.norm)
        return {"x": x, "mask": mask_to_model(mask, geom, MASK_RES), "label": rec.label_index, "index": idx}


def view_seed(cfg: dict, net: PFSAMNet) -> int | None:
    """The seed of random view parameters, or None for the fixed views: random only where the encoder
    trains (a frozen one trains on the cache's views with or without --cache) and ``augment`` is
    ``random`` (the default)."""
    augment = cfg.get("augment", "random")
    if augment not in AUGMENT_MODES:
        raise ValueError(f"augment must be random or fixed, not {augment!r}")
    return int(cfg["seed"]) if augment == "random" and not net.frozen else None


def collate(items):
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if key == "features":
            out[key] = [torch.stack([v[i] for v in vals]) for i in range(len(vals[0]))]
        elif isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        else:
            out[key] = torch.tensor(vals)
    return out


def epoch_plan(records: list[Record], cfg: dict, epoch: int, available=None) -> list[tuple[int, int]]:
    """The epoch's (record index, view) list: class-weighted sampling with replacement of
    len(records) items, each with a view drawn from its class's views; seeded by (seed, epoch)."""
    g = np.random.default_rng([cfg["seed"], epoch])
    weights = np.array([float(cfg.get("class_weights", {}).get(r.label, 1.0)) for r in records])
    idx = g.choice(len(records), size=len(records), replace=True, p=weights / weights.sum())
    per_class = class_views(cfg["views"])
    plan = []
    for i in idx:
        choices = per_class[records[i].label]
        if available is not None:
            choices = [v for v in choices if available(i, v)] or [0]
        plan.append((int(i), int(choices[g.integers(len(choices))])))
    return plan


# -------------------------------------------------------------------------------------- training
def run_batch(model, batch, device, bf16, phase, p_gt, gen, cfg, enc_bf16=None):
    """``enc_bf16``: a frozen encoder's own precision (``encoder_bf16``; None: ``bf16``'s)."""
    net = model.module if hasattr(model, "module") else model

    def put(t):  # cached features arrive as fp16: one conversion per batch, on the device,
        t = t.to(device, non_blocking=True)  # into channels-last on CPU (model/heads/layout.py)
        if device.type == "cpu" and t.ndim == 4:
            return t.to(torch.float32, memory_format=torch.channels_last)
        return t.float()

    kw = {}
    if "embedding" in batch:
        kw["embedding"] = put(batch["embedding"])
        if net.needs_features:
            kw["features"] = [put(f) for f in batch["features"]]
    else:  # images for the encoder: channels-last on CPU, as train() puts the model
        kw["x"] = put(batch["x"])
        if net.frozen and enc_bf16 is not None and enc_bf16 != bf16:  # the encoder as inference runs it
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enc_bf16):
                emb, feats = net.encode(kw.pop("x"))
            kw["embedding"], kw["features"] = emb.float(), [f.float() for f in feats] if feats else feats
    mask = batch["mask"].to(device, non_blocking=True)
    labels = batch["label"].to(device)
    if net.uses_mask and phase != "pred":
        kw["guide_mask"] = lambda logits: guide_masks(phase, mask, logits, p_gt, gen)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(**kw)
    lc = cfg["loss"]
    losses = multitask_loss(out["mask_logits"][:, 0], mask, out["class_logits"], labels,
                            lc["seg_weight"], lc["cls_weight"], float(lc["eps"]))
    return out, losses


def evaluate_epoch(model, loader, device, bf16, cfg, enc_bf16=None) -> dict:
    """Validation at the head's grid: Dice on lesion images, accuracy and macro AUC."""
    model.eval()
    dices, probs, labels, losses = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            out, loss = run_batch(model, batch, device, bf16, "pred", 0.0, None, cfg, enc_bf16)
            losses.append(float(loss["loss"]) * len(batch["label"]))
            pm = (torch.sigmoid(out["mask_logits"][:, 0].float()) > 0.5).cpu().numpy()
            gt = batch["mask"].numpy() > 0.5
            for p, g in zip(pm, gt):
                if g.any():
                    dices.append(dice(g, p))
            probs.append(torch.softmax(out["class_logits"].float(), -1).cpu().numpy())
            labels.append(batch["label"].numpy())
    probs_a, labels_a = np.concatenate(probs), np.concatenate(labels)
    acc = float((probs_a.argmax(1) == labels_a).mean())
    try:
        auc = float(auc_macro(labels_a, probs_a))
    except ValueError:
        auc = float("nan")
    return {"val_loss": sum(losses) / len(labels_a), "val_dsc": float(np.mean(dices)) if dices else float("nan"),
            "val_acc": acc, "val_auc": auc}


def write_logs(out: Path, history: list[dict]) -> None:
    write_text(out / LOG_JSON, json.dumps(to_jsonable(history), indent=1, allow_nan=False) + "\n")
    keys = list(history[0])
    with atomic_path(out / LOG_CSV) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(history)


def plot_curves(out: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(ep, [h["train_loss"] for h in history], label="train loss")
    axes[0].plot(ep, [h["val_loss"] for h in history], label="val loss")
    axes[0].set_xlabel("epoch")
    axes[0].legend()
    for k in ("val_dsc", "val_acc", "val_auc"):
        axes[1].plot(ep, [h[k] for h in history], label=k)
    axes[1].set_xlabel("epoch")
    axes[1].legend()
    fig.tight_layout()
    with atomic_path(out / CURVES_PNG) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train(cfg: dict, data: Path, out: Path, device_name: str = "auto", cache_dir: Path | None = None,
          resume: bool = False, workers: int = 0, limit: int | None = None, precision: str = "auto",
          stop_after: int | None = None, cache_build: bool = True) -> dict:
    unused = check_config(cfg)  # before anything is built or written
    if not resume:
        refuse_earlier_run(out)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = 0, 1
    if unused and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: config key(s) {', '.join(unused)} not used by training (kept in config.yaml)", file=sys.stderr)
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            device_name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = resolve_device(device_name) if not device_name.startswith("cuda:") else torch.device(device_name)
    bf16 = use_bf16(precision, device)
    # a frozen encoder runs as inference runs it; one that trains, as the heads (mixed precision)
    enc_bf16 = encoder_bf16(precision, device, cfg["model"]["encoder"]) if cfg["model"]["mode"] == "frozen" else bf16
    if device.type == "cpu":
        keep_freed_memory()
    state_path = out / STATE_NAME
    run_info = {"limit": int(limit) if limit else None, **({"limit_rule": LIMIT_RULE} if limit else {}),
                "precision": "bf16" if bf16 else "fp32", "encoder_precision": "bf16" if enc_bf16 else "fp32",
                "device": device.type,
                "data_sha256": data_digest(data),
                "cache": cache_dir is not None and cfg["model"].get("mode") == "frozen"}
    state = load_resume_state(state_path, cfg, run_info) if resume else None  # before anything is built or written
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    random.seed(seed)

    train_recs, val_recs = load_records(data, "train"), load_records(data, "val")
    for side, recs in (("train", train_recs), ("val", val_recs)):
        if not recs:  # before anything is built or written: an empty side fails only after an epoch
            raise DataError(f"{Path(data) / 'split.csv'}: no {side} images (of the {len(train_recs) + len(val_recs)} "
                            f"listed with {Path(data) / 'labels.csv'}); training needs both splits: prepare the data "
                            "again with a --val-fraction that leaves images on both sides")
    train_recs, val_recs = limit_records(train_recs, val_recs, limit)
    images = {"train": len(train_recs), "val": len(val_recs)}
    net = build_model(cfg).to(device)
    run_info["encoder_sha256"] = net.config["encoder"]["weights"].get("sha256")
    if device.type == "cpu":  # oneDNN's speed depends on the layouts (PFSAMNet.to_cpu_layout)
        net.to_cpu_layout()
    use_cache = net.frozen and cache_dir is not None
    if cache_dir is not None and not use_cache and rank == 0:
        print(f"note: --cache {cache_dir} is not used: the encoder is fine-tuned, so its embeddings change with "
              "every step (the cache serves frozen encoders)", file=sys.stderr)
    if use_cache:
        vc = views_for_classes(cfg["views"])
        cache, failure = None, None
        if rank == 0:
            try:
                cache = build_cache(net, train_recs + val_recs, cache_dir, cfg["views"], device, precision,
                                    view_classes=vc, build=cache_build)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                failure = exc
        if distributed:
            # rank 0 tells the others whether its build failed (they would wait at a barrier for ever)
            failed = torch.tensor([int(failure is not None)], device=device if dist.get_backend() == "nccl" else "cpu")
            dist.broadcast(failed, src=0)
            if failed.item() and rank != 0:
                raise click.ClickException("rank 0 could not build the embedding cache (its error is above)")
        if failure is not None:
            raise failure
        if distributed and rank != 0:  # rank 0 built it (or, with --no-cache-build, did not): this rank opens it
            cache = build_cache(net, train_recs + val_recs, cache_dir, cfg["views"], device, precision,
                                view_classes=vc, build=False)
        tr_set, va_set = CachedSet(cache, train_recs), CachedSet(cache, val_recs)
    else:
        tr_set = ImageSet(train_recs, cfg["views"], net.input_size, net.normalization, random_seed=view_seed(cfg, net))
        va_set = ImageSet(val_recs, cfg["views"], net.input_size, net.normalization)  # orig view only
    # the views the cache lacks at the start are left out of every epoch, and out of a resumed run's
    left_out = views_left_out(state, views_missing(cache, train_recs, cfg["views"]) if use_cache else {},
                              state_path, cfg["views"])
    run_info["views_missing"] = left_out
    avail = (lambda i, v: v not in left_out.get(train_recs[i].image_id, ())) if left_out else None  # noqa: E731

    out.mkdir(parents=True, exist_ok=True)  # after what can fail early (data, encoder weights, cache)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=float(cfg["optim"]["lr"]), weight_decay=float(cfg["optim"].get("weight_decay", 0)))
    epochs = int(cfg["epochs"])
    if cfg["optim"].get("scheduler", "constant") == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    model = net
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    start_epoch, history, best = 1, [], {"epoch": 0, "value": -math.inf, "metric": cfg.get("select", "val_dsc")}
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_epoch, history, best = state["epoch"] + 1, state["history"], state["best"]
        if rank == 0:
            print(f"resumed from {state_path} after epoch {state['epoch']} "
                  f"(curriculum phase {curriculum_phase(cfg, state['epoch'])})", file=sys.stderr)
    if rank == 0:
        write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        c = cfg["curriculum"]
        if net.uses_mask and epochs > 0 and c["mixed_until"] >= epochs:
            key, what = (("gt_until", "never trains on its own predicted mask") if c["gt_until"] >= epochs else
                         ("mixed_until", "never reaches the phase of its own predicted mask alone"))
            print(f"note: curriculum.{key} ({c[key]}) is not before the last epoch ({epochs}): MGC-A {what}, which "
                  "it gets at inference", file=sys.stderr)

    bs = int(cfg["batch_size"])
    va_loader = DataLoader(va_set, batch_size=bs * 2, sampler=[(i, 0) for i in range(len(va_set))],
                           collate_fn=collate, num_workers=workers, worker_init_fn=_leave_stops_to_the_run)
    p_gt = float(cfg["curriculum"].get("p_gt", 0.5))
    for epoch in range(start_epoch, epochs + 1):
        phase = curriculum_phase(cfg, epoch)
        plan = [(i, v, epoch, k) for k, (i, v) in enumerate(epoch_plan(train_recs, cfg, epoch, avail))]
        # every rank takes the same number of samples (DDP needs the same number of steps everywhere)
        plan = plan[:len(plan) - len(plan) % world][rank::world]
        loader = DataLoader(tr_set, batch_size=bs, sampler=plan, collate_fn=collate, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            worker_init_fn=_leave_stops_to_the_run)
        gen = curriculum_generator(seed, epoch, rank, world)
        model.train()
        t0, seen, sums = time.time(), 0, {"loss": 0.0, "seg": 0.0, "ce": 0.0}
        bar = tqdm(loader, desc=f"epoch {epoch}/{epochs} [{phase}]", file=sys.stderr, disable=rank != 0,
                   leave=False)
        for batch in bar:
            _, losses = run_batch(model, batch, device, bf16, phase, p_gt, gen, cfg, enc_bf16)
            if not torch.isfinite(losses["loss"]):
                raise NonFiniteLoss(epoch, f"loss is {float(losses['loss'].detach())}", state_path)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            n = len(batch["label"])
            seen += n
            for k in sums:
                sums[k] += float(losses[k].detach()) * n
            bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}")
        lr = opt.param_groups[0]["lr"]  # the rate this epoch ran at, before the step to the next epoch's
        sched.step()
        secs = time.time() - t0
        row = {"epoch": epoch, "phase": phase, "train_loss": sums["loss"] / max(seen, 1),
               "train_seg": sums["seg"] / max(seen, 1), "train_ce": sums["ce"] / max(seen, 1)}
        if rank == 0:
            row |= evaluate_epoch(net, va_loader, device, bf16, cfg, enc_bf16)
        stop_if_diverged(net, row.get("val_loss"), epoch, state_path, distributed, device)  # before it is saved
        if rank == 0:
            row |= {"lr": lr, "images_per_s": seen * world / secs, "seconds": secs}
            history.append(row)
            value = row.get(best["metric"], float("nan"))
            if value == value and value > best["value"]:
                best = {"epoch": epoch, "value": value, "metric": best["metric"]}
                save_model(net, out / BEST_DIR, provenance=provenance(cfg, data, epoch, row, limit, images))
            save_model(net, out / LAST_DIR, provenance=provenance(cfg, data, epoch, row, limit, images))
            save_state(state_path, net, opt, sched, epoch, history, best, cfg, run_info)
            write_logs(out, history)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                  file=sys.stderr)
        if stop_after is not None and epoch >= stop_after:
            break
    if rank == 0 and history:
        plot_curves(out, history)
        write_text(out / SUMMARY_JSON, json.dumps(to_jsonable({"best": best, "last": history[-1]}), indent=2,
                                                        allow_nan=False) + "\n")
    if distributed:
        # every rank leaves together: a rank that tore down its gloo connections while rank 0 was still
        # saving was seen to abort once ("terminate called without an active exception", exit -6)
        dist.barrier()
        dist.destroy_process_group()
    return {"best": best, "history": history}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it stops as on Ctrl-C (files being written are removed)."""


def _terminated(signum, frame) -> None:
    raise Terminated


def provenance(cfg: dict, data: Path, epoch: int, row: dict, limit: int | None = None,
               images: dict | None = None) -> dict:
    """What a saved model records of its training (config.json's ``provenance``; the model card shows
    it): with ``--limit``, the limit and the images trained and validated on (a quick run's model)."""
    return {"variant": cfg.get("variant"), "data": str(data), "epoch": epoch,
            "metrics": to_jsonable({k: v for k, v in row.items() if k.startswith("val_")}),
            **({"limit": int(limit), "images": dict(images or {})} if limit else {}),
            "train_config": copy.deepcopy(cfg), "torch": torch.__version__}


# the config keys the options set, to name the option behind a bad value (--frozen/--finetune and
# --encoder are choices, --epochs, --batch-size and --seed ranges: click refuses theirs)
OPTION_KEYS = {"optim.lr": "--lr", "model.encoder_checkpoint": "--encoder-checkpoint"}


def _stopped(out: Path, by_sigterm: bool, exc: BaseException, chld: list) -> None:
    """A run stopped by Ctrl-C or SIGTERM: say what can be resumed, exit 130 or 143 (``chld`` gets the
    SIGCHLD handler it sets aside, for the caller to put back)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the rest of the job's SIGTERM: the run is stopping
    # and the rest of its DataLoader workers die of it: torch's SIGCHLD handler would raise again for each,
    # wherever the stop is; the iterator that registered them, held by the traceback's frames, shuts down now
    chld.append(signal.signal(signal.SIGCHLD, signal.SIG_DFL))
    while exc is not None:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
    gc.collect()
    state = out / STATE_NAME
    if int(os.environ.get("RANK", "0")) == 0:
        how = "stopped by SIGTERM" if by_sigterm else "interrupted"
        click.echo(f"{how}: {state} holds the run's last finished epoch; continue it with the same command "
                   "and --resume" if state.is_file() else
                   f"{how} before an epoch ended: nothing to resume in {out}", err=True)
    sys.exit(128 + signal.SIGTERM if by_sigterm else 130)


@click.command(context_settings={"show_default": True})
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Variant config: training/configs/{unet-h,sd-h,mgc-a}.yaml (the paper's), default-{sd-h,mgc-a}.yaml "
                   "(the embedded default model's), litemedsam-unet-h.yaml (UNet-H on the default's encoder; "
                   "its result inside).")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Prepared dataset.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run directory: a new one (a folder holding an earlier run is refused), or the run's own "
                   "with --resume.")
@click.option("--encoder", default=None, type=click.Choice(list(ENCODERS)), help="Override the encoder.")
@click.option("--encoder-checkpoint", default=None, help="SAM/MedSAM checkpoint file for the encoder.")
@click.option("--frozen/--finetune", default=None, help="Freeze the encoder or fine-tune it (config default).")
@click.option("--epochs", type=click.IntRange(1), default=None)
@click.option("--batch-size", type=click.IntRange(1), default=None)
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=click.IntRange(0), default=None)
@click.option("--device", default="auto", help="auto, cpu, cuda.")
@click.option("--precision", default="auto", type=click.Choice(["auto", "bf16", "fp32"]),
              help="auto (bf16 where native; a frozen encoder as inference runs it: LiteMedSAM in fp32, the "
                   "heads in bf16), bf16, fp32.")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="Embedding cache folder (frozen encoder only).")
@click.option("--cache-build/--no-cache-build", default=True,
              help="Encode the views missing from the cache first, or train on the views already there at "
                   "the start (refused for images whose prepared files changed since they were encoded; a "
                   "resumed run samples the views the run started with).")
@click.option("--resume", is_flag=True,
              help="Continue from OUT/state.pt with the settings the run was started with (state.pt records "
                   "them; other settings, another --limit or changed DATA (labels.csv, split.csv) are refused, "
                   "naming each difference; another --precision, device or use of --cache is allowed with a "
                   "warning).")
@click.option("--workers", default=0, type=click.IntRange(0), help="DataLoader worker processes.")
@click.option("--set", "sets", multiple=True, help="Any other config value, e.g. --set model.seg_head.channels=[64,32].")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Only N training images and N/4 validation images (at least 3: one per class), the first by image id of each "
                   "class in turn: smoke runs and benchmarks (bench/cache-speedup.sh); training.cache --limit N "
                   "builds the same images' cache.")
def main(config_path, data, out, encoder, encoder_checkpoint, frozen, epochs, batch_size, lr, seed, device,
         precision, cache_dir, cache_build, resume, workers, sets, limit):
    """Train one variant of the model."""
    overrides = {"model.encoder": encoder, "model.encoder_checkpoint": encoder_checkpoint,
                 "model.mode": None if frozen is None else ("frozen" if frozen else "finetuned"),
                 "epochs": epochs, "batch_size": batch_size, "optim.lr": lr, "seed": seed}
    for s in sets:
        key, eq, value = s.partition("=")
        if not eq or not key.strip():
            raise click.BadParameter(f"{s!r}: give key=value, e.g. --set optim.weight_decay=0.01", param_hint="--set")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{s!r}: the value is not YAML ({' '.join(str(exc).split())})",
                                     param_hint="--set") from None
    if "WORLD_SIZE" not in os.environ:  # torchrun picks each rank's GPU itself
        try:
            resolve_device(device)
        except RuntimeError as exc:
            raise click.BadParameter(str(exc), param_hint="--device") from None
    # SIGTERM (a job's time limit, SLURM's preemption, docker stop) stops the run as Ctrl-C does, saying what
    # can be resumed; the caller's handler comes back afterwards (main also runs in-process: tests, notebooks)
    previous = signal.signal(signal.SIGTERM, _terminated)
    chld: list = []
    try:
        cfg = load_config(config_path, overrides)
        result = train(cfg, Path(data), Path(out), device, Path(cache_dir) if cache_dir else None, resume,
                       workers, limit, precision, cache_build=cache_build)
    except NonFiniteLoss as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:  # click would say "Aborted!" alone
        _stopped(Path(out), isinstance(exc, Terminated), exc, chld)
    except ConfigError as exc:
        given = {key: f"{flag} {overrides[key]}" for key, flag in OPTION_KEYS.items() if overrides.get(key) is not None}
        raise click.ClickException(config_error_origin(str(exc), config_path, sets, given)) from None
    except (WeightsError, CacheError, DataError, ImageReadError, FileNotFoundError) as exc:  # names the file
        raise click.ClickException(str(exc)) from None
    except RuntimeError as exc:
        if not _worker_terminated(exc):
            raise
        _stopped(Path(out), True, exc, chld)  # a worker killed by the job's SIGTERM first
    finally:
        signal.signal(signal.SIGTERM, previous)
        if chld and chld[0] is not None:  # torch's, once its workers are shut down (in-process callers)
            signal.signal(signal.SIGCHLD, chld[0])
    best = result["best"]
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 alone evaluates, saves and reports
        return
    if cfg["epochs"] == 0:  # --set epochs=0: the run's folder alone
        click.echo(f"done: 0 epochs, nothing trained; {out} holds the run's config alone", err=True)
        return
    if best["epoch"] == 0:  # e.g. AUC on a validation split with one class (smoke runs with --limit)
        click.echo(f"done: {best['metric']} was undefined in every epoch, so no best/ was written; "
                   f"the last epoch's model is in {out}/last (training.export … --which last)", err=True)
        return
    click.echo(f"done: best {best['metric']}={best['value']:.4f} at epoch {best['epoch']}; model in {out}/best")


if __name__ == "__main__":
    run_program(main)  # Ctrl-C: exit by SIGINT, so that a shell loop over runs stops too
