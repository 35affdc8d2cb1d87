"""`make extract`: frozen backbone -> HDF5 embedding cache (cached, resumable, content-keyed).

A hit (``pipeline.extract.cache.key``: same backbone, weights hash, input size, preprocessing, file list,
taps, views, precision) does no forward pass; a miss never reuses stale features. An engine
(``pipeline.extract.engines``) runs the feature model in the chosen runtime (``pipeline.extract.runtimes``) and yields
batches; this stage alone writes them through the cache writer (``pipeline.extract.cache.writer``), which makes
an interrupted run resume from its last batch (a killed one from its last written chunk).

Taps (``pipeline.backbones.taps``) add one dataset per tapped layer under each split's ``taps/`` group, written
with the final embedding from the same forward pass. ``--views K`` adds a ``views`` group: K augmented
passes over the training images (the fine-tune's own augmentation layers), for heads' ``--train-views``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import backbones, lock
from pipeline.artifacts import library_versions, run_record, writable_dir, write_json_atomic
from pipeline.backbones import taps as taps_mod
from pipeline.config import Config
from pipeline.data import SPLITS, Dataset, from_config
from pipeline.data.augment import AUGMENT_SEEDS, augmentation
from pipeline.errors import PipelineError
from pipeline.extract import engines, runtimes
from pipeline.extract.cache import key as cache_keys
from pipeline.extract.cache import variants
from pipeline.extract.cache.key import VIEWS
from pipeline.extract.cache.reader import tap_label
from pipeline.extract.cache.writer import CacheWriter, complete_contents

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    path: Path
    cache_hit: bool
    n_images: int
    seconds: float
    skipped: dict[str, list[str]]


def cache_path(cfg: Config) -> Path:
    """The cache the configuration reads (``cache.variants.select``): the variant its settings describe, or
    the one existing variant that agrees with the settings it names."""
    name = backbones.name_for(cfg.backbone.backbone)
    folder = cache_keys.cache_path(cfg.artifacts, cfg.dataset_name, name).parent
    return variants.select(folder, name, *request(cfg))


def request(cfg: Config) -> tuple[dict, set[str]]:
    """The extraction settings the configuration describes, and the ones it names."""
    native = cfg.backbone.input_size
    if native is None:
        try:
            native = backbones.from_config(cfg.backbone).input_size
        except PipelineError:  # not a backbone this process knows (a cache made elsewhere): only names count
            native = None
    return variants.request(cfg.backbone, cfg.extract, cfg.explicit, native)


def _adopt(cfg: Config, key: dict) -> Config:
    """``cfg`` with the extraction settings of an existing variant (which it does not contradict)."""
    s = variants.settings(key)
    out = copy.deepcopy(cfg)
    out.backbone.input_size = s["input_size"]
    out.extract.taps, out.extract.tap_grid, out.extract.views = s["taps"], s["tap_grid"], s["views"]
    return out


def cache_key(spec: backbones.BackboneSpec, weights: backbones.Weights, size: int, ds: Dataset, cfg: Config) -> dict:
    """The cache key of this configuration (see ``pipeline.extract.cache.key``)."""
    views = None
    if cfg.extract.views:
        views = {"views": cfg.extract.views, "augment": list(cfg.finetune.augment), "seed": cfg.data.seed}
        views["seeds"] = AUGMENT_SEEDS
    return cache_keys.make_key(
        backbone=spec.name,
        weights=weights.source,
        weights_sha256=weights.sha256,
        input_size=size,
        preprocessing=spec.preprocessing,
        dataset_fingerprint=ds.fingerprint(),
        class_names=ds.class_names,
        precision=backbones.compute_precision(cfg.backbone.mixed_precision),
        taps=tuple(cfg.extract.taps),
        tap_grid=cfg.extract.tap_grid,
        views=views,
    )


def run(cfg: Config, dataset: Dataset | None = None) -> ExtractResult:
    """Extract embeddings for every split of the configured dataset, or reuse the cache."""
    engines.check(cfg.extract.engine)
    ds = dataset or from_config(cfg)
    spec = backbones.from_config(cfg.backbone)
    size = cfg.backbone.input_size or spec.input_size
    weights = backbones.resolve_weights(spec, cfg.backbone.weights, Path(cfg.artifacts), size)
    name = backbones.name_for(cfg.backbone.backbone)
    folder = cache_keys.cache_path(cfg.artifacts, cfg.dataset_name, name).parent
    want, named = request(cfg)
    want["precision"] = backbones.compute_precision(cfg.backbone.mixed_precision)  # a GPU's cache is another file
    chosen = variants.pick(want, named | {"precision"}, variants.existing(folder, name))
    if chosen is not None and any(variants.settings(chosen.key)[s] != want[s] for s in variants.SETTINGS):
        cfg = _adopt(cfg, chosen.key)  # the one variant there is: its settings, never a replacement for it
        size = cfg.backbone.input_size
        weights = backbones.resolve_weights(spec, cfg.backbone.weights, Path(cfg.artifacts), size)
    key = cache_key(spec, weights, size, ds, cfg)
    out = chosen.path if chosen is not None else variants.variant_path(folder, name, key)
    writable_dir(out.parent)
    with lock.exclusive(out):  # one writer per cache; a second run waits, then usually finds it done
        hit = None if cfg.force else complete_contents(out, key)
        if hit is not None:
            log.info("cache hit: %s (%d embeddings, no forward pass needed)", out, hit.n)
            return ExtractResult(out, True, hit.n, hit.seconds, hit.skipped)
        return _extract(cfg, ds, spec, size, weights, key, out)


@dataclass
class _Models:
    """What the passes run: the TensorFlow feature model, the runtime's forward, the augmentation."""

    model: object
    forward: object  # None on the lean Ray path: the actors run the converted model
    runtime: str
    onnx: Path | None  # the converted model the Ray actors run, when the runtime is ONNX Runtime
    augmented: object  # images -> [outputs] with the views' augmentation (TensorFlow), or None
    taps: list
    dim: int
    gpu: bool


