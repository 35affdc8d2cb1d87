"""Extraction on Ray Data: the model as a pool of actors (decoding in them or in CPU tasks), rows back to
the driver.

The (position, path) items still to do flow through ``decode`` (the local engine's own decoding: lossless
files with ``data.decode``, others with ``data.load_image``, so pixels are identical; unreadable files come
back flagged, not dropped) and ``Embed``, a stateful class run as an ``ActorPoolStrategy`` pool (one GPU per
actor when the cluster has GPUs; TensorFlow's thread pools and GPU memory growth set inside the actor).
With GPUs, decoding is its own CPU stage, so the nodes' cores keep the GPUs fed; without them the forward
pass needs every core and decoding is a small share of its cost, so each actor decodes its own batch (a
separate stage would add a process and float32 images through the object store).
The model travels as the converted ONNX model's bytes, which the actors run in ONNX Runtime without
importing TensorFlow (lossless images), or as its Keras config and weights; either way workers need the
package, not the weights file.
Ray Data does not keep order: every row carries its position and a reorder buffer yields the contiguous
prefix, which ``extract`` writes exactly as it writes the local engine's batches, so ``next_index`` stays
a valid resume point and a killed Ray run resumes like a local one.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.extract.engines import Batch

log = logging.getLogger(__name__)
# logged once per pass; benchmarks/extract_throughput.py reads its argument to split start-up from steady state
FIRST_ROWS = "ray: first rows after %.1fs (the actors' start: the runtime's session or model, first batch)"


def _init_ray():
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        log.info("ray: %s", "joined " + address if address else f"local cluster, {ray.cluster_resources()}")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours is the tqdm bar over rows written
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # Ray Data's per-operator INFO lines
    return ray


@dataclass(frozen=True)
class Pool:
    """How many model actors, what each asks Ray for, and how many decode tasks."""

    actors: int
    actor_cpus: float
    threads: int  # TensorFlow intra-op threads per actor (0: TensorFlow's default)
    decoders: int  # 0: each actor decodes its own batch
    gpus: int


def plan_pool(nodes: list[dict], settings) -> Pool:
    """Sizes the pool from the alive nodes' resources (``settings``: the extract section's ``ray_actors``
    and ``ray_decoders``): one actor per GPU; without GPUs one per node, each asking for no more CPUs than
    one node has (a request for the cluster's total would never be scheduled on a cluster of several nodes)."""
    gpus = int(sum(n.get("GPU", 0) for n in nodes))
    cpu_nodes = [n["CPU"] for n in nodes if n.get("CPU", 0) > 0] or [1.0]
    cpus = sum(cpu_nodes)
    actors = settings.ray_actors or gpus or len(cpu_nodes)
    decoders = settings.ray_decoders
    if decoders < 0:  # the CPUs the GPU actors leave, one decode task each; none without GPUs
        decoders = max(1, int(cpus) - actors) if gpus else 0
    if gpus:
        return Pool(actors, 0, 0, decoders, gpus)
    per_actor = min(min(cpu_nodes), cpus / actors) - (1 if decoders else 0)
    actor_cpus = max(0.5, per_actor)
    return Pool(actors, actor_cpus, max(1, int(actor_cpus)), decoders, 0)


@functools.cache
def _loader(size: int):
    """The local engine's decoding ops as one traced function per worker process (a tf.data pipeline per
    batch pays its set-up every batch, in series with the forward pass)."""
    import tensorflow as tf

    from pipeline.data import load_image

    return tf.function(lambda path: load_image(path, size), input_signature=[tf.TensorSpec([], tf.string)])


def decode(batch: dict, size: int) -> dict:
    """Paths -> float32 RGB images, exactly as the local engine decodes them (lossless files without
    TensorFlow, so an actor running the converted model never imports it); unreadable ones flagged."""
    from pipeline.data import decode as lean

    paths = [str(p) for p in batch["path"]]
    images = np.zeros((len(paths), size, size, 3), np.float32)
    ok = np.zeros(len(paths), bool)
    for i, path in enumerate(paths):
        if lean.lossless([path]):
            ok[i] = lean.load(path, size, images[i]) is not None
        else:
            ok[i] = _tf_decode(path, size, images[i])
    return {"k": batch["k"], "ok": ok, "image": images}


def _tf_decode(path: str, size: int, out: np.ndarray) -> bool:
    """A lossy file through TensorFlow's decoder, as the local engine reads it (another decoder gives
    other pixels)."""
    import tensorflow as tf

    try:
        out[...] = _loader(size)(tf.constant(path)).numpy()
    except tf.errors.OpError:  # unreadable or not an image: flagged, as the local engine skips it
        return False
    return True


class Embed:
    """One model replica per actor; returns each readable image's outputs (embedding, taps...)."""

    def __init__(self, config: dict, weights: list, threads: int, size: int, onnx=None):
        """An ONNX Runtime session (``onnx``: the converted model's bytes), as the local engine's
        ``--runtime onnx`` runs it, without TensorFlow; or the Keras model from its config and weights."""
        import ray

        self.size = size
        if onnx is not None:
            self._onnx(ray.get(onnx) if isinstance(onnx, ray.ObjectRef) else onnx, threads)
            return
        import keras
        import tensorflow as tf

        from pipeline.backbones import layers as _registered  # noqa: F401  (Preprocess deserialises)
        from pipeline.backbones import taps

        taps.pool_class()  # registers AdaptivePool before the config is read

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(2)
        self.model = keras.Model.from_config(config)
        self.model.set_weights(ray.get(weights) if isinstance(weights, ray.ObjectRef) else weights)
        self.forward = tf.function(  # one trace, whatever the batch's length
            lambda x: self.model(x, training=False), input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)]
        )
        self.widths = [int(o.shape[-1]) for o in self.model.outputs]

    def _onnx(self, data: bytes, threads: int) -> None:
        from pipeline.extract import runtimes

        session = runtimes.onnx_session(data, threads or 0)
        self.widths = [int(o.shape[-1]) for o in session.get_outputs()]
        self.forward = runtimes.onnx_run(session)

    def __call__(self, batch: dict) -> dict:
        if "image" not in batch:  # no decode stage: this actor decodes its own batch
            batch = decode(batch, self.size)
        ok = batch["ok"]
        out = {"k": batch["k"], "ok": ok}
        images = batch["image"][ok]
        outs = self.forward(images) if len(images) else None
        outs = outs if isinstance(outs, list | tuple) else [outs]
        for j, width in enumerate(self.widths):
            full = np.zeros((len(ok), width), np.float32)
            if len(images):
                full[ok] = np.asarray(outs[j], dtype=np.float32)
            out[f"out{j}"] = full
        return out


