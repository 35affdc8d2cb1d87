"""Frozen backbone -> HDF5 embedding cache: chunked, atomic, resumable, content-keyed.

The cache is keyed by everything that changes the numbers (backbone, weights
hash, input size, preprocessing, the exact file list); a hit does no forward
pass, a miss never reuses stale features. Rows are appended batch by batch to
``<backbone>.h5.partial`` and flushed, so an interrupted run resumes from its
last complete batch; the file is renamed into place only when complete.

Taps (``pipeline.taps``) add one dataset per tapped layer under each split's
``taps/`` group, written with the final embedding from the same forward pass.
``--views K`` adds a ``views`` group: K augmented passes over the training
images (the fine-tune's own augmentation layers), for heads' ``--train-views``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline import backbones, engines, lock, runtimes
from pipeline import taps as taps_mod
from pipeline.config import Config, library_versions, run_record, writable_dir, write_json_atomic
from pipeline.data import SPLITS, Dataset, from_config, image_dataset
from pipeline.errors import DISK_FULL, PipelineError, first_line

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
KEY_FIELDS = (
    "format",
    "backbone",
    "weights",
    "weights_sha256",
    "input_size",
    "preprocessing",
    "dataset_fingerprint",
    "class_names",
    "taps",
    "views",
    "precision",
)
SHOWN = ("backbone", "weights", "input_size", "preprocessing", "precision")  # old -> new in the stale message
VIEWS = "views"  # augmented training views, a group beside the split groups


@dataclass
class ExtractResult:
    path: Path
    cache_hit: bool
    n_images: int
    seconds: float
    skipped: dict[str, list[str]]


def cache_path(cfg: Config) -> Path:
    return Path(cfg.artifacts) / "features" / cfg.dataset_name / f"{backbones.name_for(cfg.backbone.backbone)}.h5"


def cache_key(
    spec: backbones.BackboneSpec, weights: backbones.Weights, size: int, ds: Dataset, cfg: Config | None = None
) -> dict:
    """What makes the numbers. Taps are keyed as requested (resolving names needs the model,
    which a cache hit must not build); without taps or views the key is what older caches have."""
    extra = {}
    if cfg is not None and cfg.extract.taps and list(cfg.extract.taps) != [taps_mod.NONE]:
        extra["taps"] = json.dumps({"taps": list(cfg.extract.taps), "grid": cfg.extract.tap_grid})
    if cfg is not None and cfg.extract.views:
        from pipeline.finetune import AUGMENT_SEEDS

        views = {"views": cfg.extract.views, "augment": list(cfg.finetune.augment), "seed": cfg.data.seed}
        views["seeds"] = AUGMENT_SEEDS
        extra["views"] = json.dumps(views)
    return {
        "format": CACHE_FORMAT,
        "backbone": spec.name,
        "weights": weights.source,
        "weights_sha256": weights.sha256 or "",
        "input_size": size,
        "preprocessing": spec.preprocessing,
        "dataset_fingerprint": ds.fingerprint(),
        "class_names": json.dumps(ds.class_names),
        "precision": backbones.compute_precision(cfg.backbone.mixed_precision if cfg else True),
        **extra,
    }


def read_key(f: h5py.File) -> dict:
    """The key a cache was made with. Caches from before ``precision`` was keyed recorded only their
    device, and on a CPU that settles it: float32."""
    key = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items() if k in KEY_FIELDS}
    if "precision" not in key and f.attrs.get("device") == "CPU":
        key["precision"] = "float32 (CPU)"
    return key


def _differences(old: dict, new: dict) -> list[str]:
    return [
        f"{k} changed: {old.get(k) or '(not recorded)'} -> {new.get(k)}" if k in SHOWN else f"{k} changed"
        for k in KEY_FIELDS
        if old.get(k) != new.get(k)
    ]


def _contents(f: h5py.File) -> tuple[int, dict[str, list[str]]]:
    """Embeddings stored, and the ids skipped as unreadable, per split."""
    n = sum(f[s]["ids"].shape[0] for s in SPLITS)
    return n, {s: f[s]["skipped"].asstr()[()].tolist() for s in SPLITS}


def _create_rows(g: h5py.Group, dim: int, taps: list[taps_mod.Tap]) -> None:
    g.create_dataset("embeddings", (0, dim), "float32", maxshape=(None, dim), chunks=(256, dim))
    g.create_dataset("labels", (0,), "int64", maxshape=(None,), chunks=(4096,))
    g.create_dataset("ids", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(4096,))
    if taps:
        tg = g.create_group("taps")
        for t in taps:
            d = tg.create_dataset(t.layer, (0, t.width), "float32", maxshape=(None, t.width), chunks=(256, t.width))
            d.attrs.update(layer=t.layer, width=t.width, shape=list(t.shape), grid=t.grid)
    g.attrs.update(rows=0, next_index=0)


def row_datasets(g: h5py.Group) -> list[str]:
    """Every per-row dataset of a group: embeddings, labels, ids, then its taps in order."""
    names = ["embeddings", "labels", "ids"]
    if "taps" in g:
        names += [f"taps/{n}" for n in json.loads(g.file.attrs["tap_layers"])]
    return names


def _open_partial(path: Path, key: dict, dim: int, taps: list[taps_mod.Tap], groups: tuple[str, ...]) -> h5py.File:
    """Reopen a partial cache made with the same key, or start a new one."""
    if path.exists():
        try:
            f = h5py.File(path, "a")
        except OSError:
            log.warning("warning: %s is unreadable (killed mid-write?); starting over", path.name)
            path.unlink()
        else:
            if read_key(f) == key and all(s in f for s in groups):
                for s in groups:
                    g = f[s]
                    rows = int(g.attrs["rows"])
                    for name in row_datasets(g):
                        g[name].resize(rows, axis=0)
                done = sum(int(f[s].attrs["rows"]) for s in groups)
                log.info("resuming %s: %d embeddings already written", path.name, done)
                return f
            f.close()
            log.info("discarding %s: it was made with other settings", path.name)
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    f = h5py.File(path, "w")
    f.attrs.update(key)
    f.attrs["extract_seconds"] = 0.0
    f.attrs["tap_layers"] = json.dumps([t.layer for t in taps])
    for s in groups:
        _create_rows(f.create_group(s), dim, taps)
    f.flush()
    return f


CHUNK_ROWS = 256
SLACK = 256 * 2**10  # HDF5's own metadata and heap growth per batch, beyond the rows and a new chunk per dataset


def ensure_room(path: Path, nbytes: int) -> None:
    """Raise ENOSPC *before* a write that would not fit on the disk (or under the process's file-size
    limit). HDF5 turns a write that fails half way into a file it can no longer open, so a full disk
    must be met while the partial file is still whole: then it resumes once space is freed."""
    free = shutil.disk_usage(path.parent).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    size = path.stat().st_size if path.exists() else 0
    if nbytes > free or (limit != resource.RLIM_INFINITY and size + nbytes > limit):
        raise OSError(errno.ENOSPC if nbytes > free else errno.EFBIG, os.strerror(errno.ENOSPC), str(path))


def append_rows(
    group: h5py.Group,
    embeddings: np.ndarray,
    labels: np.ndarray,
    ids: list[str],
    next_index: int,
    taps: list[np.ndarray] = (),
) -> None:
    """Append one batch (and its taps) and only then advance the resume point (crash-consistent order)."""
    rows = int(group.attrs["rows"])
    n = len(ids)
    columns = [embeddings, labels, np.asarray(ids, dtype=object), *taps]
    # a new storage chunk per dataset at worst, the batch itself, and HDF5's slack
    chunk_bytes = sum(CHUNK_ROWS * int(np.prod(c.shape[1:])) * 4 for c in (embeddings, *taps))
    ensure_room(Path(group.file.filename), chunk_bytes + sum(len(i) + 16 for i in ids) + n * 8 + SLACK)
    for name, values in zip(row_datasets(group), columns, strict=True):
        group[name].resize(rows + n, axis=0)
        group[name][rows:] = values
    group.file.flush()
    group.attrs.update(rows=rows + n, next_index=next_index)
    group.file.flush()


def run(cfg: Config, dataset: Dataset | None = None) -> ExtractResult:
    """Extract embeddings for every split of the configured dataset, or reuse the cache."""
    engines.check(cfg.extract.engine)
    ds = dataset or from_config(cfg)
    spec = backbones.from_config(cfg.backbone)
    size = cfg.backbone.input_size or spec.input_size
    weights = backbones.resolve_weights(spec, cfg.backbone.weights, Path(cfg.artifacts), size)
    key = cache_key(spec, weights, size, ds, cfg)
    out = cache_path(cfg)
    writable_dir(out.parent)
    with lock.exclusive(out):  # one writer per cache; a second run waits, then usually finds it done
        return _extract(cfg, ds, spec, size, weights, key, out)


def _cache_hit(out: Path, key: dict) -> ExtractResult | None:
    """The complete cache made with ``key``, or None (and why) when it must be (re)built. An unreadable
    cache (truncated, corrupted) is rebuilt: it holds nothing a rerun cannot make again."""
    if not out.exists():
        return None
    try:
        with h5py.File(out, "r") as f:
            old = read_key(f)
            if old == key and f.attrs.get("complete"):
                n, skipped = _contents(f)
                log.info("cache hit: %s (%d embeddings, no forward pass needed)", out, n)
                return ExtractResult(out, True, n, float(f.attrs["extract_seconds"]), skipped)
    except (OSError, KeyError) as e:
        log.warning("warning: cache %s is unreadable (%s); rebuilding it", out, first_line(e))
        return None
    log.info("cache %s is stale (%s); re-extracting", out, "; ".join(_differences(old, key)))
    return None


def _extract(cfg: Config, ds: Dataset, spec, size: int, weights, key: dict, out: Path) -> ExtractResult:
    hit = _cache_hit(out, key)
    if hit is not None:
        return hit

    import tensorflow as tf

    with backbones.device_policy(cfg.backbone.mixed_precision) as gpu:
        base = backbones.build_backbone(spec, weights, size, cfg.data.seed)
        taps = taps_mod.resolve(base, cfg.extract.taps, cfg.extract.tap_grid, spec.name)
        model = taps_mod.feature_model(spec, base, taps)
        augment = augmentation(cfg.finetune.augment, cfg.data.seed) if cfg.extract.views else None
    runtime = runtimes.resolve(cfg.extract.runtime, gpu)
    if cfg.extract.engine == "ray" and runtime == "openvino":
        log.warning("notice: the Ray engine runs tf or onnx; running the OpenVINO request in TensorFlow")
        runtime = "tf"
    forward, runtime = runtimes.forward_for(
        runtime,
        model,
        lambda: taps_mod.feature_model(spec, base, taps, portable=True),
        runtimes.model_key(key),
        Path(cfg.artifacts) / "runtimes",
    )
    dim = int(base.output_shape[-1])
    log.info(
        "extracting %s with %s (%s, %dpx, %s) on %s in %s%s%s",
        ds.summary(),
        spec.name,
        weights.describe(),
        size,
        spec.preprocessing,
        "GPU" if gpu else "CPU",
        runtimes.NAMES[runtime],
        f"; taps: {', '.join(f'{t.layer} ({t.width})' for t in taps)}" if taps else "",
        f"; {cfg.extract.views} augmented views of train" if cfg.extract.views else "",
    )
    if weights.is_random:
        log.warning("warning: random weights - these features are for tests, not for conclusions")

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], reduce_retracing=True)
    def augmented(x):  # the views pass stays in TensorFlow: its augmentation layers are TensorFlow ops
        out = model(augment(x, training=True), training=False)
        return out if isinstance(out, list | tuple) else [out]

    def forward_augmented(x):
        return [o.numpy() for o in augmented(x)]

    groups = SPLITS + ((VIEWS,) if cfg.extract.views else ())
    partial = out.with_name(out.name + ".partial")
    f = _open_partial(partial, key, dim, taps, groups)
    f.attrs["runtime"] = runtime  # a resumed file may have been started in another
    onnx = None  # the converted model the Ray actors run, when the runtime is ONNX Runtime
    if runtime == "onnx":
        onnx = runtimes.converted_path(Path(cfg.artifacts) / "runtimes", runtimes.model_key(key), "onnx")
    try:
        try:
            _extract_splits(f, ds, model, forward, size, cfg, onnx)
            if cfg.extract.views:
                _extract_views(f, ds, forward_augmented, size, cfg)
        except (OSError, RuntimeError) as e:
            full = _disk_full(e, f, partial, ds, cfg, dim + sum(t.width for t in taps))
            if full is None:
                raise
            raise full from None
        f.attrs.update(
            embedding_dim=dim,
            complete=True,
            device="GPU" if gpu else "CPU",
            runtime=runtime,
            versions=json.dumps(library_versions()),
            weights_path=str(weights.path or ""),
        )
        seconds = float(f.attrs["extract_seconds"])
        n, skipped = _contents(f)
        n_views = int(f[VIEWS]["ids"].shape[0]) if VIEWS in f else 0
    except BaseException:
        with contextlib.suppress(RuntimeError, OSError):  # a failed write may fail the close too: say the first
            f.close()
        raise
    f.close()  # a failure here (the last flush) propagates: the partial file is never renamed into place
    partial.replace(out)
    write_json_atomic(out.with_suffix(".json"), run_record(cfg, "extract", key=key, seconds=seconds, skipped=skipped))
    views = f" + {n_views} augmented views" if n_views else ""
    rate = (n + n_views) / max(seconds, 1e-9)
    log.info("wrote %s: %d x %d embeddings%s in %.1fs (%.1f img/s)", out, n, dim, views, seconds, rate)
    return ExtractResult(out, False, n, seconds, skipped)


def _disk_full(e: Exception, f: h5py.File, partial: Path, ds: Dataset, cfg: Config, width: int) -> Exception | None:
    """A full disk (or file-size limit) met while writing the cache, in one line: where, what is free, what
    the rest needs, and that the rows written so far resume. None for any other error."""
    code = getattr(e, "errno", None)
    if code not in DISK_FULL and not any(f"errno = {c}" in str(e) for c in DISK_FULL):
        return None
    total = sum(len(ds.splits[s].ids) for s in SPLITS) + cfg.extract.views * len(ds.splits["train"].ids)
    done = sum(int(f[g].attrs["rows"]) for g in f if "rows" in f[g].attrs)
    need = (total - done) * (width * 4 + 64)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if code == errno.EFBIG and limit != resource.RLIM_INFINITY:
        room = f"the file-size limit (ulimit -f) is {_mib(limit)}"
    else:
        room = f"{_mib(shutil.disk_usage(partial.parent).free)} free on the disk of {partial.parent}"
    whole = isinstance(e, OSError) and code is not None  # stopped before the write: the partial file is whole
    kept = (
        f"the {done:,} rows written are kept; free space and rerun the same command to resume"
        if whole
        else "HDF5 failed mid-write, so the partial file may be damaged (a rerun restarts it); free space first"
    )
    return PipelineError(
        f"disk full writing {partial} ({room}; the remaining {total - done:,} images need ~{_mib(need)} more): {kept}"
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def augmentation(names: tuple[str, ...], seed: int):
    """The fine-tune's augmentation layers (``finetune.augment``) as one Sequential model."""
    import keras

    from pipeline.finetune import augmentation_layers

    return keras.Sequential(augmentation_layers(names, seed), name="view_augmentation")


