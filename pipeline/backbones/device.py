"""Where and in what precision a backbone runs: a GPU when TensorFlow sees one (mixed float16 there unless
turned off), float32 on the CPU. The precision is part of every cache and fine-tune key."""

from __future__ import annotations

import contextlib


def gpu_visible() -> bool:
    """Whether TensorFlow sees a GPU. With only the CPU wheel installed the answer needs no TensorFlow
    import, so a cache hit stays fast."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("tensorflow")  # the GPU-capable wheel; `tensorflow-cpu` is its own distribution
    except PackageNotFoundError:
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def compute_precision(mixed_precision: bool = True) -> str:
    """What the forward pass computes in, and where: ``float32 (CPU)``, ``mixed_float16 (GPU)`` or
    ``float32 (GPU)``. Part of every cache and fine-tune key: a GPU's float16 (or TF32) features are
    not a CPU's float32 features, and must never be reused as if they were."""
    gpu = gpu_visible()
    return f"{'mixed_float16' if gpu and mixed_precision else 'float32'} ({'GPU' if gpu else 'CPU'})"


@contextlib.contextmanager
def device_policy(mixed_precision: bool = True):
    """Yields whether a GPU is visible; models built inside use float16 compute there
    (Keras mixed precision) and float32 on CPU. The global policy is restored after."""
    import keras
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    previous = keras.mixed_precision.global_policy().name
    if gpu and mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield gpu
    finally:
        keras.mixed_precision.set_global_policy(previous)


def strategy(devices: str = "auto"):
    """(``tf.distribute`` strategy, replicas, what it is): ``MirroredStrategy`` over every GPU when there are
    several (``auto``) or over every visible device, CPU devices included (``all``); otherwise the default
    one-device strategy, today's path. Keras distributes ``fit``'s input by the strategy in scope."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    names = [d.name for d in gpus] if gpus else [d.name for d in tf.config.list_logical_devices("CPU")]
    if devices == "one" or len(names) < 2 or (devices == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy(), 1, "one device"
    mirrored = tf.distribute.MirroredStrategy(names)
    kind = "GPUs" if gpus else "CPU devices"
    return mirrored, mirrored.num_replicas_in_sync, f"MirroredStrategy over {len(names)} {kind}"