def batches(paths: list[str], size: int, settings, model, onnx: Path | None = None) -> Iterator[Batch]:
    """The items of ``paths`` through a pool of model actors, yielded as contiguous runs of positions (Ray
    Data does not keep order: a reorder buffer holds what arrives early). ``settings``: the extract
    section (batch size, actors, decoders). ``onnx``: the converted model, which the actors run in ONNX
    Runtime (its bytes travel through the object store); ``model``, the Keras one, is used only without it."""
    if not paths:
        return
    ray = _init_ray()
    plan = plan_pool([n["Resources"] for n in ray.nodes() if n.get("Alive")], settings)
    pipe = _pipeline(ray, paths, size, settings.batch_size, plan, model, onnx)
    pending: dict[int, tuple[bool, list[np.ndarray]]] = {}
    nxt = 0
    began = time.perf_counter()
    first = None
    for batch in pipe.iter_batches(batch_size=None, batch_format="numpy"):
        if first is None:
            first = time.perf_counter() - began
            log.info(FIRST_ROWS, first)
        n_out = sum(1 for key in batch if key.startswith("out"))
        for r, k in enumerate(batch["k"]):
            pending[int(k)] = (bool(batch["ok"][r]), [batch[f"out{j}"][r] for j in range(n_out)])
        start = nxt
        while nxt in pending:
            nxt += 1
        if nxt == start:
            continue
        good = [k for k in range(start, nxt) if pending[k][0]]
        outs = [np.stack([pending[k][1][j] for k in good]) if good else None for j in range(n_out)]
        for k in range(start, nxt):
            del pending[k]
        yield Batch(np.asarray(good, dtype=np.int64), outs, nxt)
    rest = time.perf_counter() - began - (first or 0.0)
    log.info("ray: %.1f img/s after the first rows", (len(paths) - settings.batch_size) / max(rest, 1e-9))


def _pipeline(ray, paths: list[str], size: int, bs: int, plan: Pool, model, onnx: Path | None):
    """The Ray Data pipeline: items -> [decode tasks] -> the ``Embed`` actor pool."""
    # one block per batch, and each stage takes whole blocks: a batch_size that cut across blocks left
    # small remainder batches beside the full ones
    items = ray.data.from_items(
        [{"k": k, "path": p} for k, p in enumerate(paths)], override_num_blocks=-(-len(paths) // bs)
    )
    converted = ray.put(Path(onnx).read_bytes()) if onnx is not None else None
    config, weights = (None, None) if onnx is not None else (model.get_config(), ray.put(model.get_weights()))
    pipe = items
    if plan.decoders:
        pipe = pipe.map_batches(
            decode,
            fn_kwargs={"size": size},
            batch_size=None,
            batch_format="numpy",
            num_cpus=0.5,
            compute=ray.data.TaskPoolStrategy(size=plan.decoders),
        )
    log.info(
        "ray engine: %d items, %d actor(s)%s, %s, batch %d",
        len(paths),
        plan.actors,
        " on GPUs" if plan.gpus else f" of {plan.actor_cpus:g} CPU(s)",
        f"{plan.decoders} decode task(s)" if plan.decoders else "decoding in the actors",
        bs,
    )
    return pipe.map_batches(
        Embed,
        fn_constructor_args=(config, weights, plan.threads, size, converted),
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=1 if plan.gpus else 0,
        num_cpus=plan.actor_cpus,
    )