def _extract_splits(f: h5py.File, ds: Dataset, model, forward, size: int, cfg: Config, onnx: Path | None) -> None:
    """One pass over every split's remaining images, so decoding never restarts (and the forward pass
    never waits) at a split boundary; rows go to their split's group. ``--engine`` picks who runs it."""
    sources = {s: (ds.splits[s].ids, ds.splits[s].labels) for s in SPLITS}
    if cfg.extract.engine == "ray":
        from pipeline.engines import ray_data

        ray_data.run_pass(f, ds, sources, model, size, cfg, "extract", onnx)
    else:
        _run_pass(f, ds, sources, forward, size, cfg, "extract")


def _extract_views(f: h5py.File, ds: Dataset, forward, size: int, cfg: Config) -> None:
    """K augmented passes over train, view-major (row j is view j // N of image j % N)."""
    train = ds.splits["train"]
    ids = list(train.ids) * cfg.extract.views
    _run_pass(f, ds, {VIEWS: (ids, np.tile(train.labels, cfg.extract.views))}, forward, size, cfg, "views")


def _run_pass(f: h5py.File, ds: Dataset, sources: dict, forward, size: int, cfg: Config, desc: str) -> None:
    """Forward every remaining item of ``sources`` ({group: (ids, labels)}) and append the rows."""
    from tqdm.auto import tqdm

    groups = list(sources)
    todo = [(g, i) for g in groups for i in range(int(f[g].attrs["next_index"]), len(sources[g][0]))]
    paths = [str(ds.root / sources[g][0][i]) for g, i in todo]
    group_of = np.asarray([groups.index(g) for g, _ in todo], dtype=np.int64)
    local = np.asarray([i for _, i in todo], dtype=np.int64)
    bar = tqdm(total=len(todo), unit="img", desc=desc, disable=None, smoothing=0.1)

    def id_of(k: int) -> str:
        group, i = todo[k]
        return sources[group][0][i]

    pos = 0
    t0 = time.perf_counter()
    try:
        for images, index in image_dataset(paths, size, cfg.extract.batch_size) if todo else ():
            outs = forward(images)
            index = index.numpy()
            end = int(index[-1]) + 1
            if cfg.extract.strict and end - pos != len(index):
                first = sorted(set(range(pos, end)) - set(index.tolist()))[0]
                unreadable(id_of(first))
            for k, group in enumerate(groups):
                sel = group_of[index] == k
                if sel.any():
                    rows = local[index[sel]]
                    ids, labels = sources[group]
                    append_rows(
                        f[group],
                        outs[0][sel],
                        labels[rows],
                        [ids[i] for i in rows],
                        int(rows[-1]) + 1,
                        [o[sel] for o in outs[1:]],
                    )
            now = time.perf_counter()
            f.attrs["extract_seconds"] = float(f.attrs["extract_seconds"]) + now - t0
            t0 = now
            bar.update(end - pos)
            pos = end
    finally:
        bar.close()
    if cfg.extract.strict and pos < len(todo):
        unreadable(id_of(pos))
    finish_pass(f, sources)


def finish_pass(f: h5py.File, sources: dict) -> None:
    """Every item of ``sources`` is done: record the resume point and which ids were skipped as unreadable."""
    for group in sources:
        g = f[group]
        g.attrs["next_index"] = len(sources[group][0])
        written = set(g["ids"].asstr()[()])
        skipped = list(dict.fromkeys(i for i in sources[group][0] if i not in written))
        if "skipped" in g:
            del g["skipped"]
        g.create_dataset("skipped", data=np.asarray(skipped, dtype=object), dtype=h5py.string_dtype())
        if skipped:
            log.warning(
                "warning: skipped %d unreadable file(s) in %s: %s", len(skipped), group, ", ".join(skipped[:10])
            )
    f.flush()


def unreadable(image_id: str):
    raise PipelineError(f"unreadable image {image_id} (--strict; drop --strict to skip such files)")
