"""Frozen-encoder embedding cache: each image view encoded once, reused every epoch.

Stored under ``CACHE/<key>/`` as memory-mapped fp16 arrays (``embedding.f16``: N x V x 256 x 64 x 64,
``skip{i}.f16`` when the head needs the stage features) plus the training targets at the head's
resolution (``mask.u8``: N x V x R x R) and a ``done.u8`` map, so an interrupted build resumes. Images are rows in
the order ``meta.json`` lists them; a build for images the cache lacks appends them (the files grow).
The key hashes everything the cached values depend on: encoder name, input size, normalisation,
the sha256 of the encoder weights, the precision, the views, the source code of the encoder's
module, and a fingerprint of the preprocessing: the exact bytes that ``model.preprocessing`` and
``training.augment`` produce for a fixed probe image in every view (so a change of what they
compute starts a new cache, an edit that computes the same does not). ``meta.json`` records the
sha256 of each image's prepared image and mask files: an image whose files changed (the data
prepared again) is encoded again, and training on the cache as it is (``build=False``) refuses it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import os
import shutil
import sys
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from model.allocator import keep_freed_memory
from model.atomic_files import write_text
from model.checkpoint import encoder_weights_info, resolve_encoder_checkpoint
from model.encoders import ENCODERS
from model.encoders.weights import WeightsError
from model.io import ImageReadError
from model.network import PFSAMNet, make_config
from model.preprocessing import mask_to_model, preprocess
from model.predictor import encoder_bf16, resolve_device

from .augment import apply_view, class_views
from .config_values import views_problem
from .datasets import DataError, Record, content_sha, limit_records, load_pair, load_records

MASK_RES = 256


def _source_sha(module) -> str:
    """sha256 of a module's source and of the files it lists in ``CODE_FILES`` (code it runs that
    lives elsewhere, e.g. the SAM ViT's fused attention kernel)."""
    h = hashlib.sha256()
    for path in (Path(inspect.getsourcefile(module)), *getattr(module, "CODE_FILES", ())):
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def preprocessing_fingerprint(size: int, normalization: str, views: list[str]) -> str:
    """sha256 of what preprocessing + augmentation compute for fixed probe images (grey and RGB)."""
    rng = np.random.default_rng(1234)
    h = hashlib.sha256()
    for shape in ((37, 53), (61, 29, 3)):
        probe = rng.integers(0, 256, shape, dtype=np.uint8)
        mask = (rng.random(shape[:2]) > 0.7).astype(np.uint8)
        for view in views:
            img, m = apply_view(probe, mask, view)
            x, geom = preprocess(img, size, normalization)
            h.update(x.numpy().tobytes())
            h.update(mask_to_model(m, geom, MASK_RES).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(model: PFSAMNet, views: list[str], precision: str, with_features: bool) -> str:
    enc = model.config["encoder"]
    enc_module = sys.modules[type(model.encoder).__module__]
    weights = enc["weights"].get("sha256", enc["weights"].get("source"))
    if weights == "random":  # random weights differ by the seed they were drawn with: key them by their values
        digest = hashlib.sha256()
        for name, t in model.encoder.state_dict().items():
            digest.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
        weights = f"random:{digest.hexdigest()[:16]}"
    payload = {"encoder": enc["name"], "input_size": enc["input_size"], "normalization": enc["normalization"],
               "weights": weights, "precision": precision,
               "views": list(views), "features": with_features, "mask_res": MASK_RES,
               "encoder_code": _source_sha(enc_module),
               "preprocessing": preprocessing_fingerprint(enc["input_size"], enc["normalization"], list(views))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


class EmbeddingCache:
    def __init__(self, root: Path, ids: list[str], views: list[str], skip_shapes: list[tuple] | None,
                 mode: str = "r+"):
        self.root, self.ids, self.views = root, ids, views
        n, v = len(ids), len(views)
        self.index = {iid: i for i, iid in enumerate(ids)}

        def mm(name, dtype, shape):
            path = root / name
            if path.exists():  # numpy would pad a short file with zeros and serve them as embeddings
                # (a longer one holds rows of a growth cut short before meta.json listed them: never read)
                want = int(np.prod(shape)) * np.dtype(dtype).itemsize
                if path.stat().st_size < want:
                    raise CacheError(f"{path}: {path.stat().st_size} bytes where the cache needs {want} (cut short "
                                     f"by a full disk or a copy?); delete {root} and build the cache again")
            return np.memmap(path, dtype=dtype, mode=mode if path.exists() else "w+", shape=shape)

        self.embedding = mm("embedding.f16", np.float16, (n, v, 256, 64, 64))
        self.skips = [mm(f"skip{i}.f16", np.float16, (n, v, *s)) for i, s in enumerate(skip_shapes or [])]
        self.mask = mm("mask.u8", np.uint8, (n, v, MASK_RES, MASK_RES))
        self.done = mm("done.u8", np.uint8, (n, v))

    def get(self, image_id: str, view: int, dtype=np.float32):
        """(embedding, skips, mask) of one view; ``dtype=np.float16`` leaves the features as stored
        (half the bytes to copy; the training loop converts them once per batch)."""
        i = self.index[image_id]
        emb = torch.from_numpy(np.array(self.embedding[i, view], dtype=dtype))
        skips = [torch.from_numpy(np.array(s[i, view], dtype=dtype)) for s in self.skips]
        mask = torch.from_numpy(np.asarray(self.mask[i, view], dtype=np.float32))
        return emb, skips, mask

    def flush(self):
        for arr in (self.embedding, self.mask, self.done, *self.skips):
            arr.flush()


class CacheError(ValueError):
    """No usable cache where one was asked for; the message says why and what to run."""


def _array_files(n: int, v: int, skip_shapes: list[tuple] | None) -> dict[str, int]:
    """The cache's files and their sizes in bytes for n images of v views (rows: image-major)."""
    sizes = {"embedding.f16": n * v * 256 * 64 * 64 * 2, "mask.u8": n * v * MASK_RES * MASK_RES, "done.u8": n * v}
    for i, shape in enumerate(skip_shapes or []):
        sizes[f"skip{i}.f16"] = n * v * int(np.prod(shape)) * 2
    return sizes


def _grow_files(root: Path, listed: int, n: int, v: int, skip_shapes: list[tuple] | None) -> None:
    """Grow the cache's files from the ``listed`` images meta.json lists to ``n``. The new rows are zeros
    (sparse on disk) with done flags 0, so they are encoded; the listed rows do not move. A file shorter
    than the listed images is left as it is, for ``EmbeddingCache`` to report as damaged."""
    before = _array_files(listed, v, skip_shapes)
    for name, size in _array_files(n, v, skip_shapes).items():
        path = root / name
        if path.exists() and path.stat().st_size >= before[name]:
            os.truncate(path, size)


@contextlib.contextmanager
def _folder_errors(root: Path, build: bool):
    """An OSError opening the cache (a read-only or full folder) as a CacheError naming the folder."""
    try:
        yield
    except OSError as exc:
        raise CacheError(f"{root}: the embedding cache cannot be {'written' if build else 'read'} there "
                         f"({exc.strerror or exc}); give --cache a folder this user can write") from None


def build_cache(model: PFSAMNet, records: list[Record], cache_dir: str | Path, views: list[str],
                device: torch.device, precision: str = "auto", batch_size: int = 8,
                view_classes: dict[str, list[str]] | None = None, build: bool = True) -> EmbeddingCache:
    """Encode every (record, view) not yet in the cache; return the cache (memory-mapped).

    ``view_classes``: the classes each view is computed for (default: all); only training images
    get views beyond the first (validation reads the first view alone). Views are built in
    order, so a partly built cache already holds the first view of every image. ``build=False``
    encodes nothing: training then samples only the views cached when it starts (the first view of
    every image must be there), e.g. while another process is still filling the cache.
    """
    with_features = model.needs_features
    precision_name = "bf16" if encoder_bf16(precision, device, model.config["encoder"]["name"]) else "fp32"
    key = cache_key(model, views, precision_name, with_features)
    root = Path(cache_dir) / key
    other_precision = {"bf16": "fp32", "fp32": "bf16"}[precision_name]
    other_key = cache_key(model, views, other_precision, with_features)
    # a cache of this model at the other precision (one built under --precision auto before session 49 ran
    # LiteMedSAM in bf16 on CPUs and GPUs with native bf16): named, with the option that uses it
    hint = (f"; the one there for {other_precision}, {other_key}, is this model's at --precision {other_precision}"
            if (Path(cache_dir) / other_key / "meta.json").is_file() else "")
    if not build and not (root / "meta.json").is_file():  # say so before creating anything
        others = sorted(p.parent.name for p in Path(cache_dir).glob("*/meta.json"))
        raise CacheError(f"{cache_dir}: no cache for this model (key {key}: encoder, weights, precision "
                         f"{precision_name}, views, encoder code or preprocessing "
                         f"differ from the caches there: {', '.join(others) or 'none'}{hint}); "
                         "build it with training.cache or train without --no-cache-build")
    with _folder_errors(root, build):
        root.mkdir(parents=True, exist_ok=True)
    ids = sorted(r.image_id for r in records)
    meta_path = root / "meta.json"
    skip_shapes = None
    if with_features:
        with torch.no_grad():
            _, feats = model.encoder(torch.zeros(1, 3, model.input_size, model.input_size, device=device))
        skip_shapes = [tuple(f.shape[1:]) for f in feats]
    content = {r.image_id: content_sha(r) for r in records}  # the prepared image and mask files
    if meta_path.exists():  # a subset of the cached images (e.g. --limit) is served from the same arrays
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        missing = sorted(set(ids) - set(meta["ids"]))
        if missing and not build:
            raise CacheError(f"{root}: {len(missing)} of these images are not in the cache (e.g. {missing[0]}; "
                             "it was built for fewer, e.g. with --limit); add them with training.cache or train "
                             "without --no-cache-build")
        with _folder_errors(root, build):
            if missing:  # appended after the cached images, whose rows and flags stay where they are
                _grow_files(root, len(meta["ids"]), len(meta["ids"]) + len(missing), len(views), skip_shapes)
                meta["ids"] = meta["ids"] + missing
                write_text(meta_path, json.dumps(meta))  # last: until then the cache lists the images it had
        ids = meta["ids"]
    else:
        others = sorted(p.parent.name for p in Path(cache_dir).glob("*/meta.json") if p.parent.name != key)
        if others:  # a new key beside older ones: say so before hours of encoding (and their disk stays taken)
            print(f"note: {cache_dir} holds {len(others)} other cache(s) ({', '.join(others)}), none for this model: "
                  f"encoding a new one, {key} (encoder {model.config['encoder']['name']}, precision {precision_name}, "
                  f"views {','.join(views)}; a cache of another precision, encoder code or preprocessing is not "
                  f"reused: remove one no longer needed to free its disk{hint})", file=sys.stderr)
        meta = {"ids": ids, "views": views, "skip_shapes": skip_shapes, "content": {}}
        with _folder_errors(root, build):
            write_text(meta_path, json.dumps(meta))
    with _folder_errors(root, build):  # read-only when nothing is to be built: a finished cache on a read-only mount
        cache = EmbeddingCache(root, ids, views, skip_shapes, mode="r+" if build else "r")
    stale = sorted(i for i, sha in content.items() if meta.get("content", {}).get(i) != sha)
    if stale and not build:
        raise CacheError(f"{root}: {len(stale)} cached images were encoded from other image or mask files than "
                         f"the data's now (e.g. {stale[0]}; re-prepared?) or by a version that recorded none; "
                         "rebuild the cache with training.cache or train without --no-cache-build")
    if stale:  # encode them again: their done flags on disk are cleared before the new hashes are recorded
        for iid in stale:
            cache.done[cache.index[iid]] = 0
        cache.done.flush()
        meta["content"] = {**meta.get("content", {}), **{i: content[i] for i in stale}}
        write_text(meta_path, json.dumps(meta))
    view_classes = view_classes or {}
    todo = [(cache.index[r.image_id], r, v) for v in range(len(views))
            for r in sorted(records, key=lambda r: r.image_id)
            if not cache.done[cache.index[r.image_id], v]
            and (v == 0 or r.split == "train") and r.label in view_classes.get(views[v], [r.label])]
    if not build:
        first = [r.image_id for r in records if not cache.done[cache.index[r.image_id], 0]]
        if first:
            raise CacheError(f"{root}: {len(first)} images lack the cached {views[0]!r} view "
                             f"(e.g. {first[0]}); build the cache first")
        return cache
    if not todo:
        return cache
    per_view = cache.embedding[0, 0].nbytes + cache.mask[0, 0].nbytes + sum(s[0, 0].nbytes for s in cache.skips)
    free = shutil.disk_usage(root).free
    if free < len(todo) * per_view:  # the memory-mapped files take their disk space as they are written:
        # a disk that fills up mid-build kills the process with SIGBUS, not an error
        raise CacheError(f"{root}: {len(todo)} views to encode need {len(todo) * per_view / 2**30:.2f} GiB, and "
                         f"only {free / 2**30:.2f} GiB are free there; free space or give --cache another folder")
    bf16 = encoder_bf16(precision, device, model.config["encoder"]["name"])  # as inference runs the encoder
    encoder = copy.deepcopy(model.encoder).eval()
    if hasattr(encoder, "fuse"):
        # BatchNorm folded into convs: same values, faster. The new convs are randomly initialised
        # before being overwritten: fork the RNG so that a run which builds the cache draws the same
        # random numbers afterwards (dropout, ...) as a run which finds it built.
        with torch.random.fork_rng(devices=[]):
            encoder.fuse()
    if device.type == "cpu":
        encoder = encoder.to(memory_format=torch.channels_last)
        if not bf16 and hasattr(encoder, "use_onednn_postops"):
            encoder.use_onednn_postops()  # GELU inside the convs and linears: same values, faster
        keep_freed_memory()  # else every batch's activations are page-faulted afresh (model/allocator.py)
    bar = tqdm(total=len(todo), desc=f"cache {key[:8]}", unit="view", file=sys.stderr)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        xs, targets = [], []
        loaded: dict[str, tuple] = {}
        for _, rec, v in chunk:
            if rec.image_id not in loaded:
                loaded[rec.image_id] = load_pair(rec)
            image, mask = apply_view(*loaded[rec.image_id], views[v])
            x, geom = preprocess(image, model.input_size, model.normalization)
            xs.append(x)
            targets.append(mask_to_model(mask, geom, MASK_RES))
        x = torch.stack(xs).to(device)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            emb, feats = encoder(x)
        for j, (i, _, v) in enumerate(chunk):
            cache.embedding[i, v] = emb[j].float().cpu().numpy().astype(np.float16)
            for s, f in zip(cache.skips, feats):
                s[i, v] = f[j].float().cpu().numpy().astype(np.float16)
            cache.mask[i, v] = targets[j].numpy().astype(np.uint8)
            cache.done[i, v] = 1
        if (start // batch_size) % 10 == 0:
            cache.flush()
        bar.update(len(chunk))
    bar.close()
    cache.flush()
    return cache


def views_missing(cache: EmbeddingCache, records: list[Record], views: list[str]) -> dict[str, list[int]]:
    """The views each record's class draws from (``augment.class_views``) that the cache lacks:
    {image_id: [view index, ...]} for the records that lack any ({} for a complete cache)."""
    from .augment import class_views

    per_class = class_views(views)
    out = {}
    for r in records:
        lacking = [v for v in per_class[r.label] if not cache.done[cache.index[r.image_id], v]]
        if lacking:
            out[r.image_id] = lacking
    return out


def views_for_classes(views: list[str]) -> dict[str, list[str]]:
    """Which classes need which view (from ``augment.class_views``): skip views nobody samples."""
    per_class = class_views(views)
    return {v: [c for c, idx in per_class.items() if i in idx] for i, v in enumerate(views)}


def view_list(ctx, param, value: str) -> list[str]:
    views = [v.strip() for v in value.split(",")]
    problem = views_problem(views)
    if problem:
        raise click.BadParameter(f"{value!r} ({problem}); the config's views, comma-separated")
    return views


@click.command()
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False), help="Prepared dataset.")
@click.option("--cache", "cache_dir", required=True, type=click.Path(file_okay=False), help="Cache folder.")
@click.option("--encoder", default="litemedsam", show_default=True, type=click.Choice(list(ENCODERS)))
@click.option("--encoder-checkpoint", default=None, help="SAM/MedSAM checkpoint file (not for litemedsam).")
@click.option("--views", default="orig,hflip,zoom,bright", show_default=True, callback=view_list,
              help="The training config's views, in its order (orig first).")
@click.option("--features/--no-features", default=False, help="Also cache the stage features (UNet-H).")
@click.option("--device", default="auto", show_default=True)
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "bf16", "fp32"]),
              help="auto (bf16 where native, for an encoder that inference runs in bf16 too: SAM's ViTs; "
                   "LiteMedSAM in fp32), bf16, fp32: training.train's --precision.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--first-view-only", is_flag=True,
              help="Encode only the first view (orig) of every image; the cache keeps its key, so training "
                   "with --no-cache-build samples that view only (how the embedded default was trained).")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Only the images training.train --limit N trains and validates on (N training and N/4 "
                   "validation images, each class in turn): a cache for a quick run. A later build or run "
                   "on more images adds the images it lacks to it.")
