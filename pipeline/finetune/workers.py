"""`finetune --engine ray --workers N`: the fine-tune data-parallel across machines, with TensorFlow's own
``MultiWorkerMirroredStrategy`` (its collectives exchange the gradients), the workers started and placed
by Ray.

Ray Train's ``TensorflowTrainer`` needs ``ray.train.v2``'s extra dependencies and ray-project/ray#47464
reports its stock TensorFlow example failing, so the workers are plain Ray actors that each write
``TF_CONFIG`` (the cluster's addresses, their index) before TensorFlow starts, exactly what the trainer
would do. Every worker runs the same two phases on its own shard of the images (it decodes only those) in
its own work folder, and every step the chief runs after them (a read of a variable the strategy reduces
is a collective op that needs every worker); worker 0, the chief, alone writes the model, the
predictions, the record and the results rows. ``--resume`` continues from the chief's checkpoint: the
other workers start from a copy of its work folder, so all of them take up the same epoch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

log = logging.getLogger(__name__)

BATCH_NOTE = (
    "fine-tune on %d Ray workers: global batch %d (--batch-size %d per worker); the same training as one device "
    "at --batch-size %d; a larger global batch has fewer updates an epoch, so give its learning-rate search a "
    "longer --search-epochs"
)


def worker_dir(work: Path, index: int) -> Path:
    """Worker ``index``'s work folder: the chief's is the single-device one, so a local run can resume it."""
    return work if index == 0 else work.with_name(f"{work.name}-worker{index}")


def prepare_folders(work: Path, workers: int, resume: bool) -> None:
    """Before any worker starts: on ``resume`` every other worker's folder becomes a copy of the chief's
    (its decoded-image spill files excepted: each worker decodes its own shard), else they are removed."""
    for index in range(1, workers):
        mine = worker_dir(work, index)
        shutil.rmtree(mine, ignore_errors=True)
        if resume and work.exists():
            shutil.copytree(work, mine, ignore=shutil.ignore_patterns("*.decoded.npy"))


def patch_keras(model, example) -> None:
    """Keras 3.15 cannot ``fit`` under ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585,
    tensorflow/tensorflow#72388): its symbolic build all-reduces a whole nested batch, which the collective
    strategy refuses, and it averages each step's scalar logs along an axis they do not have. Two narrow
    fixes, only in a worker's process: the model is built from ``example``, one batch of this worker's own
    data, and scalars are averaged across the workers as scalars. The epoch's metrics (what early stopping
    and the schedule read) come from the metric variables, which the strategy sums over every worker."""
    import types

    from keras.src.backend.tensorflow import trainer

    def symbolic_build(self, iterator=None, data_batch=None):
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=example)

    model._maybe_symbolic_build = types.MethodType(symbolic_build, model)
    if getattr(trainer.reduce_per_replica, "_multi_worker_fix", False):
        return
    original = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return trainer.tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None) if trainer._is_per_replica_instance(v) else v, values
            )
        return original(values, strategy, reduction)

    reduce_per_replica._multi_worker_fix = True
    trainer.reduce_per_replica = reduce_per_replica


def tf_config(addresses: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def _free_address() -> str:
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"{ray.util.get_node_ip_address()}:{port}"


def _connect():
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(address=address or None, include_dashboard=False, logging_level="ERROR")
        log.info("ray: %s", "joined " + address if address else f"local cluster, {ray.cluster_resources()}")
    return ray


def run(cfg, work: Path, entry, *args):
    """``entry(*args, strategy, index, workers)`` (``train.run_as_worker``) on ``cfg.finetune.workers`` Ray
    workers; returns the chief's result. Passed in, so this module needs nothing of the training code."""
    from pipeline.extract.engines import check

    check("ray")
    ray = _connect()
    n = cfg.finetune.workers
    resources = ray.cluster_resources()
    cpus = max(1.0, float(resources.get("CPU", n) // n))
    gpus = 1 if resources.get("GPU", 0) >= n else 0
    batch = cfg.finetune.batch_size
    log.info(BATCH_NOTE, n, batch * n, batch, batch * n)
    prepare_folders(work, n, cfg.finetune.resume)
    quiet = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}  # set before TensorFlow loads
    actor = ray.remote(num_cpus=cpus, num_gpus=gpus, runtime_env={"env_vars": quiet})(_Worker)
    actors = [actor.remote() for _ in range(n)]
    addresses = _distinct_addresses(ray, actors)
    log.info(
        "fine-tune on %d Ray workers, %g CPU%s each: %s", n, cpus, " + 1 GPU" if gpus else "", ", ".join(addresses)
    )
    try:
        ray.get([a.join.remote(addresses, i, int(cpus)) for i, a in enumerate(actors)])
        results = ray.get([a.train.remote(entry, *args) for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
    for index in range(1, n):
        shutil.rmtree(worker_dir(work, index), ignore_errors=True)
    return results[0]


def _distinct_addresses(ray, actors) -> list[str]:
    """One free port per worker, asked for one worker at a time: two workers on one node that each find a
    free port at the same moment can be handed the same one, and the second gRPC server could not start."""
    addresses: list[str] = []
    for actor in actors:
        address = ray.get(actor.address.remote())
        while address in addresses:
            address = ray.get(actor.address.remote())
        addresses.append(address)
    return addresses


class _Worker:
    """A Ray actor: one process, one worker of the strategy. ``join`` runs before ``train`` receives the
    training code, so ``TF_CONFIG`` is set and the strategy made before TensorFlow does anything else."""

    def address(self) -> str:
        return _free_address()

    def join(self, addresses: list[str], index: int, cpus: int) -> None:
        """Only the chief talks: the others' Keras progress lines would repeat its own. TensorFlow's op
        threads are the CPUs Ray gave this worker (its default is every core of the machine, which workers
        sharing a machine would oversubscribe: a descheduled worker holds up every collective step)."""
        import sys

        os.environ["TF_CONFIG"] = tf_config(addresses, index)
        logging.basicConfig(level=logging.INFO if index == 0 else logging.WARNING, format="%(message)s", force=True)
        if index:
            sys.stdout = open(os.devnull, "w")  # for the life of this worker process
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # the collectives' per-step INFO lines and retracing notices, twice over
        tf.config.threading.set_intra_op_parallelism_threads(cpus)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, cpus))  # a waiting collective holds one
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy()
        self.index, self.workers = index, len(addresses)

    def train(self, entry, *args):
        return entry(*args, self.strategy, self.index, self.workers)