def _models(cfg: Config, spec, size: int, weights, key: dict) -> _Models:
    lean = _converted_only(cfg, key)
    converted = None if lean is not None else _convert_apart(cfg, spec, size, key)
    if converted:
        lean = _converted_only(cfg, key)
    if lean is not None:
        return lean
    with backbones.device_policy(cfg.backbone.mixed_precision) as gpu:
        base, taps = _backbone(cfg, spec, size, weights)
        model = taps_mod.feature_model(spec, base, taps)
        augment = augmentation(cfg.finetune.augment, cfg.data.seed) if cfg.extract.views else None
    runtime = "tf" if converted is False else runtimes.resolve(cfg.extract.runtime, gpu)
    if cfg.extract.engine == "ray" and runtime == "openvino":
        log.warning("notice: the Ray engine runs tf or onnx; running the OpenVINO request in TensorFlow")
        runtime = "tf"
    folder, model_key = runtimes.store(cfg.artifacts, cfg.extract.runtimes_dir), runtimes.model_key(key)
    forward, runtime = runtimes.forward_for(
        runtime, model, lambda: taps_mod.feature_model(spec, base, taps, portable=True), model_key, folder
    )
    onnx = runtimes.converted_path(folder, model_key, "onnx") if runtime == "onnx" else None
    augmented = _augmented(model, augment, size) if augment is not None else None
    dim = int(base.output_shape[-1])
    if runtime != "tf":  # what the converted model outputs, so that the next run need not build this one
        runtimes.write_outputs(runtimes.converted_path(folder, model_key, runtime), taps, dim)
    return _Models(model, forward, runtime, onnx, augmented, taps, dim, gpu)


def _converted_path(cfg: Config, key: dict, runtime: str) -> Path:
    return runtimes.converted_path(
        runtimes.store(cfg.artifacts, cfg.extract.runtimes_dir), runtimes.model_key(key), runtime
    )


def _backbone(cfg: Config, spec, size: int, weights):
    """The frozen backbone and the taps resolved on it."""
    base = backbones.build_backbone(spec, weights, size, cfg.data.seed)
    return base, taps_mod.resolve(base, cfg.extract.taps, cfg.extract.tap_grid, spec.name)


def _lean_runtime(cfg: Config) -> str | None:
    """The converted runtime a CPU pass without views runs alone, None where the Keras model must run (the
    Ray engine's actors run ONNX Runtime, not OpenVINO)."""
    ex = cfg.extract
    if ex.views or backbones.gpu_visible():
        return None
    runtime = runtimes.resolve(ex.runtime, False)
    if runtime == "tf" or (ex.engine == "ray" and runtime != "onnx"):
        return None
    return runtime