def main(data, cache_dir, encoder, encoder_checkpoint, views, features, device, precision, batch_size,
         first_view_only, limit):
    """Precompute the frozen-encoder embedding cache for a prepared dataset."""
    wanted = views_for_classes(views)
    if first_view_only:
        wanted = {v: (classes if i == 0 else []) for i, (v, classes) in enumerate(wanted.items())}
    try:
        ckpt = resolve_encoder_checkpoint(encoder, encoder_checkpoint)
        info = encoder_weights_info(encoder, ckpt)
    except WeightsError as exc:
        raise click.ClickException(str(exc)) from None
    cfg = make_config(encoder, "frozen", "unet-h" if features else "sd-h", "gap", encoder_weights=info)
    try:
        dev = resolve_device(device)
    except RuntimeError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    net = PFSAMNet(cfg, encoder_checkpoint=ckpt).to(dev)
    try:
        train, val = limit_records(load_records(data, "train"), load_records(data, "val"), limit)
        cache = build_cache(net, train + val, cache_dir, views, dev, precision, batch_size, wanted)
    except (CacheError, DataError, ImageReadError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    mine = [cache.index[r.image_id] for r in train + val]
    done = cache.done[mine].sum(axis=0)
    click.echo(f"{cache.root}: {len(mine)} images ({len(train)} train, {len(val)} val) of the {len(cache.ids)} "
               "it holds; views encoded for them: "
               + ", ".join(f"{v} {int(n)}" for v, n in zip(views, done)), err=True)


if __name__ == "__main__":
    main()
