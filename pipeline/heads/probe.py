"""`linear_probe`: multinomial logistic regression trained with Keras on minibatches streamed from the cache.

For caches that do not fit in memory. Rows are read from the HDF5 file in
units of whole storage chunks; each epoch visits the units in a new random
order, pools a few of them and shuffles their rows, so memory is bounded by
``pool x unit x width`` floats, never by the cache. Standardisation statistics
come from one streaming pass over train. Every weight decay of the grid is its
own softmax layer on the same minibatches (one read of the data serves the
whole grid) under a cosine-decayed step; each keeps its best epoch by validation
accuracy, training stops when none has improved for ``patience`` epochs, and the
best on val is kept.
Several GPUs: the model is built under ``tf.distribute.MirroredStrategy``.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data import steady
from pipeline.errors import PipelineError
from pipeline.extract.cache.stream import CacheStream

log = logging.getLogger(__name__)


@dataclass
class ProbeResult:
    decay: float
    val_accuracy: float
    epochs: int
    val_per_decay: dict = field(default_factory=dict)
    seconds: float = 0.0
    model: object = None


def _strategy():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def _build(width: int, n_classes: int, mean, var, decays: list[float], lr_schedule):
    import keras

    inp = keras.Input((width,), name="features")
    z = keras.layers.Normalization(mean=mean, variance=var, name="standardise")(inp)
    outs = [
        keras.layers.Dense(
            n_classes, activation="softmax", kernel_regularizer=keras.regularizers.L2(d), name=f"decay_{i}"
        )(z)
        for i, d in enumerate(decays)
    ]
    model = keras.Model(inp, outs)
    model.compile(
        keras.optimizers.Adam(lr_schedule),
        loss=["sparse_categorical_crossentropy"] * len(decays),
        metrics=[["accuracy"]] * len(decays),
    )
    return model


def _dataset(stream: CacheStream, batch_size: int, heads: int, seed: int | None):
    import tensorflow as tf

    epoch = [0]

    def gen():
        rng = None if seed is None else np.random.default_rng([seed, epoch[0]])
        epoch[0] += 1
        for x, y in stream.batches(batch_size, rng):
            yield x, tuple([y] * heads)

    sig = (
        tf.TensorSpec((None, stream.width), tf.float32),
        tuple(tf.TensorSpec((None,), tf.int64) for _ in range(heads)),
    )
    return steady(tf.data.Dataset.from_generator(gen, output_signature=sig).prefetch(2))


def fit_probe(
    path: Path,
    layers: list[str],
    decays: list[float],
    n_classes: int,
    batch_size: int = 512,
    max_epochs: int = 30,
    patience: int = 3,
    learning_rate: float = 0.01,
    seed: int = 0,
    desc: str | None = None,
) -> tuple[ProbeResult, dict[str, CacheStream]]:
    """Train every decay at once on the streamed train split; keep each one's best epoch by val accuracy."""
    import keras

    from pipeline.estimators.tuning import progress_bar

    t0 = time.perf_counter()
    streams = {s: CacheStream(path, s, layers) for s in ("train", "val", "test")}
    train, val = streams["train"], streams["val"]
    if not val.n:
        raise PipelineError("linear_probe is tuned and stopped on the validation split; this dataset has none")
    mean, var = train.stats()
    var[var == 0] = 1.0
    # each block standardised and scaled to the final embedding's worth of variance, as the in-memory heads do
    ref = train.embedding_width
    factor = np.concatenate([np.full(w, np.sqrt(ref / w)) for w in train.widths]) if len(layers) > 1 else 1.0
    var = var / factor**2
    keras.utils.set_random_seed(seed)
    batch_size = int(max(16, min(batch_size, train.n // 8)))  # small sets still get several steps an epoch
    steps = max(1, -(-train.n // batch_size))
    with _strategy().scope():
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max_epochs * steps)
        model = _build(train.width, n_classes, mean, var, decays, schedule)
    best_acc = np.full(len(decays), -1.0)
    best_w: list = [None] * len(decays)
    best_epoch = np.zeros(len(decays), dtype=int)
    stale = 0
    data = _dataset(train, batch_size, len(decays), seed)
    with progress_bar(max_epochs, desc, unit="epoch") as bar:
        for epoch in range(max_epochs):
            with warnings.catch_warnings():  # a generator's length is unknown to Keras until it ends
                warnings.filterwarnings("ignore", message="Your input ran out of data")
                model.fit(data, epochs=1, verbose=0, shuffle=False)
            acc = _accuracy(model, val, batch_size * 8)
            better = acc > best_acc
            for i in np.flatnonzero(better):
                best_acc[i], best_epoch[i] = acc[i], epoch + 1
                best_w[i] = model.get_layer(f"decay_{i}").get_weights()
            stale = 0 if better.any() else stale + 1
            bar.set_postfix(best_val=f"{best_acc.max():.4f}")
            bar.update()
            if stale >= patience:
                break
    j = int(np.argmax(best_acc))
    inp = keras.Input((train.width,), name="features")
    z = model.get_layer("standardise")(inp)
    head = keras.layers.Dense(n_classes, activation="softmax", name="softmax")
    final = keras.Model(inp, head(z))
    head.set_weights(best_w[j])
    res = ProbeResult(
        float(decays[j]),
        float(best_acc[j]),
        int(best_epoch[j]),
        {f"{d:g}": float(a) for d, a in zip(decays, best_acc, strict=True)},
        time.perf_counter() - t0,
        final,
    )
    return res, streams


def _accuracy(model, stream: CacheStream, batch: int) -> np.ndarray:
    """Accuracy of every output of ``model`` on a streamed split."""
    hits, n = None, 0
    for x, y in stream.batches(batch):
        outs = model(x, training=False)
        outs = outs if isinstance(outs, list | tuple) else [outs]
        h = np.array([np.sum(np.argmax(np.asarray(o), axis=1) == y) for o in outs], dtype=float)
        hits = h if hits is None else hits + h
        n += len(y)
    return hits / max(n, 1)


def predict(model, stream: CacheStream, batch: int = 4096) -> np.ndarray:
    return np.concatenate([np.argmax(np.asarray(model(x, training=False)), axis=1) for x, _ in stream.batches(batch)])