def _convert_apart(cfg: Config, spec, size: int, key: dict) -> bool | None:
    """A first run on the lean path: a child process builds the Keras feature model, converts it and
    records its outputs, then exits, so that this process never loads TensorFlow and runs like every later
    one (TensorFlow's and the converter's memory are the child's alone, and gone before the loop). None
    where it does not apply (no lean path, or TensorFlow already loaded here: forking would copy its
    threads' locks, and building here costs no more than the model); False when the conversion failed
    (said in a notice: the Keras model runs instead)."""
    import multiprocessing
    import sys

    runtime = _lean_runtime(cfg)
    if runtime is None or "tensorflow" in sys.modules:
        return None
    path = _converted_path(cfg, key, runtime)
    path.parent.mkdir(parents=True, exist_ok=True)
    child = multiprocessing.get_context("fork").Process(  # safe: no TensorFlow (nor its threads) here yet
        target=_build_and_convert, args=(cfg, size, path, runtime), name="convert"
    )
    child.start()
    child.join()
    if child.exitcode == 0 and runtimes.read_outputs(path) is not None:
        log.info("converted %s to %s (cached at %s)", spec.name, runtimes.NAMES[runtime], path)
        return True
    log.warning(
        "notice: %s cannot be converted for %s (%s); running it in TensorFlow",
        spec.name,
        runtime,
        (runtimes.last_line(path.with_suffix(".log")) or f"exit code {child.exitcode}")[:200],
    )
    return False


def _build_and_convert(cfg: Config, size: int, path: Path, runtime: str) -> None:
    """In the child: the portable feature model built, then converted at ``path`` with its outputs recorded
    beside it (``runtimes.convert_built``)."""
    runtimes.output_to(path.with_suffix(".log"))
    spec = backbones.from_config(cfg.backbone)
    weights = backbones.resolve_weights(spec, cfg.backbone.weights, Path(cfg.artifacts), size)
    with backbones.device_policy(cfg.backbone.mixed_precision):
        base, taps = _backbone(cfg, spec, size, weights)
        portable = taps_mod.feature_model(spec, base, taps, portable=True)
    runtimes.convert_built(portable, runtimes.outputs_record(taps, int(base.output_shape[-1])), path, runtime)


def _converted_only(cfg: Config, key: dict) -> _Models | None:
    """The lean path: a CPU pass (no views) whose feature model is already converted runs it alone,
    without building the Keras model (the build would cost most of the command's own time and memory
    around the loop); on the Ray engine the actors open the session, not this process. None: build as
    usual."""
    runtime = _lean_runtime(cfg)
    if runtime is None:
        return None
    path = _converted_path(cfg, key, runtime)
    outputs = runtimes.read_outputs(path)
    if outputs is None:
        return None
    taps = [taps_mod.Tap(layer, tuple(shape), grid) for layer, shape, grid in outputs["taps"]]
    if cfg.extract.engine == "ray":
        forward = None
    else:
        forward = runtimes.onnx_forward(path) if runtime == "onnx" else runtimes.openvino_forward(path)
    return _Models(None, forward, runtime, path if runtime == "onnx" else None, None, taps, outputs["dim"], False)


