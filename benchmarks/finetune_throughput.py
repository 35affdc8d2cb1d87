"""The fine-tune's input pipeline against the model's own speed: training img/s of one epoch through the
pipeline's decoded-once batches ÷ the same model's step rate on images already in memory, side by side in
one run (goal >= 0.90), and what each lever buys (batch size, steps_per_execution, decoding every epoch,
tf.data's autotuning, whose model thread stalled the end of some epochs ~10 s on the 2-core machine).

The model is the pipeline's own (augmentation, preprocessing, backbone, dropout, head) in phase 2, every
layer trainable; the images are the first ``--images`` training images of the dataset. Each variant trains
one epoch per repeat after a warm-up epoch (tracing); medians of ``--repeats``.
Usage: python benchmarks/finetune_throughput.py [--dataset fashion-mnist] [--images 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write  # noqa: E402


def _model(cfg, n_classes: int):  # the pipeline's own fine-tune model, phase 2
    import keras

    from pipeline import backbones
    from pipeline.finetune import build_model, set_trainable
    from pipeline.finetune.model import optimizer_named

    spec = backbones.from_config(cfg.backbone)
    size = cfg.backbone.input_size or spec.input_size
    weights = backbones.resolve_weights(spec, cfg.backbone.weights, Path(cfg.artifacts), size)
    base = backbones.build_backbone(spec, weights, size, 0)
    keras.utils.set_random_seed(0)
    model = build_model(base, spec, n_classes, cfg.finetune.augment, 0, cfg.finetune.dropout)
    set_trainable(base, 2, -1)
    return (
        model,
        size,
        lambda steps: model.compile(
            optimizer_named("adam", 1e-4), "sparse_categorical_crossentropy", steps_per_execution=steps
        ),
    )


def _epoch_rate(model, data, n: int) -> float:
    t0 = time.perf_counter()
    model.fit(data, epochs=1, verbose=0)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--config", default="benchmarks/fashion_mnist_112.toml")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import tensorflow as tf

    from pipeline.config import Config, resolve_config
    from pipeline.data import from_config, image_dataset, steady
    from pipeline.finetune import inputs

    cfg: Config = resolve_config(argparse.Namespace(config=args.config, artifacts=args.artifacts))
    cfg.data.dataset = args.dataset
    ds = from_config(cfg)
    n = min(args.images, len(ds.splits["train"]))
    paths, labels = ds.paths("train")[:n], ds.splits["train"].labels[:n]
    model, size, compile_ = _model(cfg, len(ds.class_names))
    with tempfile.TemporaryDirectory() as tmp:
        dec = inputs.decode(paths, labels, size, 2**40, Path(tmp) / "x.npy")
    memory = tf.constant(dec.images), tf.constant(dec.labels)

    def in_memory(batch):
        return steady(tf.data.Dataset.from_tensor_slices(memory).batch(batch).prefetch(2))

    variants = {  # one compile for these: a new compile retraces, and tracing is not training
        "in memory (reference), batch 32": lambda: in_memory(32),
        "pipeline: decoded once, batch 32": lambda: inputs.batches(dec, 32, shuffle_seed=0),
        "pipeline, tf.data autotuning (before)": lambda: inputs.batches(dec, 32, shuffle_seed=0, autotune=True),
        "pipeline: decoding every epoch, batch 32": lambda: image_dataset(paths, size, 32, labels, shuffle_seed=0),
        "in memory, batch 64": lambda: in_memory(64),
        "pipeline, batch 64": lambda: inputs.batches(dec, 64, shuffle_seed=0),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    compile_(1)
    for rep in range(args.repeats + 1):  # the first round traces every input shape: not counted
        for name, make in variants.items():
            rate = _epoch_rate(model, make(), n)
            if rep:
                rates[name].append(rate)
    spe = "pipeline, steps_per_execution 8"
    compile_(8)
    _epoch_rate(model, inputs.batches(dec, 32, shuffle_seed=0), n)  # traces
    rates[spe] = [_epoch_rate(model, inputs.batches(dec, 32, shuffle_seed=0), n) for _ in range(args.repeats)]
    med = {k: statistics.median(v) for k, v in rates.items()}
    ref = med["in memory (reference), batch 32"]
    where = machine()
    print(
        f"fine-tune training img/s, {n} images at {size} px, every layer trainable; {where['cpu']}, "
        f"{where['cores']} cores; min / median / max of {args.repeats}"
    )
    for name, v in rates.items():
        print(f"  {name:42s} {min(v):6.1f} {med[name]:6.1f} {max(v):6.1f}   ÷ in memory {med[name] / ref:.3f}")
    ratio = med["pipeline: decoded once, batch 32"] / ref
    print(f"pipeline epoch rate ÷ in-memory step rate = {ratio:.3f} (goal >= 0.90)")
    out = write(
        "finetune_throughput",
        {"images": n, "input_size": size, "rates": rates, "medians": med, "pipeline_over_memory": ratio},
        args.artifacts,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
