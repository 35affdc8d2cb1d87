"""Frozen backbone -> HDF5 embedding cache: chunked, atomic, resumable, content-keyed.

The cache is keyed by everything that changes the numbers (backbone, weights
hash, input size, preprocessing, the exact file list); a hit does no forward
pass, a miss never reuses stale features. Rows are appended batch by batch to
``<backbone>.h5.partial`` and flushed, so an interrupted run resumes from its
last complete batch; the file is renamed into place only when complete.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline import backbones
from pipeline.config import Config, library_versions, run_record, writable_dir, write_json_atomic
from pipeline.data import SPLITS, Dataset, image_dataset, load_dataset
from pipeline.errors import PipelineError

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
)


@dataclass
class ExtractResult:
    path: Path
    cache_hit: bool
    n_images: int
    seconds: float
    skipped: dict[str, list[str]]


def cache_path(cfg: Config) -> Path:
    return Path(cfg.artifacts) / "features" / cfg.dataset_name / f"{cfg.backbone.backbone}.h5"


def cache_key(spec: backbones.BackboneSpec, weights: backbones.Weights, size: int, ds: Dataset) -> dict:
    return {
        "format": CACHE_FORMAT,
        "backbone": spec.name,
        "weights": weights.source,
        "weights_sha256": weights.sha256 or "",
        "input_size": size,
        "preprocessing": spec.preprocessing,
        "dataset_fingerprint": ds.fingerprint(),
        "class_names": json.dumps(ds.class_names),
    }


def read_key(f: h5py.File) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items() if k in KEY_FIELDS}


def _differences(old: dict, new: dict) -> list[str]:
    return [k for k in KEY_FIELDS if old.get(k) != new.get(k)]


def _contents(f: h5py.File) -> tuple[int, dict[str, list[str]]]:
    """Embeddings stored, and the ids skipped as unreadable, per split."""
    n = sum(f[s]["ids"].shape[0] for s in SPLITS)
    return n, {s: f[s]["skipped"].asstr()[()].tolist() for s in SPLITS}


def _open_partial(path: Path, key: dict, dim: int) -> h5py.File:
    """Reopen a partial cache made with the same key, or start a new one."""
    if path.exists():
        try:
            f = h5py.File(path, "a")
        except OSError:
            log.warning("warning: %s is unreadable (killed mid-write?); starting over", path.name)
            path.unlink()
        else:
            if read_key(f) == key and all(s in f for s in SPLITS):
                for s in SPLITS:
                    g = f[s]
                    rows = int(g.attrs["rows"])
                    for name in ("embeddings", "labels", "ids"):
                        g[name].resize(rows, axis=0)
                done = sum(int(f[s].attrs["rows"]) for s in SPLITS)
                log.info("resuming %s: %d embeddings already written", path.name, done)
                return f
            f.close()
            log.info("discarding %s: it was made with other settings", path.name)
            path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    f = h5py.File(path, "w")
    f.attrs.update(key)
    f.attrs["extract_seconds"] = 0.0
    for s in SPLITS:
        g = f.create_group(s)
        g.create_dataset("embeddings", (0, dim), "float32", maxshape=(None, dim), chunks=(256, dim))
        g.create_dataset("labels", (0,), "int64", maxshape=(None,), chunks=(4096,))
        g.create_dataset("ids", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(4096,))
        g.attrs.update(rows=0, next_index=0)
    f.flush()
    return f


def append_rows(group: h5py.Group, embeddings: np.ndarray, labels: np.ndarray, ids: list[str], next_index: int) -> None:
    """Append one batch and only then advance the resume point (crash-consistent order)."""
    rows = int(group.attrs["rows"])
    n = len(ids)
    for name, values in (("embeddings", embeddings), ("labels", labels), ("ids", np.asarray(ids, dtype=object))):
        group[name].resize(rows + n, axis=0)
        group[name][rows:] = values
    group.file.flush()
    group.attrs.update(rows=rows + n, next_index=next_index)
    group.file.flush()


def run(cfg: Config, dataset: Dataset | None = None) -> ExtractResult:
    """Extract embeddings for every split of the configured dataset, or reuse the cache."""
    ds = dataset or load_dataset(cfg.dataset_dir, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)
    spec = backbones.get(cfg.backbone.backbone)
    size = cfg.backbone.input_size or spec.input_size
    weights = backbones.resolve_weights(spec, cfg.backbone.weights, Path(cfg.artifacts), size)
    key = cache_key(spec, weights, size, ds)
    out = cache_path(cfg)
    writable_dir(out.parent)

    if out.exists():
        with h5py.File(out, "r") as f:
            old = read_key(f)
            if old == key:
                n, skipped = _contents(f)
                log.info("cache hit: %s (%d embeddings, no forward pass needed)", out, n)
                return ExtractResult(out, True, n, float(f.attrs["extract_seconds"]), skipped)
        log.info("cache %s is stale (%s changed); re-extracting", out, ", ".join(_differences(old, key)))

    import tensorflow as tf

    with backbones.device_policy(cfg.backbone.mixed_precision) as gpu:
        model = backbones.feature_model(spec, backbones.build_backbone(spec, weights, size, cfg.data.seed))
    dim = int(model.output_shape[-1])
    log.info(
        "extracting %s with %s (%s, %dpx, %s) on %s",
        ds.summary(),
        spec.name,
        weights.describe(),
        size,
        spec.preprocessing,
        "GPU" if gpu else "CPU",
    )
    if weights.is_random:
        log.warning("warning: random weights - these features are for tests, not for conclusions")

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], reduce_retracing=True)
    def forward(x):
        return model(x, training=False)

    partial = out.with_name(out.name + ".partial")
    f = _open_partial(partial, key, dim)
    try:
        _extract_splits(f, ds, forward, size, cfg)
        f.attrs.update(
            embedding_dim=dim,
            complete=True,
            device="GPU" if gpu else "CPU",
            versions=json.dumps(library_versions()),
            weights_path=str(weights.path or ""),
        )
        seconds = float(f.attrs["extract_seconds"])
        n, skipped = _contents(f)
    finally:
        f.close()
    partial.replace(out)
    write_json_atomic(out.with_suffix(".json"), run_record(cfg, "extract", key=key, seconds=seconds, skipped=skipped))
    log.info("wrote %s: %d x %d embeddings in %.1fs (%.1f img/s)", out, n, dim, seconds, n / max(seconds, 1e-9))
    return ExtractResult(out, False, n, seconds, skipped)


def _extract_splits(f: h5py.File, ds: Dataset, forward, size: int, cfg: Config) -> None:
    """One tf.data pipeline over every split's remaining images, so decoding never restarts
    (and the forward pass never waits) at a split boundary; rows go to their split's group."""
    from tqdm.auto import tqdm

    todo = [(s, i) for s in SPLITS for i in range(int(f[s].attrs["next_index"]), len(ds.splits[s]))]
    paths = [str(ds.root / ds.splits[s].ids[i]) for s, i in todo]
    split_of = np.asarray([SPLITS.index(s) for s, _ in todo], dtype=np.int64)
    local = np.asarray([i for _, i in todo], dtype=np.int64)
    bar = tqdm(total=len(todo), unit="img", desc="extract", disable=None, smoothing=0.1)
    pos = 0
    t0 = time.perf_counter()
    try:
        for images, index in image_dataset(paths, size, cfg.extract.batch_size):
            emb = forward(images).numpy().astype(np.float32, copy=False)
            index = index.numpy()
            end = int(index[-1]) + 1
            if cfg.extract.strict and end - pos != len(index):
                first = sorted(set(range(pos, end)) - set(index.tolist()))[0]
                _unreadable(ds, *todo[first])
            for k, split in enumerate(SPLITS):
                sel = split_of[index] == k
                if sel.any():
                    rows = local[index[sel]]
                    s = ds.splits[split]
                    append_rows(f[split], emb[sel], s.labels[rows], [s.ids[i] for i in rows], int(rows[-1]) + 1)
            now = time.perf_counter()
            f.attrs["extract_seconds"] = float(f.attrs["extract_seconds"]) + now - t0
            t0 = now
            bar.update(end - pos)
            pos = end
    finally:
        bar.close()
    if cfg.extract.strict and pos < len(todo):
        _unreadable(ds, *todo[pos])
    for split in SPLITS:
        g = f[split]
        g.attrs["next_index"] = len(ds.splits[split])
        written = set(g["ids"].asstr()[()])
        skipped = [i for i in ds.splits[split].ids if i not in written]
        if "skipped" in g:
            del g["skipped"]
        g.create_dataset("skipped", data=np.asarray(skipped, dtype=object), dtype=h5py.string_dtype())
        if skipped:
            log.warning(
                "warning: skipped %d unreadable file(s) in %s: %s", len(skipped), split, ", ".join(skipped[:10])
            )
    f.flush()


def _unreadable(ds: Dataset, split: str, i: int):
    raise PipelineError(f"unreadable image {ds.splits[split].ids[i]} (--strict; drop --strict to skip such files)")