def _augmented(model, augment, size: int):
    """The views pass stays in TensorFlow: its augmentation layers are TensorFlow ops."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], reduce_retracing=True)
    def run(x):
        out = model(augment(x, training=True), training=False)
        return out if isinstance(out, list | tuple) else [out]

    return lambda x: [o.numpy() for o in run(x)]


def _extract(cfg: Config, ds: Dataset, spec, size: int, weights, key: dict, out: Path) -> ExtractResult:
    m = _models(cfg, spec, size, weights, key)
    log.info(
        "extracting %s with %s (%s, %dpx, %s) on %s in %s%s%s",
        ds.summary(),
        spec.name,
        weights.describe(),
        size,
        spec.preprocessing,
        "GPU" if m.gpu else "CPU",
        runtimes.NAMES[m.runtime],
        f"; taps: {', '.join(tap_label(k, t.layer, list(t.shape)) for k, t in enumerate(m.taps, 1))}" if m.taps else "",
        f"; {cfg.extract.views} augmented views of train" if cfg.extract.views else "",
    )
    if weights.is_random:
        log.warning("warning: random weights - these features are for tests, not for conclusions")
    groups = SPLITS + ((VIEWS,) if cfg.extract.views else ())
    writer = CacheWriter(out, key, m.dim, m.taps, groups)
    writer.set_attrs(runtime=m.runtime)  # a resumed file may have been started in another
    try:
        _passes(writer, ds, m, size, cfg)
        contents = writer.complete(
            embedding_dim=m.dim,
            device="GPU" if m.gpu else "CPU",
            runtime=m.runtime,
            versions=json.dumps(library_versions()),
            weights_path=str(weights.path or ""),
        )
    except BaseException:
        writer.abort()
        raise
    write_json_atomic(
        out.with_suffix(".json"),
        run_record(cfg, "extract", key=key, seconds=contents.seconds, skipped=contents.skipped),
    )
    views = f" + {contents.n_views} augmented views" if contents.n_views else ""
    rate = (contents.n + contents.n_views) / max(contents.seconds, 1e-9)
    log.info(
        "wrote %s: %d x %d embeddings%s in %.1fs (%.1f img/s)", out, contents.n, m.dim, views, contents.seconds, rate
    )
    return ExtractResult(out, False, contents.n, contents.seconds, contents.skipped)


def _passes(writer: CacheWriter, ds: Dataset, m: _Models, size: int, cfg: Config) -> None:
    """One pass over every split's remaining images, so decoding never restarts (and the forward pass
    never waits) at a split boundary; then the views pass (K augmented passes over train, view-major:
    row j is view j // N of image j % N). A full disk becomes one line."""
    ex = cfg.extract
    sources = {s: (ds.splits[s].ids, ds.splits[s].labels) for s in SPLITS}
    train = ds.splits["train"]
    try:
        if ex.engine == "ray":
            from pipeline.extract.engines import ray_data

            ray = lambda p: ray_data.batches(p, size, ex, m.model, m.onnx)  # noqa: E731
            _write_pass(writer, ds.root, sources, ray, ex.strict, "extract (ray)")
        else:
            _write_pass(writer, ds.root, sources, _local(size, ex.batch_size, m.forward), ex.strict, "extract")
        if ex.views:
            views = {VIEWS: (list(train.ids) * ex.views, np.tile(train.labels, ex.views))}
            _write_pass(writer, ds.root, views, _local(size, ex.batch_size, m.augmented), ex.strict, "views")
    except (OSError, RuntimeError) as e:
        total = sum(len(ds.splits[s].ids) for s in SPLITS) + ex.views * len(train.ids)
        full = writer.disk_full(e, total, m.dim + sum(t.width for t in m.taps))
        if full is None:
            raise
        raise full from None


def _local(size: int, batch_size: int, forward):
    from pipeline.extract.engines import local

    return lambda paths: local.batches(paths, size, batch_size, forward)


def _write_pass(writer: CacheWriter, root: Path, sources: dict, batches, strict: bool, desc: str) -> None:
    """Every remaining item of ``sources`` ({group: (ids, labels)}) through ``batches`` (paths -> engine
    batches), each batch's rows appended to its group; the seconds spent are added to the cache's."""
    from tqdm.auto import tqdm

    groups = list(sources)
    todo = [(g, i) for g in groups for i in range(writer.next_index(g), len(sources[g][0]))]
    group_of = np.asarray([groups.index(g) for g, _ in todo], dtype=np.int64)
    local = np.asarray([i for _, i in todo], dtype=np.int64)
    bar = tqdm(total=len(todo), unit="img", desc=desc, disable=None, smoothing=0.1)

    def id_of(k: int) -> str:
        group, i = todo[k]
        return sources[group][0][i]

    pos, t0 = 0, time.perf_counter()
    try:
        for b in batches([str(root / sources[g][0][i]) for g, i in todo]):
            if strict and b.end - pos != len(b.positions):
                unreadable(id_of(sorted(set(range(pos, b.end)) - set(b.positions.tolist()))[0]))
            for k, group in enumerate(groups):
                _write_group(writer, group, sources[group], k, group_of, local, pos, b)
            now = time.perf_counter()
            writer.add_seconds(now - t0)
            bar.update(b.end - pos)
            pos, t0 = b.end, now
    finally:
        bar.close()
    if strict and pos < len(todo):
        unreadable(id_of(pos))
    writer.finish_pass({g: sources[g][0] for g in groups})


def _write_group(writer: CacheWriter, group: str, source, k: int, group_of, local, pos: int, b) -> None:
    """The rows of one group in batch ``b``; its resume point moves past the batch's unreadable items too."""
    in_run = group_of[pos : b.end] == k
    if not in_run.any():
        return
    last = int(local[pos : b.end][in_run][-1]) + 1
    sel = group_of[b.positions] == k if len(b.positions) else np.zeros(0, bool)
    if not sel.any():
        writer.advance(group, last)
        return
    ids, labels = source
    rows = local[b.positions[sel]]
    outs = b.outputs
    writer.append(group, outs[0][sel], labels[rows], [ids[i] for i in rows], last, [o[sel] for o in outs[1:]])


def unreadable(image_id: str):
    raise PipelineError(f"unreadable image {image_id} (--strict; drop --strict to skip such files)")
